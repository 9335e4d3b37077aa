"""The Mixed Preference Optimization objective.

MPO (Wang et al., "Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed
Preference Optimization", arXiv 2411.10442, Eq. 6) trains on three terms at once:

    L = w_p * L_p + w_q * L_q + w_g * L_g

* L_p, the preference loss, is DPO's sigmoid loss (Eq. 1): the policy should prefer the chosen
  response over the rejected one by a larger margin than the reference does.
* L_q, the quality loss, is BCO's pair loss (Eq. 3-4): each response is judged on its own, the
  chosen one should score above the reward shift delta and the rejected one below it.
* L_g, the generation loss, is plain SFT on the chosen response (Eq. 5), which keeps the model
  able to write the answers it is pushed towards.

With r = beta * (log pi_theta(y|x) - log pi_0(y|x)), the log-probs summed over response tokens.

Every term is a pure function of per-sequence log-probs, so they are tested by hand-derived values
(``tests/test_losses.py``). A term whose weight is 0 is not computed at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from mpo.types import MPOLossOutput, SequenceLogps

SFTReduction = Literal["sequence", "token"]


def dpo_sigmoid_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """DPO preference loss, -log sigmoid(r_c - r_r), per pair (MPO Eq. 1).

    Args:
        chosen_rewards: ``[B]`` beta-scaled log-ratios of the chosen responses.
        rejected_rewards: ``[B]`` the same for the rejected responses.

    Returns:
        ``[B]`` per-pair losses; ln 2 when both rewards are equal.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def bco_pair_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, delta: float | torch.Tensor
) -> torch.Tensor:
    """BCO quality loss, -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta)), per pair (Eq. 3).

    The reward shift ``delta`` centres the binary classifier; it is a detached running statistic
    (:class:`RewardShift`), so no gradient flows through it.

    Returns:
        ``[B]`` per-pair losses; 2 ln 2 when both rewards equal delta.
    """
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def sft_loss(chosen_logps: torch.Tensor, chosen_token_counts: torch.Tensor, reduction: SFTReduction) -> torch.Tensor:
    """Generation loss on the chosen response (Eq. 5).

    Args:
        chosen_logps: ``[B]`` policy log-probs of the chosen responses, summed over their tokens.
        chosen_token_counts: ``[B]`` number of response tokens in each chosen response.
        reduction: ``"sequence"`` is the paper's -log pi(y_c|x) / |y_c| per pair then averaged over
            the batch; ``"token"`` is the token-mean cross-entropy over the whole micro-batch that
            the official InternVL code and TRL use (long answers weigh more). They agree only at
            one pair per micro-batch.

    Returns:
        A scalar.
    """
    counts = chosen_token_counts.to(chosen_logps.dtype)
    if reduction == "sequence":
        return (-chosen_logps / counts.clamp(min=1)).mean()
    if reduction == "token":
        return -chosen_logps.sum() / counts.sum().clamp(min=1)
    raise ValueError(f"sft reduction must be 'sequence' or 'token', got {reduction!r}")


ReduceFn = Callable[[torch.Tensor], torch.Tensor]


class RewardShift:
    """BCO's reward shift delta: a running mean of batch reward means, detached.

    Each optimizer step contributes one value, the mean of every chosen and rejected reward in its
    global batch (all micro-batches, all data-parallel ranks). Rewards are gathered with
    :meth:`accumulate` during the step and folded in by :meth:`step` after it, whose ``reduce_fn``
    sums the pending (sum, count) across ranks.

    ``mode="cumulative"`` is the paper's and the official code's statistic: the plain mean of all
    step means so far (no window, no decay). ``mode="ema"`` is an exponential moving average with
    ``ema_decay`` for users who want the shift to forget early training.

    Unlike the official code, the value used at step t holds the steps before t only. The
    official code folds in the current micro-batch before its loss, which makes delta (and so the
    loss) depend on how the global batch is split over micro-batches and ranks. At step 1 both give
    the same value whenever the policy starts equal to its reference: every reward is then 0.

    Only training steps update delta (an evaluation pass must not move it), and the state is saved
    and restored with checkpoints (:meth:`state_dict`), which no peer does.
    """

    def __init__(self, mode: Literal["cumulative", "ema"] = "cumulative", ema_decay: float = 0.99):
        if mode not in ("cumulative", "ema"):
            raise ValueError(f"reward shift mode must be 'cumulative' or 'ema', got {mode!r}")
        self.mode = mode
        self.ema_decay = ema_decay
        self.value = 0.0
        self.num_updates = 0
        self._pending_sum = 0.0
        self._pending_count = 0

    def accumulate(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        """Adds one micro-batch's rewards to the current step's batch statistics."""
        self._pending_sum += float(chosen_rewards.detach().float().sum() + rejected_rewards.detach().float().sum())
        self._pending_count += chosen_rewards.numel() + rejected_rewards.numel()

    def step(self, reduce_fn: ReduceFn | None = None) -> float:
        """Folds the current step's batch mean into delta; returns the new delta.

        Args:
            reduce_fn: sums a tensor across data-parallel ranks (e.g. ``accelerator.reduce`` with
                ``reduction="sum"``); ``None`` in a single process.
        """
        pending = torch.tensor([self._pending_sum, float(self._pending_count)], dtype=torch.float64)
        if reduce_fn is not None:
            pending = reduce_fn(pending)
        self._pending_sum, self._pending_count = 0.0, 0
        total, count = float(pending[0]), float(pending[1])
        if count == 0:
            return self.value
        batch_mean = total / count
        self.num_updates += 1
        if self.mode == "cumulative":
            self.value += (batch_mean - self.value) / self.num_updates
        elif self.num_updates == 1:
            self.value = batch_mean
        else:
            self.value = self.ema_decay * self.value + (1 - self.ema_decay) * batch_mean
        return self.value

    def state_dict(self) -> dict:
        return {"mode": self.mode, "ema_decay": self.ema_decay, "value": self.value, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint reward shift mode {state['mode']!r} differs from the recipe's {self.mode!r}")
        self.ema_decay = float(state["ema_decay"])
        self.value = float(state["value"])
        self.num_updates = int(state["num_updates"])


@dataclass
class MPOLoss:
    """w_p * DPO + w_q * BCO + w_g * SFT, with the paper's defaults.

    Args:
        beta: scale of the implicit reward r = beta * (policy logp - reference logp).
        dpo_weight: w_p, the preference term's weight (paper 0.8).
        bco_weight: w_q, the quality term's weight (paper 0.2).
        sft_weight: w_g, the generation term's weight (paper 1.0).
        sft_reduction: see :func:`sft_loss`.
    """

    beta: float = 0.1
    dpo_weight: float = 0.8
    bco_weight: float = 0.2
    sft_weight: float = 1.0
    sft_reduction: SFTReduction = "sequence"

    @property
    def needs_reference(self) -> bool:
        """Only the preference and quality terms look at the reference model."""
        return self.dpo_weight != 0 or self.bco_weight != 0

    def __call__(
        self,
        policy: SequenceLogps,
        reference: SequenceLogps | None,
        delta: float,
    ) -> MPOLossOutput:
        """Computes the weighted objective for one micro-batch.

        Args:
            policy: summed log-probs of the policy, with gradients.
            reference: summed log-probs of the reference, no gradients; may be ``None`` only when
                both reference-based weights are 0.
            delta: the reward shift for this step (see :class:`RewardShift`).

        Returns:
            The scalar loss, each computed term's value (unweighted) and the per-pair rewards.
        """
        terms: dict[str, torch.Tensor] = {}
        loss = policy.chosen_logps.new_zeros(())
        chosen_rewards = rejected_rewards = None
        if self.needs_reference:
            if reference is None:
                raise ValueError("the DPO and BCO terms need reference log-probs")
            chosen_rewards = self.beta * (policy.chosen_logps - reference.chosen_logps.detach())
            rejected_rewards = self.beta * (policy.rejected_logps - reference.rejected_logps.detach())
        if self.dpo_weight != 0:
            terms["dpo"] = dpo_sigmoid_loss(chosen_rewards, rejected_rewards).mean()
            loss = loss + self.dpo_weight * terms["dpo"]
        if self.bco_weight != 0:
            terms["bco"] = bco_pair_loss(chosen_rewards, rejected_rewards, delta).mean()
            loss = loss + self.bco_weight * terms["bco"]
        if self.sft_weight != 0:
            terms["sft"] = sft_loss(policy.chosen_logps, policy.chosen_token_counts, self.sft_reduction)
            loss = loss + self.sft_weight * terms["sft"]
        return MPOLossOutput(loss=loss, terms=terms, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)

