"""Evaluation during training: MPO's loss terms, rewards and log-probs on held-out pairs.

Held-out pairs are :mod:`mpo.data.heldout`'s. Every ``train.eval_every`` steps and after the last
one, :meth:`mpo.train.trainer.MPOTrainer.evaluate` scores each held-out pair once through the
trainer's own forward and loss, with no gradient and the current reward shift delta in the BCO term. It never
updates delta, leaves the training RNG as it was, and puts the model back in training mode, so a
run trains exactly the same with and without evaluation.

The ``eval/*`` values are exact means over all held-out pairs, whatever the number of processes:
each process sums its pairs' values (a term's micro-batch mean times its pairs), the sums and the
pair count are all-reduced, and the totals are divided once. ``eval/loss`` is the weighted sum of
the term means; with ``loss.sft_reduction: token`` the SFT term is the token mean over every
held-out chosen response.
"""

from __future__ import annotations

import math

import torch

from mpo.train.metrics import pair_values
from mpo.types import MPOLossOutput, SequenceLogps


class EvalSums:
    """Sums over the held-out pairs of one process, reduced to exact means over all processes.

    Args:
        names: the metrics to report, without ``eval/`` (from :func:`mpo.config.eval_metric_names`),
            the same on every process so the reduced tensor lines up.
        weights: each loss term's weight, for ``loss``.
        token_sft: the SFT term is a token mean (``loss.sft_reduction: token``).
    """

    def __init__(self, names: list[str], weights: dict[str, float], token_sft: bool):
        self.sums = dict.fromkeys((name for name in names if name != "loss"), 0.0)
        self.weights, self.token_sft = weights, token_sft
        self.pairs = 0
        self.chosen_tokens = 0

    def add(self, output: MPOLossOutput, policy: SequenceLogps, num_pairs: int) -> None:
        chosen_tokens = int(policy.chosen_token_counts.sum())
        for name, term in output.terms.items():
            # A term is a mean over the micro-batch's pairs (over its chosen tokens for token SFT).
            self.sums[f"loss/{name}"] += float(term) * (chosen_tokens if name == "sft" and self.token_sft else num_pairs)
        for name, values in pair_values(output, policy).items():
            self.sums[name] += float(values.sum())
        self.pairs += num_pairs
        self.chosen_tokens += chosen_tokens

    def reduce(self, accelerator) -> dict[str, float]:
        """``eval/<name>`` means over every process's pairs, ``eval/loss`` and ``eval/pairs``."""
        names = list(self.sums)
        local = torch.tensor([self.sums[n] for n in names] + [self.pairs, self.chosen_tokens], dtype=torch.float64)
        total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu().tolist()
        pairs, chosen_tokens = total[-2], total[-1]
        means = {n: total[i] / (chosen_tokens if n == "loss/sft" and self.token_sft else pairs) for i, n in enumerate(names)}
        means = {"loss": sum(weight * means[f"loss/{term}"] for term, weight in self.weights.items() if weight), **means}
        result = {f"eval/{name}": value for name, value in means.items()}
        result["eval/pairs"] = pairs
        return result


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether an eval ``value`` beats the ``best`` so far (``mode`` ``min`` or ``max``); NaN never does."""
    if math.isnan(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)
