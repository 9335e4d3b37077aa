"""``train.grad_accum_dtype``: a step's micro-batch gradients of bf16 weights summed in fp32.

The summed gradient the optimizer receives at step 1 (recorded by an optimizer step pre-hook, no
clipping) is compared with the exact (float64) sum of the same micro-batches' bf16 gradients,
formed by hand through the trainer's own forward: summed in fp32 it is exact to fp32 rounding;
summed in bf16 (``weights``, what every step did before) each micro-batch rounds the running sum.
"""

from __future__ import annotations

import pytest
import torch

from mpo.config import TrainConfig, recipe_from_dict
from mpo.errors import DataError
from mpo.tools.grad_accum import relative_error
from mpo.train.precision import MasterWeightAdamW
from mpo.train.trainer import MPOTrainer

MICRO_BATCHES = 4


def bf16_recipe(make_recipe, model_dir, data_dir, out, grad_accum_dtype: str) -> dict:
    recipe = make_recipe(model_dir, data_dir, out, max_steps=1, micro_batch_size=1, gradient_accumulation_steps=MICRO_BATCHES,
                         mixed_precision="bf16", max_grad_norm=0.0, grad_accum_dtype=grad_accum_dtype)
    recipe["model"]["dtype"] = "bfloat16"
    return recipe


def step_one_gradient(recipe: dict, train_in_process) -> list[torch.Tensor]:
    """The fp32 masters' gradients as the optimizer steps with them at step 1 (float64 copies)."""
    recorded = []

    def record(trainer):
        optimizer = trainer.optimizer.optimizer
        assert isinstance(optimizer, MasterWeightAdamW)
        parameters = [p for p in trainer.policy.parameters() if p.requires_grad]  # the model's order
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: recorded.extend(opt.masters[p].grad.double().clone() for p in parameters))

    train_in_process(recipe, before_training=record)
    return recorded


def exact_gradient(recipe: dict, accelerate_reset) -> list[torch.Tensor]:
    """The same step's micro-batches through the trainer's forward and loss, each bf16 gradient
    added into a float64 sum (each loss divided by the micro-batch count, as accelerate does)."""
    trainer = MPOTrainer(recipe_from_dict(recipe))
    try:
        parameters = [p for p in trainer.policy.parameters() if p.requires_grad]
        sums = [torch.zeros(p.shape, dtype=torch.float64) for p in parameters]
        loader = trainer.micro_batch_loader()
        for (indices, items), _ in zip(zip(loader.batch_sampler, iter(loader)), range(MICRO_BATCHES)):
            batch = trainer.collate(trainer.fetch.resolve(items, indices))
            with trainer.accelerator.autocast():
                _, output = trainer.score(batch, 0.0)
            (output.loss / MICRO_BATCHES).backward()
            for total, parameter in zip(sums, parameters):
                if parameter.grad is not None:  # none for the vision tower in a text-only micro-batch
                    total.add_(parameter.grad.double())
                    parameter.grad = None
        return sums
    finally:
        trainer.close()  # its signal handlers and run lock: train() is never called here
        accelerate_reset()


@pytest.mark.slow
def test_fp32_accumulation_sums_bf16_gradients_exactly(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, train_in_process,
                                                       accelerate_reset):
    exact = exact_gradient(bf16_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "exact", "fp32"), accelerate_reset)
    in_fp32 = step_one_gradient(bf16_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "fp32", "fp32"), train_in_process)
    in_bf16 = step_one_gradient(bf16_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "bf16", "weights"), train_in_process)
    fp32_error, bf16_error = relative_error(in_fp32, exact), relative_error(in_bf16, exact)
    print(f"step-1 gradient, {MICRO_BATCHES} micro-batches, relative error against the exact sum: "
          f"fp32 sums {fp32_error:.2e}, bf16 sums {bf16_error:.2e}")
    assert fp32_error < 1e-6
    assert bf16_error > 1e-4 and bf16_error > 100 * fp32_error


def test_deepspeed_is_told_the_accumulation_dtype():
    """The recipe's choice goes into DeepSpeed's own key (every ZeRO stage reads it); ``weights``
    removes one a launch config set, so the recipe decides under every launch."""
    from accelerate.utils import DeepSpeedPlugin

    from mpo.train.distributed import configure_deepspeed

    class Launched:  # what configure_deepspeed reads of an Accelerator: the plugin, processes, precision
        num_processes = 2
        mixed_precision = "bf16"

        class state:  # noqa: N801
            deepspeed_plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2},
                                                             "data_types": {"grad_accum_dtype": "bf16"}})

    configure_deepspeed(Launched, 1, 4, 0.0, 64, "fp32")
    config = Launched.state.deepspeed_plugin.deepspeed_config
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["gradient_clipping"] == 0.0
    configure_deepspeed(Launched, 1, 4, -1.0, 64, "weights")
    assert config["data_types"] == {} and config["gradient_clipping"] == 0.0
    configure_deepspeed(Launched, 1, 4, 1.0, 64, "weights")
    assert config["gradient_clipping"] == 1.0
    config["zero_optimization"]["stage"] = 0  # DeepSpeed itself fails on 16-bit weights with fp32 sums there
    with pytest.raises(DataError, match=r"^train\.grad_accum_dtype: DeepSpeed sums 16-bit gradients in fp32 only under ZeRO"):
        configure_deepspeed(Launched, 1, 4, 1.0, 64, "fp32")


@pytest.mark.parametrize("dtype", ["fp32", "weights"])
def test_the_choice_is_a_recipe_key(dtype):
    assert TrainConfig().grad_accum_dtype == "weights"  # the default, chosen in the README's Precision section
    recipe = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"meta_path": "m.json"}}, [f"train.grad_accum_dtype={dtype}"])
    assert recipe.train.grad_accum_dtype == dtype


@pytest.mark.slow
def test_fp32_sums_under_ddp_keep_the_replicas_equal(launch_env, tiny_model_dir, tiny_mmpr_dir, tmp_path, launch, launch_probe):
    """Two DDP processes, bf16 weights, fp32 sums: DDP's own reduction is skipped and the fp32 sums
    are averaged at the step, so both replicas end bit-identical and the run follows a one-process
    run of the same global batch (up to bf16 rounding, which differs with the order of the sums)."""
    import json
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
    common = [f"model.name_or_path={tiny_model_dir}", "model.dtype=bfloat16", "train.mixed_precision=bf16",
              f"data.meta_path={tiny_mmpr_dir / 'meta.json'}", "train.max_steps=3", "train.save_every=0", "train.warmup_ratio=0",
              "train.gradient_accumulation_steps=2", "train.grad_accum_dtype=fp32", "report_to=none"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    launch(launch_env, "single_gpu.yaml", [str(launch_probe), str(recipe)],
           [*common, f"output_dir={single}", "train.micro_batch_size=2"], processes=1)
    launch(launch_env, "ddp.yaml", [str(launch_probe), str(recipe)], [*common, f"output_dir={ddp}", "train.micro_batch_size=1"])
    views = [json.loads((ddp / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert views[0]["weights_sum"] == views[1]["weights_sum"]
    rows = {name: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for name, out in
            (("single", single), ("ddp", ddp))}
    assert [r["loss"] for r in rows["ddp"]] == pytest.approx([r["loss"] for r in rows["single"]], rel=2e-3)
    assert rows["ddp"][-1]["loss"] < rows["ddp"][0]["loss"]
