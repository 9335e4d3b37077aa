"""The whole pipeline for one input file, and the summary it prints.

Layout under ``OUT`` (``<name>`` defaults to the input file's stem)::

    OUT/meta.json                                  MMPR meta, shared by every build into OUT
    OUT/annotations/<dataset><suffix>.jsonl        the subsets
    OUT/work/<name>/samples.shard-i-of-N.jsonl     sample logs (resumable)
    OUT/work/<name>/ntp.shard-i-of-N.jsonl         Dropout-NTP logs (resumable)
    OUT/work/<name>/matched.jsonl                  judged responses
    OUT/work/<name>/resample.jsonl                 all-wrong questions, in the input format
    OUT/work/<name>/pass_rates.jsonl               per question: samples, correct, pass rate (rl-prompts reads it)
    OUT/work/<name>/bad_inputs.jsonl               inputs skipped with --skip-bad
    OUT/work/<name>/summary.json                   the final summary

With ``--shard i/N`` a worker runs the generation stages for its shard; whichever worker finds
every shard's logs complete writes the dataset. Rerunning any worker's command once all are done
also writes it (its log is complete, so it generates nothing). Workers must share ``OUT`` (a
shared filesystem) and every setting except ``--shard``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.dropout_ntp import NTPSettings, continue_without_image, needs_ntp, ntp_pairs, subset_suffix
from data_pipeline.generation import LoopStats
from data_pipeline.judging import MatchStats, match_records, merge_sample_logs
from data_pipeline.mmpr import group_by_dataset, write_mmpr
from data_pipeline.pairs import CORRECTNESS_SUFFIX, FORMAT_SUFFIX, PairStats, build_answer_pairs
from data_pipeline.pass_rates import render_histogram, write_pass_rates
from data_pipeline.records import DirectoryLock, Question, SampleRecord, read_log, split_skipped
from data_pipeline.sample import SampleSettings, sample_questions
from data_pipeline.sharding import ShardSpec
from mpo.config import MAX_IMAGE_PIXELS
from mpo.errors import DataError
from mpo.jsonl import write_json_atomic, write_jsonl_atomic


@dataclass(frozen=True)
class PairSettings:
    max_pairs: int = 15
    seed: int = 0
    answer_fix: bool = False


@dataclass
class Summary:
    """What a build reports: counts per dataset and pairs per subset."""

    questions: int = 0
    samples: int = 0
    parse_failures: int = 0
    bad_inputs: list[str] = field(default_factory=list)
    datasets: dict[str, dict] = field(default_factory=dict)
    subsets: dict[str, dict] = field(default_factory=dict)
    all_correct: int = 0
    all_wrong: int = 0
    ntp_skipped: int = 0
    ntp_identical: int = 0
    resample_path: str | None = None
    pass_rates: dict = field(default_factory=dict)  # the pass-rate file's path and histogram

    def render(self) -> str:
        lines = [f"questions: {self.questions}   samples: {self.samples}   parse failures: {self.parse_failures}"
                 f"   bad inputs skipped: {len(self.bad_inputs)}"]
        lines += [f"  skipped: {message}" for message in self.bad_inputs[:20]]
        if len(self.bad_inputs) > 20:
            lines.append(f"  ... and {len(self.bad_inputs) - 20} more (see bad_inputs.jsonl)")
        lines.append(f"{'dataset':<28}{'questions':>10}{'samples':>9}{'unparsable':>11}{'correct':>9}{'accuracy':>10}")
        for name, d in sorted(self.datasets.items()):
            accuracy = "-" if d["accuracy"] is None else f"{100 * d['accuracy']:.1f}%"
            lines.append(f"{name:<28}{d['questions']:>10}{d['samples']:>9}{d['parse_failures']:>11}{d['correct']:>9}{accuracy:>10}")
        if self.pass_rates:
            lines.append(render_histogram(self.pass_rates) + f" -> {self.pass_rates['path']}")
        lines.append("pairs per subset:")
        for name, s in sorted(self.subsets.items()):
            lines.append(f"  {name:<56}{s['pairs']:>7}" + (f"  ({s['duplicates']} duplicates dropped)" if s["duplicates"] else ""))
        lines.append(f"all-correct questions (no pairs): {self.all_correct}   all-wrong questions: {self.all_wrong}"
                     + (f" -> {self.resample_path}" if self.all_wrong else ""))
        if self.ntp_skipped or self.ntp_identical:
            lines.append(f"dropout-ntp: {self.ntp_skipped} questions without a response long enough to cut, "
                         f"{self.ntp_identical} continuations identical to the chosen response")
        return "\n".join(lines)

    @property
    def pairs(self) -> int:
        return sum(subset["pairs"] for subset in self.subsets.values())

    def no_pairs_reason(self) -> str:
        """Why a build wrote no pair, from its counts."""
        if not self.questions:
            return f"every input line is bad ({len(self.bad_inputs)} skipped)" if self.bad_inputs else "the input has no questions"
        if self.samples and self.parse_failures == self.samples:
            return (f"every response is unparsable ({self.samples} of {self.samples}): the model does not answer in the "
                    "format the prompt asks for (see --prompt / --template)")
        checkable = sum(d["checkable_questions"] for d in self.datasets.values())
        if checkable and self.all_correct == checkable:
            return f"every response is right: all {checkable} question(s) are all-correct, which gives no pairs"
        if checkable and self.all_wrong == checkable:
            return f"no response is right: all {checkable} question(s) are all-wrong (written for re-sampling to {self.resample_path})"
        return (f"{self.all_correct} question(s) all-correct, {self.all_wrong} all-wrong, "
                f"{sum(d['substring_skipped'] for d in self.datasets.values())} pair(s) skipped as substrings, "
                f"{sum(d['empty_responses'] for d in self.datasets.values())} empty response(s), "
                f"{self.ntp_skipped} Dropout-NTP question(s) without a response long enough to cut")


def dataset_summary(match_stats: dict[str, MatchStats], pair_stats: dict[str, PairStats]) -> dict[str, dict]:
    out = {}
    for name, m in match_stats.items():
        p = pair_stats.get(name, PairStats())
        out[name] = {
            "questions": m.questions, "checkable_questions": m.checkable_questions, "samples": m.samples,
            "parse_failures": m.parse_failures, "correct": m.correct, "incorrect": m.incorrect,
            "accuracy": m.accuracy, "all_correct": p.all_correct, "all_wrong": p.all_wrong,
            "substring_skipped": p.substring_skipped, "empty_responses": p.empty_responses,
        }
    return out


def tile_budget(matched: list[SampleRecord], fallback: int | None) -> int:
    """The tile budget the records were sampled with; ``fallback`` for logs too old to say."""
    budgets = sorted({r.max_tiles for r in matched if r.max_tiles is not None})
    if len(budgets) > 1:
        raise DataError(f"the responses were sampled with different tile budgets ({', '.join(map(str, budgets))}); "
                        "pair each budget's logs separately", field="max_tiles")
    if budgets:
        return budgets[0]
    if fallback is None:
        raise DataError("the records do not say which --max-tiles they were sampled with (written by an older "
                        "mpo-data); pass --max-tiles", field="max_tiles")
    return fallback


def sampled_system_prompt(records: list[SampleRecord], dataset: str) -> str | None:
    """The one system message a dataset's responses were sampled with; mixed logs are refused."""
    found = {r.system_prompt for r in records if r.dataset == dataset}
    if len(found) > 1:
        raise DataError(f"the sample logs of dataset {dataset!r} were sampled with {len(found)} different system messages "
                        f"({', '.join(sorted(repr(f) for f in found))}); pair logs sampled with one --system-prompt")
    return found.pop()


def assemble(matched: list[SampleRecord], ntp_records: list[dict], match_stats: dict[str, MatchStats], out_dir: Path,
             image_root: Path, resample_path: Path, pass_rates_path: Path, pair_settings: PairSettings, ntp_ratio: float,
             max_tiles: int | None) -> Summary:
    """Pairs, annotations, meta.json, the re-sample and pass-rate files and the summary, from judged records.

    Args:
        pass_rates_path: where the per-question pass rates go (:mod:`data_pipeline.pass_rates`).
        max_tiles: the sampling tile budget, for records that do not carry it (older logs).
    """
    budget = tile_budget(matched, max_tiles)
    answer_pairs = build_answer_pairs(matched, pair_settings.max_pairs, pair_settings.seed, pair_settings.answer_fix)
    by_id = {r.id: r for r in matched}
    unknown = [r["id"] for r in ntp_records if r["id"] not in by_id]
    if unknown:
        raise DataError(f"Dropout-NTP log holds ids that no sample record has (e.g. {unknown[0]!r}); wrong --samples/--ntp pairing?")
    ntp, identical = ntp_pairs(by_id, ntp_records)
    subsets: dict[str, list] = {}
    system_prompts: dict[str, str | None] = {}
    ntp_suffix = subset_suffix(ntp_ratio)
    for dataset in match_stats:
        # Every dataset's subsets are named, empty or not, so a stale file from a run with
        # other settings is removed instead of lingering in meta.json.
        names = [dataset + CORRECTNESS_SUFFIX, dataset + FORMAT_SUFFIX]
        if any(r.dataset == dataset and needs_ntp(r) for r in matched):
            names.append(dataset + ntp_suffix)
        system_prompt = sampled_system_prompt(matched, dataset)
        for name in names:
            subsets[name], system_prompts[name] = [], system_prompt
    for suffix, pairs in ((CORRECTNESS_SUFFIX, answer_pairs.correctness), (FORMAT_SUFFIX, answer_pairs.format), (ntp_suffix, ntp)):
        for name, group in group_by_dataset(pairs, suffix).items():
            subsets[name] = group
    report = write_mmpr(out_dir, image_root, subsets, budget, system_prompts)
    write_jsonl_atomic(resample_path, answer_pairs.resample)
    pass_rates = write_pass_rates(pass_rates_path, matched)
    summary = Summary(
        questions=sum(m.questions for m in match_stats.values()),
        samples=sum(m.samples for m in match_stats.values()),
        parse_failures=sum(m.parse_failures for m in match_stats.values()),
        datasets=dataset_summary(match_stats, answer_pairs.stats),
        subsets=report,
        all_correct=sum(s.all_correct for s in answer_pairs.stats.values()),
        all_wrong=sum(s.all_wrong for s in answer_pairs.stats.values()),
        ntp_skipped=sum(1 for r in ntp_records if "skipped" in r),
        ntp_identical=identical,
        resample_path=str(resample_path),
        pass_rates=pass_rates,
    )
    return summary


@dataclass(frozen=True)
class BuildPaths:
    out_dir: Path
    work_dir: Path

    @classmethod
    def of(cls, out_dir: str | os.PathLike, name: str) -> BuildPaths:
        out = Path(out_dir)
        return cls(out, out / "work" / name)

    def sample_log(self, shard: ShardSpec) -> Path:
        return self.work_dir / f"samples.{shard.tag}.jsonl"

    def ntp_log(self, shard: ShardSpec) -> Path:
        return self.work_dir / f"ntp.{shard.tag}.jsonl"


def _missing(paths: BuildPaths, shard: ShardSpec, questions: list[Question]) -> tuple[int, list[tuple[str, list[dict]]], list[dict]]:
    """How many questions are not finished across all shards, and the logs read on the way."""
    sample_logs = [(str(paths.sample_log(s)), read_log(paths.sample_log(s))) for s in shard.all()]
    ntp_records = [r for s in shard.all() for r in read_log(paths.ntp_log(s))]
    sampled = {r["id"]: r for _, records in sample_logs for r in records}
    ntp_done = {r["id"] for r in ntp_records}
    missing = 0
    for question in questions:
        line = sampled.get(question.id)
        if line is None or ("skipped" not in line and line["answer"] is None and question.id not in ntp_done):
            missing += 1
    return missing, sample_logs, ntp_records


def run_build(
    questions: list[Question],
    bad_lines: list[DataError],
    image_root: Path,
    paths: BuildPaths,
    backend,
    sample_settings: SampleSettings,
    ntp_settings: NTPSettings,
    pair_settings: PairSettings,
    modes: tuple[str, ...] | None,
    threshold: float,
    shard: ShardSpec = ShardSpec(),
    skip_bad: bool = False,
    progress: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    on_sampled: Callable[[LoopStats], None] | None = None,
) -> Summary | None:
    """Runs every stage; returns the summary, or None when other shards still have work.

    Args:
        on_sampled: called with the sample stage's counts and time (the command prints the rate).
    """
    # Inputs skipped here land in the log as "skipped" records, which the summary reads back.
    stats, _ = sample_questions(questions, image_root, backend, sample_settings, paths.sample_log(shard),
                                shard, skip_bad, progress, max_image_pixels)
    if on_sampled is not None:
        on_sampled(stats)
    sampled, _ = split_skipped(read_log(paths.sample_log(shard)))
    continue_without_image(sampled, backend, ntp_settings, paths.ntp_log(shard), shard, progress)

    with DirectoryLock(paths.work_dir):
        missing, sample_logs, ntp_records = _missing(paths, shard, questions)
        if missing:
            return None
        records, skipped = split_skipped(merge_sample_logs(sample_logs))
        # Bad lines of the input (found when reading it) and bad inputs the sample stage skipped.
        bad = sorted([{"line": e.line, "message": str(e)} for e in bad_lines]
                     + [{"line": r["line"], "id": r["id"], "message": r["skipped"]} for r in skipped],
                     key=lambda b: b["line"])
        write_jsonl_atomic(paths.work_dir / "bad_inputs.jsonl", bad)
        matched, match_stats = match_records(records, modes, threshold, progress)
        write_jsonl_atomic(paths.work_dir / "matched.jsonl", (r.to_json() for r in matched))
        summary = assemble(matched, ntp_records, match_stats, paths.out_dir, image_root, paths.work_dir / "resample.jsonl",
                           paths.work_dir / "pass_rates.jsonl", pair_settings, ntp_settings.ratio,
                           sample_settings.params.max_tiles)
        summary.bad_inputs = [b["message"] for b in bad]
        write_json_atomic(paths.work_dir / "summary.json", asdict(summary))
    return summary
