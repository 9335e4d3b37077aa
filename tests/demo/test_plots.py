"""The demo's plots are readable: no tick label over another in ``accuracy.png``, and the 800-step SFT
stage on its own step axes, apart from the 200-step preference runs.

Before: "SFT model" and "SFT model, direct prompt" overlapped under their bars; one step axis per
metric held all four runs, squeezing the preference runs into its first quarter.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt

from mpo.demo.plots import accuracy_figure, training_curves_figure
from mpo.demo.results import METHOD_LABELS, SeedResult

STEPS = {"sft": 800, "mpo": 200, "dpo": 200, "sft_chosen": 200}


def _result(tmp_path: Path, seed: int = 0) -> SeedResult:
    """A seed whose runs logged what the trainer logs: SFT the SFT terms, the others every term."""
    runs = {}
    for name, steps in STEPS.items():
        rows = []
        for step in range(1, steps + 1):
            row = {"step": step, "loss": 1.0 / step, "loss/sft": 1.0 / step, "logps/chosen": -step, "grad_norm": 1.0, "lr": 1e-5}
            if name != "sft":
                row.update({"loss/dpo": 0.69, "loss/bco": 1.38, "rewards/margins": step / 100, "rewards/accuracies": 0.5})
            rows.append(row)
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        runs[name] = str(tmp_path / name)
    return SeedResult(seed=seed, accuracy={m: 0.25 + 0.1 * i for i, m in enumerate(METHOD_LABELS)}, runs=runs)


def test_accuracy_tick_labels_do_not_overlap(tmp_path):
    figure = accuracy_figure([_result(tmp_path / "0"), _result(tmp_path / "1", seed=1)])
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (axis,) = figure.axes
    boxes = [label.get_window_extent(renderer) for label in axis.get_xticklabels()]
    assert len(boxes) == len(METHOD_LABELS)
    for first, second in itertools.combinations(boxes, 2):
        assert not first.overlaps(second), (first, second)
    plt.close(figure)


def test_the_sft_stage_has_its_own_step_axes(tmp_path):
    figure = training_curves_figure(_result(tmp_path))
    figure.canvas.draw()
    for axis in figure.axes:
        names = {line.get_label() for line in axis.get_lines()}
        if not names:
            continue
        # Every panel holds the SFT stage alone, or preference runs alone, on a step axis its runs fill.
        assert names == {"SFT model"} or "SFT model" not in names, names
        steps = 800 if names == {"SFT model"} else 200
        assert steps <= axis.get_xlim()[1] <= 1.1 * steps, (names, axis.get_xlim())
    titled = [axis.get_title() for axis in figure.axes if {line.get_label() for line in axis.get_lines()} == {"SFT model"}]
    assert titled == ["loss/sft", "logps/chosen", "grad_norm", "lr"]
    plt.close(figure)
