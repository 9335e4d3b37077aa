"""Trains like ``python -m mpo.train`` and then records what this process saw, for the tests.

Launched by ``tests/train/test_distributed.py`` under ``accelerate launch``; each process writes
``<output_dir>/rank<N>.json`` with its reward shift, how many reference and policy weights it
holds itself (a ZeRO-3 process holds about 1/N of them) and, outside DeepSpeed, a checksum of its
trained weights.

    accelerate launch --config_file launch/zero3.yaml tests/launch_probe.py RECIPE.yaml [key=value ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mpo.config import load_recipe
from mpo.train.distributed import local_and_total_numel
from mpo.model.reference import FrozenModelReference
from mpo.train.trainer import MPOTrainer


def main(argv: list[str]) -> None:
    recipe = load_recipe(argv[0], argv[1:])
    trainer = MPOTrainer(recipe)
    trainer.train()
    view = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "delta": trainer.reward_shift.value,
        "delta_updates": trainer.reward_shift.num_updates,
        "reference": type(trainer.reference).__name__,
        "policy_numel": local_and_total_numel(trainer.policy),
    }
    if not trainer.recipe.model.lora.enabled and trainer.accelerator.state.deepspeed_plugin is None:
        # A checksum of this process's replica of the trained weights (DDP keeps them equal).
        view["weights_sum"] = sum(float(p.detach().double().sum()) for p in trainer.accelerator.unwrap_model(trainer.policy).parameters())
    if isinstance(trainer.reference, FrozenModelReference):
        view["reference_numel"] = local_and_total_numel(trainer.reference.forward)
    (Path(recipe.output_dir) / f"rank{view['rank']}.json").write_text(json.dumps(view))


if __name__ == "__main__":
    main(sys.argv[1:])
