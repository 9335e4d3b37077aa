"""Where the micro-batches' gradients of a step are summed: ``train.grad_accum_dtype``.

A 16-bit weight gets a 16-bit gradient from its backward; autograd adds each micro-batch's into
``.grad`` in that dtype, rounding the running sum at every micro-batch, and DDP all-reduces the
16-bit sums. ``mpo grad-accum`` measures what that costs on the bench model
(:mod:`mpo.tools.grad_accum`; figures in the README's Precision section). With ``fp32``:

* one process or DDP, 16-bit weights (:class:`mpo.train.precision.MasterWeightAdamW` keeps fp32
  masters): after every micro-batch's backward, each 16-bit gradient is added into its master's
  fp32 gradient and freed (:meth:`after_backward`), so the sum is formed in fp32. The fp32 sums
  live for the whole step: +4 bytes per trainable 16-bit parameter while the activations are
  held (before, the fp32 gradient appeared only at the step, replacing the 16-bit one). Under DDP
  every micro-batch runs without DDP's reduction (``no_sync``) and the fp32 sums are averaged over
  the processes once, at the end of the step (:meth:`reduce`): twice the bytes of a bf16
  all-reduce, not overlapped with the backward.
* DeepSpeed: its own ``data_types.grad_accum_dtype`` (written by
  :func:`mpo.train.distributed.configure_deepspeed`), which every ZeRO stage reads.
* fp32 weights (and peft's fp32 adapters): their gradients are fp32 already; nothing changes.

With ``weights`` the trainer keeps the 16-bit sums, as DeepSpeed, HF Trainer and TRL do by default.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mpo.train.precision import MasterWeightAdamW, stepped_parameters

BUCKET_ELEMENTS = 2**24
"""Gradient elements all-reduced per collective call (64 MiB of fp32)."""


class GradAccumulation:
    """Sums a step's micro-batch gradients in fp32 outside DeepSpeed, when asked and when it matters.

    Args:
        model: the policy as prepared (DDP-wrapped under DDP).
        optimizer: the optimizer as prepared (accelerate's wrapper of :func:`mpo.train.optim.build_optimizer`'s).
        dtype: ``train.grad_accum_dtype``.
    """

    def __init__(self, model: nn.Module, optimizer, dtype: str):
        self.model = model
        self.optimizer = optimizer.optimizer
        self.active = dtype == "fp32" and isinstance(self.optimizer, MasterWeightAdamW) and bool(self.optimizer.masters)
        self.ddp = model if self.active and isinstance(model, DistributedDataParallel) else None

    def no_sync(self):
        """The context of each micro-batch's forward and backward: under DDP with fp32 sums, DDP's
        own (16-bit) reduction is skipped; :meth:`reduce` averages the fp32 sums instead."""
        return self.ddp.no_sync() if self.ddp is not None else nullcontext()

    def after_backward(self) -> None:
        """Moves this micro-batch's 16-bit gradients into the fp32 sums."""
        if self.active:
            self.optimizer.load_gradients()

    @torch.no_grad()
    def reduce(self) -> None:
        """Under DDP with fp32 sums: averages them over the processes (DDP's mean), in buckets."""
        if self.ddp is None:
            return
        tensors = stepped_parameters(self.model, self.optimizer)
        for tensor in tensors:
            if tensor.grad is None:  # every process takes part in every bucket
                tensor.grad = torch.zeros_like(tensor)
        world = dist.get_world_size()
        bucket: list[torch.Tensor] = []
        for tensor in tensors:
            bucket.append(tensor.grad)
            if sum(g.numel() for g in bucket) >= BUCKET_ELEMENTS:
                _all_reduce_mean(bucket, world)
                bucket = []
        if bucket:
            _all_reduce_mean(bucket, world)


def _all_reduce_mean(gradients: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in gradients])
    dist.all_reduce(flat)
    flat.div_(world)
    for gradient, piece in zip(gradients, flat.split([g.numel() for g in gradients])):
        gradient.copy_(piece.view_as(gradient))
