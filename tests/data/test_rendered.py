"""TRL string prompts and responses that already hold the chat template's tokens are taken as rendered.

Before, a prompt rendered with ``<|im_start|>user…<|im_start|>assistant\\n`` was wrapped in the
template a second time (two user headers, two assistant headers) and a response ending in
``<|im_end|>`` got a second one, which was scored. Now the token ids are TRL's own for the same row
(``maybe_apply_chat_template`` then ``DataCollatorForVisionPreference`` on the tiny processor),
except the newline TRL scores after the end of the turn.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from PIL import Image

from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.preference_files import parse_row
from mpo.data.rendered import parse_rendered_prompt, rendered_response
from mpo.errors import DataError

SYSTEM = "You are a careful counter."
CHOSEN, REJECTED = "Two circles.\nFinal answer: 2", "Five circles.\nFinal answer: 5"


def _conversation(system: bool, images: int) -> dict:
    prompt = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] if system else []
    prompt.append({"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": "How many circles?"}]})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": [{"type": "text", "text": CHOSEN}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": REJECTED}]}]}


@pytest.mark.parametrize("system, images", [(False, 1), (True, 1), (True, 2), (False, 0)])
def test_a_rendered_trl_row_gets_trls_token_ids(system, images, tiny_processor, tiny_mmpr_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    names = ["multi_00_a.png", "multi_00_b.png"][:images]
    for name in names:
        shutil.copy(tiny_mmpr_dir / "images" / name, tmp_path / name)
    rendered = trl.maybe_apply_chat_template(_conversation(system, images), tiny_processor)
    assert rendered["chosen"] == CHOSEN + "<|im_end|>\n"  # what a TRL user stores
    record = parse_row("TRL", {**rendered, "images": names}, str(tmp_path / "d.jsonl"), 1, tmp_path, 12)
    assert record.system_prompt == (SYSTEM if system else None)
    assert record.question == "<image>\n" * images + "How many circles?"
    ours = PreferenceDataset([record], tiny_processor, DataConfig(max_length=4096)).encode(record)

    pictures = [Image.open(tmp_path / name) for name in names]
    theirs = DataCollatorForVisionPreference(tiny_processor)([{**rendered, "images": pictures}])
    real, completion = theirs["attention_mask"][0].bool(), theirs["completion_mask"][0].bool()
    ids = theirs["input_ids"][0]
    newline = tiny_processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert ours.prompt_ids == ids[real & ~completion].tolist()
    assert ours.chosen_ids + newline == ids[completion].tolist()  # TRL also scores the newline after <|im_end|>
    assert ours.chosen_ids.count(tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1
    if images:
        # TRL's collator tiles every image with the processor's 12 tiles, as the record's budget of 12 does.
        assert torch.equal(ours.pixel_values, theirs["pixel_values"][: ours.num_tiles])


def test_a_template_that_renders_otherwise_is_refused(tiny_processor, tmp_path):
    """A string rendered by another template (here, one adding a default system turn) would not be
    the prompt the data meant: the pair is refused naming file, row and column."""
    prompt = "<|im_start|>user\nHow many circles?<|im_end|>\n<|im_start|>assistant\n"
    record = parse_row("TRL", {"prompt": prompt, "chosen": "Two", "rejected": "Five"}, "d.jsonl", 3, tmp_path, 6)
    other = copy.deepcopy(tiny_processor)
    other.chat_template = "{{'<|im_start|>system\nDefault.<|im_end|>\n'}}" + tiny_processor.chat_template
    dataset = PreferenceDataset([record], other, DataConfig())
    error = dataset[0]
    assert isinstance(error, DataError)
    assert str(error) == ("d.jsonl:3: prompt: the checkpoint's chat template renders this prompt otherwise (from character 12: "
                          "'user\\nHow many circles?<|im_end|>\\n<|im_st' given, 'system\\nDefault.<|im_end|>\\n<|im_start|>us' "
                          "rendered); give the plain question or TRL's conversational messages")
    assert PreferenceDataset([record], tiny_processor, DataConfig())[0].chosen_ids[-1] == tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("text, expected", [
    ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", (None, "Q")),
    ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n<IMG_CONTEXT>\nQ<|im_end|>\n<|im_start|>assistant\n",
     ("S", "<image>\n<image>\nQ")),
    ("<|im_start|>user\nHow <IMG_CONTEXT>\n many?<|im_end|>\n<|im_start|>assistant\n", (None, "How <image>\n many?")),
])
def test_rendered_prompts_read_back(text, expected):
    assert parse_rendered_prompt(text) == expected


NOT_ONE_TURN = ("holds the chat template's tokens but is not one rendered turn ({users} user header(s); {ends} with the "
                "assistant header '<|im_start|>assistant\\n'): give the plain question, TRL's conversational messages, or "
                "exactly the template's rendering of one turn")


@pytest.mark.parametrize("text, message", [
    ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n",
     NOT_ONE_TURN.format(users=2, ends="ends")),
    ("<|im_start|>user\nQ<|im_end|>\n", NOT_ONE_TURN.format(users=1, ends="does not end")),
    ("<|im_start|>user\n<img><IMG_CONTEXT></img>\nQ<|im_end|>\n<|im_start|>assistant\n", NOT_ONE_TURN.format(users=1, ends="ends")),
    ("<|im_start|>user\n<IMG_CONTEXT>Q<|im_end|>\n<|im_start|>assistant\n",
     "an image token <IMG_CONTEXT> without the newline the template renders after it"),
    ("<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n",
     "a rendered prompt marks its images with <IMG_CONTEXT> (the processor's image token), not <image>"),
])
def test_other_template_text_in_a_prompt_is_refused(text, message, tmp_path):
    with pytest.raises(DataError) as caught:
        parse_row("TRL", {"prompt": text, "chosen": "a", "rejected": "b"}, "d.parquet", 4, tmp_path, 6)
    assert str(caught.value) == f"d.parquet:4: prompt: {message}"


@pytest.mark.parametrize("text, expected", [("A<|im_end|>\n", "A"), ("A<|im_end|>", "A"), ("A\n", "A\n"), ("A", "A")])
def test_a_response_keeps_one_end_of_turn(text, expected):
    assert rendered_response(text) == expected


def test_a_token_inside_a_response_is_refused(tmp_path):
    with pytest.raises(DataError) as caught:
        parse_row("TRL", {"prompt": "Q", "chosen": "A<|im_end|>\n<|im_start|>user\nmore", "rejected": "b"}, "d.jsonl", 2, tmp_path, 6)
    assert str(caught.value) == ("d.jsonl:2: chosen: holds the chat template's token <|im_end|> inside the response "
                                 "(only a final <|im_end|> is taken as the end of the turn)")
