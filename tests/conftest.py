"""Shared fixtures: the tiny InternVL and MMPR data every test uses, trainer runs and launches.

* ``tiny_model_dir``: ``mpo.model.tiny.build_tiny_model(dir, size="tiny", seed=0)``, an HF
  directory that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load offline (64-px tiles,
  16 image tokens per tile, ~0.2 M parameters). Building it takes a few seconds.
* ``tiny_mmpr_dir``: ``mpo.data.tiny_mmpr.write_tiny_mmpr(dir, seed=0)``, the directory holding
  ``meta.json`` (4 subsets, 24 pairs: single-image, two-image, text-only, video); ``TINY_KINDS``
  gives the index of the first record of each kind.
* ``tiny_processor``, ``tiny_hf_model`` (float32, eval mode), ``tiny_pairs`` (one encoded pair
  of each kind): per test module.
* ``make_recipe(model_dir, data_dir, out, **train)``: a small training recipe (a dict);
  ``run_trainer(recipe, overrides)`` trains it in this process and returns its metrics rows,
  ``train_in_process`` the trained ``MPOTrainer``. Accelerate's process-wide state is reset after
  each of them and after every test.
* ``launch_env`` / ``launch``: real multi-process runs with ``accelerate launch``.

The session-scoped directories are shared by every test: treat them as read-only (copy them into
``tmp_path`` before changing anything). ``escaping_annotation`` is in such a copy, with one bad line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from mpo.data.tiny_mmpr import write_tiny_mmpr
from loopback import free_port
from mpo.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
TINY_KINDS = {"single_image": 0, "multi_image": 10, "text_only": 16, "video": 21}
"""The first record of each kind in ``tiny_mmpr_dir``'s meta.json order: shapes 0-9, multi 10-15,
text 16-20, video 21-23."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_mmpr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mmpr(tmp_path_factory.mktemp("tiny_mmpr")).parent


@pytest.fixture(scope="module")
def tiny_processor(tiny_model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_hf_model(tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_dataset(tiny_mmpr_dir: Path, tiny_processor):
    """The example data encoded as the trainer encodes it (4 video frames)."""
    from mpo.config import DataConfig
    from mpo.data.dataset import PreferenceDataset
    from mpo.data.records import load_records

    config = DataConfig(meta_path=str(tiny_mmpr_dir / "meta.json"), video_frames=4)
    return PreferenceDataset(load_records(config, seed=0), tiny_processor, config)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_dataset) -> dict:
    """One encoded pair of each kind of ``TINY_KINDS``, in that order."""
    return {kind: tiny_dataset[index] for kind, index in TINY_KINDS.items()}


def _dense_mask(batch):
    """``[R, 1, T, T]`` "may attend" of a shared-prefix or packed batch, from the layout's rule, as a
    plain SDPA mask would be."""
    import torch

    from mpo.model.pair_attention import may_attend

    pairs, parts = batch.pair_ids, batch.part_ids
    positions = torch.arange(pairs.shape[-1])
    rule = may_attend(pairs[:, :, None], parts[:, :, None], pairs[:, None, :], parts[:, None, :], positions[:, None], positions)
    return rule[:, None]


@pytest.fixture(scope="session")
def dense_mask():
    """``dense_mask(batch)``: the layout's attention rule as a dense ``[R, 1, T, T]`` mask."""
    return _dense_mask


@pytest.fixture
def escaping_annotation(tiny_mmpr_dir: Path, tmp_path: Path) -> Path:
    """An annotation of a copy of the tiny MMPR directory (its ``meta.json`` two levels up) whose
    line 3 names an image outside the image root (``../../../etc/passwd``)."""
    data = tmp_path / "escaping_mmpr"
    shutil.copytree(tiny_mmpr_dir, data)
    annotation = data / "annotations" / "multi_pairs_vqa_correctness_rules.jsonl"
    lines = annotation.read_text().splitlines()
    lines[2] = json.dumps({"image": ["../../../etc/passwd"], "question": "<image>\nQ", "chosen": "a", "rejected": "b"})
    annotation.write_text("\n".join(lines) + "\n")
    return annotation


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; a later ``Accelerator`` with other settings would
    be refused while it lives."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _make_recipe(model_dir: Path, data_dir: Path, out: Path, **train) -> dict:
    base_train = dict(lr=2e-3, warmup_ratio=0.0, lr_scheduler="constant", micro_batch_size=2,
                      gradient_accumulation_steps=2, max_steps=3, mixed_precision="no")
    base_train.update(train)
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"meta_path": str(data_dir / "meta.json"), "max_dynamic_patch": 4, "video_frames": 4, "shuffle": True},
        "train": base_train,
        "output_dir": str(out),
        "seed": 7,
    }


@pytest.fixture(scope="session")
def make_recipe():
    """``make_recipe(model_dir, data_dir, out, **train)``: 3 steps of 2 x 2 pairs, fp32, lr 2e-3."""
    return _make_recipe


def _train_in_process(recipe, overrides: list[str] | None = None, before_training=None):
    from mpo.config import Recipe, recipe_from_dict
    from mpo.train.trainer import MPOTrainer

    try:
        trainer = MPOTrainer(recipe if isinstance(recipe, Recipe) else recipe_from_dict(recipe, overrides))
        if before_training is not None:
            before_training(trainer)
        trainer.train()
    finally:
        reset_accelerate()
    return trainer


def _run_trainer(recipe, overrides: list[str] | None = None) -> list[dict]:
    trainer = _train_in_process(recipe, overrides)
    return metrics_rows(Path(trainer.recipe.output_dir))


def metrics_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def run_trainer():
    """``run_trainer(recipe, overrides=None)``: trains the recipe (a dict or a ``Recipe``) in this
    process and returns its ``metrics.jsonl`` rows; accelerate's state is reset afterwards."""
    return _run_trainer


@pytest.fixture(scope="session")
def train_in_process():
    """``train_in_process(recipe, overrides=None, before_training=None)``: as ``run_trainer``, but
    returns the trained ``MPOTrainer`` (``before_training(trainer)`` runs once it is set up)."""
    return _train_in_process


@pytest.fixture(scope="session")
def accelerate_reset():
    """``accelerate_reset()``: for a fixture that builds an ``Accelerator`` outside a test."""
    return reset_accelerate


@pytest.fixture(autouse=True)
def _accelerate_state_reset():
    """No test leaves accelerate's process-wide state to the next one."""
    yield
    reset_accelerate()


@pytest.fixture(scope="session")
def launch_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of every launched process: offline, one JIT build for the whole session."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))
    env.setdefault("MPO_CACHE", str(tmp_path_factory.mktemp("mpo_cache")))
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    return env


def _launch_command(config: str, program: list[str], args: list[str], processes: int = 2, extra: list[str] = (),
                    port: int | None = None) -> list[str]:
    # A free port each time: concurrent launches would collide on torchrun's default port 29500.
    return [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(REPO / "launch" / config),
        "--num_processes", str(processes), "--main_process_port", str(port or free_port()), *extra, *program, *args,
    ]  # fmt: skip


def _launch(env: dict, config: str, program: list[str], args: list[str], processes: int = 2) -> None:
    command = _launch_command(config, program, args, processes)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="session")
def launch_command():
    """``launch_command(config, program, args, processes=2, extra=(), port=None)``: the command line
    of an ``accelerate launch`` with ``launch/<config>``."""
    return _launch_command


@pytest.fixture(scope="session")
def launch():
    """``launch(env, config, program, args, processes=2)``: ``accelerate launch`` with ``launch/<config>``
    on a free port, from the repository root; fails the test with the output if a process fails."""
    return _launch


@pytest.fixture(scope="session")
def launch_probe() -> Path:
    """The program that trains like ``python -m mpo.train`` and records what each process saw."""
    return Path(__file__).with_name("launch_probe.py")
