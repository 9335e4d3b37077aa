"""``rounds.png``: held-out accuracy of each method round after round (round 0 is the SFT model
every method starts from), the mean over seeds as a line and each seed as a dot."""

from __future__ import annotations

import statistics
from pathlib import Path

from mpo.demo.plots import METHOD_COLOURS
from mpo.demo.results import PREFERENCE_METHODS, SeedResult, rounds_of, short_label


def round_accuracies(results: list[SeedResult], method: str) -> list[list[float]]:
    """Per round (0 = the SFT model, then each round every seed finished): ``method``'s held-out
    accuracy per seed, in points."""
    points = [[100 * r.accuracy["sft"] for r in results]]
    return points + [[100 * r.rounds[i].accuracy[method] for r in results] for i in range(rounds_of(results))]


def plot_rounds(results: list[SeedResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for offset, method in zip((-0.06, 0.0, 0.06), PREFERENCE_METHODS):
        per_round = round_accuracies(results, method)
        rounds = range(len(per_round))
        axis.plot(rounds, [statistics.fmean(values) for values in per_round], color=METHOD_COLOURS[method], marker="o",
                  label=short_label(method))
        for number, values in zip(rounds, per_round):
            axis.scatter([number + offset] * len(values), values, color=METHOD_COLOURS[method], s=10, alpha=0.5)
    axis.set_xticks(range(len(per_round)), ["SFT"] + [f"round {i}" for i in range(1, len(per_round))])
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"each method sampling its own previous round, {len(results)} seed(s)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
