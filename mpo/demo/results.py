"""What a demo run measures: the methods it compares and one seed's results."""

from __future__ import annotations

from dataclasses import dataclass, field

METHOD_LABELS = {
    "sft": "SFT model (stage 1)",
    "sft_direct": "SFT model, direct prompt",
    "mpo": "MPO (0.8 DPO + 0.2 BCO + 1.0 SFT)",
    "dpo": "DPO alone (1/0/0)",
    "sft_chosen": "SFT on chosen (0/0/1)",
}


PREFERENCE_METHODS = ("mpo", "dpo", "sft_chosen")
"""The methods trained in every preference round, in report and plot order."""


def short_label(method: str) -> str:
    """``"MPO (0.8 DPO + ...)"`` -> ``"MPO"``: the label without its weights, for tight spaces."""
    return METHOD_LABELS.get(method, method).split(" (")[0]


def rounds_of(results: list[SeedResult]) -> int:
    """The rounds every seed finished."""
    return min(len(r.rounds) for r in results)


@dataclass
class Samples:
    """One model's samples on the train questions and the pairs built from them."""

    source: str
    """The model sampled: ``sft`` (round 1, shared by every method) or a method (its previous round)."""
    sample_accuracy: float | None = None
    """Accuracy of the K sampled responses."""
    pass_at_k: float | None = None
    """Share of sampled questions with at least one correct response among the K."""
    pairs: dict[str, int] = field(default_factory=dict)
    """MMPR subset -> pairs trained on."""
    build: dict = field(default_factory=dict)
    """Counts from the pipeline summary: questions, samples, parse failures, all-correct, all-wrong."""
    chosen_chains: dict[str, float] = field(default_factory=dict)
    """Distinct chosen responses of the correctness pairs: share with a right chain (``none``), with a
    perception error, with a reasoning error (:func:`mpo.demo.chains.chain_shares`)."""


@dataclass
class RoundResult:
    """One preference round: what each method trained on and how its model does."""

    round: int
    samples: dict[str, Samples] = field(default_factory=dict)
    """source -> its samples and pairs (round 1: ``sft`` only; later rounds: one per method)."""
    accuracy: dict[str, float] = field(default_factory=dict)
    """method -> held-out accuracy of its model after this round."""
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    unparsable: dict[str, int] = field(default_factory=dict)
    eval_chains: dict[str, dict[str, float]] = field(default_factory=dict)
    """method -> chain-checker shares of its held-out chain-of-thought responses."""
    runs: dict[str, str] = field(default_factory=dict)
    """method -> its training run's output directory (holding metrics.jsonl)."""


@dataclass
class SeedResult:
    """What one seed's run produced (also written to ``seed<N>/result.json``).

    ``accuracy``, ``per_kind``, ``unparsable``, ``eval_chains`` and ``runs`` hold the SFT model and
    each method's model after the last round; ``rounds`` holds every round.
    """

    seed: int
    accuracy: dict[str, float] = field(default_factory=dict)
    """method -> held-out accuracy in [0, 1]."""
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    unparsable: dict[str, int] = field(default_factory=dict)
    eval_questions: int = 0
    sft_data: dict[str, int] = field(default_factory=dict)
    """SFT lines per kind: ``describe``, ``cot`` and ``direct``."""
    rounds: list[RoundResult] = field(default_factory=list)
    """Every preference round, in order."""
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    """stage -> {"wall": s, "cpu": s}."""
    runs: dict[str, str] = field(default_factory=dict)
    """training run -> its output directory (holding metrics.jsonl)."""
    majority_baseline: float | None = None
    """Held-out accuracy of answering each family's most common train answer, image unseen."""
    image_sensitivity: dict[str, float] = field(default_factory=dict)
    """method -> share of held-out answers that change when each image is swapped for another."""
    per_kind_baseline: dict[str, float] = field(default_factory=dict)
    """question family -> its majority-answer baseline on the held-out questions."""
    per_kind_swap: dict[str, dict[str, float]] = field(default_factory=dict)
    """method -> question family -> share of answers that change with the image."""
    tallies: dict[str, tuple[float, float]] = field(default_factory=dict)
    """method -> (share of held-out describe responses exactly right, share of tally entries right)."""
    eval_chains: dict[str, dict[str, float]] = field(default_factory=dict)
    """method -> the chain-checker shares over its held-out chain-of-thought responses."""

    @property
    def sft_samples(self) -> Samples | None:
        """The SFT model's samples (round 1's pairs), or None before round 1."""
        return self.rounds[0].samples.get("sft") if self.rounds else None
