"""Pair building, Dropout-NTP text handling, MMPR writing, input errors, logs and sharding.

All on hand-made records: no model. The counts in the docstrings are worked out by hand.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.__main__ import main
from data_pipeline.dropout_ntp import NTPSettings, choose_responses, ntp_pairs, subset_suffix, truncate_words
from data_pipeline.judging import judge_record, merge_sample_logs
from data_pipeline.mmpr import group_by_dataset, write_mmpr
from data_pipeline.pairs import CORRECTNESS_SUFFIX, FORMAT_SUFFIX, build_answer_pairs
from data_pipeline.prompts import build_cot_prompt, drop_image_placeholders, get_template, strip_short_answer_instruction
from data_pipeline.records import AppendLog, ResumeError, SampleRecord, read_log, read_questions
from data_pipeline.sharding import ShardSpec
from mpo.errors import DataError


def sample_record(qid: str, answer, responses: list[str], line: int, image: str = "a.png", dataset: str = "toy") -> SampleRecord:
    return SampleRecord(
        id=qid, dataset=dataset, line=line, image=[image] if image else [], question=f"question {qid}?",
        prompt=("<image>\n" if image else "") + f"CoT: question {qid}?", answer=answer,
        answer_format="final_answer", responses=responses, finish_reasons=["stop"] * len(responses),
    )


Q1 = [
    "Count.\nFinal answer: 3",  # 0 correct
    "Count again.\nFinal answer: 3",  # 1 correct
    "Count.\nFinal answer: 3",  # 2 same text as 0: merged
    "Hmm.\nFinal answer: 4",  # 3 incorrect
    "Hmm.\nFinal answer: 13",  # 4 incorrect, but "3" is a substring of "13": no pair with it
    "no idea",  # 5 unparsable
    "Maybe.\nFinal answer: 5",  # 6 incorrect
]


def judged(records: list[SampleRecord]) -> list[SampleRecord]:
    return [judge_record(r, None) for r in records]


def indices(pairs: list) -> list[tuple[int, int]]:
    """(chosen, rejected) response indices of each pair."""
    return [(p.extra["chosen_meta"]["index"], p.extra["rejected_meta"]["index"]) for p in pairs]


def test_pair_counts_on_hand_made_responses() -> None:
    """q1: correct {0, 1} x incorrect {3, 6} = 4 pairs (4 is skipped twice); format: {0, 1} x {5} = 2.

    q2 is all correct (no pairs), q3 all wrong (re-sample), q4 has no ground truth (not here).
    """
    records = judged([
        sample_record("q1", "3", Q1, 1),
        sample_record("q2", "B", ["R.\nFinal answer: B", "S.\nFinal answer: (B)"], 2),
        sample_record("q3", "7", ["x.\nFinal answer: 1", "garbage"], 3),
        sample_record("q4", None, ["Some text here.\nFinal answer: cat"], 4),
    ])
    result = build_answer_pairs(records, max_pairs=15, seed=0)
    assert indices(result.correctness) == [(0, 3), (0, 6), (1, 3), (1, 6)]
    assert indices(result.format) == [(0, 5), (1, 5)]
    stats = result.stats["toy"]
    assert (stats.questions, stats.all_correct, stats.all_wrong, stats.substring_skipped) == (3, 1, 1, 2)
    assert (stats.correctness_pairs, stats.format_pairs) == (4, 2)
    assert result.resample == [{"id": "q3", "dataset": "toy", "question": "question q3?", "answer": "7", "image": "a.png"}]
    first = result.correctness[0].to_mmpr()
    assert first["image"] == "a.png" and first["question"] == "<image>\nCoT: question q1?"
    assert first["chosen"] == Q1[0] and first["rejected"] == Q1[3] and first["answer_gt"] == "3"
    assert first["rejected_meta"] == {"id": "q1", "index": 3, "answer": "4", "score": 0.0, "mode": None}


def test_empty_responses_are_never_paired() -> None:
    """An empty or blank sample is unparsable, yet pairing it would give the trainer an empty side."""
    records = judged([sample_record("q1", "3", ["R.\nFinal answer: 3", "", "  \n", "garbage", "S.\nFinal answer: 4"], 1)])
    result = build_answer_pairs(records, max_pairs=15, seed=0)
    assert indices(result.format) == [(0, 3)]
    assert indices(result.correctness) == [(0, 4)]
    assert result.stats["toy"].empty_responses == 2


def test_pair_cap_is_a_seeded_sample() -> None:
    """5 distinct correct x 5 distinct incorrect = 25 candidates, capped at 15; the seed picks which."""
    responses = [f"Way {i}.\nFinal answer: 1" for i in range(5)] + [f"Way {i}.\nFinal answer: 2{i}" for i in range(5)]
    records = judged([sample_record("q", "1", responses, 1)])

    def picked(seed: int) -> list[tuple[int, int]]:
        return indices(build_answer_pairs(records, max_pairs=15, seed=seed).correctness)

    # "1" is a substring of "21": the pairs (c, 6) are skipped, leaving 5 x 4 = 20 candidates.
    assert len(picked(0)) == 15
    assert picked(0) == picked(0)
    assert picked(0) != picked(1)
    assert picked(0) == sorted(picked(0))  # kept in candidate order
    assert all(r != 6 for _, r in picked(0))
    assert len(build_answer_pairs(records, max_pairs=3, seed=0).correctness) == 3


def test_answer_fix_sets_the_ground_truth_in_chosen() -> None:
    records = judged([sample_record("q", "12", ["Side.\nFinal answer: 12 cm", "Side.\nFinal answer: 15 cm"], 1)])
    fixed = build_answer_pairs(records, answer_fix=True).correctness
    assert [(p.chosen, p.rejected) for p in fixed] == [("Side.\nFinal answer: 12", "Side.\nFinal answer: 15 cm")]
    plain = build_answer_pairs(records, answer_fix=False).correctness
    assert plain[0].chosen == "Side.\nFinal answer: 12 cm"


def test_write_mmpr_layout_and_deduplication(tmp_path: Path) -> None:
    """q1 and its copy under another id give the same 4 + 2 pairs: the copies are dropped."""
    records = judged([
        sample_record("q1", "3", Q1, 1),
        replace(sample_record("q1", "3", Q1, 2), id="q1-copy"),  # same image and text, another id
        sample_record("t1", "3", Q1, 3, image="", dataset="text"),
    ])
    result = build_answer_pairs(records)
    subsets = {**group_by_dataset(result.correctness, CORRECTNESS_SUFFIX), **group_by_dataset(result.format, FORMAT_SUFFIX)}
    system_prompts = {name: "sys" if name.startswith("toy") else None for name in subsets}
    report = write_mmpr(tmp_path, tmp_path / "images", subsets, 12, system_prompts)
    assert {name: (r["pairs"], r["duplicates"]) for name, r in report.items()} == {
        "toy_pairs_vqa_correctness_rules": (4, 4), "toy_pairs_vqa_format_rules": (2, 2),
        "text_pairs_vqa_correctness_rules": (4, 0), "text_pairs_vqa_format_rules": (2, 0),
    }
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["toy_pairs_vqa_format_rules"] == {
        "root": "images",
        "annotation": "annotations/toy_pairs_vqa_format_rules.jsonl",
        "repeat_time": 1.0,
        "length": 2,
        "max_dynamic_patch": 12,
        "system_prompt": "sys",
    }
    assert meta["text_pairs_vqa_format_rules"]["system_prompt"] is None  # sampled without a system turn
    lines = [json.loads(x) for x in (tmp_path / "annotations" / "text_pairs_vqa_correctness_rules.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all("image" not in line for line in lines)  # text-only: no image key
    assert list(lines[0])[:4] == ["question", "chosen", "rejected", "answer_gt"]
    # A second write with no pairs for a subset removes its stale file and meta entry.
    write_mmpr(tmp_path, tmp_path / "images", {"toy_pairs_vqa_format_rules": []}, 12, {"toy_pairs_vqa_format_rules": "sys"})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert "toy_pairs_vqa_format_rules" not in meta and "toy_pairs_vqa_correctness_rules" in meta
    assert not (tmp_path / "annotations" / "toy_pairs_vqa_format_rules.jsonl").exists()
    # Removing the last subsets leaves no meta.json rather than a "{}" the trainer would refuse.
    write_mmpr(tmp_path, tmp_path / "images", {name: [] for name in meta}, 12, {name: None for name in meta})
    assert not (tmp_path / "meta.json").exists()


@pytest.mark.parametrize(
    ("text", "ratio", "prefix"),
    [
        ("a b c d e", 0.5, "a b"),  # floor(2.5) = 2
        ("Line one.\nLine two is here.", 0.5, "Line one.\nLine"),  # 6 words -> 3; the newline is kept
        ("  lead  spaces and  more ", 0.5, "  lead  spaces"),
        ("one two three four", 0.75, "one two three"),
        ("one two three four", 0.25, "one"),
        ("single", 0.5, None),  # nothing left after cutting
        ("a b c", 0.25, None),  # floor(0.75) = 0 words
    ],
)
def test_truncate_words(text: str, ratio: float, prefix: str | None) -> None:
    assert truncate_words(text, ratio) == prefix


def test_ntp_choice_prefers_well_formed_and_pairs_join_prefix() -> None:
    record = sample_record("d", None, ["short", "no format here at all", "It shows a cat.\nFinal answer: cat"], 1)
    chosen = choose_responses(record, NTPSettings(ratio=0.5, pairs_per_question=2))
    assert chosen == [(2, "It shows a"), (1, "no format")]
    log = [{"id": "d", "continuations": [
        {"chosen_index": 2, "prefix": "It shows a", "continuation": " dog.\nFinal answer: dog", "finish_reason": "stop"},
        {"chosen_index": 1, "prefix": "no format", "continuation": " here at all", "finish_reason": "stop"},  # identical
    ]}]
    pairs, identical = ntp_pairs({"d": record}, log)
    assert identical == 1
    assert [(p.chosen, p.rejected) for p in pairs] == [("It shows a cat.\nFinal answer: cat", "It shows a dog.\nFinal answer: dog")]
    assert pairs[0].to_mmpr()["image"] == "a.png"  # trained with the image; only generated without
    assert subset_suffix(0.5) == "_prefix_pair_sr0.5_wo_image" and subset_suffix(0.25) == "_prefix_pair_sr0.25_wo_image"


def test_prompts() -> None:
    v1 = get_template("v1")
    assert strip_short_answer_instruction("How many?\nAnswer the question using a single word or phrase.") == "How many?"
    options = "Pick one.\nA. x\nB. y"
    assert strip_short_answer_instruction(options + "\nAnswer with the option's letter from the given choices directly.") == options
    assert strip_short_answer_instruction("Is it red? Please answer yes or no.") == "Is it red?"
    assert strip_short_answer_instruction("Answer the question carefully: what is it?") == "Answer the question carefully: what is it?"
    assert build_cot_prompt("<image>\nHow many?", 1, v1) == "<image>\n" + v1.fill("How many?")
    assert build_cot_prompt("How many?", 1, v1) == "<image>\n" + v1.fill("How many?")
    assert build_cot_prompt("How many?", 2, v1).startswith("Image-1: <image>\nImage-2: <image>\nYour task")
    assert build_cot_prompt("Compare <image> and <image>.", 2, v1) == v1.fill("Compare <image> and <image>.")
    assert build_cot_prompt("How many?", 0, v1) == v1.fill("How many?")
    assert "\\boxed{$FINAL_ANSWER}" in get_template("v2").text
    with pytest.raises(DataError, match="1 <image> placeholder"):
        build_cot_prompt("<image> vs ?", 2, v1)
    with pytest.raises(ValueError, match="exactly once"):
        get_template("custom", "no field", "boxed")
    assert drop_image_placeholders("Image-1: <image>\nImage-2: <image>\nQ?") == "Q?"
    assert drop_image_placeholders("<image>\nQ <image>?") == "Q ?"


def test_read_questions_reports_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"image": "a.png", "question": "Q?", "answer": 3}\n{"image": "a.png", "answer": "x"}\n{oops\n'
                    '{"question": "text only", "answer": ["1", 2]}\n{"id": 7, "question": "dup", "answer": ""}\n')
    with pytest.raises(DataError) as error:
        read_questions(path, "ds", skip_bad=False)
    assert str(error.value) == f"{path}:2: question: missing or not a non-empty string"
    questions, bad = read_questions(path, "ds", skip_bad=True)
    assert [str(e) for e in bad] == [
        f"{path}:2: question: missing or not a non-empty string",
        f"{path}:3: <line>: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
    ]
    assert [(q.id, q.images, q.answer) for q in questions] == [("1", ("a.png",), "3"), ("4", (), ["1", "2"]), ("7", (), None)]


def test_append_log_drops_torn_tail_and_locks(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "respo')
    assert [r["id"] for r in read_log(path)] == ["a", "b"]
    with AppendLog(path) as log:
        assert [r["id"] for r in log.read()] == ["a", "b"]
        log.append([{"id": "c"}])
        with pytest.raises(ResumeError, match="another process"):
            AppendLog(path).__enter__()
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]  # the log locked itself: no lock file left


def test_merge_refuses_conflicting_shards() -> None:
    a = sample_record("q", "1", ["x"], 2).to_json()
    b = sample_record("p", "1", ["y"], 1).to_json()
    assert [r["id"] for r in merge_sample_logs([("s0", [a]), ("s1", [b, a])])] == ["p", "q"]
    with pytest.raises(DataError, match="also appears, differently"):
        merge_sample_logs([("s0", [a]), ("s1", [{**a, "responses": ["z"]}])])


def test_shards_partition_the_ids() -> None:
    ids = [str(i) for i in range(200)]
    shards = ShardSpec.parse("0/3").all()
    owned = [[i for i in ids if s.owns(i)] for s in shards]
    assert sorted(sum(owned, [])) == sorted(ids)
    assert all(40 < len(o) < 95 for o in owned)  # roughly even, none empty
    assert ShardSpec.parse(" 2 / 3 ") == ShardSpec(2, 3)
    for bad in ["3/3", "1", "-1/2", "0/0"]:
        with pytest.raises(ValueError):
            ShardSpec.parse(bad)


def test_cli_bad_image_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"image": name, "question": "Q?", "answer": "1"}) + "\n"
                                 for name in ["broken.png", "gone.png", "ok.png"]))
    model = tmp_path / "no-model"
    args = ["sample", "--input", str(questions), "--out", str(tmp_path / "s.jsonl"), "--model", str(model),
            "--no-progress", "--batch-size", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"mpo-data: error: {questions}:1: image: cannot decode image {tmp_path / 'broken.png'}")
    assert not (tmp_path / "s.jsonl").exists() or read_log(tmp_path / "s.jsonl") == []  # stopped before any work
    # With --skip-bad both bad lines are logged as skipped; the good one then needs the model,
    # which does not load: again one line, not a traceback, and a failure of the run (1), not of its input.
    assert main([*args, "--skip-bad"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpo-data: error: cannot load model from {model}")
    skipped = read_log(tmp_path / "s.jsonl")
    assert [(r["id"], r["skipped"].split(": ")[1]) for r in skipped] == [("1", "image"), ("2", "image")]
    assert skipped[1]["skipped"] == f"{questions}:2: image: image not found: {tmp_path / 'gone.png'}"
