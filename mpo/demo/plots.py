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
SFT_STAGE = "sft"
"""The stage-1 run: its own section and step axes in the training curves."""
SFT_METRICS = ["loss/sft", "logps/chosen", "grad_norm", "lr"]
"""What the SFT stage's curves show (it logs no preference term)."""
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


def _curve_panels(figure, runs: dict[str, list[dict]], metrics: list[str], title: str) -> None:
    """One panel per metric some run of ``runs`` logged, one line per run."""
    from matplotlib.ticker import MaxNLocator

    metrics = [m for m in metrics if any(m in row for rows in runs.values() for row in rows)]
    columns = 4
    rows = max(1, -(-len(metrics) // columns))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        for name, lines in runs.items():
            points = [(row["step"], row[metric]) for row in lines if metric in row]
            if points:
                axis.plot(*zip(*points), label=short_label(name), color=METHOD_COLOURS[name], linewidth=1)
        axis.set_title(metric)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    figure.suptitle(title)


def _panel_rows(runs: dict[str, list[dict]], metrics: list[str]) -> int:
    return max(1, -(-sum(any(m in row for rows in runs.values() for row in rows) for m in metrics) // 4))


def training_curves_figure(result: SeedResult):
    """The SFT stage and the preference runs in two sections, each on its own step axes (the SFT
    stage runs 800 steps, the preference runs 200 from its end: on one axis they would fill its
    first quarter). A panel per logged metric, a line per run; each method keeps one colour and one
    name in every panel, also where some runs log nothing; the legend lists every run once, below
    the panels (apart from the title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = {name: read_metrics(run_dir) for name, run_dir in result.runs.items()}
    stage_one = {name: rows for name, rows in runs.items() if name == SFT_STAGE}
    preference = {name: rows for name, rows in runs.items() if name != SFT_STAGE}
    sections = [(stage_one, SFT_METRICS, "stage 1: SFT of the model"),
                (preference, CURVE_METRICS, "stage 3: preference training from the SFT model, on the same pairs")]
    sections = [section for section in sections if section[0]]
    heights = [_panel_rows(runs_of, metrics) for runs_of, metrics, _ in sections]
    figure = plt.figure(figsize=(16, 3 * sum(heights) + 0.8 * len(sections)), layout="constrained")
    figure.suptitle(f"training curves, seed {result.seed}")
    parts = figure.subfigures(len(sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    for part, (runs_of, metrics, title) in zip(parts, sections):
        _curve_panels(part, runs_of, metrics, title)
    handles = [Line2D([], [], color=METHOD_COLOURS[name], label=short_label(name)) for name in runs]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    return figure


def plot_training_curves(result: SeedResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = training_curves_figure(result)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def accuracy_figure(results: list[SeedResult]):
    """Held-out accuracy per method: a bar at the mean, a dot per seed; long labels on two lines."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHOD_LABELS if all(m in r.accuracy for r in results)]
    figure, axis = plt.subplots(figsize=(7, 4), layout="constrained")
    for index, method in enumerate(methods):
        values = [100 * r.accuracy[method] for r in results]
        axis.bar(index, statistics.fmean(values), color=METHOD_COLOURS[method], alpha=0.7)
        axis.scatter([index] * len(values), values, color="black", s=12, zorder=3)
        # Above the bar and every seed's dot, so the mean is never written over a dot.
        axis.text(index, max(statistics.fmean(values), *values) + 2, f"{statistics.fmean(values):.1f}", ha="center")
    axis.set_xticks(range(len(methods)), [textwrap.fill(short_label(m), 12) for m in methods])
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"shapes task, greedy CoT, {len(results)} seed(s)")
    axis.grid(axis="y", alpha=0.3)
    return figure


def plot_accuracy(results: list[SeedResult], path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = accuracy_figure(results)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
