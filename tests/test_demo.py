"""``mpo demo --preset quick``: every stage of the end-to-end demo runs and leaves its outputs.

The quick preset trains on a handful of questions, so its accuracies mean nothing; what is checked
is each stage's output: the task files, the model, the SFT run, the pipeline's MMPR directory
(meta.json lengths equal the annotation lines, and the trainer trained on it), the three
preference runs with their loss terms, one prediction per held-out question per method, the
report's accuracy table with the four methods, and the PNGs. The accuracy target is measured by
``mpo demo`` itself (see README), not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mpo.demo.run import main
from mpo.demo.settings import PRESETS, DemoSettings, apply_overrides

QUICK = PRESETS["quick"]
METHODS = ("sft", "mpo", "dpo", "sft_chosen")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["--preset", "quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_task_and_model(demo_out: Path) -> None:
    seed = demo_out / "seed0"
    train, test = _lines(seed / "task" / "train.jsonl"), _lines(seed / "task" / "test.jsonl")
    assert len(train) == QUICK.train_images * QUICK.questions_per_image
    assert len(test) == QUICK.test_images * QUICK.questions_per_image
    assert len(list((seed / "task" / "images" / "train").glob("*.png"))) == QUICK.train_images
    assert (seed / "model" / "config.json").exists()


@pytest.mark.slow
def test_sft_stage(demo_out: Path) -> None:
    seed = demo_out / "seed0"
    sft_lines = _lines(seed / "sft_data" / "sft.jsonl")
    assert len(sft_lines) == QUICK.train_images * (QUICK.questions_per_image + 1)  # + describe items
    assert all(line["question"].startswith("<image>\n") and "Final answer" in line["question"] for line in sft_lines)
    metrics = _lines(seed / "sft" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, QUICK.sft_steps + 1))
    assert all("loss/sft" in m and "loss/dpo" not in m for m in metrics)  # no reference model
    # the SFT stage warms up over its own share of steps (a from-scratch model needs it)
    warm = round(QUICK.sft_warmup * QUICK.sft_steps)
    assert warm >= 2
    assert metrics[1]["lr"] == pytest.approx(QUICK.sft_lr / warm)
    assert metrics[warm]["lr"] == pytest.approx(QUICK.sft_lr)
    assert (seed / "sft" / "final" / "config.json").exists()


@pytest.mark.slow
def test_pairs_stage(demo_out: Path) -> None:
    pairs = demo_out / "seed0" / "pairs"
    meta = json.loads((pairs / "meta.json").read_text())
    assert meta, "no MMPR subset was written"
    for name, entry in meta.items():
        lines = _lines(Path(entry["annotation"]))
        assert entry["length"] == len(lines) > 0
        assert all(line["chosen"].strip() and line["rejected"].strip() and line["chosen"] != line["rejected"] for line in lines)
        assert name.endswith(("_pairs_vqa_correctness_rules", "_pairs_vqa_format_rules", "_prefix_pair_sr0.5_wo_image"))
    assert "shapes_describe_prefix_pair_sr0.5_wo_image" in meta  # Dropout-NTP pairs
    samples = _lines(pairs / "work" / "shapes" / "matched.jsonl")
    assert len(samples) == QUICK.train_images * QUICK.questions_per_image
    assert all(len(record["responses"]) == QUICK.num_samples for record in samples)
    result = json.loads((demo_out / "seed0" / "result.json").read_text())
    assert result["pairs"] == {name: entry["length"] for name, entry in meta.items()}


@pytest.mark.slow
def test_preference_runs(demo_out: Path) -> None:
    seed = demo_out / "seed0"
    expected_terms = {"mpo": {"loss/dpo", "loss/bco", "loss/sft"}, "dpo": {"loss/dpo"}, "sft_chosen": {"loss/sft"}}
    for method, terms in expected_terms.items():
        metrics = _lines(seed / method / "metrics.jsonl")
        assert [m["step"] for m in metrics] == list(range(1, QUICK.pref_steps + 1))
        assert terms <= set(metrics[0])
        assert (seed / method / "final" / "config.json").exists()
    first = _lines(seed / "mpo" / "metrics.jsonl")[0]
    # Policy == reference at step 1: DPO = ln 2 exactly, whatever the pairs.
    assert first["loss/dpo"] == pytest.approx(0.693147, abs=1e-4)
    assert "rewards/margins" in first and "bco/delta" in first


@pytest.mark.slow
def test_evaluation_and_report(demo_out: Path) -> None:
    seed = demo_out / "seed0"
    num_test = QUICK.test_images * QUICK.questions_per_image
    for method in METHODS:
        predictions = _lines(seed / "eval" / f"{method}.jsonl")
        assert len(predictions) == num_test
        assert {p["status"] for p in predictions} <= {"correct", "incorrect", "unparsable"}
    result = json.loads((seed / "result.json").read_text())
    assert set(result["accuracy"]) == set(METHODS)
    for method in METHODS:
        correct = sum(p["status"] == "correct" for p in _lines(seed / "eval" / f"{method}.jsonl"))
        assert result["accuracy"][method] == pytest.approx(correct / num_test)

    assert 0.0 <= result["majority_baseline"] <= 1.0
    assert set(result["image_sensitivity"]) == {"sft", "mpo"}
    for method in ("sft", "mpo"):
        assert len(_lines(seed / "eval" / f"{method}_swapped_images.jsonl")) == num_test

    report = (demo_out / "report.md").read_text()
    assert "Majority-answer baseline" in report and "swapped for another test image" in report
    assert "points of sampling error" in report and "without a parsable final answer" in report
    table = [line for line in report.splitlines() if line.startswith("| ") and "seed 0" not in line]
    for label in ("SFT model (stage 1)", "MPO (0.8 DPO + 0.2 BCO + 1.0 SFT)", "DPO alone (1/0/0)", "SFT on chosen (0/0/1)"):
        assert any(line.startswith(f"| {label} |") for line in table), label
    assert "## Preference data" in report and "## Timings" in report and "## Settings" in report
    for name in ("accuracy.png", "training_curves_seed0.png"):
        with Image.open(demo_out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    totals = json.loads((demo_out / "results.json").read_text())
    assert totals["preset"] == "quick" and len(totals["seeds"]) == 1


@pytest.mark.slow
def test_same_seed_same_outputs(demo_out: Path, tmp_path: Path) -> None:
    # A second run of the same seed and settings writes byte-identical data, pairs and answers.
    assert main(["--preset", "quick", "--out", str(tmp_path / "again")]) == 0
    first, again = demo_out / "seed0", tmp_path / "again" / "seed0"
    files = ["task/train.jsonl", "task/test.jsonl", "sft_data/sft.jsonl", "pairs/meta.json"]
    files += [f"eval/{method}.jsonl" for method in METHODS]
    files += [str(p.relative_to(first)) for p in sorted((first / "pairs").glob("*/*.jsonl"))]
    for name in files:
        assert (again / name).read_bytes() == (first / name).read_bytes().replace(
            str(first).encode(), str(again).encode()), name
    assert json.loads((again / "result.json").read_text())["accuracy"] == json.loads((first / "result.json").read_text())["accuracy"]


def test_settings_overrides() -> None:
    settings = apply_overrides(DemoSettings(), ["sft_steps=7", "temperature=1", "pref_lr=1e-3", "layout=plain"])
    assert (settings.sft_steps, settings.temperature, settings.pref_lr) == (7, 1.0, 1e-3)
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(DemoSettings(), ["no_such_knob=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(DemoSettings(), ["sft_steps=1.5"])


def test_reading_the_numbers() -> None:
    from mpo.demo.report import SeedResult, reading_the_numbers

    results = [
        SeedResult(seed=0, eval_questions=400, accuracy={"sft": 0.4, "mpo": 0.5, "dpo": 0.1, "sft_chosen": 0.45},
                   unparsable={"sft": 0, "mpo": 2, "dpo": 300, "sft_chosen": 1}),
        SeedResult(seed=1, eval_questions=400, accuracy={"sft": 0.6, "mpo": 0.6, "dpo": 0.2, "sft_chosen": 0.5},
                   unparsable={"sft": 0, "mpo": 4, "dpo": 100, "sft_chosen": 0}),
    ]
    error, gain, unparsable = reading_the_numbers(results)
    assert "over 400 held-out questions: ±2.5 points" in error  # sqrt(0.5 * 0.5 / 400) = 0.025
    assert "the same pairs: +7.5 points" in gain  # mean of +5 and +10
    assert "SFT model 0.0, MPO 3.0, DPO alone 200.0, SFT on chosen 0.5" in unparsable


def test_majority_baseline_swap_and_changed_share() -> None:
    from mpo.demo.evaluate import changed_share, majority_baseline, swap_images

    train = [{"kind": "count", "answer": a} for a in "1123"] + [{"kind": "yes_no", "answer": a} for a in "ABB"]
    test = [{"kind": "count", "answer": "1"}, {"kind": "count", "answer": "2"}, {"kind": "yes_no", "answer": "B"},
            {"kind": "new_kind", "answer": "1"}]
    assert majority_baseline(train, test) == 0.5  # "1" and "B" right; a family unseen in train is wrong

    questions = [{"id": "a", "image": "i/2.png"}, {"id": "b", "image": "i/1.png"}, {"id": "c", "image": "i/3.png"},
                 {"id": "d", "image": "i/1.png"}]
    assert [q["image"] for q in swap_images(questions)] == ["i/3.png", "i/2.png", "i/1.png", "i/2.png"]

    original = [{"id": "a", "extracted": "1"}, {"id": "b", "extracted": None}, {"id": "c", "extracted": "B"}]
    swapped = [{"id": "c", "extracted": "A"}, {"id": "a", "extracted": "1"}, {"id": "b", "extracted": "2"}]
    assert changed_share(original, swapped) == 2 / 3
