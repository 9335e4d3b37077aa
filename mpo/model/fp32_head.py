"""The LM head with fp32 logits, whatever the weights' dtype.

A bf16 head rounds every logit to bf16 (8 significant bits) before the log-softmax: about 0.025
nats per scored token at InternVL3 size, 0.13 over a 512-token response, straight into the DPO
margin. :class:`Float32LMHead` takes the place of the model's ``lm_head`` (transformers'
``set_output_embeddings``) holding the very same weight Parameter (tied to the input embeddings or
not), and computes the logits in fp32 from the 16-bit weight and hidden states.

It stays a module of its own, called by its owner's forward like the ``nn.Linear`` it replaces, so
DDP and DeepSpeed see nothing unusual: ZeRO-3 gathers the weight in this module's forward and
again for its backward (reading ``lm_head.weight`` from outside the head's forward would see an
empty partition). Neither pass keeps an fp32 copy of the weight: vocabulary rows are upcast
``chunk`` at a time and the backward upcasts them again.

Called with ``targets`` (what :mod:`mpo.model.forward` does), it returns each scored token's log-prob
without ever holding the ``[scored, vocab]`` logits: the forward folds each vocabulary chunk into
a running log-sum-exp, keeping only it and the target's logit, and the backward recomputes each
chunk's logits and turns them into their gradient in place (TRL's fused LM head does the same).
At InternVL3's 151,674 tokens and 1,024 scored tokens that is 0.6 GiB of fp32 logits, and 1.9 GiB
more for the log-softmax's backward, replaced by one ``[scored, chunk]`` block, for one more
``scored x vocab x hidden`` matrix product in the backward (the head's share of a step grows by a
third; 1-4 % of an InternVL3-1B/8B step).
"""

from __future__ import annotations

import torch
from torch import nn


DEFAULT_CHUNK = 16384
"""Vocabulary rows the head computes at a time."""


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit or fp32 inputs; float64 stays float64 (for ``gradcheck``)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_grads(grad_logits: torch.Tensor, rows_of_weight: torch.Tensor, wide_hidden: torch.Tensor,
                 grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None, start: int) -> None:
    """Adds one vocabulary chunk's share of ``d hidden`` and writes its rows of ``d weight``
    (``grad_logits``: ``[N, chunk]``, the gradient reaching that chunk's logits); a ``None``
    target is a gradient autograd did not ask for."""
    if grad_hidden is not None:
        grad_hidden.addmm_(grad_logits, rows_of_weight)
    if grad_weight is not None:
        rows = grad_weight[start : start + rows_of_weight.shape[0]]
        if rows.dtype == grad_logits.dtype:
            # Written in place: a [chunk, H] product and its copy would pass over the whole
            # [V, H] gradient once more (a fifth of a text step's LM-head time on a CPU).
            torch.mm(grad_logits.T, wide_hidden, out=rows)
        else:
            rows.copy_(grad_logits.T @ wide_hidden)  # rounded to the 16-bit weight's dtype


class _Float32Logits(torch.autograd.Function):
    """``hidden @ weight.T`` in fp32 (``hidden``: ``[N, H]``, ``weight``: ``[V, H]``), saving only
    the 16-bit inputs for backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.chunk = chunk
        dtype = _wide(hidden.dtype)
        # Autocast would turn the fp32 matmul below back into a bf16 one.
        with torch.autocast(hidden.device.type, enabled=False):
            wide_hidden = hidden.to(dtype)
            logits = wide_hidden.new_empty(hidden.shape[0], weight.shape[0])
            for start in range(0, weight.shape[0], chunk):
                rows = weight[start : start + chunk].to(dtype)
                logits[:, start : start + rows.shape[0]] = wide_hidden @ rows.T
        return logits

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        dtype = grad_logits.dtype
        want_hidden, want_weight, _ = ctx.needs_input_grad
        with torch.autocast(grad_logits.device.type, enabled=False):
            wide_hidden = hidden.to(dtype)
            grad_hidden = torch.zeros_like(wide_hidden) if want_hidden else None
            grad_weight = torch.empty_like(weight) if want_weight else None
            for start in range(0, weight.shape[0], ctx.chunk):
                stop = min(start + ctx.chunk, weight.shape[0])
                _chunk_grads(grad_logits[:, start:stop], weight[start:stop].to(dtype), wide_hidden, grad_hidden, grad_weight, start)
        return (grad_hidden.to(hidden.dtype) if want_hidden else None), grad_weight, None


class _Float32TokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` in fp32, a vocabulary chunk at a time
    (``hidden``: ``[N, H]``, ``weight``: ``[V, H]``, ``targets``: ``[N]``); saves the 16-bit
    inputs, the targets and the ``[N]`` log-sum-exp, never an ``[N, V]`` tensor."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = _wide(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            wide_hidden = hidden.to(dtype)
            log_total = wide_hidden.new_full((hidden.shape[0],), float("-inf"))
            target_logits = wide_hidden.new_zeros(hidden.shape[0])
            for start in range(0, weight.shape[0], chunk):
                logits = wide_hidden @ weight[start : start + chunk].to(dtype).T
                log_total = torch.logaddexp(log_total, logits.logsumexp(-1))
                inside = (targets >= start) & (targets < start + logits.shape[1])
                local = (targets - start).clamp(0, logits.shape[1] - 1)
                target_logits += torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), 0.0)
        ctx.save_for_backward(hidden, weight, targets, log_total)
        ctx.chunk = chunk
        return target_logits - log_total

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        hidden, weight, targets, log_total = ctx.saved_tensors
        dtype = grad_logps.dtype
        want_hidden, want_weight, _, _ = ctx.needs_input_grad
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        with torch.autocast(grad_logps.device.type, enabled=False):
            wide_hidden = hidden.to(dtype)
            grad_hidden = torch.zeros_like(wide_hidden) if want_hidden else None
            grad_weight = torch.empty_like(weight) if want_weight else None
            for start in range(0, weight.shape[0], ctx.chunk):
                stop = min(start + ctx.chunk, weight.shape[0])
                rows_of_weight = weight[start:stop].to(dtype)
                # d logp_i / d logit_iv = [v == target_i] - softmax_iv, times the incoming gradient
                grad_logits = (wide_hidden @ rows_of_weight.T).sub_(log_total[:, None]).exp_().mul_(-grad_logps[:, None])
                inside = (targets >= start) & (targets < stop)
                grad_logits[rows[inside], targets[inside] - start] += grad_logps[inside]
                _chunk_grads(grad_logits, rows_of_weight, wide_hidden, grad_hidden, grad_weight, start)
        return (grad_hidden.to(hidden.dtype) if want_hidden else None), grad_weight, None, None


class Float32LMHead(nn.Module):
    """A bias-free LM head whose logits are fp32.

    Args:
        weight: the head's ``[vocab, hidden]`` weight Parameter, shared, not copied.
        chunk: vocabulary rows upcast at a time (bounds the transient fp32 copy of the weight).
    """

    def __init__(self, weight: nn.Parameter, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.weight = weight
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., hidden]`` -> fp32 ``[..., vocab]`` logits; with ``targets`` (``[N]`` token ids
        for ``[N, hidden]`` states), the fp32 ``[N]`` log-probs of those tokens instead (module
        docstring: no ``[N, vocab]`` tensor is held)."""
        if targets is not None:
            return _Float32TokenLogps.apply(hidden, self.weight, targets, self.chunk)
        flat = hidden.reshape(-1, hidden.shape[-1])
        return _Float32Logits.apply(flat, self.weight, self.chunk).reshape(*hidden.shape[:-1], -1)


def use_float32_head(model: nn.Module) -> None:
    """Replaces the HF model's LM head by a :class:`Float32LMHead` on the same weight (once)."""
    head = model.get_output_embeddings()
    if isinstance(head, Float32LMHead):
        return
    if head.bias is not None:
        raise ValueError("the fp32 LM head supports bias-free heads only (InternVL's has none)")
    model.set_output_embeddings(Float32LMHead(head.weight))
