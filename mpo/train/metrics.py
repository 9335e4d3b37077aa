"""Step metrics: averaged over micro-batches and processes, written to metrics.jsonl and trackers.

Reward metrics are reported unscaled (r = beta * log-ratio), not multiplied by the sum of the
loss weights as one peer does.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch

from mpo.config import Recipe
from mpo.jsonl import write_text_atomic
from mpo.types import MPOLossOutput, SequenceLogps


def pair_values(output: MPOLossOutput, policy: SequenceLogps) -> dict[str, torch.Tensor]:
    """``[B]`` per-pair values of the reward and log-prob metrics of one micro-batch (detached)."""
    values = {}
    if output.chosen_rewards is not None:
        chosen, rejected = output.chosen_rewards.detach(), output.rejected_rewards.detach()
        values["rewards/chosen"] = chosen
        values["rewards/rejected"] = rejected
        values["rewards/margins"] = chosen - rejected
        values["rewards/accuracies"] = (chosen > rejected).float()
    values["logps/chosen"] = policy.chosen_logps.detach()
    values["logps/rejected"] = policy.rejected_logps.detach()
    return values


class StepStats:
    """Accumulates per-micro-batch means of every metric within one optimizer step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.micro_batches = 0
        self.tokens = 0
        self.pairs = 0

    def add(self, output: MPOLossOutput, policy: SequenceLogps, num_tokens: int, num_pairs: int) -> None:
        values = {"loss": output.loss.detach()}
        values.update({f"loss/{name}": value.detach() for name, value in output.terms.items()})
        values.update({name: value.mean() for name, value in pair_values(output, policy).items()})
        for name, value in values.items():
            self.sums[name] += float(value)
        self.micro_batches += 1
        self.tokens += num_tokens
        self.pairs += num_pairs

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over micro-batches and processes; token and pair counts summed over processes."""
        names = sorted(self.sums)
        local = torch.tensor([self.sums[n] / self.micro_batches for n in names] + [self.tokens, self.pairs], dtype=torch.float64)
        local = local.to(accelerator.device)
        total = accelerator.reduce(local, reduction="sum")
        world = accelerator.num_processes
        result = {n: float(total[i]) / world for i, n in enumerate(names)}
        result["tokens"] = float(total[-2])
        result["pairs"] = float(total[-1])
        return result


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and logs the same values to the
    recipe's trackers (``report_to``, through accelerate), all on the main process only.

    The trackers get the recipe as their run configuration, flattened to dotted keys
    (``train.lr``) since tensorboard's hyper-parameters take scalars only. On resume the file is cut
    back to the checkpoint's step, so a resumed run's file reads like an uninterrupted one; W&B
    continues the same run (its id is kept in ``output_dir/wandb_run_id``, reused only by a run that
    resumes from a checkpoint) and tensorboard hides the events after the checkpoint's step.
    """

    def __init__(self, accelerator, recipe: Recipe, resume_step: int):
        self.accelerator = accelerator
        self.path = Path(recipe.output_dir) / "metrics.jsonl"
        if not accelerator.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if not recipe.report_to:
            return
        init_kwargs = {}
        if "wandb" in recipe.report_to:
            # The API key is never read here; WANDB_MODE=offline is honoured by wandb itself.
            init_kwargs["wandb"] = {"name": recipe.run_name or None, "dir": recipe.output_dir,
                                    "id": wandb_run_id(self.path.parent, resuming=resume_step > 0), "resume": "allow"}
        if "tensorboard" in recipe.report_to and resume_step:
            init_kwargs["tensorboard"] = {"purge_step": resume_step + 1}  # events after the checkpoint hidden
        accelerator.init_trackers(
            recipe.project,
            config=flat_config(recipe.to_dict()),
            init_kwargs=init_kwargs,
        )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line torn by a crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)


def flat_config(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """``{"train": {"lr": 1e-6}}`` -> ``{"train.lr": 1e-6}``; lists become comma-joined strings."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def wandb_run_id(output_dir: Path, resuming: bool) -> str:
    """The W&B run id: the one stored in the output directory when resuming from a checkpoint (the
    resumed run continues the same W&B run), else a new one, stored for the runs resuming this one."""
    path = output_dir / "wandb_run_id"
    if resuming and path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    write_text_atomic(path, run_id)
    return run_id
