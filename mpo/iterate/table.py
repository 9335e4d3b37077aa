"""The per-round table (``rounds.md``, also printed) and plot (``rounds.png``) of ``mpo iterate``.

One row per round: the samples the round's pairs came from (the previous model's accuracy over
every sample, the mean per-question pass rate, pass@K, the questions in MMPR-Tiny's band
[0.2, 0.8]), the pairs, the training (steps, last loss, the trainer's held-out ``eval/loss`` and
``eval/rewards/accuracies`` when the recipe holds out pairs), the round's model's greedy held-out
accuracy, and the minutes each step took. Round 0 is the starting model.
"""

from __future__ import annotations

from pathlib import Path

COLUMNS = ["round", "sample accuracy", "mean pass rate", "pass@K", "in [0.2, 0.8]", "pairs", "steps", "loss",
           "eval/loss", "eval/rewards/accuracies", "held-out accuracy", "minutes (sample / train / eval)"]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def row(report: dict) -> list[str]:
    """The table's cells for one round report (:mod:`mpo.iterate.loop`)."""
    steps = report["steps"]
    sample, train, evaluation = steps.get("sample", {}), steps.get("train", {}), steps.get("evaluate", {})
    metrics = train.get("metrics", {})
    minutes = " / ".join("-" if not step else f"{step['seconds'] / 60:.1f}" for step in (sample, train, evaluation))
    return [
        str(report["round"]),
        _percent(sample.get("sample_accuracy")),
        _percent(sample.get("mean_pass_rate")),
        _percent(sample.get("pass_at_k")),
        str(sample["pass_rates"]["mmpr_tiny"]) if sample else "-",
        str(sample["pairs"]) if sample else "-",
        str(train["steps"]) if train else "-",
        _number(metrics.get("loss")),
        _number(metrics.get("eval/loss")),
        _percent(metrics.get("eval/rewards/accuracies")),
        _percent(evaluation.get("accuracy")),
        minutes,
    ]


def render_table(reports: list[dict]) -> str:
    """A markdown table, one row per round (percentages in points)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(report)) + " |" for report in reports]
    return "\n".join(lines)


def write_plot(reports: list[dict], path: Path) -> Path:
    """Held-out accuracy and the samples' mean pass rate per round; pairs per round as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    rounds = [r["round"] for r in reports]
    evaluated = [(r["round"], 100 * r["steps"]["evaluate"]["accuracy"]) for r in reports
                 if r["steps"].get("evaluate", {}).get("accuracy") is not None]
    # A round's samples come from the model before it: plotted at that model's round.
    sampled = [(r["round"] - 1, 100 * r["steps"]["sample"]["mean_pass_rate"]) for r in reports
               if r["steps"].get("sample", {}).get("mean_pass_rate") is not None]
    if evaluated:
        axis.plot(*zip(*evaluated), marker="o", color="C1", label="held-out accuracy (greedy)")
    if sampled:
        axis.plot(*zip(*sampled), marker="s", color="C0", linestyle="--", label="mean pass rate of its samples")
    axis.set_xticks(rounds, ["start" if n == 0 else f"round {n}" for n in rounds])
    axis.set_ylabel("%")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    pairs = [(r["round"], r["steps"]["sample"]["pairs"]) for r in reports if "sample" in r["steps"]]
    if pairs:
        twin = axis.twinx()
        twin.bar(*zip(*pairs), width=0.3, alpha=0.2, color="C2", label="pairs trained on")
        twin.set_ylabel("pairs")
        twin.legend(loc="lower right")
    axis.legend(loc="upper left")
    axis.set_title("mpo iterate: each round samples the model before it")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
