"""One prompt everywhere: every path that turns a question into tokens gives the same token ids.

Each record kind (text-only, one image, several images, ``<image>`` mid-text, video frames, an
assistant prefix) is rendered by hand into the text the checkpoint's chat template must produce,
and every path must tokenize to exactly that: the trainer (:class:`mpo.data.PreferenceDataset`), the
transformers backend (what ``mpo-data sample`` / ``dropout-ntp`` feed the model), ``mpo-data serve``
behind the openai backend's own request body, and that request body rendered by the checkpoint's
template the way an OpenAI-compatible server renders it (``tests/pipeline/test_vllm.py`` checks the same
bodies against a real vLLM server).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.backends import GenerationRequest, SamplingParams, TransformersBackend
from data_pipeline.dropout_ntp import continuation_request
from data_pipeline.openai_client import OpenAIBackend
from data_pipeline.records import SampleRecord
from data_pipeline.server import ChatServer
from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE, resolve_system_prompt, user_parts
from loopback import serving
from prompt_cases import HEAD, KINDS, PREFIX, SYSTEM, TAIL, expected_ids, image_run, trainer_ids, write_images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("prompting_images"))


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend(tiny_model_dir)


@pytest.fixture(scope="module")
def served(backend: TransformersBackend) -> Iterator[str]:
    """``mpo-data serve``'s server on an ephemeral loopback port, in a thread of this process."""
    with serving(ChatServer(backend, "tiny", "127.0.0.1", 0, max_tokens=4, max_tiles=6)) as url:
        yield url


def served_ids(url: str, body: dict) -> list[int]:
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps({**body, "return_token_ids": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["prompt_token_ids"]


def template_ids(tiny_processor, body: dict, images: list[Image.Image]) -> list[int]:
    """The request body as an OpenAI-compatible server renders it with the checkpoint's template:
    image_url parts become image parts, and the tile budget is the request's max_patches."""
    messages = [
        {**m, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
        if isinstance(m["content"], list) else m
        for m in body["messages"]
    ]
    continuing = bool(body.get("continue_final_message"))
    text = tiny_processor.apply_chat_template(messages, tokenize=False, continue_final_message=continuing,
                                         add_generation_prompt=body.get("add_generation_prompt", True))
    kwargs = {"images": images, **body["mm_processor_kwargs"]} if images else {}
    return tiny_processor(text=text, return_tensors="pt", **kwargs)["input_ids"][0].tolist()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_path_gives_the_same_token_ids(kind, tiny_processor, images, backend, served):
    question, files, max_tiles, rendered = KINDS[kind]
    want = expected_ids(tiny_processor, rendered)
    pictures = tuple(Image.open(images / f).convert("RGB") for f in files)
    request = GenerationRequest(question, pictures, tuple(images / f for f in files), SYSTEM, num_samples=2, seed=1)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, max_tiles=max_tiles)
    body = OpenAIBackend(served, timeout=60, retries=0).payload(request, params, n=1, seed=1)

    assert trainer_ids(tiny_processor, images, question, files, max_tiles) == want
    assert backend.encode(request, max_tiles)["input_ids"][0].tolist() == want
    assert served_ids(served, body) == want
    assert template_ids(tiny_processor, body, list(pictures)) == want


def test_assistant_prefix_paths_agree(tiny_processor, backend, served):
    """Dropout-NTP's request (text-only prompt, the prefix continued) on every generation path,
    and equal to the trainer's text-only prompt followed by the prefix's tokens."""
    record = SampleRecord(id="d", dataset="d", line=1, image=["a.png"], question="Describe it.", prompt="<image>\nDescribe it.",
                          system_prompt=SYSTEM, answer=None, answer_format="final_answer", responses=["x"], finish_reasons=["stop"])
    request = continuation_request(record, PREFIX, seed=0)
    want = expected_ids(tiny_processor, HEAD + "Describe it." + TAIL + PREFIX)
    body = OpenAIBackend(served, timeout=60, retries=0).payload(request, SamplingParams(max_new_tokens=4), n=1, seed=0)
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert backend.encode(request, 6)["input_ids"][0].tolist() == want
    assert served_ids(served, body) == want
    assert template_ids(tiny_processor, body, []) == want
    trainer_prompt = expected_ids(tiny_processor, HEAD + "Describe it." + TAIL)
    assert trainer_prompt + tiny_processor.tokenizer(PREFIX, add_special_tokens=False)["input_ids"] == want


def test_video_record_renders_frames_after_the_system_turn(tiny_processor, tiny_mmpr_dir):
    """The trainer's video path: ``<video>\\n`` becomes the template's video part, which the
    processor expands into one ``FrameK: <img>…</img>`` line per sampled frame."""
    config = DataConfig(meta_path=str(tiny_mmpr_dir / "meta.json"), video_frames=4)
    record = next(r for r in load_records(config, seed=0) if r.video)
    question = record.question.removeprefix("<video>\n")
    frames = "\n".join(f"Frame{i + 1}: {image_run(1)}" for i in range(4))
    want = expected_ids(tiny_processor, HEAD + frames + "\n" + question + TAIL)
    assert PreferenceDataset([record], tiny_processor, config).encode(record).prompt_ids == want


@pytest.mark.parametrize(
    ("question", "parts"),
    [
        ("<image>\nQ", [{"type": "image"}, {"type": "text", "text": "Q"}]),
        ("<image>\n\nQ", [{"type": "image"}, {"type": "text", "text": "\nQ"}]),  # only one newline is the template's
        ("How <image> many?", [{"type": "text", "text": "How "}, {"type": "image"}, {"type": "text", "text": " many?"}]),
        ("<image>\n<image>\n", [{"type": "image"}, {"type": "image"}]),
        ("<video>\nQ", [{"type": "video"}, {"type": "text", "text": "Q"}]),
        ("No image.", [{"type": "text", "text": "No image."}]),
    ],
)
def test_user_parts(question, parts):
    assert user_parts(question) == parts


def test_system_prompt_settings():
    assert resolve_system_prompt("auto") == INTERNVL_SYSTEM_MESSAGE
    assert resolve_system_prompt("none") is None
    assert resolve_system_prompt("You are terse.") == "You are terse."


def test_meta_json_system_prompt_reaches_the_trainer(tmp_path, tiny_processor):
    """Per subset: what meta.json records (a text, or null for none), ``auto`` where it records
    nothing (MMPR-v1.2); a recipe value overrides it, with a note for each subset it changes."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"question": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    meta = {
        "recorded": {"root": ".", "annotation": "a.jsonl", "system_prompt": "Be brief."},
        "none": {"root": ".", "annotation": "a.jsonl", "system_prompt": None},
        "absent": {"root": ".", "annotation": "a.jsonl"},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    config = DataConfig(meta_path=str(tmp_path / "meta.json"))
    assert [r.system_prompt for r in load_records(config, seed=0)] == ["Be brief.", None, INTERNVL_SYSTEM_MESSAGE]
    encoded = PreferenceDataset(load_records(config, seed=0), tiny_processor, config)
    assert tiny_processor.tokenizer.decode(encoded[0].prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert tiny_processor.tokenizer.decode(encoded[1].prompt_ids).startswith("<|im_start|>user\nQ")

    notes: list[str] = []
    override = DataConfig(meta_path=str(tmp_path / "meta.json"), system_prompt="none")
    assert [r.system_prompt for r in load_records(override, seed=0, notes=notes)] == [None, None, None]
    assert [note.split(" for subset ")[1].split(" ")[0] for note in notes] == ["recorded", "absent"]
    bad = {"x": {"root": ".", "annotation": "a.jsonl", "system_prompt": 3}}
    (tmp_path / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match="x.system_prompt: must be a string or null"):
        load_records(config, seed=0)


def test_vision_tower_encodes_a_prompt_once_for_all_its_samples(backend, images):
    """4 samples of a 7-tile prompt: the vision tower sees 7 tiles, not 28, and greedy samples of
    one prompt are identical."""
    seen = []
    def count_tiles(module, args, kwargs, output):
        seen.append((args[0] if args else kwargs["pixel_values"]).shape[0])

    hook = backend.model.model.vision_tower.register_forward_hook(count_tiles, with_kwargs=True)
    try:
        picture = Image.open(images / "wide.png").convert("RGB")
        request = GenerationRequest("<image>\nHow many shapes?", (picture,), system_prompt=SYSTEM, num_samples=4)
        generation = backend.generate([request], SamplingParams(temperature=0.0, max_new_tokens=6, max_tiles=6))[0]
    finally:
        hook.remove()
    assert seen == [7]
    assert len(set(generation.texts)) == 1 and len(generation.texts) == 4
