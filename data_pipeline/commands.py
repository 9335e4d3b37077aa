"""The body of each ``mpo-data`` subcommand: flags in, stage functions called, a report out."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_pipeline.backends import SamplingParams, model_identity
from data_pipeline.build import BuildPaths, PairSettings, Summary, assemble, run_build
from data_pipeline.dropout_ntp import NTPSettings, continue_without_image, needs_ntp
from data_pipeline.generation import LoopStats, rate_line
from data_pipeline.judging import match_records, merge_sample_logs, tally
from data_pipeline.match import parse_modes
from data_pipeline.pass_rates import render_histogram, write_pass_rates
from data_pipeline.prompts import get_template
from data_pipeline.records import SampleRecord, iter_jsonl, read_log, read_questions, split_skipped
from data_pipeline.sample import SampleSettings, sample_questions
from mpo.errors import DataError
from mpo.jsonl import write_jsonl_atomic
from mpo.data.prompting import resolve_system_prompt


class LazyBackend:
    """Loads the model (or contacts the server) on the first generation, not before.

    A resumed run whose logs are already complete, or a shard finisher, then never pays for
    loading a multi-gigabyte checkpoint. ``describe()`` comes from the flags alone.
    """

    def __init__(self, args: argparse.Namespace):
        # Checked now, so a missing flag fails before any work rather than at the first batch.
        if args.backend == "transformers" and not args.model:
            raise ValueError("--model (a checkpoint directory) is required with --backend transformers")
        if args.backend == "openai" and not args.base_url:
            raise ValueError("--base-url is required with --backend openai")
        self.args = args
        self._backend = None

    def describe(self) -> dict:
        if self.args.backend == "transformers":
            return {"backend": "transformers", "model": model_identity(self.args.model)}
        return {"backend": "openai", "model": self.args.served_model or sorted(self.args.base_url),
                "extra_body": self.args.extra_body, "samples_per_request": self.args.samples_per_request}

    def generate(self, requests, params):
        if self._backend is None:
            self._backend = make_backend(self.args)
        return self._backend.generate(requests, params)

    def close(self) -> None:
        if self._backend is not None:
            if self.args.backend == "openai" and len(self._backend.endpoints) > 1:
                spread = ", ".join(f"{url}: {count}" for url, count in zip(self._backend.endpoints, self._backend.answered))
                _log(f"requests answered per server: {spread}")
            self._backend.close()


def make_backend(args: argparse.Namespace):
    from data_pipeline.backends import TransformersBackend
    from data_pipeline.openai_client import OpenAIBackend

    if args.backend == "transformers":
        return TransformersBackend(args.model, device=args.device, dtype=args.dtype)
    return OpenAIBackend(args.base_url, model=args.served_model, api_key=os.environ.get(args.api_key_env),
                         concurrency=args.concurrency, timeout=args.timeout, retries=args.retries,
                         samples_per_request=args.samples_per_request, extra_body=args.extra_body)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _batch_size(args: argparse.Namespace) -> int:
    if args.batch_size is not None:
        return args.batch_size
    # A local model batches what it is given; a server batches across requests, so keep it busy.
    return 4 if args.backend == "transformers" else 2 * max(1, args.concurrency) * len(args.base_url)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    if args.max_new_tokens < 1 or args.max_tiles < 1 or _batch_size(args) < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("need --max-new-tokens, --max-tiles, --batch-size >= 1, --temperature >= 0, 0 < --top-p <= 1")
    return SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.max_tiles)


def _sample_settings(args: argparse.Namespace) -> SampleSettings:
    if args.num_samples < 1:
        raise ValueError("--num-samples must be at least 1")
    template = get_template(args.prompt, args.template, args.answer_format)
    return SampleSettings(template, args.num_samples, _sampling(args), args.seed, _batch_size(args),
                          resolve_system_prompt(args.system_prompt))


def _ntp_settings(args: argparse.Namespace) -> NTPSettings:
    return NTPSettings(args.ntp_ratio, args.ntp_pairs_per_question, _sampling(args), args.seed, _batch_size(args))


def _questions(args: argparse.Namespace):
    source = Path(args.input)
    name = args.name or source.stem
    image_root = Path(args.image_root) if args.image_root else source.parent
    if args.max_image_pixels < 1:
        raise ValueError("--max-image-pixels must be at least 1")
    questions, bad_lines = read_questions(source, name, args.skip_bad)
    for error in bad_lines:
        _log(f"skipped: {error}")
    if not questions:
        reason = f"every line is bad ({len(bad_lines)} skipped, listed above)" if bad_lines else "the file has no questions"
        raise DataError(f"nothing to do: {reason}", file=str(source))
    return questions, bad_lines, image_root, name


def _require_pairs(summary: Summary, source: str) -> None:
    """A build that wrote no pair fails, saying why (the summary printed above has the counts)."""
    if not summary.pairs:
        raise DataError(f"wrote 0 pairs: {summary.no_pairs_reason()}", file=source)


def _read_logs(paths: list[str]) -> list[tuple[str, list[dict]]]:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"no such file: {missing[0]}")
    return [(p, read_log(p)) for p in paths]


def cmd_sample(args: argparse.Namespace) -> int:
    questions, bad_lines, image_root, _ = _questions(args)
    backend = LazyBackend(args)
    try:
        stats, bad = sample_questions(questions, image_root, backend, _sample_settings(args), args.out, args.shard,
                                      args.skip_bad, not args.no_progress, args.max_image_pixels)
    finally:
        backend.close()
    _log(f"sample: {stats.items} questions in shard {args.shard.tag}: {stats.already_done} were done, "
         f"{stats.written} written now; {len(bad_lines) + len(bad)} bad inputs skipped -> {args.out}")
    if stats.samples:
        _log(rate_line("sample", stats, args.backend))
    return 0


def _beside(path: str, suffix: str) -> Path:
    """``matched.jsonl`` -> ``matched<suffix>``: where pair's side files go by default."""
    path = Path(path)
    return path.with_name(path.stem + suffix)


def cmd_match(args: argparse.Namespace) -> int:
    records, _ = split_skipped(merge_sample_logs(_read_logs(args.samples)))
    matched, stats = match_records(records, parse_modes(args.mode), args.threshold, not args.no_progress)
    write_jsonl_atomic(args.out, (r.to_json() for r in matched))
    pass_rates = write_pass_rates(args.pass_rates or _beside(args.out, ".pass_rates.jsonl"), matched)
    for name, s in sorted(stats.items()):
        accuracy = "-" if s.accuracy is None else f"{100 * s.accuracy:.1f}%"
        _log(f"match: {name}: {s.questions} questions, {s.samples} samples, {s.parse_failures} unparsable, "
             f"{s.correct} correct, accuracy {accuracy}")
    _log(f"match: {render_histogram(pass_rates)} -> {pass_rates['path']}")
    _log(f"match: wrote {len(matched)} records -> {args.out}")
    return 0


def _ntp_token_limit(records: list[SampleRecord]) -> int:
    """Dropout-NTP's default ``--max-new-tokens``: the largest limit its questions were sampled with
    (a continuation finishes a response drawn under it)."""
    limits = {r.max_new_tokens for r in records if needs_ntp(r) and r.max_new_tokens is not None}
    if limits:
        _log(f"dropout-ntp: --max-new-tokens {max(limits)}, the limit the samples were drawn with")
        return max(limits)
    _log("dropout-ntp: --max-new-tokens 1024: the sample logs do not record their limit (written before they did)")
    return 1024


def cmd_dropout_ntp(args: argparse.Namespace) -> int:
    records, _ = split_skipped(merge_sample_logs(_read_logs(args.samples)))
    if args.max_new_tokens is None:
        args.max_new_tokens = _ntp_token_limit(records)
    backend = LazyBackend(args)
    try:
        stats = continue_without_image(records, backend, _ntp_settings(args), args.out, args.shard, not args.no_progress)
    finally:
        backend.close()
    _log(f"dropout-ntp: {stats.items} questions without an answer in shard {args.shard.tag}: "
         f"{stats.already_done} were done, {stats.written} written now -> {args.out}")
    return 0


def cmd_pair(args: argparse.Namespace) -> int:
    matched = [SampleRecord.from_json(value) for _, value in iter_jsonl(args.matched)]
    if not matched:
        raise DataError("no judged records to pair", file=args.matched)
    ntp_records = [r for _, records in _read_logs(args.ntp) for r in records]
    stats = tally(matched)
    resample = Path(args.resample_out) if args.resample_out else _beside(args.matched, ".resample.jsonl")
    pass_rates = Path(args.pass_rates) if args.pass_rates else _beside(args.matched, ".pass_rates.jsonl")
    summary = assemble(matched, ntp_records, stats, Path(args.out_dir), Path(args.image_root), resample, pass_rates,
                       PairSettings(args.max_pairs, args.seed, args.answer_fix), args.ntp_ratio, args.max_tiles)
    print(summary.render())
    _require_pairs(summary, args.matched)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    questions, bad_lines, image_root, name = _questions(args)
    paths = BuildPaths.of(args.out_dir, name)
    backend = LazyBackend(args)

    def sampled(stats: LoopStats) -> None:
        if stats.samples:
            _log(rate_line("build", stats, args.backend))

    try:
        summary = run_build(
            questions, bad_lines, image_root, paths, backend, _sample_settings(args), _ntp_settings(args),
            PairSettings(args.max_pairs, args.seed, args.answer_fix), parse_modes(args.mode), args.threshold,
            args.shard, args.skip_bad, not args.no_progress, args.max_image_pixels, on_sampled=sampled,
        )
    finally:
        backend.close()
    if summary is None:
        _log(f"build: shard {args.shard.tag} is done; other shards still have work. The last shard to finish "
             f"writes {paths.out_dir}/meta.json (rerunning any shard's command after all finished does it too).")
        return 0
    print(summary.render())
    _require_pairs(summary, args.input)
    print(f"wrote {paths.out_dir / 'meta.json'}")
    return 0


def cmd_rl_prompts(args: argparse.Namespace) -> int:
    from data_pipeline.pass_rates import histogram, render_histogram
    from data_pipeline.rl_export import Band, export, select

    band = Band.of(args.min_pass_rate, args.max_pass_rate)
    span = f"[{args.min_pass_rate:g}, {args.max_pass_rate:g}]"
    selection = select(args.pass_rates, args.image_root, band, args.system_prompt, not args.no_progress)
    _log(f"rl-prompts: {render_histogram(histogram(selection.rates))}")
    for name, counts in sorted(selection.per_dataset.items()):
        _log(f"rl-prompts: {name}: {counts['selected']} of {counts['questions']} questions selected ({counts['below']} below, "
             f"{counts['above']} above {span}, {counts['no_ground_truth']} without a ground truth)")
    if not selection.prompts:  # nothing written: an empty prompt set would only fail later, inside the engine
        raise DataError(f"no question has a pass rate in {span}", file=args.pass_rates[0])
    report = export(selection, args.out_dir, args.image_root, args.format, band, args.pass_rates, args.system_prompt)
    for engine, path in report["files"].items():
        print(f"wrote {len(selection.prompts)} prompts for {engine} -> {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from data_pipeline.backends import TransformersBackend
    from data_pipeline.server import ChatServer

    backend = TransformersBackend(args.model, device=args.device, dtype=args.dtype)
    name = args.served_model_name or Path(args.model).resolve().name
    server = ChatServer(backend, name, args.host, args.port, args.max_new_tokens, args.max_tiles, args.verbose)
    host, port = server.server_address[:2]
    # Tests and scripts read this line to learn the port chosen for --port 0.
    print(f"serving {name} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    print("mpo-data serve is a test server: it generates one request at a time; sample with vLLM, LMDeploy or SGLang "
          "for throughput", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


COMMANDS = {
    "sample": cmd_sample,
    "match": cmd_match,
    "dropout-ntp": cmd_dropout_ntp,
    "pair": cmd_pair,
    "build": cmd_build,
    "rl-prompts": cmd_rl_prompts,
    "serve": cmd_serve,
}


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)

