"""One ``mpo train`` run with ``report_to: [tensorboard, wandb]`` (W&B offline), read back: every
metric of metrics.jsonl at every step, and the recipe, in tensorboard's event files (its own
event reader) and in W&B's offline run file (its records, parsed with wandb's own protobuf
schema); and the console of that run: one summary block, none of the libraries' noise."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from mpo.config import load_recipe
from mpo.train.metrics import flat_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tiny_mmpr_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.meta_path={tiny_mmpr_dir / 'meta.json'}", f"output_dir={out}",
                 "train.max_steps=2", "train.save_every=1", "data.eval_fraction=0.2", "train.eval_every=1", "report_to=[tensorboard, wandb]", "project=mpo-test", "run_name=tiny"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("DS_ACCELERATOR", None)
    result = subprocess.run([sys.executable, "-m", "mpo", "train", str(RECIPE), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows, flat_config(load_recipe(RECIPE, overrides).to_dict()), result


def test_tensorboard_holds_every_metric_and_the_recipe(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, rows, config, _ = tracked_run
    logdir = out / "logs" / "mpo-test"
    scalars = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    scalars.Reload()
    assert set(scalars.Tags()["scalars"]) == set(rows[0]) - {"step"}
    for key in set(rows[0]) - {"step"}:
        events = scalars.Scalars(key)
        assert [e.step for e in events] == [1, 2], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6, nan_ok=True), key
    (hparams_dir,) = [d for d in logdir.iterdir() if d.is_dir() and list(d.glob("events.out.tfevents.*"))]
    session = EventAccumulator(str(hparams_dir))
    session.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(session.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    stored = start.session_start_info.hparams
    assert set(stored) == set(config)
    for key, value in config.items():
        field = stored[key].WhichOneof("kind")
        got = {"number_value": stored[key].number_value, "string_value": stored[key].string_value,
               "bool_value": stored[key].bool_value}[field]
        assert got == value, key
    assert stored["train.lr"].number_value == 1e-3 and stored["report_to"].string_value == "tensorboard,wandb"


def wandb_records(path: Path):
    """The records of a ``.wandb`` file: LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header: CRC-32 of type + data, length, type full/first/middle/last) after W&B's own
    7-byte header ``:W&B``, 0xBEE1, version; each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length, kind) == (0, 0):  # the zero padding at a block's end
            position += left
            continue
        if position + 7 + length > len(data):
            return  # a chunk still being written
        chunk = data[position + 7:position + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    """A config or history item's name (W&B writes it in ``key`` or, for history, ``nested_key``)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_every_metric_and_the_recipe(tracked_run):
    out, rows, config, _ = tracked_run
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert run_dir.name.endswith((out / "wandb_run_id").read_text())  # a resumed run continues it
    # wandb's service process may still be flushing the file after the run's process exited.
    deadline = time.monotonic() + 60
    while True:
        records = list(wandb_records(next(run_dir.glob("*.wandb"))))
        if sum(r.WhichOneof("record_type") == "history" for r in records) >= len(rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("mpo-test", "tiny")
    stored = {_key(item): json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert {key: stored[key] for key in config} == config
    history = [{_key(item): json.loads(item.value_json) for item in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2]
    for logged, row in zip(history, rows):
        for key, value in row.items():
            if key != "step":
                assert logged[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key


def test_console_is_one_summary_and_no_library_noise(tracked_run, tiny_model_dir, tiny_mmpr_dir):
    out, _, _, result = tracked_run
    console = result.stdout + result.stderr
    for noise in ("Removed shared tensor", "Setting accelerator to CPU", "Loading weights", "Writing model shards"):
        assert noise not in console, noise
    lines = console.splitlines()
    start = lines.index("MPO run")
    assert lines[start + 1:start + 12] == [
        f"  model         {tiny_model_dir} (175,968 parameters, 175,968 trainable)",
        "  data          19 pairs from 4 subset(s): shapes_pairs_vqa_correctness_rules 9, multi_pairs_vqa_correctness_rules 4, "
        "text_prefix_pair_sr0.5_wo_image 4, video_pairs_vqa_correctness_rules 2; 0 skipped",
        "  evaluation    5 held-out pairs, every 1 steps and after the last step",
        "  layout        auto (shared_prefix, or packed where it removes padding), vision once per pair",
        "  reference     a frozen copy of the starting model",
        "  precision     weights float32, mixed precision no",
        "  gradients     summed in fp32, clipped at norm 1",
        "  processes     1 (one process)",
        "  global batch  4 pairs = micro-batch 2 x accumulation 2 x 1 process(es)",
        "  steps         2 (0.50 epochs; from step 0); 3 pair(s) per epoch do not fill a global batch and are left out",
        f"  outputs       {out}: checkpoints every 1 steps, final/, metrics.jsonl; trackers: tensorboard, wandb",
    ]
