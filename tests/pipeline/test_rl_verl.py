"""``mpo-data rl-prompts``' verl export read by verl 0.9.1 itself, and the reward scored through verl.

verl pins transformers < 5.11 and pulls in ray and hydra, so it lives in its own environment,
built by ``scripts/setup_verl.sh`` (``make verl-venv``) and found at ``$MPO_VERL_VENV`` (default
``.cache/verl-venv``). ``tests/verl_probe.py`` runs there: verl's trainer config composed by hydra,
``RLHFDataset`` over the export with the tiny InternVL's tokenizer and processor, the rollout's
prompt tokenizer, and the reward loop worker with ``reward.custom_reward_function`` pointing at
``data_pipeline/rewards.py`` (by file, then as ``pkg://data_pipeline.rewards``). Without the
environment the test skips and says why, unless ``MPO_REQUIRE_VERL=1`` (CI sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.__main__ import main
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE, chat_messages, encode_prompt, render
from rl_cases import MAX_TILES, SELECTED, prompt_of, write_workspace

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MPO_VERL_VENV", REPO / ".cache" / "verl-venv"))
REQUIRED = os.environ.get("MPO_REQUIRE_VERL") == "1"

# Completions per row of the export (0 q1, 2 q5, 3 q7, 4 q8) and the reward each must get.
COMPLETIONS = {
    "0": ["Counting.\nFinal answer: 3", "Final answer: 3"],  # right; no rationale: unparsable
    "2": ["Two and two.\nFinal answer: four"],  # the second acceptable answer
    "3": ["Half.\nFinal answer: \\frac{2}{4}", "Half.\nFinal answer: 0.4"],  # math-verify; wrong
    "4": ["The bar.\nFinal answer: 12.9", "The bar.\nFinal answer: 15"],  # a chart's relaxed 5 %; wrong
}
REWARDS = [  # (row, score, parsed)
    (0, 1.0, 1.0), (0, 0.0, 0.0), (2, 1.0, 1.0), (3, 1.0, 1.0), (3, 0.0, 1.0), (4, 1.0, 1.0), (4, 0.0, 1.0),
]


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (MPO_REQUIRE_VERL=1)")
    pytest.skip(f"{reason}; build it with scripts/setup_verl.sh (make verl-venv) or point MPO_VERL_VENV at one")


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict]:
    python = VENV / "bin" / "python"
    if not python.exists():
        unavailable(f"no verl environment at {VENV}")
    root = write_workspace(tmp_path_factory.mktemp("rl_verl"))
    assert main(["match", "--samples", str(root / "samples.jsonl"), "--out", str(root / "matched.jsonl"), "--no-progress"]) == 0
    assert main(["rl-prompts", "--pass-rates", str(root / "matched.pass_rates.jsonl"), "--image-root", str(root / "images"),
                 "--out-dir", str(root / "rl"), "--format", "verl", "--no-progress"]) == 0
    (root / "completions.json").write_text(json.dumps(COMPLETIONS))
    # The checkout first on the path, so verl's environment runs this tree's reward module.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [str(python), str(REPO / "tests" / "verl_probe.py"), "--parquet", str(root / "rl" / "verl.parquet"),
               "--model", str(tiny_model_dir), "--completions", str(root / "completions.json"), "--out", str(root / "probe.json")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, json.loads((root / "probe.json").read_text())


def test_rlhf_dataset_reads_the_export_as_sampled(probed: tuple[Path, dict], tiny_model_dir: Path) -> None:
    """verl's rows, the prompt its chat template renders and its rollout's prompt token ids are the
    renderer's, for one image, two images and text only."""
    from transformers import AutoProcessor

    root, result = probed
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = result["rows"]
    assert [row["extra_info"]["id"] for row in rows] == SELECTED
    assert [row["index"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[4]["data_source"] == "chartqa_toy" and rows[4]["ability"] == "vqa"
    assert rows[2]["reward_model"] == {"style": "rule", "ground_truth": ["4", "four"]}
    # RLHFDataset splits the user text at each <image> into parts; a text-only row keeps strings.
    assert rows[0]["parts"] == [["text"], ["image", "text"]]
    assert rows[2]["parts"] == [["text"], ["text", "image", "text", "image", "text"]]
    assert rows[3]["parts"] == [["str"], ["str"]]
    for row in rows:
        question_id = row["extra_info"]["id"]
        names = row["extra_info"]["image_paths"]
        images = [Image.open(root / "images" / name).convert("RGB") for name in names]
        expected = render(processor, chat_messages(prompt_of(question_id), len(images), INTERNVL_SYSTEM_MESSAGE))
        assert row["rendered"] == expected, question_id
        ids = encode_prompt(processor, prompt_of(question_id), images, MAX_TILES, INTERNVL_SYSTEM_MESSAGE)["input_ids"][0]
        assert row["prompt_ids"] == ids.tolist(), question_id
        # verl reads images through qwen-vl-utils, which resizes them to multiples of 28 pixels
        # (64 -> 56 here); the one-tile prompt is the same, the pixels are not the trainer's.
        assert row["image_sizes"] == [[56, 56]] * len(names)
    assert result["gspo"] == {"adv_estimator": "grpo", "loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean",
                              "clip_ratio": [0.0003, 0.0004], "use_kl_loss": False, "use_kl_in_reward": False, "n": 16}


def test_verl_reward_loop_scores_with_the_matcher(probed: tuple[Path, dict]) -> None:
    _, result = probed
    expected = [{"index": row, "completion": text, "reward_score": score,
                 "reward_extra_info": {"acc": score, "parsed": parsed, "score": score}}
                for (row, score, parsed), text in zip(REWARDS, [t for texts in COMPLETIONS.values() for t in texts])]
    assert result["rewards_file"] == expected
    assert result["rewards_package"] == expected
