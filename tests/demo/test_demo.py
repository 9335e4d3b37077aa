"""``mpo demo --preset quick``: every stage of the end-to-end demo runs and leaves its outputs.

The quick preset trains on a handful of questions, so its accuracies mean nothing; what is checked
is each stage's output: the task files, the model, the SFT run (its describe / chain-of-thought /
direct mix), the pipeline's MMPR directory (meta.json lengths equal the annotation lines, and the
trainer trained on it), the three preference runs of each of the two rounds with their loss terms
(round 2 of each method from its own round-1 model, on pairs sampled from that model, with that
model as the reference), one prediction per held-out question per method and round, the report
(which says the preset checks the stages), and the PNGs. The pieces the report's figures come from (the chain checker, the tally check, pass@K,
the target verdicts, the curves' colours) are checked on hand-made inputs. The accuracy targets
are measured by ``mpo demo`` itself (see README), not here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
import yaml
from safetensors.torch import load_file

from mpo.demo.chains import chain_shares
from mpo.demo.results import RoundResult, SeedResult
from mpo.demo.accuracy import evaluate
from mpo.demo.rounds import chosen_responses, pass_at_k
from mpo.demo.run import main
from mpo.demo.settings import PRESETS, DemoSettings, apply_overrides
from mpo.demo.stages import METHODS as METHODS_WEIGHTS
from mpo.demo.stages import build_pairs, generate_task, train, write_sft_data

QUICK = PRESETS["quick"]
METHODS = ("sft", "sft_direct", "mpo", "dpo", "sft_chosen")
PREFERENCE = ("mpo", "dpo", "sft_chosen")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def one_thread() -> Iterator[None]:
    # One torch thread, as the demo recommends on a busy machine: with one thread per core, the
    # threads of a small model's ops wait on each other when other jobs hold the cores (10x slower
    # measured). The thread count also fixes the order of the reductions, so a rerun uses the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    with one_thread():
        assert main(["--preset", "quick", "--out", str(out), "--threads", "1"]) == 0
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
    assert all(line["question"].startswith("<image>\n") for line in sft_lines)
    task = {r["id"]: r for r in _lines(seed / "task" / "train.jsonl") + _lines(seed / "task" / "train_describe.jsonl")}
    cot = [line for line in sft_lines if "Final answer" in line["question"]]
    direct = [line for line in sft_lines if line["question"].endswith("\nAnswer with a single number.")]
    assert len(cot) + len(direct) == len(sft_lines)
    assert all(line["chosen"] == task[line["id"]]["cot"] for line in cot)  # describe items and CoT questions
    assert all(line["chosen"] == task[line["id"]]["answer"] for line in direct)
    result = json.loads((seed / "result.json").read_text())
    assert result["sft_data"] == {"describe": QUICK.train_images, "cot": len(cot) - QUICK.train_images, "direct": len(direct)}
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
    seed = demo_out / "seed0"
    result = json.loads((seed / "result.json").read_text())
    assert QUICK.rounds == 2 and len(result["rounds"]) == 2
    # round 1: the SFT model's samples, shared by every method; round 2: each method's own
    sources = {1: ("sft",), 2: PREFERENCE}
    for number, names in sources.items():
        assert set(result["rounds"][number - 1]["samples"]) == set(names)
        for source in names:
            pairs = seed / f"round{number}" / f"pairs-{source}"
            meta = json.loads((pairs / "meta.json").read_text())
            assert meta, "no MMPR subset was written"
            for name, entry in meta.items():
                lines = _lines(pairs / entry["annotation"])
                assert entry["length"] == len(lines) > 0
                assert all(line["chosen"].strip() and line["rejected"].strip() and line["chosen"] != line["rejected"]
                           for line in lines)
                assert name.endswith(("_pairs_vqa_correctness_rules", "_pairs_vqa_format_rules", "_prefix_pair_sr0.5_wo_image"))
            samples = _lines(pairs / "work" / "shapes" / "matched.jsonl")
            assert len(samples) == QUICK.train_images * QUICK.questions_per_image
            assert all(len(record["responses"]) == QUICK.num_samples for record in samples)
            # training used pairs judged by their chains (the default pairing, first_error): the
            # pipeline's correctness and format subsets replaced by chain-judged ones (none here:
            # the quick model writes no right chain), its Dropout-NTP subset kept as it is
            checked = json.loads((pairs.parent / f"pairs-{source}_checked" / "meta.json").read_text())
            recorded = result["rounds"][number - 1]["samples"][source]
            assert QUICK.pairing == DemoSettings().pairing == "first_error"
            assert recorded["pairs"] == {name: entry["length"] for name, entry in checked.items()} == {
                name: entry["length"] for name, entry in meta.items() if name.endswith("_prefix_pair_sr0.5_wo_image")}
            assert recorded["build"]["wrong_chains_dropped"] == 0
            assert recorded["pass_at_k"] == pass_at_k(pairs / "work" / "shapes" / "matched.jsonl")
    assert "shapes_describe_prefix_pair_sr0.5_wo_image" in json.loads((seed / "round1" / "pairs-sft" / "meta.json").read_text())


@pytest.mark.slow
def test_preference_runs(demo_out: Path) -> None:
    seed = demo_out / "seed0"
    expected_terms = {"mpo": {"loss/dpo", "loss/bco", "loss/sft"}, "dpo": {"loss/dpo"}, "sft_chosen": {"loss/sft"}}
    for number in (1, 2):
        for method, terms in expected_terms.items():
            run = seed / f"round{number}" / method
            metrics = _lines(run / "metrics.jsonl")
            assert [m["step"] for m in metrics] == list(range(1, QUICK.pref_steps + 1))
            assert terms <= set(metrics[0])
            assert (run / "final" / "config.json").exists()
            # round 1 starts from the SFT model on its pairs; round 2 from the method's own round-1
            # model, on pairs sampled from it, with it as the reference (reference: previous)
            recipe = yaml.safe_load((run / "recipe.yaml").read_text())
            start = seed / "sft" / "final" if number == 1 else seed / "round1" / method / "final"
            source = "sft" if number == 1 else method
            assert recipe["model"]["name_or_path"] == str(start)
            assert recipe["reference"]["name_or_path"] == ""
            assert recipe["data"]["meta_path"] == str(seed / f"round{number}" / f"pairs-{source}_checked" / "meta.json")
        first = _lines(seed / f"round{number}" / "mpo" / "metrics.jsonl")[0]
        # Policy == reference at step 1: DPO = ln 2 exactly, whatever the pairs.
        assert first["loss/dpo"] == pytest.approx(0.693147, abs=1e-4)
        assert "rewards/margins" in first and "bco/delta" in first


def _predictions(seed: Path, method: str, number: int) -> Path:
    """The held-out answers of ``method`` after round ``number`` (0: the SFT model's, in eval/)."""
    return seed / "eval" / f"{method}.jsonl" if number == 0 else seed / f"round{number}" / "eval" / f"{method}.jsonl"


@pytest.mark.slow
def test_evaluation_and_report(demo_out: Path) -> None:
    seed = demo_out / "seed0"
    num_test = QUICK.test_images * QUICK.questions_per_image
    result = json.loads((seed / "result.json").read_text())
    test = {r["id"]: r for r in _lines(seed / "task" / "test.jsonl")}
    models = [("sft", 0), ("sft_direct", 0)] + [(method, number) for number in (1, 2) for method in PREFERENCE]

    def accuracy(path: Path) -> float:
        predictions = _lines(path)
        assert len(predictions) == num_test
        assert {p["status"] for p in predictions} <= {"correct", "incorrect", "unparsable"}
        return sum(p["status"] == "correct" for p in predictions) / num_test

    for method, number in models:
        expected = accuracy(_predictions(seed, method, number))
        if number:
            assert result["rounds"][number - 1]["accuracy"][method] == pytest.approx(expected)
            shares = result["rounds"][number - 1]["eval_chains"][method]
            predictions = _lines(_predictions(seed, method, number))
            assert shares == chain_shares([(p["response"], test[p["id"]]) for p in predictions])
            assert set(shares) == {"none", "perception", "reasoning"} and sum(shares.values()) == pytest.approx(1.0)
        if number in (0, QUICK.rounds):  # the top-level values are the SFT model's and the last round's
            assert result["accuracy"][method] == pytest.approx(expected)
    assert set(result["accuracy"]) == set(METHODS)
    assert set(result["eval_chains"]) == set(METHODS) - {"sft_direct"}
    assert result["eval_chains"]["mpo"] == result["rounds"][-1]["eval_chains"]["mpo"]

    assert 0.0 <= result["majority_baseline"] <= 1.0
    # The image swap and the tallies: the SFT model and the last round's MPO model.
    assert set(result["image_sensitivity"]) == set(result["per_kind_swap"]) == set(result["tallies"]) == {"sft", "mpo"}
    kinds = {p["kind"] for p in _lines(seed / "eval" / "sft.jsonl")}
    assert set(result["per_kind_baseline"]) == set(result["per_kind_swap"]["sft"]) == kinds
    for method, directory in (("sft", seed / "eval"), ("mpo", seed / "round2" / "eval")):
        assert len(_lines(directory / f"{method}_swapped_images.jsonl")) == num_test
        assert len(_lines(directory / f"{method}_tallies.jsonl")) == QUICK.test_images
    assert not (seed / "round1" / "eval" / "mpo_swapped_images.jsonl").exists()
    # The chosen chains' shares are those of each round's pairs (none in the quick run, whose model
    # writes no parsable answer: then no shares at all rather than three zeros).
    train = {r["id"]: r for r in _lines(seed / "task" / "train.jsonl")}
    for number, round_result in enumerate(result["rounds"], start=1):
        for source, samples in round_result["samples"].items():
            # pass@K from the pipeline's own per-question pass rates, not from the report's reader
            rates = [r for r in _lines(seed / f"round{number}" / f"pairs-{source}" / "work" / "shapes" / "pass_rates.jsonl")
                     if r["pass_rate"] is not None]
            assert len(rates) == QUICK.train_images * QUICK.questions_per_image
            assert samples["pass_at_k"] == sum(r["correct"] > 0 for r in rates) / len(rates)
            assert samples["chosen_chains"] == chain_shares(chosen_responses(seed / f"round{number}" / f"pairs-{source}", train))
            assert (samples["chosen_chains"] == {}) == ("shapes_pairs_vqa_correctness_rules" not in samples["pairs"])

    report = (demo_out / "report.md").read_text()
    # The quick preset says what it checks instead of judging targets on 8 questions.
    assert "The `quick` preset checks that every stage runs" in report
    assert "no target is judged" in report
    assert "sampling error" not in report and "met**" not in report and "target +10" not in report
    table = [line for line in report.splitlines() if line.startswith("| ") and "seed 0" not in line]
    labels = ["SFT model (stage 1)", "SFT model, direct prompt"] + [
        f"{label}, round {number}" for label in ("MPO (0.8 DPO + 0.2 BCO + 1.0 SFT)", "DPO alone (1/0/0)", "SFT on chosen (0/0/1)")
        for number in (1, 2)]
    for label in labels:
        assert any(line.startswith(f"| {label} |") for line in table), label
    assert "| question family | majority baseline | SFT | MPO r1 | MPO r2 | DPO alone r1 |" in report
    assert "| 2 | MPO round 1 |" in report and "| 1 | SFT model |" in report  # the samples of each round
    assert "## Samples and pairs, per round" in report and "## Timings" in report and "## Settings" in report
    for name in ("accuracy.png", "rounds.png", "training_curves_seed0.png"):
        with Image.open(demo_out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    totals = json.loads((demo_out / "results.json").read_text())
    assert totals["preset"] == "quick" and len(totals["seeds"]) == 1


@pytest.mark.slow
def test_same_seed_same_outputs(demo_out: Path, tmp_path: Path) -> None:
    # The stages again from the run's own inputs write byte-identical files: the task, the SFT
    # data, the pairs sampled from its SFT model, an MPO run from that model on those pairs (its
    # losses and weights), and the greedy answers of the MPO model.
    first = demo_out / "seed0"

    with one_thread():
        _rerun_stages(first, tmp_path)


def _same_pairs(first: Path, again: Path, first_task: Path, task: Path) -> None:
    """Two pipeline directories hold the same pairs and logs (up to their own paths)."""
    files = ["meta.json", *(str(p.relative_to(first)) for p in sorted(first.glob("*/*.jsonl")))]
    files += [str(p.relative_to(first)) for p in sorted((first / "work").glob("*/*.jsonl"))]
    assert len(files) > 6
    for name in files:
        # the files name the task and pairs directories, and the work logs a hash of the settings
        # that includes the task's path; the rest is the same line for line
        text = (again / name).read_text()
        expected = (first / name).read_text().replace(str(first), str(again)).replace(str(first_task), str(task))
        if name == "meta.json":
            assert text == expected
        else:
            assert [{k: v for k, v in json.loads(line).items() if k != "config"} for line in text.splitlines()] == [
                {k: v for k, v in json.loads(line).items() if k != "config"} for line in expected.splitlines()], name


def _same_run(first: Path, again: Path) -> None:
    """Two training runs logged the same losses and saved the same weights."""
    def losses(run: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k.startswith(("loss", "rewards", "bco"))} for m in _lines(run / "metrics.jsonl")]

    assert losses(again) == losses(first)
    weights, reference = load_file(again / "final" / "model.safetensors"), load_file(first / "final" / "model.safetensors")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


def _rerun_stages(first: Path, tmp_path: Path) -> None:
    task = tmp_path / "task"
    generate_task(task, QUICK, 0)
    for name in ("train.jsonl", "test.jsonl", "train_describe.jsonl", "test_describe.jsonl", "images/train/000001.png"):
        assert (task / name).read_bytes() == (first / "task" / name).read_bytes(), name
    write_sft_data(task, tmp_path / "sft.jsonl", QUICK.prompt, QUICK.cot_share, 0)
    assert (tmp_path / "sft.jsonl").read_bytes() == (first / "sft_data" / "sft.jsonl").read_bytes()

    # round 1: the SFT model's pairs, MPO from the SFT model on them, its greedy answers
    sft_model = first / "sft" / "final"
    # at the run's depth under the task's folder, so that meta.json's relative paths are the same
    again = tmp_path / "round1" / "pairs-sft"
    build_pairs(sft_model, task, again, QUICK, 0, progress=False)
    _same_pairs(first / "round1" / "pairs-sft", again, first / "task", task)
    final = train(sft_model, {"meta_path": str(again / "meta.json")}, tmp_path / "mpo1", METHODS_WEIGHTS["mpo"],
                  QUICK.pref_steps, QUICK.pref_batch, QUICK.pref_lr, QUICK.pref_warmup, QUICK, 0)
    _same_run(first / "round1" / "mpo", tmp_path / "mpo1")
    test_questions = _lines(task / "test.jsonl")
    evaluate(final, test_questions, task, tmp_path / "mpo.jsonl", QUICK.max_new_tokens, QUICK.eval_batch, QUICK.prompt)
    assert (tmp_path / "mpo.jsonl").read_bytes() == (first / "round1" / "eval" / "mpo.jsonl").read_bytes()

    # round 2: the round-1 MPO model's own pairs, and MPO from it on them
    round1 = first / "round1" / "mpo" / "final"
    again = tmp_path / "round2" / "pairs-mpo"
    build_pairs(round1, task, again, QUICK, 0, progress=False, round_number=2)
    _same_pairs(first / "round2" / "pairs-mpo", again, first / "task", task)
    train(round1, {"meta_path": str(again / "meta.json")}, tmp_path / "mpo2", METHODS_WEIGHTS["mpo"],
          QUICK.pref_steps, QUICK.pref_batch, QUICK.pref_lr, QUICK.pref_warmup, QUICK, 0)
    _same_run(first / "round2" / "mpo", tmp_path / "mpo2")


@pytest.mark.slow
def test_resume_keeps_finished_stages(demo_out: Path, tmp_path: Path) -> None:
    # A run interrupted in round 2's MPO stage, with round 1's DPO run lost too: --resume keeps the
    # task, model and SFT model and every finished run, trains the missing runs again, and ends
    # with the same answers as the uninterrupted run.
    out = tmp_path / "out"
    shutil.copytree(demo_out, out)
    seed = out / "seed0"
    text = (demo_out / "seed0" / "result.json").read_text().replace(str(demo_out), str(out))
    shutil.rmtree(seed / "round2" / "mpo" / "final")
    shutil.rmtree(seed / "round1" / "dpo")
    # the copy moved the task, and the pipeline's logs refuse to resume from another task path
    for pairs in seed.glob("round*/pairs-*"):
        shutil.rmtree(pairs)
    (seed / "result.json").unlink()
    kept = {path: path.stat().st_mtime_ns for path in (seed / "sft" / "final" / "model.safetensors",
                                                      seed / "round1" / "mpo" / "final" / "model.safetensors",
                                                      seed / "round2" / "dpo" / "final" / "model.safetensors")}
    with one_thread():
        assert main(["--preset", "quick", "--out", str(out), "--threads", "1", "--resume"]) == 0
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # not trained again
    for run in ("round2/mpo", "round1/dpo"):
        assert [m["step"] for m in _lines(seed / run / "metrics.jsonl")] == list(range(1, QUICK.pref_steps + 1))
    again = json.loads((seed / "result.json").read_text())
    expected = json.loads(text)
    assert {k: v for k, v in again.items() if k != "timings"} == {k: v for k, v in expected.items() if k != "timings"}
    for method, number in [("sft", 0), ("sft_direct", 0)] + [(m, n) for n in (1, 2) for m in PREFERENCE]:
        assert _predictions(seed, method, number).read_bytes() == _predictions(demo_out / "seed0", method, number).read_bytes()


def test_settings_overrides() -> None:
    settings = apply_overrides(DemoSettings(), ["sft_steps=7", "temperature=1", "pref_lr=1e-3", "layout=plain"])
    assert (settings.sft_steps, settings.temperature, settings.pref_lr) == (7, 1.0, 1e-3)
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(DemoSettings(), ["no_such_knob=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(DemoSettings(), ["sft_steps=1.5"])


def _seed(seed: int, rounds: list[dict[str, float]], **accuracy: float) -> SeedResult:
    final = {**accuracy, **rounds[-1]}
    return SeedResult(seed=seed, eval_questions=400, accuracy=final, majority_baseline=0.1,
                      unparsable={m: 2 * seed for m in final},
                      rounds=[RoundResult(round=i + 1, accuracy=a) for i, a in enumerate(rounds)],
                      per_kind={"sft": {"times": 0.5, "count_total": 0.2}}, per_kind_baseline={"times": 0.1, "count_total": 0.2})


def test_targets_and_evidence() -> None:
    from mpo.demo.report import accuracy_rows, evidence, targets

    results = [_seed(0, [dict(mpo=0.50, dpo=0.2, sft_chosen=0.5), dict(mpo=0.55, dpo=0.1, sft_chosen=0.45)], sft=0.4),
               _seed(1, [dict(mpo=0.60, dpo=0.3, sft_chosen=0.7), dict(mpo=0.66, dpo=0.2, sft_chosen=0.78)], sft=0.6)]
    gain, over_chosen, over_dpo, rounds, families = targets(results)
    # after round 2: (15 + 6) / 2 = 10.5 >= 10; std of (15, 6) = 6.364
    assert "MPO after round 2 over the SFT model: **+10.5 points** mean over 2 seed(s) (per seed +15.0, +6.0; std 6.4)" in gain
    assert gain.endswith("target +10: **met**.")
    assert "(0/0/1), both after round 2: -1.0 points (per seed +10.0, -12.0; std 15.6); MPO above it: **not met**." in over_chosen
    assert "+45.5 points" in over_dpo and over_dpo.endswith("**met**.")
    # means: SFT (0.4 + 0.6) / 2 = 50.0, round 1 (0.5 + 0.6) / 2 = 55.0, round 2 (0.55 + 0.66) / 2 = 60.5
    assert "50.0 -> 55.0 -> 60.5: **met**." in rounds
    falling = [_seed(0, [dict(mpo=0.50, dpo=0.2, sft_chosen=0.5), dict(mpo=0.45, dpo=0.1, sft_chosen=0.45)], sft=0.4)]
    assert "40.0 -> 50.0 -> 45.0: **not met**." in targets(falling)[3]
    # count_total at its baseline (0.2 = 0.2) fails in both seeds
    assert "**not met** (at or below it: seed 0: count_total; seed 1: count_total)." in families
    assert [label for label, _ in accuracy_rows(results)][1:3] == ["MPO (0.8 DPO + 0.2 BCO + 1.0 SFT), round 1",
                                                                    "MPO (0.8 DPO + 0.2 BCO + 1.0 SFT), round 2"]
    lines = evidence(results)
    assert any("over 400 held-out questions: ±2.5 points" in line for line in lines)  # sqrt(0.5 * 0.5 / 400)
    assert any("MPO 1.0, DPO alone 1.0, SFT on chosen 1.0" in line for line in lines)  # 0 and 2 unparsable


def test_chain_checker() -> None:
    from mpo.demo.chains import check_chain

    record = {"question": "Red shapes are worth 3 points, green shapes 1 point and blue shapes 2 points. "
                          "How many points are all the shapes worth?", "answer": "9",
              "scene": [{"colour": c, "shape": k, "x": 8, "y": 8, "size": 12}
                        for c, k in (("red", "circle"), ("red", "square"), ("green", "circle"), ("blue", "triangle"))],
              "cot": "red 2, green 1, blue 1. 2 x 3 = 6. 1 x 1 = 1. 1 x 2 = 2. 6 + 1 = 7. 7 + 2 = 9.\nFinal answer: 9"}
    right = check_chain(record["cot"], record)
    assert right.correct and right.error == "none" and right.tally_entries == 3
    # red and green miscounted, true arithmetic throughout, and the right answer by luck
    lucky = check_chain("red 1, green 3, blue 1. 1 x 3 = 3. 3 x 1 = 3. 1 x 2 = 2. 3 + 3 = 6. 6 + 3 = 9.\nFinal answer: 9", record)
    assert (lucky.wrong_counts, lucky.wrong_steps, lucky.wrong_arithmetic, lucky.error) == (2, 4, 0, "perception")
    # the right tally, green's weight taken for blue: true arithmetic on the wrong numbers
    swapped = check_chain("red 2, green 1, blue 1. 2 x 3 = 6. 1 x 1 = 1. 1 x 1 = 1. 6 + 1 = 7. 7 + 1 = 8.\nFinal answer: 8", record)
    assert (swapped.wrong_counts, swapped.wrong_steps, swapped.wrong_arithmetic, swapped.error) == (0, 2, 0, "reasoning")
    slip = check_chain("red 2, green 1, blue 1. 2 x 3 = 6. 1 x 1 = 1. 1 x 2 = 2. 6 + 1 = 7. 7 + 2 = 10.\nFinal answer: 9", record)
    assert (slip.wrong_steps, slip.wrong_arithmetic, slip.consistent, slip.error) == (1, 1, False, "reasoning")
    short = check_chain("red 2, green 1, blue 1. 2 x 3 = 6.\nFinal answer: 6", record)  # four operations missing
    assert short.wrong_steps == 4 and not short.correct
    missing = check_chain("red 2, green 1. 2 x 3 = 6. 1 x 1 = 1. 1 x 2 = 2. 6 + 1 = 7. 7 + 2 = 9.\nFinal answer: 9", record)
    assert (missing.wrong_counts, missing.error) == (1, "perception")  # blue's entry is missing
    assert check_chain("Final answer: 9", record).error == "perception"  # no tally at all
    count = {**record, "question": "How many red shapes are there?", "answer": "2", "cot": "red 2, green 1, blue 1.\nFinal answer: 2"}
    assert check_chain("red 2, green 1, blue 1.\nFinal answer: 2", count).correct
    assert check_chain("red 2, green 1, blue 1.\nFinal answer: 1", count).error == "reasoning"  # green's count read out
    # where each chain first goes wrong: the first wrong token, in the order written
    from mpo.demo.chains import first_error_end

    def cut(response: str) -> str | None:
        end = first_error_end(response, record)
        return None if end is None else response[:end]

    assert cut(record["cot"]) is None
    assert cut("red 1, green 3, blue 1. 1 x 3 = 3. 3 x 1 = 3.\nFinal answer: 9") == "red 1"  # a miscount
    assert cut(swapped_text := "red 2, green 1, blue 1. 2 x 3 = 6. 1 x 1 = 1. 1 x 1 = 1.\nFinal answer: 8") == (
        "red 2, green 1, blue 1. 2 x 3 = 6. 1 x 1 = 1. 1 x 1")  # green's weight for blue's: the right number
    assert swapped_text.startswith(cut(swapped_text))
    assert cut("red 2, green 1, blue 1. 2 x 3 = 7. 1 x 1 = 1.\nFinal answer: 9") == "red 2, green 1, blue 1. 2 x 3 = 7"
    assert cut("red 2, green 1, blue 1. 2 + 3 = 5.\nFinal answer: 9") == "red 2, green 1, blue 1. 2 +"  # the operator
    assert cut("red 2, green 1, blue 1. 2 x 3 = 6.\nFinal answer: 6") is None  # steps left out: wrong only as a whole
    responses = [record["cot"], "red 2, green 2, blue 1.\nFinal answer: 9", "red 2, green 1, blue 1. 2 x 3 = 6.\nFinal answer: 6",
                 record["cot"]]
    assert chain_shares([(response, record) for response in responses]) == {"none": 0.5, "perception": 0.25, "reasoning": 0.25}
    assert chain_shares([]) == {}  # nothing checked: no shares, not three zeros


def test_keep_right_chains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpo.demo.pair_filter import keep_right_chains

    record = {"id": "q", "question": "How many red or blue shapes are there?", "answer": "3",
              "scene": [{"colour": c, "shape": "circle", "x": 8, "y": 8, "size": 12} for c in ("red", "red", "green", "blue")],
              "cot": "red 2, green 1, blue 1. 2 + 1 = 3.\nFinal answer: 3"}
    chosen = [record["cot"], "red 2, green 1, blue 1. 2 + 2 = 3.\nFinal answer: 3", "red 1, green 1, blue 2. 1 + 2 = 3.\nFinal answer: 3"]
    annotations = tmp_path / "pairs" / "annotations"
    annotations.mkdir(parents=True)
    lines = [{"chosen": c, "rejected": "red 2, green 1, blue 1. 2 + 1 = 4.\nFinal answer: 4", "chosen_meta": {"id": "q"}} for c in chosen]
    (annotations / "s_pairs_vqa_correctness_rules.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (annotations / "s_pairs_vqa_format_rules.jsonl").write_text(json.dumps(lines[1]) + "\n")
    meta = {name: {"root": "task", "annotation": str(annotations / f"{name}.jsonl"), "repeat_time": 1.0, "length": n}
            for name, n in (("s_pairs_vqa_correctness_rules", 3), ("s_pairs_vqa_format_rules", 1))}
    (tmp_path / "pairs" / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)  # a relative output folder, as `mpo demo`'s default outputs/demo
    kept = keep_right_chains(tmp_path / "pairs" / "meta.json", {"q": record}, Path("checked"))
    # the slip (2 + 2 = 3) and the miscounted tally reach the right answer and are dropped
    assert kept["subsets"] == {"s_pairs_vqa_correctness_rules": 1, "s_pairs_vqa_format_rules": 1} and kept["dropped"] == 2
    new_meta = json.loads((tmp_path / "checked" / "meta.json").read_text())
    # Paths relative to the copy's folder: the pipeline's root and untouched annotations from there.
    assert new_meta["s_pairs_vqa_correctness_rules"]["annotation"] == "annotations/s_pairs_vqa_correctness_rules.jsonl"
    assert _lines(tmp_path / "checked" / new_meta["s_pairs_vqa_correctness_rules"]["annotation"]) == lines[:1]
    assert new_meta["s_pairs_vqa_format_rules"] == {**meta["s_pairs_vqa_format_rules"], "root": "../pairs/task",
                                                    "annotation": "../pairs/annotations/s_pairs_vqa_format_rules.jsonl"}
    assert len(_lines(annotations / "s_pairs_vqa_correctness_rules.jsonl")) == 3  # the pipeline's pairs stay


def test_pair_by_chains(tmp_path: Path) -> None:
    from data_pipeline.records import ResponseJudgement, SampleRecord
    from mpo.demo.pair_filter import pair_by_chains

    record = {"id": "q", "question": "How many red or blue shapes are there?", "answer": "3",
              "scene": [{"colour": c, "shape": "circle", "x": 8, "y": 8, "size": 12} for c in ("red", "red", "green", "blue")],
              "cot": "red 2, green 1, blue 1. 2 + 1 = 3.\nFinal answer: 3"}
    responses = [record["cot"],                                      # right chain
                 "red 2, green 1, blue 1. 2 + 2 = 3.\nFinal answer: 3",  # the right answer through a wrong operation
                 "red 2, green 1, blue 1. 2 + 2 = 4.\nFinal answer: 4",  # a wrong answer
                 "I do not know.",                                   # unparsable
                 record["cot"]]                                      # the right chain again
    status = ["correct", "correct", "incorrect", "unparsable", "correct"]
    answers = ["3", "3", "4", None, "3"]
    sampled = SampleRecord(id="q", dataset="s", line=1, image=["q.png"], question=record["question"], prompt="<image>\nQ",
                           system_prompt=None, answer="3", answer_format="final_answer", responses=responses,
                           finish_reasons=["stop"] * 5, judgements=[ResponseJudgement(s, a) for s, a in zip(status, answers)])
    describe = SampleRecord(id="d", dataset="d", line=2, image=["q.png"], question="Describe.", prompt="<image>\nD",
                            system_prompt=None, answer=None, answer_format="final_answer", responses=["red 2."],
                            finish_reasons=["stop"], judgements=[ResponseJudgement("unchecked", None)])
    pipeline = tmp_path / "pairs"
    (pipeline / "annotations").mkdir(parents=True)
    (pipeline / "work" / "s").mkdir(parents=True)
    (pipeline / "work" / "s" / "matched.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in (sampled, describe)))
    # the pipeline's pairs: the lucky chain is the chosen response of one of its two correctness pairs
    correctness = [{"chosen": responses[i], "rejected": responses[2], "chosen_meta": {"id": "q"}} for i in (0, 1)]
    (pipeline / "annotations" / "s_pairs_vqa_correctness_rules.jsonl").write_text("".join(json.dumps(x) + "\n" for x in correctness))
    (pipeline / "annotations" / "d_prefix_pair_sr0.5_wo_image.jsonl").write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    entry = {"root": str(tmp_path), "repeat_time": 1.0, "max_dynamic_patch": 1, "system_prompt": None}
    meta = {"s_pairs_vqa_correctness_rules": {**entry, "annotation": "annotations/s_pairs_vqa_correctness_rules.jsonl", "length": 2},
            "d_prefix_pair_sr0.5_wo_image": {**entry, "annotation": "annotations/d_prefix_pair_sr0.5_wo_image.jsonl", "length": 1}}
    (pipeline / "meta.json").write_text(json.dumps(meta))
    kept = pair_by_chains(pipeline / "meta.json", pipeline / "work" / "s" / "matched.jsonl", {"q": record}, tmp_path / "chains",
                          max_pairs=4, seed=0)
    # the right chain (once: its repeat adds nothing) against the lucky chain and the wrong answer,
    # and against the unparsable response; the Dropout-NTP subset as the pipeline wrote it
    assert kept["subsets"] == {"s_pairs_vqa_correctness_rules": 2, "s_pairs_vqa_format_rules": 1, "d_prefix_pair_sr0.5_wo_image": 1}
    assert kept["dropped"] == 1  # the pipeline's pair whose chosen chain is wrong
    new_meta = json.loads((tmp_path / "chains" / "meta.json").read_text())
    pairs = _lines(tmp_path / "chains" / new_meta["s_pairs_vqa_correctness_rules"]["annotation"])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(responses[0], responses[1]), (responses[0], responses[2])]
    assert [p["rejected_meta"]["index"] for p in pairs] == [1, 2] and pairs[0]["answer_gt"] == "3"
    [form] = _lines(tmp_path / "chains" / new_meta["s_pairs_vqa_format_rules"]["annotation"])
    assert (form["chosen"], form["rejected"]) == (responses[0], responses[3])
    # paths relative to the new folder: its own annotations, the pipeline's root and untouched subset
    assert new_meta["s_pairs_vqa_correctness_rules"]["annotation"] == "annotations/s_pairs_vqa_correctness_rules.jsonl"
    assert new_meta["d_prefix_pair_sr0.5_wo_image"]["annotation"] == "../pairs/annotations/d_prefix_pair_sr0.5_wo_image.jsonl"
    assert new_meta["s_pairs_vqa_correctness_rules"]["root"] == ".."
    assert new_meta["s_pairs_vqa_correctness_rules"]["max_dynamic_patch"] == 1
    few = pair_by_chains(pipeline / "meta.json", pipeline / "work" / "s" / "matched.jsonl", {"q": record}, tmp_path / "few",
                         max_pairs=1, seed=0)
    assert few["subsets"]["s_pairs_vqa_correctness_rules"] == 1
    # first_error: each rejected chain ends just past its first wrong token (the second operand of
    # both wrong chains), the unparsable one is whole
    cut = pair_by_chains(pipeline / "meta.json", pipeline / "work" / "s" / "matched.jsonl", {"q": record}, tmp_path / "cut",
                         max_pairs=4, seed=0, cut_at_first_error=True)
    cut_meta = json.loads((tmp_path / "cut" / "meta.json").read_text())
    pairs = _lines(tmp_path / "cut" / cut_meta["s_pairs_vqa_correctness_rules"]["annotation"])
    # both wrong chains part from the right one at their second operand, so they cut to one rejected response
    assert [(p["chosen"], p["rejected"], p["rejected_cut_from"]) for p in pairs] == [
        (responses[0], "red 2, green 1, blue 1. 2 + 2", responses[1])]
    assert cut["subsets"]["s_pairs_vqa_format_rules"] == 1


def test_tally_accuracy_and_pass_at_k(tmp_path: Path) -> None:
    from mpo.demo.accuracy import tally_accuracy

    describe = [{"cot": "red 2, green 1, blue 0."}, {"cot": "red 0, green 3, blue 1."}]
    responses = ["red 2, green 1, blue 0.", "red 0, green 2."]
    assert tally_accuracy(responses, describe) == (0.5, (3 + 1) / 6)  # the second: green wrong, blue missing
    matched = tmp_path / "matched.jsonl"
    statuses = [["incorrect", "correct"], ["unparsable", "incorrect"], ["correct", "correct"], ["incorrect", "incorrect"]]
    matched.write_text("".join(json.dumps({"id": str(i), "judgements": [{"status": s} for s in row]}) + "\n"
                               for i, row in enumerate(statuses)))
    assert pass_at_k(matched) == 0.5


def test_training_curves_one_colour_and_name_per_method(tmp_path: Path) -> None:
    from mpo.demo.plots import METHOD_COLOURS, training_curves_figure
    from mpo.demo.results import SeedResult, short_label

    runs = {}
    for method in ("sft", "mpo", "dpo", "sft_chosen"):
        run = tmp_path / method
        run.mkdir()
        row = {"step": 1, "loss": 1.0, "loss/sft": 1.0} if method == "sft" else {"step": 1, "loss": 1.0, "rewards/accuracies": 0.5}
        (run / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "step": 2}) + "\n")
        runs[method] = str(run)
    figure = training_curves_figure(SeedResult(seed=0, runs=runs))
    panels = {axis.get_title(): axis for axis in figure.axes}
    # SFT logs no rewards: every other run keeps its own colour in that panel, not the next in the cycle
    lines = {line.get_label(): line.get_color() for line in panels["rewards/accuracies"].get_lines()}
    assert lines == {short_label(m): METHOD_COLOURS[m] for m in ("mpo", "dpo", "sft_chosen")}
    [legend] = figure.legends
    assert {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)} == {
        short_label(m): METHOD_COLOURS[m] for m in runs}
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert not legend.get_window_extent(renderer).overlaps(figure._suptitle.get_window_extent(renderer))


def test_each_preset_its_own_folder_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpo.demo.run import claim_out_dir, default_out

    assert default_out("default") == Path("outputs/demo") and default_out("quick") == Path("outputs/demo-quick")
    out = tmp_path / "demo"
    claim_out_dir(out, "default", PRESETS["default"], force=False)
    claim_out_dir(out, "default", PRESETS["default"], force=False)  # the same run again may replace its results
    with pytest.raises(SystemExit, match="holds the results of `mpo demo --preset default` with other settings"):
        claim_out_dir(out, "quick", QUICK, force=False)
    claim_out_dir(out, "quick", QUICK, force=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="was not made by `mpo demo`"):
        claim_out_dir(tmp_path / "mine", "quick", QUICK, force=True)


def test_majority_baseline_swap_and_changed_share() -> None:
    from mpo.demo.accuracy import changed_share, majority_baseline, swap_images

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
