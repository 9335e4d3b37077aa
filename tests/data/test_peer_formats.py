"""``data.dataset_path`` reads the preference data of TRL, ms-swift and LLaMA-Factory.

Rows are written by hand in each project's documented shape (ms-swift's RLHF/DPO dataset docs,
LLaMA-Factory's data/README and dataset_info for sharegpt ranking, TRL's vision preference
columns), images as paths beside the file, and stored the ways users store them: JSONL, a JSON
array, Parquet and a ``save_to_disk`` folder. Each must give the records written out below (the
question with its placeholders, both responses, the images, the system message).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from mpo.config import DataConfig
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE
from mpo.data.records import load_records
from mpo.errors import DataError

COUNTER = "You are a careful counter."
Q_CIRCLES = "How many circles are there in the image?"
Q_MORE = "Which image has more shapes?"

SWIFT_ROWS = [  # ms-swift's standard RLHF format: messages + rejected_response (+ images, <image> tags)
    {"messages": [{"role": "system", "content": COUNTER},
                  {"role": "user", "content": f"<image>{Q_CIRCLES}"},
                  {"role": "assistant", "content": "A red circle and a green one: 2.\nFinal answer: 2"}],
     "rejected_response": "Five circles.\nFinal answer: 5", "images": ["images/shapes_00.png"]},
    {"messages": [{"role": "user", "content": f"<image><image>{Q_MORE}"},
                  {"role": "assistant", "content": "The second image has more shapes."}],
     "rejected_response": "The first image has more shapes.", "images": ["images/multi_00_a.png", "images/multi_00_b.png"]},
    {"messages": [{"role": "user", "content": "Tell me tomorrow's weather"},
                  {"role": "assistant", "content": "Tomorrow's weather will be sunny"}],
     "rejected_response": "I don't know", "images": []},
]
LLAMAFACTORY_ROWS = [  # LLaMA-Factory sharegpt ranking: conversations (from/value), chosen/rejected messages, system, images
    {"conversations": [{"from": "human", "value": f"<image>{Q_CIRCLES}"}],
     "chosen": {"from": "gpt", "value": "A red circle and a green one: 2.\nFinal answer: 2"},
     "rejected": {"from": "gpt", "value": "Five circles.\nFinal answer: 5"},
     "system": COUNTER, "images": ["images/shapes_00.png"]},
    {"conversations": [{"from": "human", "value": f"<image><image>{Q_MORE}"}],
     "chosen": {"from": "gpt", "value": "The second image has more shapes."},
     "rejected": {"from": "gpt", "value": "The first image has more shapes."},
     "system": "", "images": ["images/multi_00_a.png", "images/multi_00_b.png"]},
    {"conversations": [{"from": "human", "value": "Tell me tomorrow's weather"}],
     "chosen": {"from": "gpt", "value": "Tomorrow's weather will be sunny"},
     "rejected": {"from": "gpt", "value": "I don't know"}, "system": "", "images": []},
]
TRL_ROWS = [  # TRL's vision preference columns, conversational, images as paths
    {"prompt": [{"role": "system", "content": [{"type": "text", "text": COUNTER}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q_CIRCLES}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red circle and a green one: 2.\nFinal answer: 2"}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Five circles.\nFinal answer: 5"}]}],
     "images": ["images/shapes_00.png"]},
    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": Q_MORE}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "The second image has more shapes."}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "The first image has more shapes."}]}],
     "images": ["images/multi_00_a.png", "images/multi_00_b.png"]},
    {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Tell me tomorrow's weather"}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Tomorrow's weather will be sunny"}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "I don't know"}]}],
     "images": []},
]
ROWS = {"ms-swift": SWIFT_ROWS, "LLaMA-Factory": LLAMAFACTORY_ROWS, "TRL": TRL_ROWS}

# (question, chosen, rejected, images, system) of the three rows, written out. An image part of a
# TRL prompt is "<image>\n"; ms-swift and LLaMA-Factory keep their tags as written.
EXPECTED = {
    "tags": [
        (f"<image>{Q_CIRCLES}", "A red circle and a green one: 2.\nFinal answer: 2", "Five circles.\nFinal answer: 5",
         ["shapes_00.png"], COUNTER),
        (f"<image><image>{Q_MORE}", "The second image has more shapes.", "The first image has more shapes.",
         ["multi_00_a.png", "multi_00_b.png"], INTERNVL_SYSTEM_MESSAGE),
        ("Tell me tomorrow's weather", "Tomorrow's weather will be sunny", "I don't know", [], INTERNVL_SYSTEM_MESSAGE),
    ],
}
EXPECTED["parts"] = [(q.replace("<image>", "<image>\n"), *rest) for q, *rest in EXPECTED["tags"]]


def _folder(tiny_mmpr_dir: Path, out: Path) -> Path:
    """A dataset folder with the example images under ``images/``."""
    shutil.copytree(tiny_mmpr_dir / "images", out / "images")
    return out


def _store(rows: list[dict], container: str, folder: Path) -> Path:
    """``rows`` stored as a user would: the path to give as ``data.dataset_path``."""
    if container == "jsonl":
        path = folder / "pairs.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif container == "json":
        path = folder / "pairs.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif container == "parquet":
        path = folder / "data" / "train-00000-of-00001.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path = folder / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "save_to_disk"])
@pytest.mark.parametrize("fmt", ["ms-swift", "LLaMA-Factory", "TRL"])
def test_each_format_from_each_container(fmt, container, tiny_mmpr_dir, tmp_path):
    folder = _folder(tiny_mmpr_dir, tmp_path / "ds")
    path = _store(ROWS[fmt], container, folder)
    records = load_records(DataConfig(dataset_path=str(path), image_root=str(folder)), seed=0)
    got = [(r.question, r.chosen, r.rejected, [Path(p).name for p in r.images], r.system_prompt) for r in records]
    assert got == EXPECTED["parts" if fmt == "TRL" else "tags"]
    assert all(Path(p).parent == folder / "images" for r in records for p in r.images)
    assert [r.rendered_prompt for r in records] == [None] * 3


def test_variants_each_project_documents(tiny_mmpr_dir, tmp_path):
    """ms-swift's rejected answer as an assistant message or as rejected_messages (with the same
    rejected_images); LLaMA-Factory's system turn inside conversations and its role tags
    (``messages`` of role/content); TRL's implicit prompt and a conversation with its prompt first."""
    folder = _folder(tiny_mmpr_dir, tmp_path / "ds")
    user = {"role": "user", "content": f"<image>{Q_CIRCLES}"}
    right, wrong = "Two.\nFinal answer: 2", "Five.\nFinal answer: 5"
    variants = {
        "swift_message.jsonl": {"messages": [user, {"role": "assistant", "content": right}],
                                "rejected_response": [{"role": "assistant", "content": wrong}], "images": ["images/shapes_00.png"]},
        "swift_rejected_messages.jsonl": {"messages": [user, {"role": "assistant", "content": right}], "images": ["images/shapes_00.png"],
                                          "rejected_messages": [user, {"role": "assistant", "content": wrong}],
                                          "rejected_images": ["images/shapes_00.png"]},
        "lf_system_turn.json": [{"conversations": [{"from": "system", "value": COUNTER}, {"from": "human", "value": f"<image>{Q_CIRCLES}"}],
                                 "chosen": {"from": "gpt", "value": right}, "rejected": {"from": "gpt", "value": wrong},
                                 "images": ["images/shapes_00.png"]}],
        "lf_role_tags.jsonl": {"messages": [user], "chosen": {"role": "assistant", "content": right},
                               "rejected": {"role": "assistant", "content": wrong}, "images": ["images/shapes_00.png"]},
        "trl_implicit.jsonl": {"chosen": [user, {"role": "assistant", "content": right}],
                               "rejected": [user, {"role": "assistant", "content": wrong}], "images": ["images/shapes_00.png"]},
        "trl_prompt_first.jsonl": {"prompt": [user], "chosen": [user, {"role": "assistant", "content": right}],
                                   "rejected": [{"role": "assistant", "content": wrong}], "images": ["images/shapes_00.png"]},
    }
    for name, row in variants.items():
        path = folder / name
        path.write_text(json.dumps(row) if name.endswith(".json") else json.dumps(row) + "\n")
        (record,) = load_records(DataConfig(dataset_path=str(path)), seed=0)
        system = COUNTER if name == "lf_system_turn.json" else INTERNVL_SYSTEM_MESSAGE
        assert (record.question, record.chosen, record.rejected, record.system_prompt) == (f"<image>{Q_CIRCLES}", right, wrong, system), name
        assert record.images == [str(folder / "images" / "shapes_00.png")], name


def test_a_video_row(tiny_mmpr_dir, tmp_path):
    """ms-swift's and LLaMA-Factory's ``videos`` (one per pair; a frame folder or a file) with a ``<video>`` tag."""
    folder = tmp_path / "ds"
    shutil.copytree(tiny_mmpr_dir / "videos", folder / "videos")
    rows = [{"messages": [{"role": "user", "content": "<video>Which way does the square move?"},
                          {"role": "assistant", "content": "Right."}], "rejected_response": "Left.", "videos": ["videos/clip0"]},
            {"conversations": [{"from": "human", "value": "<video>Which way?"}], "chosen": {"from": "gpt", "value": "Right."},
             "rejected": {"from": "gpt", "value": "Left."}, "videos": ["videos/clip0", "videos/clip1"]}]
    (folder / "swift.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (record,) = load_records(DataConfig(dataset_path=str(folder / "swift.jsonl")), seed=0)
    assert (record.question, record.video, record.images) == ("<video>Which way does the square move?", str(folder / "videos" / "clip0"), [])
    (folder / "lf.json").write_text(json.dumps(rows[1:]))
    with pytest.raises(DataError) as caught:
        load_records(DataConfig(dataset_path=str(folder / "lf.json")), seed=0)
    assert str(caught.value) == f"{folder / 'lf.json'}:0: videos: 2 videos: a pair takes at most one"


def test_system_prompt_setting_replaces_the_rows_own_and_says_so(tiny_mmpr_dir, tmp_path):
    folder = _folder(tiny_mmpr_dir, tmp_path / "ds")
    path = _store(SWIFT_ROWS, "jsonl", folder)
    notes: list[str] = []
    records = load_records(DataConfig(dataset_path=str(path), system_prompt="none"), seed=0, notes=notes)
    assert [r.system_prompt for r in records] == [None, None, None]
    assert notes == [f"data.system_prompt replaces the system message 1 row(s) of {path} state"]


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "and?"}, {"role": "assistant", "content": "b"}],
      "rejected_response": "c", "images": ["images/shapes_00.png"]},
     "messages: 2 user turns: mpo trains one-turn pairs (an optional system message, one user turn, the response); "
     "multi-turn conversations are not supported"),
    ({"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "a"}], "rejected_images": ["images/shapes_01.png"],
      "images": ["images/shapes_00.png"], "rejected_response": "b"},
     "rejected_images: differs from images: an MPO pair scores both responses on one prompt and its images"),
    ({"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "a"}], "images": ["images/shapes_00.png"],
      "rejected_messages": [{"role": "user", "content": "<image>Other Q"}, {"role": "assistant", "content": "b"}]},
     "rejected_messages: its prompt differs from the one in messages: an MPO pair scores both responses on one prompt"),
    ({"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "a"}], "rejected_response": "b",
      "images": ["https://example.com/cat.png"]},
     "images: 'https://example.com/cat.png' is a URL: images are read from disk; download them under data.image_root"),
    ({"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "a"}], "rejected_response": "b",
      "images": ["/elsewhere/cat.png"]},
     "images: path '/elsewhere/cat.png' is outside the image root {root}; set data.image_root to a folder that holds the absolute paths"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "tool_call", "content": "{}"}], "rejected_response": "b"},
     "messages: role 'tool_call': mpo trains one-turn pairs (system, user, assistant); tool and function turns are not supported"),
    ({"conversations": [{"from": "human", "value": "<image>Q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "<|im_start|>b"}, "images": ["images/shapes_00.png"]},
     "rejected: content holds the chat template's token <|im_start|>: message contents are plain text, mpo applies the template"),
    ({"conversations": [{"from": "human", "value": "<image><image>Q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}, "images": ["images/shapes_00.png"]},
     "conversations: has 2 <image> placeholder(s) but 1 image(s)"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "same"},
      "rejected": {"from": "gpt", "value": "same "}},
     "rejected: same text as chosen: the pair has nothing to prefer"),
])
def test_bad_rows_name_file_line_and_column(row, message, tiny_mmpr_dir, tmp_path):
    folder = _folder(tiny_mmpr_dir, tmp_path / "ds")
    path = folder / "pairs.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x"}],
                                "rejected_response": "y"} if "messages" in row else
                               {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "x"},
                                "rejected": {"from": "gpt", "value": "y"}}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as caught:
        load_records(DataConfig(dataset_path=str(path)), seed=0)
    assert str(caught.value) == f"{path}:2: " + message.format(root=folder)
    skipped: list[DataError] = []
    assert len(load_records(DataConfig(dataset_path=str(path)), seed=0, skipped=skipped)) == 1
    assert [(e.line, str(e)) for e in skipped] == [(2, str(caught.value))]


def test_unknown_columns_name_every_format(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"instruction": "Q", "output": "a"}) + "\n")
    with pytest.raises(DataError) as caught:
        load_records(DataConfig(dataset_path=str(path)), seed=0)
    assert str(caught.value) == (
        f"{path}: data.dataset_path: columns ['instruction', 'output'] are no preference format mpo reads "
        "(TRL: prompt, chosen, rejected, images; ms-swift: messages, rejected_response (or rejected_messages), images; "
        "LLaMA-Factory: conversations, chosen, rejected, images (sharegpt ranking))")
