"""The PNG plots of a demo run: ``accuracy.png`` (accuracy per method, one dot per seed) and
``training_curves_seed<N>.png`` (every loss term and reward metric the trainer logged, one line
per training run)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mpo.demo.results import METHOD_LABELS, SeedResult, short_label

# One colour per method in every plot (matplotlib's default cycle, fixed per method).
METHOD_COLOURS = {"sft": "C0", "mpo": "C1", "dpo": "C2", "sft_chosen": "C3", "sft_direct": "C7"}
CURVE_METRICS = [
    "loss", "loss/dpo", "loss/bco", "loss/sft", "rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "bco/delta",
    "grad_norm", "lr",
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curves_figure(result: SeedResult):
    """One panel per logged metric, one line per training run of this seed.

    Each method keeps one colour and one name in every panel, also in panels where some runs log
    nothing (the SFT stage has no ``loss/dpo`` or ``rewards/*``); the legend lists every run once,
    below the panels (apart from the title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = {name: read_metrics(run_dir) for name, run_dir in result.runs.items()}
    metrics = [m for m in CURVE_METRICS if any(m in row for rows in runs.values() for row in rows)]
    columns = 4
    rows = max(1, -(-len(metrics) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False, layout="constrained")
    for axis, metric in zip(axes.flat, metrics):
        for name, lines in runs.items():
            points = [(row["step"], row[metric]) for row in lines if metric in row]
            if points:
                axis.plot(*zip(*points), label=short_label(name), color=METHOD_COLOURS[name], linewidth=1)
        axis.set_title(metric)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    handles = [Line2D([], [], color=METHOD_COLOURS[name], label=short_label(name)) for name in runs]
    figure.suptitle(f"training curves, seed {result.seed}")
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    return figure


def plot_training_curves(result: SeedResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = training_curves_figure(result)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def plot_accuracy(results: list[SeedResult], path: Path) -> Path:
    """Held-out accuracy per method: a bar at the mean, a dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHOD_LABELS if all(m in r.accuracy for r in results)]
    figure, axis = plt.subplots(figsize=(7, 4))
    for index, method in enumerate(methods):
        values = [100 * r.accuracy[method] for r in results]
        axis.bar(index, statistics.fmean(values), color=METHOD_COLOURS[method], alpha=0.7)
        axis.scatter([index] * len(values), values, color="black", s=12, zorder=3)
        axis.text(index, statistics.fmean(values) + 1, f"{statistics.fmean(values):.1f}", ha="center")
    axis.set_xticks(range(len(methods)), [short_label(m) for m in methods])
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"shapes task, greedy CoT, {len(results)} seed(s)")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
