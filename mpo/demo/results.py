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


def short_label(method: str) -> str:
    """``"MPO (0.8 DPO + ...)"`` -> ``"MPO"``: the label without its weights, for tight spaces."""
    return METHOD_LABELS.get(method, method).split(" (")[0]


@dataclass
class SeedResult:
    """What one seed's run produced (also written to ``seed<N>/result.json``)."""

    seed: int
    accuracy: dict[str, float] = field(default_factory=dict)
    """method -> held-out accuracy in [0, 1]."""
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    unparsable: dict[str, int] = field(default_factory=dict)
    eval_questions: int = 0
    sft_data: dict[str, int] = field(default_factory=dict)
    """SFT lines per kind: ``describe``, ``cot`` and ``direct``."""
    sample_accuracy: float | None = None
    """Accuracy of the SFT model's K sampled responses on the train questions."""
    pairs: dict[str, int] = field(default_factory=dict)
    """MMPR subset -> pairs."""
    build: dict = field(default_factory=dict)
    """Counts from the pipeline summary: questions, samples, parse failures, all-correct, all-wrong."""
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
    pass_at_k: float | None = None
    """Share of sampled train questions with at least one correct response among the K."""
    chosen_chains: dict[str, float] = field(default_factory=dict)
    """Distinct chosen responses of the correctness pairs: share with a right chain (``none``), with a
    perception error, with a reasoning error (:func:`mpo.demo.chains.chain_shares`)."""
    eval_chains: dict[str, dict[str, float]] = field(default_factory=dict)
    """method -> the same shares over its held-out chain-of-thought responses."""
