"""Precomputed reference log-probs: training on them equals training with the live reference, and
a file that no longer matches the data, the model or the tiling/length settings is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mpo.config import load_recipe
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.errors import DataError
from mpo.model.loading import load_processor
from mpo.model.precomputed import PrecomputedReference
from mpo.train.precompute import compute

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"


def _overrides(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", f"data.meta_path={data_dir / 'meta.json'}", f"output_dir={out}",
        "train.max_steps=3", "train.save_every=0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def precomputed(tiny_model_dir, tiny_mmpr_dir, tmp_path_factory, accelerate_reset) -> tuple[Path, Path]:
    """(data directory, reference file) written by ``compute`` next to a copy of the example data."""
    data = tmp_path_factory.mktemp("precompute") / "data"
    shutil.copytree(tiny_mmpr_dir, data)
    try:
        path = compute(load_recipe(RECIPE, _overrides(tiny_model_dir, data, data / "unused")), None)
    finally:
        accelerate_reset()
    assert path.parent == data  # next to the data by default
    return data, path


def _open(model_dir: Path, data: Path, path: Path, *extra: str) -> PrecomputedReference:
    recipe = load_recipe(RECIPE, _overrides(model_dir, data, data / "unused", *extra))
    dataset = PreferenceDataset(load_records(recipe.data, recipe.seed), load_processor(recipe.model), recipe.data)
    return PrecomputedReference.open(path, recipe, dataset)


def _train(train_in_process, args: list[str]) -> tuple[str, list[dict]]:
    trainer = train_in_process(load_recipe(RECIPE, args))
    rows = (Path(trainer.recipe.output_dir) / "metrics.jsonl").read_text().splitlines()
    return type(trainer.reference).__name__, [json.loads(row) for row in rows]


def test_training_on_precomputed_log_probs_equals_the_live_reference(precomputed, tiny_model_dir, tmp_path, train_in_process):
    data, path = precomputed
    live_kind, live = _train(train_in_process, _overrides(tiny_model_dir, data, tmp_path / "live"))
    stored_kind, stored = _train(train_in_process, _overrides(tiny_model_dir, data, tmp_path / "stored", f"reference.precomputed_path={path}"))
    assert (live_kind, stored_kind) == ("FrozenModelReference", "PrecomputedReference")
    assert live[2]["bco/delta"] != 0.0
    for key in ("loss", "loss/dpo", "loss/bco", "loss/sft", "bco/delta", "rewards/chosen", "rewards/margins", "grad_norm"):
        assert [r[key] for r in stored] == pytest.approx([r[key] for r in live], rel=1e-4, abs=1e-5), key


def test_the_data_directory_can_move_with_its_file(precomputed, tiny_model_dir, tmp_path):
    """Keys are relative to the data directory, so a copied directory keeps a valid file."""
    data, path = precomputed
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    reference = _open(tiny_model_dir, moved, moved / path.name)
    assert len(reference.rows) == 24


def _edit_annotation(data: Path) -> None:
    annotation = data / "annotations" / "shapes_pairs_vqa_correctness_rules.jsonl"
    lines = annotation.read_text().splitlines()
    record = json.loads(lines[0])
    record["chosen"] += " Indeed."
    annotation.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")


def _fine_tuned_copy(model_dir: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    name = next(n for n in weights if "layers.0.mlp.up_proj" in n)
    weights[name] = weights[name] + 1e-3  # same shapes, same size: only the values differ
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _replace_image(data: Path, keep_stat: bool = False) -> None:
    """Another picture under the same name (same size and modification time with ``keep_stat``)."""
    image = data / "images" / "shapes_03.png"
    before = image.stat()
    replacement = (data / "images" / "shapes_04.png").read_bytes()
    if keep_stat:
        original = image.read_bytes()
        replacement = bytes(b ^ 0xFF for b in original)  # same length, other bytes
    image.write_bytes(replacement)
    if keep_stat:
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize(
    "change, expected",
    [
        ("annotation", "dataset (annotations)"),
        ("image", "dataset (images)"),
        ("model", "model (model.safetensors)"),
        ("model.attn_implementation=eager", "model (attn_implementation)"),
        ("data.max_length=1000", "settings (max_length)"),
        ("data.max_dynamic_patch=2", "settings (max_dynamic_patch)"),
        ("data.video_frames=2", "settings (video_frames)"),
        ("train.mixed_precision=bf16", "settings (mixed_precision)"),
        ("forward.layout=shared_prefix", "settings (layout)"),
        ("forward.attention=sdpa", "settings (attention)"),
    ],
)
def test_a_stale_file_is_refused(precomputed, tiny_model_dir, tmp_path, change, expected):
    """The file was computed in fp32 with the plain layout and the automatic attention path:
    another precision, layout, attention kernel or a replaced image makes it stale."""
    data, path = precomputed
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    model, extra = tiny_model_dir, []
    if change == "annotation":
        _edit_annotation(copy)
    elif change == "image":
        _replace_image(copy)
    elif change == "model":
        model = _fine_tuned_copy(tiny_model_dir, tmp_path / "model")
    else:
        extra = [change]
    with pytest.raises(DataError, match="stale precomputed reference log-probs") as error:
        _open(model, copy, copy / path.name, *extra)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_image_fingerprint_modes_trade_cost_for_certainty(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """An image rewritten with other bytes of the same length, its modification time put back:
    ``stat`` (size + mtime) cannot see it, ``content`` (a hash of the bytes) does; an image
    replaced the ordinary way changes both."""
    from mpo.model.precomputed import Fingerprint

    data = tmp_path / "data"
    shutil.copytree(tiny_mmpr_dir, data)

    def images(mode: str) -> str:
        recipe = load_recipe(RECIPE, _overrides(tiny_model_dir, data, tmp_path / "unused", f"reference.image_fingerprint={mode}"))
        return Fingerprint.of(recipe, load_records(recipe.data, recipe.seed)).dataset["images"]

    before = {mode: images(mode) for mode in ("stat", "content")}
    _replace_image(data, keep_stat=True)
    assert images("stat") == before["stat"]
    assert images("content") != before["content"]
    _replace_image(data)
    assert images("stat") != before["stat"]


def test_cli_refuses_a_stale_file_in_one_line_before_loading_models(precomputed, tiny_model_dir, tmp_path, capsys):
    from mpo.cli.main import main

    data, path = precomputed
    args = _overrides(tiny_model_dir, data, tmp_path / "run", f"reference.precomputed_path={path}", "data.max_length=1000")
    assert main(["train", str(RECIPE), *args]) == 2  # bad input
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line == err.strip().splitlines()[-1] == (
        f"error: {path}: stale precomputed reference log-probs: settings (max_length) changed since they were computed; "
        "run `mpo precompute-ref` again"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_pair_scored_differently_now_is_refused(precomputed, tiny_model_dir):
    """The stored token counts guard the lookup: a batch whose responses tokenize to other
    lengths (here: one token cut) cannot silently take the stored values."""
    from mpo.data.layouts import collate_plain

    data, path = precomputed
    reference = _open(tiny_model_dir, data, path)
    recipe = load_recipe(RECIPE, _overrides(tiny_model_dir, data, data / "unused"))
    dataset = PreferenceDataset(load_records(recipe.data, recipe.seed), load_processor(recipe.model), recipe.data)
    pair = dataset[0]
    batch = collate_plain([pair], pad_id=0)
    logps = reference(batch)
    assert logps.chosen_token_counts.tolist() == [len(pair.chosen_ids)]
    assert torch.isfinite(logps.chosen_logps).all()
    pair.chosen_ids = pair.chosen_ids[:-1]
    with pytest.raises(DataError, match="other response token counts"):
        reference(collate_plain([pair], pad_id=0))
