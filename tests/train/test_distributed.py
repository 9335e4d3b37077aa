"""Every ``launch/`` config, run for real: ``accelerate launch`` subprocesses on CPU (gloo), tiny model.

A 1-process run with micro-batch 2 x accumulation 2 and a 2-process run with micro-batch 1 x
accumulation 2 train on the same 4 pairs at every step (the global batch is a function of seed
and step only, :mod:`mpo.data.batch_order`), average the same per-pair terms and gradients, and fold the
same rewards into the reward shift delta (all-reduced sum and count). So they must log the same
losses step by step, and every process must end with the same delta as the single one.

One launch per config keeps this suite lean (each launch pays the imports of two processes, and
the first DeepSpeed one a ~45 s JIT build of a communication op, cached in TORCH_EXTENSIONS_DIR):

====================  ==========================================================================
single_gpu.yaml       the 1-process run everything is compared with
ddp.yaml              losses, delta and evaluation match
zero2.yaml            losses, delta and evaluation match
zero3.yaml            losses, delta and evaluation match; reference sharded; the final save and
                      every checkpoint are one plain HF directory, equal to the 1-process one
two_node_zero3.yaml   two "machines" on localhost (machine_rank 0 and 1, one process each) resume
                      the ZeRO-3 run from its step-2 checkpoint and reproduce its step 3
zero1.yaml            LoRA: losses and evaluation match a 1-process LoRA run; adapter and merged
                      model saved, checkpoints open with peft (LoRA under zero3.yaml too: merged
                      from the gathered shards)
zero3_offload.yaml    ``mpo precompute-ref`` with the reference's weights offloaded to CPU; the
                      stored log-probs equal a 1-process precompute. Training with this config
                      needs DeepSpeed's CPU Adam, a further JIT build of minutes, so it is not run
                      here (it was run by hand: same losses as the 1-process run).
====================  ==========================================================================

Every run evaluates on 11 held-out pairs (one-image, text-only, video) at steps 2 and 3: 6 and 5
on the two processes, one micro-batch of 1 pair at a time (the second process's last one empty),
against 2 per micro-batch in one process, so only an exact pair-weighted mean agrees.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from loopback import free_port
from mpo.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
PROBE = Path(__file__).resolve().parents[1] / "launch_probe.py"
COMPARED = ("loss", "loss/dpo", "loss/bco", "loss/sft", "bco/delta", "rewards/margins", "logps/chosen", "lr", "grad_norm")
EVALUATED = ("eval/loss", "eval/loss/dpo", "eval/loss/bco", "eval/loss/sft", "eval/rewards/margins",
             "eval/rewards/accuracies", "eval/logps/chosen", "eval/logps/rejected")


@pytest.fixture(scope="session")
def eval_meta(tiny_mmpr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A meta.json of 11 held-out pairs: a seeded 3 of the one-image pairs, the 5 text-only, the 3 video."""
    spec = json.loads((tiny_mmpr_dir / "meta.json").read_text())
    names = ("shapes_pairs_vqa_correctness_rules", "text_prefix_pair_sr0.5_wo_image", "video_pairs_vqa_correctness_rules")
    meta = {n: dict(spec[n], root=str(tiny_mmpr_dir / spec[n]["root"]), annotation=str(tiny_mmpr_dir / spec[n]["annotation"])) for n in names}
    meta[names[0]]["repeat_time"] = 0.3
    path = tmp_path_factory.mktemp("eval") / "meta.json"
    path.write_text(json.dumps(meta))
    return path


def overrides(model_dir: Path, data_dir: Path, out: Path, **extra) -> list[str]:
    values = {
        "model.name_or_path": model_dir,
        "data.meta_path": data_dir / "meta.json",
        "output_dir": out,
        "train.max_steps": 3,
        "train.save_every": 0,
        "train.micro_batch_size": 1,
        "train.gradient_accumulation_steps": 2,
        "report_to": "none",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rank_views(out: Path, world_size: int) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def assert_same_losses(rows: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for key in COMPARED:
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in expected], rel=1e-4, abs=1e-5), key


def assert_same_evaluation(rows: list[dict], expected: list[dict]) -> None:
    """Evaluated at steps 2 and 3, all 11 held-out pairs, the same means as ``expected``."""
    evaluated, reference = [r for r in rows if "eval/loss" in r], [r for r in expected if "eval/loss" in r]
    assert [r["step"] for r in evaluated] == [r["step"] for r in reference] == [2, 3]
    assert {r["eval/pairs"] for r in evaluated} == {11.0}
    for key in EVALUATED:
        assert [r[key] for r in evaluated] == pytest.approx([r[key] for r in reference], rel=1e-4, abs=1e-5), key


@pytest.fixture(scope="module")
def launched(launch_env, tiny_model_dir, tiny_mmpr_dir, eval_meta, tmp_path_factory, launch):
    """``launched(config)``: the output directory of the probe trained under ``config`` (once)."""
    outputs: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in outputs:
            out = tmp_path_factory.mktemp(config.removesuffix(".yaml"))
            evaluated = {"data.eval_meta_path": eval_meta, "train.eval_every": 2}
            if config == "single_gpu.yaml":
                args = overrides(tiny_model_dir, tiny_mmpr_dir, out, **evaluated, **{"train.micro_batch_size": 2})
                launch(launch_env, config, [str(PROBE), str(RECIPE)], args, processes=1)
            else:
                extra = {"train.save_every": 2} if config == "zero3.yaml" else {}
                args = overrides(tiny_model_dir, tiny_mmpr_dir, out, **evaluated, **extra)
                launch(launch_env, config, [str(PROBE), str(RECIPE)], args)
            outputs[config] = out
        return outputs[config]

    return get


def test_launch_configs_parse_and_say_what_they_are():
    """Every config loads with accelerate's own parser, opens with a one-line comment, keeps
    ``use_cpu: false`` (true would silently start a single process), and ZeRO-3 ones gather a
    16-bit model on save (without it the final save under ZeRO-3 fails)."""
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.name for p in LAUNCH.glob("*.yaml"))
    assert names == sorted(
        ["single_gpu.yaml", "ddp.yaml", "zero1.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "two_node_zero3.yaml"]
    )
    for name in names:
        path = LAUNCH / name
        assert path.read_text().startswith("# "), name
        config = load_config_from_file(str(path))
        assert config.use_cpu is False, name
        raw = yaml.safe_load(path.read_text())
        if raw.get("distributed_type") == "DEEPSPEED":
            stage = raw["deepspeed_config"]["zero_stage"]
            assert stage == int(name[4]) if name.startswith("zero") else stage == 3, name
            if stage == 3:
                assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True, name
    two_node = yaml.safe_load((LAUNCH / "two_node_zero3.yaml").read_text())
    assert two_node["num_machines"] == 2 and two_node["main_process_ip"] and "machine_rank" in two_node
    offload = yaml.safe_load((LAUNCH / "zero3_offload.yaml").read_text())["deepspeed_config"]
    assert offload["offload_param_device"] == offload["offload_optimizer_device"] == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp.yaml", "zero2.yaml", "zero3.yaml"])
def test_two_processes_match_one_process(launched, config):
    single = launched("single_gpu.yaml")
    out = launched(config)
    assert_same_losses(metrics(out), metrics(single))
    assert_same_evaluation(metrics(out), metrics(single))
    assert metrics(out)[2]["bco/delta"] != 0.0  # delta really moved by step 3
    (alone,) = rank_views(single, 1)
    views = rank_views(out, 2)
    assert {v["world_size"] for v in views} == {2}
    assert views[0]["delta"] == views[1]["delta"]  # all-reduced: bit-identical on every rank
    assert views[0]["delta"] == pytest.approx(alone["delta"], rel=1e-5)
    assert views[0]["delta_updates"] == alone["delta_updates"] == 3
    for view in views:
        assert view["reference"] == "FrozenModelReference"
        (reference_local, reference_total), (policy_local, policy_total) = view["reference_numel"], view["policy_numel"]
        assert reference_total == policy_total == alone["reference_numel"][1]
        if config == "zero3.yaml":
            # Sharded like the policy: each process holds about half, never a full replica.
            assert reference_local < 0.6 * reference_total and policy_local < 0.6 * policy_total
        else:
            assert reference_local == reference_total


@pytest.mark.slow
def test_zero3_save_is_one_plain_transformers_directory(launched):
    """The ZeRO-3 shards are gathered into one safetensors directory that plain transformers
    loads, holding the same weights as the 1-process run's final model; every checkpoint holds
    such a directory beside DeepSpeed's own files, the last one the final weights."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from safetensors import safe_open

    checkpoints = launched("zero3.yaml") / "checkpoints"
    for step in (2, 3):
        assert (checkpoints / f"step-{step:08d}" / "pytorch_model").is_dir()  # DeepSpeed's engine state
        AutoProcessor.from_pretrained(checkpoints / f"step-{step:08d}")
    last = AutoModelForImageTextToText.from_pretrained(checkpoints / "step-00000003").state_dict()
    final = launched("zero3.yaml") / "final"
    gathered = AutoModelForImageTextToText.from_pretrained(final).state_dict()
    assert last.keys() == gathered.keys() and all(torch.equal(last[k], gathered[k]) for k in last)
    assert not list(final.glob("*.bin")) and (final / "model.safetensors").exists()
    single_final = launched("single_gpu.yaml") / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as a, safe_open(str(single_final / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # the tied LM head is not written twice
    AutoProcessor.from_pretrained(final)
    sharded = AutoModelForImageTextToText.from_pretrained(final).state_dict()
    single = AutoModelForImageTextToText.from_pretrained(single_final).state_dict()
    assert sharded.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_two_node_config_resumes_the_zero3_run(launch_env, launched, tiny_model_dir, tiny_mmpr_dir, tmp_path, launch_command):
    """Two launchers on this machine act as the two nodes (machine_rank 0 and 1, one process each,
    main process address 127.0.0.1): they resume the ZeRO-3 run's step-2 checkpoint and log the
    step 3 it logged, delta restored from the checkpoint."""
    zero3 = launched("zero3.yaml")
    out = tmp_path / "resumed"
    args = overrides(tiny_model_dir, tiny_mmpr_dir, out, resume_from=zero3 / "checkpoints" / "step-00000002")
    port = free_port()
    nodes = []
    for machine_rank in (0, 1):
        extra = ["--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
        command = launch_command("two_node_zero3.yaml", [str(PROBE), str(RECIPE)], args, 2, extra, port)
        nodes.append(subprocess.Popen(command, env=launch_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-4000:] for log in logs)
    assert "resumed from" in logs[0]
    assert_same_losses(metrics(out), metrics(zero3)[2:])
    views = rank_views(out, 2)
    assert views[0]["delta"] == views[1]["delta"] == pytest.approx(rank_views(zero3, 2)[0]["delta"], rel=1e-6)


LORA = {
    "model.lora.enabled": "true", "model.lora.r": 4, "model.lora.alpha": 8, "model.lora.dropout": 0.0,
    "model.lora.merge_on_save": "true",
}  # fmt: skip


@pytest.fixture(scope="module")
def lora_single(tiny_model_dir, tiny_mmpr_dir, eval_meta, tmp_path_factory, train_in_process) -> Path:
    """A 1-process LoRA run (micro-batch 2), in-process."""
    out = tmp_path_factory.mktemp("lora_single")
    evaluated = {"data.eval_meta_path": eval_meta, "train.eval_every": 2}
    train_in_process(load_recipe(RECIPE, overrides(tiny_model_dir, tiny_mmpr_dir, out, **LORA, **evaluated, **{"train.micro_batch_size": 2})))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero1.yaml", "zero3.yaml"])
def test_lora_under_zero_matches_one_process(launch_env, lora_single, tiny_model_dir, tiny_mmpr_dir, eval_meta, tmp_path, config, launch):
    """LoRA (dropout 0, so no run draws anything at random) with the adapters-disabled reference:
    2 processes log the 1-process losses and evaluation; the final directory holds the adapter,
    the merged model (under ZeRO-3 merged from the gathered shards) equals the 1-process one, and
    the last checkpoint is the final adapter, which peft opens on the base model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    evaluated = {"data.eval_meta_path": eval_meta, "train.eval_every": 2}
    launch(launch_env, config, [str(PROBE), str(RECIPE)], overrides(tiny_model_dir, tiny_mmpr_dir, out, **LORA, **evaluated))
    assert_same_losses(metrics(out), metrics(lora_single))
    assert_same_evaluation(metrics(out), metrics(lora_single))
    last = out / "checkpoints" / "step-00000003"
    adapter = load_file(last / "adapter_model.safetensors")
    final_adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert adapter.keys() == final_adapter.keys() and all(torch.equal(adapter[k], final_adapter[k]) for k in adapter)
    opened = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), last).state_dict()
    assert all(torch.equal(opened[k.replace(".weight", ".default.weight")], v) for k, v in adapter.items())
    assert {v["reference"] for v in rank_views(out, 2)} == {"DisabledAdapterReference"}
    assert (out / "final" / "adapter_model.safetensors").exists() and (out / "final" / "adapter_config.json").exists()
    merged = load_file(out / "final" / "merged" / "model.safetensors")
    expected = load_file(lora_single / "final" / "merged" / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_precompute_with_offloaded_reference_matches_one_process(launch_env, tiny_model_dir, tiny_mmpr_dir, tmp_path, launch):
    """``mpo precompute-ref`` sharded over 2 processes under ZeRO-3 with parameter offload stores
    the same pairs and log-probs as one process."""
    from safetensors import safe_open

    from mpo.train.precompute import compute

    single = tmp_path / "single.safetensors"
    compute(load_recipe(RECIPE, overrides(tiny_model_dir, tiny_mmpr_dir, tmp_path / "unused")), single)
    sharded = tmp_path / "sharded.safetensors"
    args = [str(RECIPE), *overrides(tiny_model_dir, tiny_mmpr_dir, tmp_path / "unused"), "--out", str(sharded)]
    launch(launch_env, "zero3_offload.yaml", ["-m", "mpo.cli.precompute_ref"], args)
    with safe_open(str(single), "pt") as a, safe_open(str(sharded), "pt") as b:
        assert a.metadata() == b.metadata()  # same keys, skipped pairs and fingerprint
        for name in a.keys():
            torch.testing.assert_close(b.get_tensor(name), a.get_tensor(name), rtol=1e-5, atol=1e-4, msg=name)
