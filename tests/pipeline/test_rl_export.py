"""Pass rates as data and the hand-off to online RL: ``match``/``pair`` -> ``rl-prompts`` -> TRL.

The sample log is hand-made (``rl_cases``: every count worked out in its table); match and pair
run as the CLI runs them. TRL's side runs on TRL's own classes: the export loaded with
``datasets``, each prompt prepared by TRL's ``prepare_multimodal_messages`` and the processor's
chat template as ``GRPOTrainer`` does, one GSPO training step of a ``GRPOTrainer`` on the tiny
InternVL with the project's reward, and hand-written completions scored through the trainer's
reward call. verl's side: ``test_rl_verl.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.__main__ import main
from data_pipeline.rewards import accuracy_reward, compute_score
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE, chat_messages, encode_prompt, render
from rl_cases import MAX_TILES, PASS_RATES, QUESTIONS, SELECTED, prompt_of, write_workspace

REPO = Path(__file__).resolve().parents[2]
HISTOGRAM_LINE = ("pass rates (7 questions with a ground truth): 0: 1  (0,0.2): 0  [0.2,0.4): 1  [0.4,0.6): 2  "
                  "[0.6,0.8]: 2  (0.8,1): 0  1: 1   in [0.2, 0.8] (MMPR-Tiny): 5   no ground truth: 1")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-made log matched (``matched.jsonl`` + ``matched.pass_rates.jsonl``) and exported to ``rl/``."""
    root = write_workspace(tmp_path_factory.mktemp("rl"))
    assert main(["match", "--samples", str(root / "samples.jsonl"), "--out", str(root / "matched.jsonl"), "--no-progress"]) == 0
    assert main(["rl-prompts", "--pass-rates", str(root / "matched.pass_rates.jsonl"), "--image-root", str(root / "images"),
                 "--out-dir", str(root / "rl"), "--no-progress"]) == 0
    return root


def test_match_and_pair_write_the_pass_rates(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines = _lines(workspace / "matched.pass_rates.jsonl")
    assert [line["id"] for line in lines] == [q[0] for q in QUESTIONS]  # input order
    assert {line["id"]: (line["samples"], line["correct"], line["incorrect"], line["unparsable"], line["pass_rate"])
            for line in lines} == PASS_RATES
    assert lines[0] == {
        "id": "q1", "dataset": "toy", "line": 1, "image": ["a.png"], "question": "How many shapes?",
        "prompt": prompt_of("q1"), "prompt_version": "v1", "answer_format": "final_answer",
        "system_prompt": INTERNVL_SYSTEM_MESSAGE, "max_tiles": MAX_TILES, "answer": "3",
        "match_modes": ["exact", "option", "numeric", "vqa", "math"], "match_threshold": 0.9,
        "samples": 5, "correct": 1, "incorrect": 3, "unparsable": 1, "pass_rate": 0.2,
    }
    assert lines[6]["image"] == [] and lines[7]["match_modes"] == ["exact", "relaxed"]  # text-only; a chart's modes
    assert lines[5]["answer"] is None and lines[5]["correct"] is None  # Dropout-NTP's question: no pass rate

    # pair writes the same file beside its pairs (here under another name), and the histogram in its summary.
    capsys.readouterr()
    assert main(["pair", "--matched", str(workspace / "matched.jsonl"), "--image-root", str(workspace / "images"),
                 "--out-dir", str(tmp_path / "mmpr"), "--pass-rates", str(tmp_path / "rates.jsonl")]) == 0
    assert f"{HISTOGRAM_LINE} -> {tmp_path / 'rates.jsonl'}" in capsys.readouterr().out.splitlines()
    assert (tmp_path / "rates.jsonl").read_bytes() == (workspace / "matched.pass_rates.jsonl").read_bytes()
    selection = json.loads((workspace / "rl" / "selection.json").read_text())
    assert selection["histogram"] == {
        "questions": 7, "no_ground_truth": 1, "mmpr_tiny": 5,
        "bins": {"0": 1, "(0,0.2)": 0, "[0.2,0.4)": 1, "[0.4,0.6)": 2, "[0.6,0.8]": 2, "(0.8,1)": 0, "1": 1},
    }
    assert selection["per_dataset"] == {
        "chartqa_toy": {"questions": 1, "no_ground_truth": 0, "below": 0, "above": 0, "selected": 1},
        "toy": {"questions": 7, "no_ground_truth": 1, "below": 1, "above": 1, "selected": 4},
    }
    assert (selection["band"], selection["selected"], selection["system_prompt"]) == ([0.2, 0.8], 5, "as sampled")


@pytest.mark.parametrize(("band", "expected"), [
    ([], SELECTED),  # MMPR-Tiny's [0.2, 0.8], both edges kept
    (["--min-pass-rate", "0.3", "--max-pass-rate", "0.7"], ["q5", "q7", "q8"]),
    (["--min-pass-rate", "0", "--max-pass-rate", "0.5"], ["q1", "q3", "q7", "q8"]),  # all-wrong q3 at 0
    (["--min-pass-rate", "0.9", "--max-pass-rate", "1"], ["q4"]),
])
def test_rl_prompts_selects_by_band(workspace: Path, tmp_path: Path, band: list[str], expected: list[str]) -> None:
    assert main(["rl-prompts", "--pass-rates", str(workspace / "matched.pass_rates.jsonl"), "--image-root",
                 str(workspace / "images"), "--out-dir", str(tmp_path), "--format", "verl", "--no-progress", *band]) == 0
    rows = pq.read_table(tmp_path / "verl.parquet").to_pylist()
    assert [row["extra_info"]["id"] for row in rows] == expected
    assert [row["extra_info"]["index"] for row in rows] == list(range(len(expected)))
    assert not (tmp_path / "trl.parquet").exists()


def test_verl_rows(workspace: Path) -> None:
    """verl's columns; the text after each <image> starts without the template's own newline."""
    rows = pq.read_table(workspace / "rl" / "verl.parquet").to_pylist()
    images = workspace / "images"
    system = {"role": "system", "content": INTERNVL_SYSTEM_MESSAGE}
    assert rows[0] == {
        "data_source": "toy",
        "prompt": [system, {"role": "user", "content": "<image>" + prompt_of("q1").removeprefix("<image>\n")}],
        "images": [str(images / "a.png")], "ability": "vqa",
        "reward_model": {"style": "rule", "ground_truth": ["3"]},
        "extra_info": {"index": 0, "id": "q1", "dataset": "toy", "answer_format": "final_answer",
                       "match_modes": ["exact", "option", "numeric", "vqa", "math"], "match_threshold": 0.9,
                       "prompt_version": "v1", "max_tiles": MAX_TILES, "samples": 5, "correct": 1, "pass_rate": 0.2,
                       "image_root": str(images), "image_paths": ["a.png"]},
    }
    two_images = prompt_of("q5").replace("Image-1: <image>\nImage-2: <image>\n", "Image-1: <image>Image-2: <image>")
    assert rows[2]["prompt"][1]["content"] == two_images
    assert rows[2]["images"] == [str(images / "a.png"), str(images / "c.png")]
    assert rows[2]["reward_model"]["ground_truth"] == ["4", "four"]
    assert (rows[3]["images"], rows[3]["prompt"][1]["content"]) == ([], prompt_of("q7"))  # text-only
    assert (rows[4]["data_source"], rows[4]["extra_info"]["match_modes"]) == ("chartqa_toy", ["exact", "relaxed"])


def test_trl_rows_and_system_prompt_override(workspace: Path, tmp_path: Path) -> None:
    rows = pq.read_table(workspace / "rl" / "trl.parquet").to_pylist()
    assert [row["id"] for row in rows] == SELECTED
    assert rows[2] == {
        "prompt": [
            {"role": "system", "content": [{"type": "text", "text": INTERNVL_SYSTEM_MESSAGE}]},
            {"role": "user", "content": [{"type": "text", "text": "Image-1: "}, {"type": "image", "text": None},
                                         {"type": "text", "text": "Image-2: "}, {"type": "image", "text": None},
                                         {"type": "text", "text": prompt_of("q5").split("Image-2: <image>\n")[1]}]},
        ],
        "images": [{"bytes": None, "path": str(workspace / "images" / "a.png")},
                   {"bytes": None, "path": str(workspace / "images" / "c.png")}],
        "solution": ["4", "four"], "answer_format": "final_answer",
        "match_modes": ["exact", "option", "numeric", "vqa", "math"], "match_threshold": 0.9,
        "dataset": "toy", "id": "q5", "pass_rate": 0.6,
    }
    assert main(["rl-prompts", "--pass-rates", str(workspace / "matched.pass_rates.jsonl"), "--image-root",
                 str(workspace / "images"), "--out-dir", str(tmp_path), "--system-prompt", "none", "--no-progress"]) == 0
    assert [m["role"] for m in pq.read_table(tmp_path / "trl.parquet").to_pylist()[0]["prompt"]] == ["user"]
    assert [m["role"] for m in pq.read_table(tmp_path / "verl.parquet").to_pylist()[0]["prompt"]] == ["user"]
    assert json.loads((tmp_path / "selection.json").read_text())["system_prompt"] == "none"


def _rewrite(workspace: Path, tmp_path: Path, line: int, change: dict | str) -> Path:
    """A copy of the pass-rate file with one line changed (a dict: fields replaced; a string: the raw line)."""
    lines = (workspace / "matched.pass_rates.jsonl").read_text(encoding="utf-8").splitlines()
    lines[line - 1] = change if isinstance(change, str) else json.dumps({**json.loads(lines[line - 1]), **change})
    path = tmp_path / "rates.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("line", "change", "message"), [
    (1, {"image": ["../a.png"]}, "1: image: path '../a.png' is outside the image root {root}: '..' is not allowed"),
    (1, {"image": ["/etc/passwd"]}, "1: image: path '/etc/passwd' is outside the image root {root}"),
    (2, {"image": ["gone.png"]}, "2: image: file not found: {root}/gone.png"),
    (3, {"pass_rate": 0.5}, "3: pass_rate: must be correct / samples = 0/2"),
    (5, {"correct": 9}, "5: correct: must be an integer from 0 to samples (5)"),
    (5, {"prompt": "<image>\nOne placeholder, two images"}, "5: prompt: has 1 <image> placeholder(s) but 2 image(s)"),
    (7, {"answer_format": "latex"}, "7: answer_format: must be one of final_answer, boxed"),
    (1, {"max_tiles": "six"}, "1: max_tiles: must be an integer or null"),
    (8, {"id": "q1", "dataset": "toy"}, "8: id: question 'q1' of dataset 'toy' also on {file}:1"),
    (4, "{not json", "4: <line>: malformed JSON (Expecting property name enclosed in double quotes at column 2)"),
])
def test_bad_pass_rate_lines_stop_with_one_line(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                line: int, change, message: str) -> None:
    path = _rewrite(workspace, tmp_path, line, change)
    capsys.readouterr()
    code = main(["rl-prompts", "--pass-rates", str(path), "--image-root", str(workspace / "images"),
                 "--out-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"mpo-data: error: {path}:" + message.format(root=workspace / "images", file=path)
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_empty_band_fails_without_writing(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rates = workspace / "matched.pass_rates.jsonl"
    assert main(["rl-prompts", "--pass-rates", str(rates), "--image-root", str(workspace / "images"), "--out-dir",
                 str(tmp_path / "out"), "--min-pass-rate", "0.85", "--max-pass-rate", "0.9", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"mpo-data: error: {rates}: no question has a pass rate in [0.85, 0.9]"
    assert not (tmp_path / "out").exists()


def test_reward_module_needs_no_torch() -> None:
    """verl's environment and reward workers import it: standard library and the matcher only."""
    code = ("import sys, data_pipeline.rewards; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'numpy', 'PIL', 'mpo', 'math_verify'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_reward_values() -> None:
    """One score per completion: 1 correct, 0 wrong or unparsable, by the row's format and modes."""
    assert compute_score("toy", "Counting.\nFinal answer: 3", ["3"], {"answer_format": "final_answer"}) == \
        {"score": 1.0, "acc": 1.0, "parsed": 1.0}
    assert compute_score("toy", "Final answer: 3", ["3"]) == {"score": 0.0, "acc": 0.0, "parsed": 0.0}  # no rationale
    assert compute_score("toy", "So.\nAnswer: \\boxed{\\frac{2}{4}}", ["0.5"], {"answer_format": "boxed"})["score"] == 1.0
    # modes: 12.9 is 12.5 within a chart's 5 %, not by the default modes; a dataset name picks them when
    # absent. An integer truth is exact in every mode, a chart's too (103 is not 100).
    assert compute_score("chartqa_toy", "R.\nFinal answer: 12.9", ["12.5"], {"match_modes": ["exact", "relaxed"]})["score"] == 1.0
    assert compute_score("toy", "R.\nFinal answer: 12.9", ["12.5"])["score"] == 0.0
    assert compute_score("chartqa_toy", "R.\nFinal answer: 12.9", ["12.5"])["score"] == 1.0
    assert compute_score("chartqa_toy", "R.\nFinal answer: 103", ["100"])["score"] == 0.0
    # ANLS 1 - 1/11 = 0.909: above the default threshold 0.9, not above a row's 0.95.
    assert compute_score("docvqa_toy", "R.\nFinal answer: helo world", ["hello world"])["score"] == 1.0
    assert compute_score("docvqa_toy", "R.\nFinal answer: helo world", ["hello world"], {"match_threshold": 0.95})["score"] == 0.0
    conversational = [[{"role": "assistant", "content": "Two and two.\nFinal answer: four"}],
                      [{"role": "assistant", "content": [{"type": "text", "text": "Hm.\nFinal answer: 5"}]}]]
    assert accuracy_reward(conversational, solution=[["4", "four"], "4"]) == [1.0, 0.0]
    assert accuracy_reward(["Thus.\nFinal answer: B."], solution=[["B"]], answer_format=["final_answer"],
                           match_modes=[["exact", "option"]], match_threshold=[None], dataset=["toy"], id=["q2"]) == [1.0]
    with pytest.raises(ValueError, match="ground truth must be a string or a non-empty list of strings, got"):
        compute_score("toy", "R.\nFinal answer: 3", [])


@pytest.fixture
def trl_dataset(workspace: Path):
    from datasets import Dataset

    return Dataset.from_parquet(str(workspace / "rl" / "trl.parquet"))


def test_trl_prompts_render_as_sampled(trl_dataset, tiny_model_dir: Path) -> None:
    """TRL's own preparation of each row gives the prompt text and token ids the samples were drawn with."""
    from transformers import AutoProcessor
    from trl.data_utils import is_conversational, prepare_multimodal_messages

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert len(trl_dataset) == 5 and is_conversational(trl_dataset[0])
    for row in trl_dataset:
        assert all(isinstance(image, Image.Image) for image in row["images"])  # datasets' Image feature, by path
        messages = prepare_multimodal_messages(row["prompt"], images=row["images"])  # as GRPOTrainer does
        prompt = prompt_of(row["id"])
        expected = render(processor, chat_messages(prompt, len(row["images"]), INTERNVL_SYSTEM_MESSAGE))
        assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
        ids = processor.apply_chat_template([messages], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
        images = [image.convert("RGB") for image in row["images"]]
        assert list(ids) == encode_prompt(processor, prompt, images, MAX_TILES, INTERNVL_SYSTEM_MESSAGE)["input_ids"][0].tolist()


def test_grpo_trainer_trains_a_step_with_the_reward(trl_dataset, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A GSPO step (TRL's GRPOTrainer, sequence-level importance sampling) on the export, then completions scored
    through the trainer's own reward call, which passes the dataset's columns to the reward function."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_completion_length=8,
                      max_steps=1, importance_sampling_level="sequence", loss_type="grpo", beta=0.0, use_cpu=True,
                      bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny_model_dir), reward_funcs=[accuracy_reward],
                          args=args, train_dataset=trl_dataset, processing_class=AutoProcessor.from_pretrained(tiny_model_dir))
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["step"] == 1 and "rewards/accuracy_reward/mean" in logged and 0.0 <= logged["reward"] <= 1.0

    rows = [trl_dataset[i] for i in (0, 0, 3, 4, 4)]  # q1 twice, q7, q8 twice
    texts = ["Counting.\nFinal answer: 3", "Final answer: 3", "Half.\nFinal answer: \\frac{2}{4}",
             "The bar.\nFinal answer: 12.9", "The bar.\nFinal answer: 15"]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    rewards = trainer._calculate_rewards(rows, [row["prompt"] for row in rows], completions, [[0]] * len(rows))
    assert rewards[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
