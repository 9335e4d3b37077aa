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
"""

from __future__ import annotations

import torch
from torch import nn


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit or fp32 inputs; float64 stays float64 (for ``gradcheck``)."""
    return torch.promote_types(dtype, torch.float32)


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
                grad_rows = grad_logits[:, start:stop]
                if want_hidden:
                    grad_hidden.addmm_(grad_rows, weight[start:stop].to(dtype))
                if want_weight:
                    grad_weight[start:stop] = grad_rows.T @ wide_hidden
        return (grad_hidden.to(hidden.dtype) if want_hidden else None), grad_weight, None


class Float32LMHead(nn.Module):
    """A bias-free LM head whose logits are fp32.

    Args:
        weight: the head's ``[vocab, hidden]`` weight Parameter, shared, not copied.
        chunk: vocabulary rows upcast at a time (bounds the transient fp32 copy of the weight).
    """

    def __init__(self, weight: nn.Parameter, chunk: int = 16384):
        super().__init__()
        self.weight = weight
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> fp32 ``[..., vocab]`` logits."""
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
