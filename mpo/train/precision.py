"""fp32 master weights for 16-bit models trained without DeepSpeed; the gradient norm in fp32.

At the official InternVL3 rates (2e-7 .. 1e-6) one AdamW update moves a weight by about the rate,
far below half a bf16 unit in the last place (2^-9 of the weight): applied to bf16 weights it
rounds away (tiny model, lr 2e-7, 4 steps: 2.1 % of the weights moved at all). DeepSpeed keeps fp32
master weights whenever bf16 is on (its BF16 and ZeRO optimizers wrap the AdamW it is handed), so
under DeepSpeed the AdamW stays plain and no second copy is made. Everywhere else (one process,
DDP) :class:`MasterWeightAdamW` does what DeepSpeed does:

* the model keeps its 16-bit weights, so the forward is the one DeepSpeed runs, and the policy
  computes bit for bit what its 16-bit reference computes (at step 1 every reward is exactly 0);
* the optimizer holds an fp32 copy of each 16-bit trainable weight (an fp32 one, such as a peft
  LoRA adapter over a bf16 model, is its own master), moves the 16-bit gradients onto it (so the
  clipping and the logged norm are computed in fp32), steps it with fp32 moments and writes it
  back rounded to nearest;
* its ``state_dict`` carries the masters, so a resumed run continues from the fp32 values.

Per 16-bit trainable parameter that is 2 (weight) + 2 (gradient) + 4 (master) + 8 (moments) = 16
bytes, DeepSpeed's 2 + 2 + 12; at the step the fp32 gradient (4) replaces the freed 16-bit one,
when the activations are already gone. With ``train.grad_accum_dtype: fp32`` the fp32 gradient is
the sum of the micro-batches' (:meth:`MasterWeightAdamW.load_gradients` after each backward,
:mod:`mpo.train.grad_accum`) and exists from the first micro-batch on, activations and all.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType
from torch import nn

from mpo.errors import DataError


def check_precision(dtype: str, mixed_precision: str, deepspeed: bool) -> None:
    """Refuses, in one line, the precision settings that do not train right without DeepSpeed.

    Args:
        dtype: ``model.dtype``.
        mixed_precision: ``train.mixed_precision``.
        deepspeed: whether DeepSpeed runs the optimizer (it masters 16-bit weights itself).
    """
    if deepspeed:
        return
    if dtype == "float16":
        raise DataError(
            "float16 weights train only under DeepSpeed (loss scaling over fp32 master weights); "
            "use model.dtype=bfloat16 or float32",
            field="model.dtype",
        )
    if dtype == "bfloat16" and mixed_precision == "fp16":
        raise DataError("fp16 autocast over bfloat16 weights; use train.mixed_precision=bf16 (or no)", field="train.mixed_precision")


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of the 16-bit parameters it is given.

    Args:
        param_groups: groups of model parameters (16-bit or fp32), as for ``torch.optim.AdamW``;
            the masters are made on each parameter's device.
        **hyperparameters: AdamW's (``lr``, ``betas``, ...).
    """

    def __init__(self, param_groups: list[dict], **hyperparameters):
        self.masters: dict[nn.Parameter, nn.Parameter] = {}  # 16-bit model weight -> its fp32 master
        master_groups = []
        for group in param_groups:
            masters = []
            for parameter in group["params"]:
                if parameter.dtype == torch.float32:
                    masters.append(parameter)
                else:
                    self.masters[parameter] = nn.Parameter(parameter.detach().float())
                    masters.append(self.masters[parameter])
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **hyperparameters)

    @torch.no_grad()
    def load_gradients(self) -> None:
        """Adds the 16-bit gradients into the fp32 masters' gradients, freeing them: once at the
        step, or after every micro-batch to sum them in fp32 (:mod:`mpo.train.grad_accum`)."""
        for parameter, master in self.masters.items():
            if parameter.grad is not None:
                if master.grad is None:
                    master.grad = parameter.grad.float()
                else:
                    master.grad.add_(parameter.grad)
                parameter.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        self.load_gradients()
        loss = super().step(closure)
        for parameter, master in self.masters.items():
            parameter.copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for parameter in self.masters:
            parameter.grad = None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["master_weights"] = list(self.masters.values())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for master, saved in zip(self.masters.values(), masters, strict=True):
                master.copy_(saved)


def clip_grad_norm(accelerator, model: nn.Module, optimizer, max_norm: float) -> torch.Tensor | None:
    """Clips the gradients the optimizer is about to apply; returns their total norm.

    With master weights those are the fp32 masters' gradients (in the model's parameter order),
    so the norm is computed in fp32 rather than over bf16 gradients. DeepSpeed clips inside its
    own step (``gradient_clipping``, :func:`mpo.train.distributed.configure_deepspeed`); there
    this returns ``None`` and the engine reports the norm.

    ``max_norm <= 0`` means no clipping, as HF Trainer, TRL and DeepSpeed read it: the norm is
    computed (after fp16 unscaling) and the gradients are left alone. ``clip_grad_norm_`` itself
    would scale them by ``max_norm / norm``, stopping (0) or reversing (< 0) the training.

    Args:
        accelerator: the run's ``Accelerator``.
        model: the policy (as prepared).
        optimizer: the optimizer ``accelerator.prepare`` returned.
        max_norm: ``train.max_grad_norm``.
    """
    # accelerate's wrapper holds the optimizer built here
    parameters = stepped_parameters(model, optimizer.optimizer)
    if max_norm > 0 or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    accelerator.unscale_gradients()
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def stepped_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors whose gradients ``optimizer`` applies to ``model``'s trainable parameters: the
    fp32 masters (their gradients loaded) under :class:`MasterWeightAdamW`, else the parameters."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, MasterWeightAdamW):
        optimizer.load_gradients()
        return [optimizer.masters.get(p, p) for p in parameters]
    return parameters
