"""``report.md`` of a demo run (one or several seeds, one or several rounds).

The report holds the held-out accuracy of the SFT model and of every method after every round,
per seed with mean ± standard deviation and range; each target of the demo with whether it is met;
what the numbers rest on (the SFT model's perception, the majority-answer baseline, the image-swap
test, each round's samples: accuracy, pass@K and the share of chosen chains that are right claim by
claim; the held-out chains); per-family accuracy against each family's baseline; the pairs each
round trained on; the settings; and the wall and CPU time of every stage. A preset of
:data:`mpo.demo.settings.STAGE_CHECK_PRESETS` checks the stages, not accuracy; its report says so
instead of judging targets.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from mpo.demo.plots import plot_accuracy, plot_training_curves
from mpo.demo.results import METHOD_LABELS, PREFERENCE_METHODS, SeedResult, rounds_of, short_label
from mpo.demo.round_plot import plot_rounds
from mpo.demo.settings import STAGE_CHECK_PRESETS

TARGET_GAIN = 10.0  # points of held-out accuracy, MPO after the last round over SFT, mean over seeds
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


def accuracy_rows(results: list[SeedResult]) -> list[tuple[str, list[float]]]:
    """(label, accuracy per seed) for the SFT model (both prompts) and each method after each round."""
    rows = [(METHOD_LABELS[m], [r.accuracy[m] for r in results]) for m in ("sft", "sft_direct")
            if all(m in r.accuracy for r in results)]
    for method in PREFERENCE_METHODS:
        for index in range(rounds_of(results)):
            if all(method in r.rounds[index].accuracy for r in results):
                rows.append((f"{METHOD_LABELS[method]}, round {index + 1}", [r.rounds[index].accuracy[method] for r in results]))
    return rows


def accuracy_table(results: list[SeedResult]) -> list[str]:
    head = ("| model | " + " | ".join(f"seed {r.seed}" for r in results) + " | mean"
            + (" ± std [min, max]" if len(results) > 1 else "") + " | vs SFT |")
    lines = [head, "|" + "---|" * (len(results) + 3)]
    sft = [r.accuracy["sft"] for r in results]
    for label, values in accuracy_rows(results):
        gain = "" if label == METHOD_LABELS["sft"] else f"{100 * statistics.fmean(v - s for v, s in zip(values, sft)):+.1f}"
        lines.append(f"| {label} | " + " | ".join(_points(v) for v in values) + f" | {_mean_spread(values)} | {gain} |")
    return lines


def _gain(results: list[SeedResult], method: str, over: str) -> tuple[float, str]:
    """(mean gain of ``method`` over ``over`` in points, "per seed a, b; std s"), final models."""
    gains = [100 * (r.accuracy[method] - r.accuracy[over]) for r in results]
    spread = f"; std {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
    return statistics.fmean(gains), "per seed " + ", ".join(f"{g:+.1f}" for g in gains) + spread


def families_below_baseline(result: SeedResult) -> list[str]:
    """Question families where the SFT model is not above the majority-answer baseline."""
    return [kind for kind, accuracy in result.per_kind["sft"].items() if accuracy <= result.per_kind_baseline.get(kind, 0.0)]


def round_means(results: list[SeedResult], method: str) -> list[float]:
    """Mean accuracy over seeds of the SFT model (round 0) and of ``method`` after each round."""
    means = [statistics.fmean(r.accuracy["sft"] for r in results)]
    return means + [statistics.fmean(r.rounds[i].accuracy[method] for r in results) for i in range(rounds_of(results))]


def targets(results: list[SeedResult]) -> list[str]:
    """Each target of the demo, its measured value, and whether it is met."""
    def verdict(met: bool) -> str:
        return "**met**" if met else "**not met**"

    rounds = rounds_of(results)
    gain, detail = _gain(results, "mpo", "sft")
    lines = [f"- MPO after round {rounds} over the SFT model: **{gain:+.1f} points** mean over {len(results)} seed(s) "
             f"({detail}); target +{TARGET_GAIN:.0f}: {verdict(gain >= TARGET_GAIN)}."]
    for other in ("sft_chosen", "dpo"):
        gain, detail = _gain(results, "mpo", other)
        lines.append(f"- MPO over {METHOD_LABELS[other]}, both after round {rounds}: {gain:+.1f} points ({detail}); "
                     f"MPO above it: {verdict(gain > 0)}.")
    means = round_means(results, "mpo")
    path = " -> ".join(f"{100 * m:.1f}" for m in means)
    lines.append(f"- MPO each round at least as good as the round before (mean over seeds; round 0 is the SFT model): "
                 f"{path}: {verdict(all(b >= a for a, b in zip(means, means[1:])))}.")
    below = {r.seed: families_below_baseline(r) for r in results}
    failing = "; ".join(f"seed {seed}: {', '.join(kinds)}" for seed, kinds in below.items() if kinds)
    lines.append(f"- Every question family above its majority-answer baseline for the SFT model: "
                 f"{verdict(not failing)}" + (f" (at or below it: {failing})." if failing else "."))
    return lines


def _chain_split(shares: list[dict[str, float]]) -> str:
    """"a % right, b % with a perception error, c % with a reasoning error" (means over seeds)."""
    def mean(kind: str) -> str:
        return _mean_spread([share[kind] for share in shares])

    return f"{mean('none')} % right, {mean('perception')} % with a perception error, {mean('reasoning')} % with a reasoning error"


def evidence(results: list[SeedResult]) -> list[str]:
    """What the accuracies rest on: perception, the no-image baseline, the image swap, the samples
    and their chains, the sampling error, and the unparsable answers."""
    def across(values: list[float]) -> str:
        return _mean_spread(values) + " %"

    lines = []
    methods = _methods(results, "tallies")
    if methods:
        lines.append("Perception (the describe item on every held-out image: its colour tally, three counts): "
                     + "; ".join(f"{short_label(m)} {across([r.tallies[m][0] for r in results])} exactly right, "
                                 f"{across([r.tallies[m][1] for r in results])} of the counts right" for m in methods) + ".")
    lines.append(f"Majority-answer baseline (each family's most common train answer, image unseen): "
                 f"{across([r.majority_baseline for r in results])}.")
    methods = _methods(results, "image_sensitivity")
    if methods:
        lines.append("Held-out answers that change when each image is swapped for another test image: "
                     + ", ".join(f"{short_label(m)} {across([r.image_sensitivity[m] for r in results])}" for m in methods)
                     + ". A model that reads the image changes most of its answers.")
    samples = [r.sft_samples for r in results]
    if all(s is not None for s in samples):
        chosen = ("Chosen responses of its correctness pairs (distinct), checked claim by claim (each tally entry "
                  "against the scene, each operation against the reference chain's): "
                  + _chain_split([s.chosen_chains for s in samples]) + "."
                  if all(s.chosen_chains for s in samples) else "Some seed has no correctness pairs to check.")
        lines.append(f"The SFT model's samples on the train questions: {across([s.sample_accuracy for s in samples])} correct, "
                     f"pass@K (a question with at least one correct sample) {across([s.pass_at_k for s in samples])}. " + chosen)
    methods = _methods(results, "eval_chains")
    if methods:
        lines.append("Held-out chain-of-thought responses after the last round, checked the same way: "
                     + "; ".join(f"{short_label(m)} {_chain_split([r.eval_chains[m] for r in results])}" for m in methods) + ".")
    questions = min(r.eval_questions for r in results)
    p = statistics.fmean(r.accuracy["sft"] for r in results)
    lines.append(f"Each accuracy is over {questions} held-out questions: ±{100 * (p * (1 - p) / questions) ** 0.5:.1f} points of "
                 "sampling error (binomial standard error at the SFT model's accuracy), so a per-seed difference below "
                 "about twice that is noise.")
    methods = _methods(results, "unparsable")
    lines.append("Held-out answers without a parsable final answer after the last round, mean per seed: "
                 + ", ".join(f"{short_label(m)} {statistics.fmean(r.unparsable[m] for r in results):.1f}" for m in methods) + ".")
    return lines


def stage_check_note(results: list[SeedResult], settings: dict, preset: str) -> str:
    return (f"The `{preset}` preset checks that every stage runs and writes its outputs: its model trains "
            f"{settings['sft_steps']} SFT steps and answers {results[0].eval_questions} held-out questions, so its "
            "accuracies measure nothing and no target is judged. `mpo demo` (the default preset) measures them.")


def per_kind_table(results: list[SeedResult]) -> list[str]:
    """Accuracy per family of the SFT model and of each method after each round, against the
    family's baseline, and the image-swap share of the models it was measured on."""
    columns = [("SFT", [r.per_kind["sft"] for r in results])]
    for method in PREFERENCE_METHODS:
        for index in range(rounds_of(results)):
            if all(method in r.rounds[index].per_kind for r in results):
                columns.append((f"{short_label(method)} r{index + 1}", [r.rounds[index].per_kind[method] for r in results]))
    swapped = _methods(results, "per_kind_swap")
    kinds = sorted({k for _, values in columns for per_kind in values for k in per_kind})
    lines = ["| question family | majority baseline | " + " | ".join(name for name, _ in columns) + " | "
             + " | ".join(f"changed by image swap, {short_label(m)}" for m in swapped) + " |",
             "|" + "---|" * (len(columns) + len(swapped) + 2)]

    def mean(values: list[float]) -> str:
        return _points(statistics.fmean(values)) if values else "-"

    for kind in kinds:
        cells = [mean([r.per_kind_baseline[kind] for r in results if kind in r.per_kind_baseline])]
        cells += [mean([per_kind[kind] for per_kind in values if kind in per_kind]) for _, values in columns]
        cells += [mean([r.per_kind_swap[m][kind] for r in results if kind in r.per_kind_swap[m]]) for m in swapped]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def _sources(results: list[SeedResult], index: int) -> list[str]:
    return [s for s in ("sft", *PREFERENCE_METHODS) if all(s in r.rounds[index].samples for r in results)]


def samples_table(results: list[SeedResult]) -> list[str]:
    """Per round and sampled model: the samples' accuracy and pass@K, the pairs trained on, the
    chain-checked correctness pairs dropped, and the chosen chains' split (means over seeds)."""
    lines = ["| round | sampled model | sample accuracy | pass@K | pairs trained on (per seed) | wrong chains dropped | "
             "chosen chains: right / perception / reasoning error |", "|" + "---|" * 7]

    def mean(values: list[float | None]) -> str:
        present = [v for v in values if v is not None]
        return _points(statistics.fmean(present)) if present else "-"

    for index in range(rounds_of(results)):
        for source in _sources(results, index):
            samples = [r.rounds[index].samples[source] for r in results]
            chains = [s.chosen_chains for s in samples if s.chosen_chains]
            split = " / ".join(mean([c[k] for c in chains]) for k in ("none", "perception", "reasoning")) if chains else "-"
            dropped = ", ".join(str(s.build.get("wrong_chains_dropped", "-")) for s in samples)
            lines.append(f"| {index + 1} | {'SFT model' if source == 'sft' else f'{short_label(source)} round {index}'} | "
                         f"{mean([s.sample_accuracy for s in samples])} | {mean([s.pass_at_k for s in samples])} | "
                         f"{', '.join(str(sum(s.pairs.values())) for s in samples)} | {dropped} | {split} |")
    return lines


def round_chains_table(results: list[SeedResult]) -> list[str]:
    """Held-out chains of each method after each round: right / perception / reasoning (means)."""
    lines = ["| model | right chains | perception error | reasoning error | unparsable answers (per seed) |", "|---|---|---|---|---|"]
    rows = [("SFT model", [r.eval_chains["sft"] for r in results], [r.unparsable["sft"] for r in results])]
    for method in PREFERENCE_METHODS:
        for index in range(rounds_of(results)):
            rounds = [r.rounds[index] for r in results]
            if all(method in x.eval_chains for x in rounds):
                rows.append((f"{short_label(method)} round {index + 1}", [x.eval_chains[method] for x in rounds],
                             [x.unparsable[method] for x in rounds]))
    for label, shares, unparsable in rows:
        cells = [_points(statistics.fmean(s[k] for s in shares)) if all(shares) else "-" for k in ("none", "perception", "reasoning")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(map(str, unparsable))} |")
    return lines


def pairs_table(results: list[SeedResult]) -> list[str]:
    """Pairs per MMPR subset of round 1 (the SFT model's samples, shared by every method)."""
    samples = [r.sft_samples for r in results]
    subsets = sorted({name for s in samples for name in s.pairs})
    lines = ["| MMPR subset (round 1) | " + " | ".join(f"seed {r.seed}" for r in results) + " |",
             "|" + "---|" * (len(results) + 1)]
    for subset in subsets:
        lines.append(f"| `{subset}` | " + " | ".join(str(s.pairs.get(subset, 0)) for s in samples) + " |")
    lines.append("| **total** | " + " | ".join(str(sum(s.pairs.values())) for s in samples) + " |")
    keys = ["questions", "samples", "parse_failures", "all_correct", "all_wrong", "ntp_skipped", "ntp_identical",
            "wrong_chains_dropped"]
    for key in keys:
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(str(s.build.get(key, "-")) for s in samples) + " |")
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
    """Writes ``report.md``, ``accuracy.png``, ``rounds.png`` and one ``training_curves_seed<N>.png`` per seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, out_dir / "accuracy.png")
    plot_rounds(results, out_dir / "rounds.png")
    curves = [plot_training_curves(r, out_dir / f"training_curves_seed{r.seed}.png") for r in results]
    seeds = " ".join(str(r.seed) for r in results)
    checks_only = preset in STAGE_CHECK_PRESETS
    sft_data = results[0].sft_data
    lines = [
        "# MPO demo: the shapes task",
        "",
        f"`mpo demo --preset {preset} --seeds {seeds}`: a small InternVL trained from scratch with SFT "
        f"({sft_data.get('describe', 0)} describe items, {sft_data.get('direct', 0)} questions with the bare answer, "
        f"{sft_data.get('cot', 0)} with a chain of thought), then {rounds_of(results)} round(s) of preference training: "
        "round 1 on pairs built from the SFT model's own chain-of-thought samples, each later round from each method's "
        "previous model on pairs from that model's samples. Evaluated greedily with the chain-of-thought prompt on "
        "held-out images (the pipeline's `Final answer:` extraction and judge; an unparsable answer counts as wrong). "
        f"{results[0].eval_questions} held-out questions per seed.",
        "",
        "## Held-out accuracy (%)",
        "",
        *accuracy_table(results),
        "",
        *([stage_check_note(results, settings, preset), ""] if checks_only else
          [*targets(results), "", *[line for item in evidence(results) for line in (item, "")]]),
        "![rounds](rounds.png) ![accuracy](accuracy.png)",
        "",
        "## Accuracy per question family (%, mean over seeds)",
        "",
        *per_kind_table(results),
        "",
        "## Held-out chains, checked claim by claim (%, mean over seeds)",
        "",
        *round_chains_table(results),
        "",
        "## Samples and pairs, per round (%, mean over seeds)",
        "",
        *samples_table(results),
        "",
        *pairs_table(results),
        "",
        "## Training curves (the SFT stage and the last round)",
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
