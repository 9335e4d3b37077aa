"""The optimizer: AdamW with per-part rates, no decay on 1-D weights, a fused kernel where the
device has one; and what a step with no image does to the vision weights.

**Fused AdamW.** ``torch.optim.AdamW`` without ``fused``/``foreach`` loops over the tensors one by
one off CUDA (108 ms a step on the 23 M-parameter bench model against 40 ms fused, 2 CPU cores).
Its fused kernel exists for CUDA, CPU and XPU; elsewhere torch's own default (``foreach`` where
available) is kept. Under DeepSpeed the engine wraps this optimizer and steps its fp32 partitions
with it, so the fused kernel serves there too.

**Text-only steps and the vision weights: zero gradients.** A micro-batch without images does not
depend on the vision tower or the projector, so their gradient is exactly zero. A step whose
micro-batches are all text-only therefore hands AdamW zero gradients for those weights, not none:
AdamW decays them (``lr * weight_decay``) and keeps moving them by their momentum, as it does for
any weight whose gradient happens to be zero. This is what the official InternVL trainer does
(its blank tile gives zero gradients), the only thing DeepSpeed's flat gradient partitions can do,
and what DDP's gradient all-reduce gives a process whose micro-batch had no image. Choosing it
everywhere makes the trajectory a function of the data alone, the same under every launch config
and however the global batch is split. The vision tower itself is not run for it in one process
(:func:`zero_missing_gradients` fills the gradients at the step); see
:func:`mpo.forward.text_only_vision` for what the distributed configs do.
"""

from __future__ import annotations

import torch
from torch import nn

from mpo.config import Recipe
from mpo.train.precision import MasterWeightAdamW

# Devices with a fused AdamW kernel in torch 2.14 (torch.optim.adamw's supported devices, less the
# ones this project never runs on).
FUSED_DEVICES = ("cuda", "cpu", "xpu")


def part_of(name: str) -> str:
    """``vision``, ``projector`` or ``language``: which rate a parameter trains with."""
    return "vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name else "language"


def build_optimizer(model: nn.Module, recipe: Recipe, master_weights: bool, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay, as in HF Trainer.

    The vision tower and the projector get their own peak rate when ``train.vision_lr`` /
    ``train.projector_lr`` are set; the scheduler scales every group by the same factor, and the
    language model's rate comes first, so ``get_last_lr()[0]`` is the logged ``lr``. With
    ``master_weights`` it steps fp32 copies of 16-bit weights (:mod:`mpo.train.precision`).

    Args:
        model: the policy, its parameters on ``device``.
        recipe: the training recipe (``train.*`` rates, decay, betas).
        master_weights: keep fp32 masters of 16-bit weights (not under DeepSpeed, which does).
        device: where the parameters are stepped; picks the fused kernel when it has one.
    """
    train = recipe.train
    rates = {"language": train.lr, "vision": train.vision_lr or train.lr, "projector": train.projector_lr or train.lr}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {(part, decay): [] for part in rates for decay in (True, False)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # A ZeRO-3 partitioned parameter is an empty 1-D placeholder; ds_shape is its real shape.
            ndim = len(parameter.ds_shape) if hasattr(parameter, "ds_shape") else parameter.ndim
            groups[part_of(name), ndim >= 2].append(parameter)
    optimizer_class = MasterWeightAdamW if master_weights else torch.optim.AdamW
    return optimizer_class(
        # DeepSpeed drops an empty group (LoRA trains no 1-D weights), leaving the scheduler with
        # more rates than groups; so no empty group is made.
        [{"params": params, "lr": rates[part], "weight_decay": train.weight_decay if decay else 0.0}
         for (part, decay), params in groups.items() if params],
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        fused=True if device.type in FUSED_DEVICES else None,
    )


@torch.no_grad()
def zero_missing_gradients(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Gives every trainable parameter without a gradient a zero one (module docstring: a step
    whose micro-batches had no image still steps the vision weights, with zero gradients). A
    parameter whose gradient was already summed into its fp32 master (``optimizer`` a
    :class:`MasterWeightAdamW`, :mod:`mpo.train.grad_accum`) has one."""
    masters = optimizer.masters if isinstance(optimizer, MasterWeightAdamW) else {}
    for parameter in model.parameters():
        master = masters.get(parameter)
        if parameter.requires_grad and parameter.grad is None and (master is None or master.grad is None):
            parameter.grad = torch.zeros_like(parameter)
