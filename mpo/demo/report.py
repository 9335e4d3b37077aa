"""``report.md`` of a demo run (one or several seeds).

The report holds the held-out accuracy of every method per seed with mean ± standard deviation
and range, each target of the demo with whether it is met, what the numbers rest on (the SFT
model's perception, the majority-answer baseline, the image-swap test, pass@K, the share of
chosen chains that are right claim by claim), per-family accuracy against each family's
baseline, the pair counts per MMPR subset, the settings, and the wall and CPU time of every stage.
A preset of :data:`mpo.demo.settings.STAGE_CHECK_PRESETS` checks the stages, not accuracy; its
report says so instead of judging targets.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from mpo.demo.plots import plot_accuracy, plot_training_curves
from mpo.demo.results import METHOD_LABELS, SeedResult, short_label
from mpo.demo.settings import STAGE_CHECK_PRESETS

TARGET_GAIN = 10.0  # points of held-out accuracy, MPO over SFT, mean over seeds


def _points(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean_spread(values: list[float]) -> str:
    """``mean ± std [min, max]`` in points; a single value is shown alone."""
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    std = 100 * statistics.stdev(values)
    return f"{mean:.1f} ± {std:.1f} [{100 * min(values):.1f}, {100 * max(values):.1f}]"


def _methods(results: list[SeedResult], attribute: str) -> list[str]:
    """The methods every seed has a value of ``attribute`` for, in the report's order."""
    return [m for m in METHOD_LABELS if all(m in getattr(r, attribute) for r in results)]


def accuracy_table(results: list[SeedResult]) -> list[str]:
    head = "| method | " + " | ".join(f"seed {r.seed}" for r in results) + " | mean" + (" ± std [min, max]" if len(results) > 1 else "") + " | vs SFT |"
    lines = [head, "|" + "---|" * (len(results) + 3)]
    for method in _methods(results, "accuracy"):
        values = [r.accuracy[method] for r in results]
        gains = [r.accuracy[method] - r.accuracy["sft"] for r in results]
        gain = "" if method == "sft" else f"{100 * statistics.fmean(gains):+.1f}"
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(_points(v) for v in values)
                     + f" | {_mean_spread(values)} | {gain} |")
    return lines


def _gain(results: list[SeedResult], method: str, over: str) -> tuple[float, str]:
    """(mean gain of ``method`` over ``over`` in points, "per seed a, b; std s")."""
    gains = [100 * (r.accuracy[method] - r.accuracy[over]) for r in results]
    spread = f"; std {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
    return statistics.fmean(gains), "per seed " + ", ".join(f"{g:+.1f}" for g in gains) + spread


def families_below_baseline(result: SeedResult) -> list[str]:
    """Question families where the SFT model is not above the majority-answer baseline."""
    return [kind for kind, accuracy in result.per_kind["sft"].items() if accuracy <= result.per_kind_baseline.get(kind, 0.0)]


def targets(results: list[SeedResult]) -> list[str]:
    """Each target of the demo, its measured value, and whether it is met."""
    def verdict(met: bool) -> str:
        return "**met**" if met else "**not met**"

    gain, detail = _gain(results, "mpo", "sft")
    lines = [f"- MPO over the SFT model: **{gain:+.1f} points** mean over {len(results)} seed(s) ({detail}); "
             f"target +{TARGET_GAIN:.0f}: {verdict(gain >= TARGET_GAIN)}."]
    for other in ("sft_chosen", "dpo"):
        gain, detail = _gain(results, "mpo", other)
        lines.append(f"- MPO over {METHOD_LABELS[other]}: {gain:+.1f} points ({detail}); MPO above it: {verdict(gain > 0)}.")
    below = {r.seed: families_below_baseline(r) for r in results}
    failing = "; ".join(f"seed {seed}: {', '.join(kinds)}" for seed, kinds in below.items() if kinds)
    lines.append(f"- Every question family above its majority-answer baseline for the SFT model: "
                 f"{verdict(not failing)}" + (f" (at or below it: {failing})." if failing else "."))
    return lines


def evidence(results: list[SeedResult]) -> list[str]:
    """What the accuracies rest on: perception, the no-image baseline, the image swap, the samples
    and their chains, the sampling error, and the unparsable answers."""
    def across(values: list[float]) -> str:
        return _mean_spread(values) + " %"

    lines = []
    methods = _methods(results, "tallies")
    if methods:
        lines.append("Perception (the describe item on every held-out image: its colour tally, three counts): "
                     + "; ".join(f"{METHOD_LABELS[m]} {across([r.tallies[m][0] for r in results])} exactly right, "
                                 f"{across([r.tallies[m][1] for r in results])} of the counts right" for m in methods) + ".")
    lines.append(f"Majority-answer baseline (each family's most common train answer, image unseen): "
                 f"{across([r.majority_baseline for r in results])}.")
    methods = _methods(results, "image_sensitivity")
    if methods:
        lines.append("Held-out answers that change when each image is swapped for another test image: "
                     + ", ".join(f"{METHOD_LABELS[m]} {across([r.image_sensitivity[m] for r in results])}" for m in methods)
                     + ". A model that reads the image changes most of its answers.")
    if all(r.pass_at_k is not None for r in results):
        chosen = ("Chosen responses of the correctness pairs (distinct), checked claim by claim (each tally entry "
                  "against the scene, each operation against the reference chain's): "
                  + _chain_split([r.chosen_chains for r in results]) + "."
                  if all(r.chosen_chains for r in results) else "Some seed has no correctness pairs to check.")
        lines.append(f"The SFT model's samples on the train questions: {across([r.sample_accuracy for r in results])} correct, "
                     f"pass@K (a question with at least one correct sample) {across([r.pass_at_k for r in results])}. "
                     + chosen)
    methods = _methods(results, "eval_chains")
    if methods:
        lines.append("Held-out chain-of-thought responses, checked the same way: "
                     + "; ".join(f"{short_label(m)} {_chain_split([r.eval_chains[m] for r in results])}" for m in methods) + ".")
    questions = min(r.eval_questions for r in results)
    p = statistics.fmean(r.accuracy["sft"] for r in results)
    lines.append(f"Each accuracy is over {questions} held-out questions: ±{100 * (p * (1 - p) / questions) ** 0.5:.1f} points of "
                 "sampling error (binomial standard error at the SFT model's accuracy), so a per-seed difference below "
                 "about twice that is noise.")
    methods = _methods(results, "unparsable")
    lines.append("Held-out answers without a parsable final answer, mean per seed: "
                 + ", ".join(f"{short_label(m)} {statistics.fmean(r.unparsable[m] for r in results):.1f}" for m in methods) + ".")
    return lines


def _chain_split(shares: list[dict[str, float]]) -> str:
    """"a % right, b % with a perception error, c % with a reasoning error" (means over seeds)."""
    def mean(kind: str) -> str:
        return _mean_spread([share[kind] for share in shares])

    return f"{mean('none')} % right, {mean('perception')} % with a perception error, {mean('reasoning')} % with a reasoning error"


def stage_check_note(results: list[SeedResult], settings: dict, preset: str) -> str:
    return (f"The `{preset}` preset checks that every stage runs and writes its outputs: its model trains "
            f"{settings['sft_steps']} SFT steps and answers {results[0].eval_questions} held-out questions, so its "
            "accuracies measure nothing and no target is judged. `mpo demo` (the default preset) measures them.")


def per_kind_table(results: list[SeedResult]) -> list[str]:
    """Accuracy per family and method against the family's baseline, and its image-swap share."""
    methods = _methods(results, "per_kind")
    swapped = _methods(results, "per_kind_swap")
    kinds = sorted({k for r in results for m in methods for k in r.per_kind[m]})
    lines = ["| question family | majority baseline | " + " | ".join(short_label(m) for m in methods) + " | "
             + " | ".join(f"changed by image swap, {short_label(m)}" for m in swapped) + " |",
             "|" + "---|" * (len(methods) + len(swapped) + 2)]

    def mean(values: list[float]) -> str:
        return _points(statistics.fmean(values)) if values else "-"

    for kind in kinds:
        cells = [mean([r.per_kind_baseline[kind] for r in results if kind in r.per_kind_baseline])]
        cells += [mean([r.per_kind[m][kind] for r in results if kind in r.per_kind[m]]) for m in methods]
        cells += [mean([r.per_kind_swap[m][kind] for r in results if kind in r.per_kind_swap[m]]) for m in swapped]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def pairs_table(results: list[SeedResult]) -> list[str]:
    subsets = sorted({s for r in results for s in r.pairs})
    lines = ["| MMPR subset | " + " | ".join(f"seed {r.seed}" for r in results) + " |",
             "|" + "---|" * (len(results) + 1)]
    for subset in subsets:
        lines.append(f"| `{subset}` | " + " | ".join(str(r.pairs.get(subset, 0)) for r in results) + " |")
    lines.append("| **total** | " + " | ".join(str(sum(r.pairs.values())) for r in results) + " |")
    return lines


def build_table(results: list[SeedResult]) -> list[str]:
    keys = ["questions", "samples", "parse_failures", "all_correct", "all_wrong", "ntp_skipped", "ntp_identical",
            "wrong_chains_dropped"]
    lines = ["| sampling (train questions) | " + " | ".join(f"seed {r.seed}" for r in results) + " |",
             "|" + "---|" * (len(results) + 1)]
    lines.append("| accuracy of the SFT model's samples | " + " | ".join(
        "-" if r.sample_accuracy is None else _points(r.sample_accuracy) for r in results) + " |")
    lines.append("| pass@K | " + " | ".join("-" if r.pass_at_k is None else _points(r.pass_at_k) for r in results) + " |")
    for key in keys:
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(str(r.build.get(key, "-")) for r in results) + " |")
    return lines


def timing_table(results: list[SeedResult]) -> list[str]:
    stages = list(dict.fromkeys(s for r in results for s in r.timings))
    lines = ["| stage | " + " | ".join(f"seed {r.seed} wall / CPU (s)" for r in results) + " |",
             "|" + "---|" * (len(results) + 1)]
    for stage in stages + ["total"]:
        cells = []
        for r in results:
            t = r.timings.get(stage) if stage != "total" else {
                "wall": sum(v["wall"] for v in r.timings.values()), "cpu": sum(v["cpu"] for v in r.timings.values())}
            cells.append("-" if t is None else f"{t['wall']:.0f} / {t['cpu']:.0f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def write_report(out_dir: Path, settings: dict, results: list[SeedResult], preset: str,
                 total_wall: float, total_cpu: float, machine: str = "") -> Path:
    """Writes ``report.md``, ``accuracy.png`` and one ``training_curves_seed<N>.png`` per seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, out_dir / "accuracy.png")
    curves = [plot_training_curves(r, out_dir / f"training_curves_seed{r.seed}.png") for r in results]
    seeds = " ".join(str(r.seed) for r in results)
    checks_only = preset in STAGE_CHECK_PRESETS
    sft_data = results[0].sft_data
    lines = [
        "# MPO demo: the shapes task",
        "",
        f"`mpo demo --preset {preset} --seeds {seeds}`: a small InternVL trained from scratch with SFT "
        f"({sft_data.get('describe', 0)} describe items, {sft_data.get('direct', 0)} questions with the bare answer, "
        f"{sft_data.get('cot', 0)} with a chain of thought), then with MPO on preference pairs built from its own "
        "chain-of-thought samples, evaluated greedily with the chain-of-thought prompt on held-out images (the "
        "pipeline's `Final answer:` extraction and judge; an unparsable answer counts as wrong). "
        f"{results[0].eval_questions} held-out questions per seed.",
        "",
        "## Held-out accuracy (%)",
        "",
        *accuracy_table(results),
        "",
        *([stage_check_note(results, settings, preset), ""] if checks_only else
          [*targets(results), "", *[line for item in evidence(results) for line in (item, "")]]),
        "![accuracy](accuracy.png)",
        "",
        "## Accuracy per question family (%, mean over seeds)",
        "",
        *per_kind_table(results),
        "",
        "## Preference data",
        "",
        *pairs_table(results),
        "",
        *build_table(results),
        "",
        "## Training curves",
        "",
        *[f"![seed {r.seed}]({path.name})" for r, path in zip(results, curves)],
        "",
        "## Timings",
        "",
        f"Total: {total_wall:.0f} s wall, {total_cpu:.0f} s CPU (this process; CPU time counts every core). "
        f"Machine: {machine or 'not recorded'}.",
        "",
        *timing_table(results),
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in settings.items()],
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
