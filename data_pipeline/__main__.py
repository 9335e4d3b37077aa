"""mpo-data: build MMPR preference data for MPO (also: python -m data_pipeline).

    mpo-data build --input questions.jsonl --image-root images/ --out-dir mmpr/ --model ckpt/
    mpo-data sample --input questions.jsonl --out samples.jsonl --model ckpt/ [--shard 0/4]
    mpo-data match --samples samples*.jsonl --out matched.jsonl
    mpo-data dropout-ntp --samples samples.jsonl --out ntp.jsonl --model ckpt/
    mpo-data pair --matched matched.jsonl --ntp ntp.jsonl --image-root images/ --out-dir mmpr/
    mpo-data rl-prompts --pass-rates mmpr/work/NAME/pass_rates.jsonl --image-root images/ --out-dir rl/
    mpo-data serve --model ckpt/ --port 8000

Errors in the input (an image outside --image-root, missing, corrupt or larger than
--max-image-pixels; a line that is not UTF-8 or not JSON; a missing field) print one line naming
the file, line and field; ``--skip-bad`` counts and lists them instead. An input with no usable
question, or a build that writes no pair, also ends in one line saying why.

Exit codes (as mpo's): 0 done; 1 the job failed while running (a model or server that failed, an
unexpected error); 2 usage or bad input (a flag, a value, an input line, no usable question, no
pair written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from data_pipeline.backends import BackendError
from data_pipeline.prompt_check import SAMPLE_EVERY
from data_pipeline.server_kinds import SERVERS
from data_pipeline.sharding import ShardSpec
from mpo.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED
from mpo.config import MAX_IMAGE_PIXELS
from mpo.data.prompting import SYSTEM_PROMPT_CHOICES


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _shard(text: str) -> ShardSpec:
    try:
        return ShardSpec.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1 (inclusive)")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1 (exclusive)")
    return value


def add_input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help='JSONL: {"image" | "images", "question", "answer", optional "id", "dataset"}')
    g.add_argument("--image-root", help="directory image paths are relative to (default: the input file's directory)")
    g.add_argument("--name", help="dataset name of lines without a 'dataset' field (default: the input file's stem)")
    g.add_argument("--skip-bad", action="store_true", help="skip and count bad input lines instead of stopping")
    g.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="largest image accepted (width x height); a larger one is a bad input (the trainer's data.max_image_pixels)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", default="v1", choices=["v1", "v2", "custom"],
                   help='v1: "Final answer: .."; v2: "Answer: \\boxed{}"; custom: --template')
    g.add_argument("--template", help="custom CoT template containing {question} (default: none; needed by --prompt custom)")
    g.add_argument("--answer-format", choices=["final_answer", "boxed"],
                   help="what a custom template asks for (default: none; needed by --prompt custom)")
    g.add_argument("--system-prompt", default="auto", help=SYSTEM_PROMPT_CHOICES + " (written to meta.json for the trainer)")


def add_generation_args(p: argparse.ArgumentParser, temperature: float, continuing: bool = False) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    if continuing:
        g.add_argument("--max-new-tokens", type=int, default=None,
                       help="longest continuation, in tokens (default: the limit the samples were drawn with, which the "
                            "sample logs record; 1024 for logs that do not)")
    else:
        g.add_argument("--max-new-tokens", type=int, default=1024, help="longest response, in tokens")
    g.add_argument("--max-tiles", type=int, default=6,
                   help="InternVL max_dynamic_patch, shared by a prompt's images (12 for charts/documents)")
    g.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    g.add_argument("--batch-size", type=int, default=None,
                   help="questions per generate call; openai backend: questions in flight "
                        "(default: 4; openai: 2 x --concurrency x servers)")
    g.add_argument("--shard", type=_shard, default="0/1", help="i/N: this worker's share (0-based i)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    b = p.add_argument_group("backend")
    b.add_argument("--backend", choices=["transformers", "openai"], default="transformers",
                   help="a local model, or an OpenAI-compatible server (vLLM, LMDeploy, SGLang)")
    b.add_argument("--model", help="checkpoint directory (needed by --backend transformers); with --backend openai the "
                                   "served checkpoint (directory or hub id), whose processor the server's prompts are checked "
                                   "against (default: none; openai: --served-model, else the name the server lists)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    b.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float16, ...")
    b.add_argument("--base-url", nargs="+", metavar="URL",
                   help="OpenAI-compatible server(s), e.g. http://node1:8000/v1 http://node2:8000/v1: requests go to the "
                        "least busy one and are retried on another (default: none; needed by --backend openai)")
    b.add_argument("--served-model", help="model name on the server (default: the first one it lists)")
    b.add_argument("--server", choices=["auto", *SERVERS], default="auto",
                   help="which server it is, so the tile budget goes in the key it reads (vllm: mm_processor_kwargs.max_patches; "
                        "lmdeploy, sglang: max_dynamic_patch); auto asks GET /v1/models and sends no key to a server it does "
                        "not recognise (transformers serve), leaving the prompt check to stop a run it tiles otherwise")
    b.add_argument("--prompt-check", choices=["on", "off"], default="on",
                   help="compare the server's usage.prompt_tokens with the trainer's renderer on the first request of each "
                        f"prompt shape and every {SAMPLE_EVERY}th after, and stop on a difference")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    b.add_argument("--concurrency", type=int, default=8, help="requests in flight per server")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    b.add_argument("--retries", type=int, default=3, help="attempts after a failure (connection, timeout, 429, 5xx), each on the next server")
    b.add_argument("--samples-per-request", type=int, default=0,
                   help="split K samples into requests of this many (1 for servers without n); 0: one request")
    b.add_argument("--extra-body", type=_json_object, default={},
                   help='JSON merged into every request, e.g. \'{"repetition_penalty": 1.05}\' (the tile budget is '
                        'sent as mm_processor_kwargs.max_patches already)')


def add_match_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("match")
    g.add_argument("--mode", default="auto",
                   help="auto (by dataset name) or a comma list of: exact,option,numeric,math,vqa,relaxed,anls")
    g.add_argument("--threshold", type=float, default=0.9, help="correct when the best score is above this")


def add_pair_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pairs")
    g.add_argument("--max-pairs", type=int, default=15, help="pairs per question and subset")
    g.add_argument("--answer-fix", action="store_true", help="rewrite the chosen final answer to the ground truth")


def add_ntp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dropout-ntp")
    g.add_argument("--ntp-ratio", type=_ratio, default=0.5, help="share of the chosen words kept")
    g.add_argument("--ntp-pairs-per-question", type=int, default=1, help="continuations per question without an answer")


class Defaults(argparse.HelpFormatter):
    """Shows the default of every option that takes a value. Options without one (None) say in
    their help what happens then; flags (off unless given) and required options show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "(default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpo-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", formatter_class=Defaults, help="sample K CoT responses per question (resumable, shardable)")
    add_input_args(p)
    add_prompt_args(p)
    add_generation_args(p, temperature=1.0)
    p.add_argument("--num-samples", type=int, default=8, help="responses per question (K)")
    p.add_argument("--out", required=True, help="sample log (JSONL); rerun to resume")

    p = sub.add_parser("match", formatter_class=Defaults, help="extract and judge each response")
    p.add_argument("--samples", nargs="+", required=True, help="sample logs (all shards)")
    p.add_argument("--out", required=True, help="matched records (JSONL)")
    p.add_argument("--pass-rates", help="per-question pass rates (JSONL) (default: <out>.pass_rates.jsonl beside --out)")
    add_match_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("dropout-ntp", formatter_class=Defaults, help="continue half of a response without the image (resumable)")
    p.add_argument("--samples", nargs="+", required=True, help="sample logs (questions without an answer are used)")
    p.add_argument("--out", required=True, help="continuation log (JSONL); rerun to resume")
    add_ntp_args(p)
    add_generation_args(p, temperature=1.0, continuing=True)

    p = sub.add_parser("pair", formatter_class=Defaults, help="build pairs and write the MMPR annotations and meta.json")
    p.add_argument("--matched", required=True, help="output of match")
    p.add_argument("--ntp", nargs="*", default=[], help="continuation logs of dropout-ntp")
    p.add_argument("--image-root", required=True, help="written to meta.json as the subsets' root")
    p.add_argument("--out-dir", required=True, help="the MMPR directory (meta.json, annotations/)")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of pairs")
    p.add_argument("--ntp-ratio", type=_ratio, default=0.5, help="the ratio dropout-ntp used (names the subset)")
    p.add_argument("--resample-out", help="where all-wrong questions go (default: <matched>.resample.jsonl)")
    p.add_argument("--pass-rates", help="per-question pass rates (JSONL) (default: <matched>.pass_rates.jsonl)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="the --max-tiles the samples were drawn with, for logs that do not record it (written to meta.json) (default: the budget each log line records)")
    add_pair_args(p)

    p = sub.add_parser("build", formatter_class=Defaults, help="sample, match, dropout-ntp and pair in one resumable run")
    add_input_args(p)
    add_prompt_args(p)
    add_generation_args(p, temperature=1.0)
    p.add_argument("--num-samples", type=int, default=8, help="responses per question (K)")
    p.add_argument("--out-dir", required=True, help="the MMPR directory; logs and summaries go to OUT_DIR/work/NAME")
    add_match_args(p)
    add_pair_args(p)
    add_ntp_args(p)

    p = sub.add_parser("rl-prompts", formatter_class=Defaults,
                       help="select questions by pass rate (MMPR-Tiny: 0.2-0.8) and write them for verl and TRL GRPO")
    p.add_argument("--pass-rates", nargs="+", required=True, help="pass-rate files of match, pair or build (OUT/work/NAME/pass_rates.jsonl)")
    p.add_argument("--image-root", required=True, help="directory the image paths are relative to (the build's --image-root)")
    p.add_argument("--out-dir", required=True, help="where verl.parquet, trl.parquet and selection.json go")
    p.add_argument("--min-pass-rate", type=_rate, default=0.2, help="lowest pass rate kept (inclusive)")
    p.add_argument("--max-pass-rate", type=_rate, default=0.8, help="highest pass rate kept (inclusive)")
    p.add_argument("--format", nargs="+", choices=["verl", "trl"], default=["verl", "trl"], help="which engines' files to write")
    p.add_argument("--system-prompt", help=SYSTEM_PROMPT_CHOICES + " (default: the one each question was sampled with)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("serve", formatter_class=Defaults,
                       help="OpenAI-compatible test server over a checkpoint (one generation at a time; use vLLM for throughput)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    p.add_argument("--served-model-name", help="name in /v1/models (default: the directory name)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="default max_tokens")
    p.add_argument("--max-tiles", type=int, default=6, help="tile budget of a request without mm_processor_kwargs.max_patches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float16, ...")
    p.add_argument("--verbose", action="store_true", help="log each request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data_pipeline import commands

    try:
        return commands.run(args)
    except ValueError as error:  # DataError and ResumeError are ValueErrors
        print(f"mpo-data: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BackendError as error:
        print(f"mpo-data: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mpo-data: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - one line for users, the traceback on request
        if args.debug:
            traceback.print_exc()
        else:
            print(f"mpo-data: unexpected error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

