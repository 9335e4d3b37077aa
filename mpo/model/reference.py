"""Where the reference log-probs come from.

Three sources, one interface (``reference(batch, policy_image_features) -> SequenceLogps``):

* :class:`FrozenModelReference`: a frozen copy of the starting checkpoint, run each step without
  gradients (the official recipe). When the policy's vision tower and projector are frozen too,
  it reuses the policy's image features instead of running its own vision tower.
* :class:`DisabledAdapterReference`: with LoRA, the policy itself with its adapters switched off,
  so no second copy of the weights is held in memory.
* precomputed log-probs (:mod:`mpo.model.precomputed`): looked up by pair, no model at all.
"""

from __future__ import annotations

import torch
from torch import nn

from mpo.model.forward import PreferenceForward
from mpo.types import PreferenceBatch, SequenceLogps


class FrozenModelReference:
    """Scores batches with a frozen model.

    Args:
        forward: the reference wrapped in :class:`PreferenceForward` (possibly a DeepSpeed engine
            around it under ZeRO-3, so it is sharded like the policy).
        reuse_policy_features: take the policy's image features (detached) instead of running
            the reference's own vision tower; valid only when both vision towers and projectors
            hold the same frozen weights.
    """

    def __init__(self, forward: nn.Module, reuse_policy_features: bool):
        self.forward = forward
        self.reuse_policy_features = reuse_policy_features

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch, policy_image_features: torch.Tensor | None) -> SequenceLogps:
        features = policy_image_features.detach() if self.reuse_policy_features and policy_image_features is not None else None
        return self.forward(batch, features).logps


class DisabledAdapterReference:
    """Scores batches with the LoRA policy's adapters disabled (the base model = the reference).

    Args:
        policy: the unwrapped :class:`PreferenceForward` around a peft model.
        reuse_policy_features: as for :class:`FrozenModelReference`; true when the adapters do not
            touch the vision tower and the projector is frozen.
    """

    def __init__(self, policy: PreferenceForward, reuse_policy_features: bool):
        self.policy = policy
        self.reuse_policy_features = reuse_policy_features

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch, policy_image_features: torch.Tensor | None) -> SequenceLogps:
        features = policy_image_features.detach() if self.reuse_policy_features and policy_image_features is not None else None
        was_training = self.policy.training
        self.policy.eval()  # adapter dropout off: the reference is deterministic
        with self.policy.model.disable_adapter():
            logps = self.policy(batch, features).logps
        self.policy.train(was_training)
        return logps
