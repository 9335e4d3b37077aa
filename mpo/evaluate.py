"""Evaluation during training: MPO's loss terms, rewards and log-probs on held-out pairs.

Held-out pairs come from ``data.eval_meta_path`` / ``data.eval_jsonl_path``, or from a seeded
``data.eval_fraction`` of the training questions (:func:`split_eval`: every pair of a question
lands on the same side, so no held-out prompt is trained on). Every ``train.eval_every`` steps and
after the last one, :func:`evaluate` scores each held-out pair once through the trainer's own
forward and loss, with no gradient and the current reward shift delta in the BCO term. It never
updates delta, leaves the training RNG as it was, and puts the model back in training mode, so a
run trains exactly the same with and without evaluation.

The ``eval/*`` values are exact means over all held-out pairs, whatever the number of processes:
each process sums its pairs' values (a term's micro-batch mean times its pairs), the sums and the
pair count are all-reduced, and the totals are divided once. ``eval/loss`` is the weighted sum of
the term means; with ``loss.sft_reduction: token`` the SFT term is the token mean over every
held-out chosen response.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import TYPE_CHECKING

import torch

from mpo.checkpoint import untouched_rng
from mpo.config import DataConfig, eval_metric_names
from mpo.data import PreferenceDataset, load_records
from mpo.errors import DataError
from mpo.metrics import pair_values
from mpo.types import MPOLossOutput, PreferenceRecord, SequenceLogps

if TYPE_CHECKING:
    from mpo.train import MPOTrainer, PairFetcher


def _prompt(record: PreferenceRecord) -> tuple:
    """What makes two pairs the same question: the prompt and its images or video."""
    return record.question, tuple(record.images), record.video


def _unique(records: list[PreferenceRecord]) -> list[PreferenceRecord]:
    """One record per annotation line (``repeat_time`` > 1 repeats lines; scoring one copy suffices)."""
    return list({record.source: record for record in records}.values())


def split_eval(records: list[PreferenceRecord], fraction: float, seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(training, held-out) records: a seeded ``fraction`` of the questions, all their pairs, held out.

    Raises:
        DataError: the fraction would leave no question to train on.
    """
    questions = list(dict.fromkeys(_prompt(record) for record in records))
    count = max(1, round(fraction * len(questions)))
    if count >= len(questions):
        raise DataError(f"holding out {count} of {len(questions)} question(s) leaves none to train on", field="data.eval_fraction")
    held = {questions[i] for i in random.Random(f"{seed}:eval").sample(range(len(questions)), count)}
    train = [record for record in records if _prompt(record) not in held]
    return train, _unique([record for record in records if _prompt(record) in held])


def load_eval_records(config: DataConfig, seed: int, records: list[PreferenceRecord],
                      skipped: list[DataError] | None) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(training, held-out) records: ``records`` split by ``data.eval_fraction``, or ``records``
    and the pairs of ``data.eval_meta_path`` / ``data.eval_jsonl_path`` (none without either)."""
    if config.eval_fraction:
        return split_eval(records, config.eval_fraction, seed)
    if not (config.eval_meta_path or config.eval_jsonl_path):
        return records, []
    held_out = dataclasses.replace(config, meta_path=config.eval_meta_path, jsonl_path=config.eval_jsonl_path,
                                   dataset_path="", image_root=config.eval_image_root)
    return records, _unique(load_records(held_out, seed, skipped))


def eval_micro_batches(num_pairs: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Process ``rank``'s micro-batches of held-out pair indices.

    Pair i goes to process ``i % world_size``, so each pair is scored exactly once. Every process
    gets the same number of micro-batches, its last ones possibly empty: under DDP and ZeRO-3 each
    forward is a collective, so every process must run as many.
    """
    mine = list(range(rank, num_pairs, world_size))
    count = math.ceil(math.ceil(num_pairs / world_size) / micro_batch_size)
    return [mine[k * micro_batch_size : (k + 1) * micro_batch_size] for k in range(count)]


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


def evaluate(trainer: MPOTrainer, dataset: PreferenceDataset, fetch: PairFetcher) -> dict[str, float]:
    """Scores every held-out pair once with the trainer's current model and delta.

    Args:
        trainer: the running trainer (its policy, reference, collator, loss and reward shift).
        dataset: the held-out pairs.
        fetch: reports (or raises) the unusable ones, as for training.

    Returns:
        ``eval/loss``, ``eval/loss/<term>``, ``eval/rewards/*``, ``eval/logps/*``, ``eval/pairs``.
    """
    accelerator, recipe, loss = trainer.accelerator, trainer.recipe, trainer.loss_fn
    sums = EvalSums([name.removeprefix("eval/") for name in eval_metric_names(recipe.loss)],
                    {"dpo": loss.dpo_weight, "bco": loss.bco_weight, "sft": loss.sft_weight}, loss.sft_reduction == "token")
    batches = eval_micro_batches(len(dataset), accelerator.process_index, accelerator.num_processes, recipe.train.micro_batch_size)
    delta = trainer.reward_shift.value
    fallback = None
    trainer.policy.eval()
    with untouched_rng(accelerator.device), torch.no_grad():
        for items in trainer.pair_loader(dataset, batches):
            pairs = fetch.usable(items)
            fallback = pairs or fallback
            # A process out of pairs still runs a forward (its values unused) to match the others'.
            batch = trainer.collate(pairs or fallback or fetch.resolve([dataset[0]], [0])).to(accelerator.device)
            policy_out, output = trainer.score(batch, delta)
            if pairs:
                sums.add(output, policy_out.logps, batch.num_pairs)
    trainer.policy.train()
    return sums.reduce(accelerator)
