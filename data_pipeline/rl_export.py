"""``mpo-data rl-prompts``: the hand-off from MPO data to online RL (InternVL3.5's cascade).

Selects the questions whose pass rate (from :mod:`data_pipeline.pass_rates`) lies in a band,
by default MMPR-Tiny's [0.2, 0.8] inclusive, and writes them for the online-RL engines, each
prompt exactly as it was sampled: the CoT user turn and the system message of the pass-rate
file (or ``--system-prompt``), split into chat parts by the project's renderer
(:func:`mpo.prompting.chat_messages`). Images go by path: each one passes the trainer's path rule
under ``--image-root`` (no ``..``, no absolute path outside the root) and must exist; the files
hold them joined with that root, because both engines open a path as given, from whatever
directory their workers run in. ::

    OUT/verl.parquet     verl's RLHFDataset columns (data.train_files=OUT/verl.parquet)
    OUT/trl.parquet      TRL GRPOTrainer columns (datasets.Dataset.from_parquet)
    OUT/selection.json   the band, the counts per dataset, the histogram, the sources

verl (0.9.1) row: ``data_source`` (the dataset), ``prompt`` (messages with string contents, one
``<image>`` per image: RLHFDataset splits the text there into image and text parts; the newline
that follows a placeholder is the chat template's own and is left out, as the renderer does),
``images`` (path strings), ``ability`` ("vqa"), ``reward_model: {style: "rule", ground_truth:
[answers]}``, ``extra_info`` (``index`` and what the reward reads: ``answer_format``,
``match_modes``, ``match_threshold``; plus the pass rate and the relative image paths).

TRL (1.16) row: ``prompt`` (messages whose contents are parts, ``{"type": "image"}`` where the
images go), ``images`` (a ``datasets`` Image list stored by path, read as PIL images), ``solution``
([answers]) and the reward's ``answer_format``, ``match_modes``, ``match_threshold``, ``dataset``,
plus ``id`` and ``pass_rate``. The reward for both: :mod:`data_pipeline.rewards`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from data_pipeline.prompts import ANSWER_FORMATS
from data_pipeline.match import ALL_MODES
from data_pipeline.pass_rates import exact_rate, histogram, in_range
from data_pipeline.records import iter_jsonl
from mpo.jsonl import write_bytes_atomic, write_json_atomic
from mpo.errors import DataError

ABILITY = "vqa"  # verl's per-row task label; MMPR's answer subsets are "vqa" ones
FORMATS = ("verl", "trl")
# Placeholders other than <image> that verl (and the renderer, for <video>) would split a prompt at.
MEDIA_PLACEHOLDERS = ("<video>", "<audio>")


@dataclass(frozen=True)
class Band:
    """Pass rates from ``low`` to ``high``, both inclusive, compared as exact fractions."""

    low: Fraction
    high: Fraction

    @classmethod
    def of(cls, low: float, high: float) -> Band:
        if not 0 <= low <= high <= 1:
            raise ValueError(f"need 0 <= --min-pass-rate <= --max-pass-rate <= 1, got {low} and {high}")
        # Through str: 0.2 means 1/5, not the binary float nearest to it.
        return cls(Fraction(str(low)), Fraction(str(high)))


@dataclass(frozen=True)
class RLPrompt:
    """One selected question, checked, with its images resolved under the image root."""

    id: str
    dataset: str
    messages: list[dict]  # the renderer's chat messages: system (optional), user as text and image parts
    image_paths: tuple[str, ...]  # relative to the image root, as in the pass-rate file
    images: tuple[str, ...]  # absolute: root joined with each path
    answer: tuple[str, ...]
    answer_format: str
    match_modes: tuple[str, ...]
    match_threshold: float | None
    prompt_version: str | None
    max_tiles: int | None
    samples: int
    correct: int


def _check_line(value: dict, where: dict) -> None:
    """Types of the fields the export reads; a DataError names the first bad one."""

    def need(field: str, ok: bool, message: str) -> None:
        if not ok:
            raise DataError(message, field=field, **where)

    def optional(field: str, kind: type | tuple[type, ...], name: str) -> None:
        item = value.get(field)
        need(field, item is None or (isinstance(item, kind) and not isinstance(item, bool)), f"must be {name} or null")

    for field in ("id", "dataset", "prompt"):
        need(field, isinstance(value.get(field), str) and value[field] != "", "missing or not a non-empty string")
    need("image", isinstance(value.get("image"), list) and all(isinstance(x, str) and x for x in value["image"]),
         "missing or not a list of path strings")
    need("answer_format", value.get("answer_format") in ANSWER_FORMATS, f"must be one of {', '.join(ANSWER_FORMATS)}")
    need("system_prompt", "system_prompt" in value and (value["system_prompt"] is None or isinstance(value["system_prompt"], str)),
         "missing, or not a string or null")
    answer = value.get("answer", "absent")
    need("answer", answer is None or isinstance(answer, str) or (isinstance(answer, list) and answer and all(isinstance(x, str) for x in answer)),
         "must be a string, a non-empty list of strings, or null")
    modes = value.get("match_modes")
    need("match_modes", isinstance(modes, list) and all(m in ALL_MODES for m in modes), f"must be a list of: {', '.join(ALL_MODES)}")
    optional("match_threshold", (int, float), "a number")
    optional("prompt_version", str, "a string")
    optional("max_tiles", int, "an integer")
    samples = value.get("samples")
    need("samples", isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1, "must be an integer >= 1")
    correct = value.get("correct")
    if answer is None:
        need("correct", correct is None, "must be null for a question without a ground truth")
        need("pass_rate", value.get("pass_rate") is None, "must be null for a question without a ground truth")
        return
    need("correct", isinstance(correct, int) and not isinstance(correct, bool) and 0 <= correct <= samples,
         f"must be an integer from 0 to samples ({samples})")
    rate = value.get("pass_rate")
    need("pass_rate", isinstance(rate, (int, float)) and not isinstance(rate, bool) and abs(rate - correct / samples) < 1e-9,
         f"must be correct / samples = {correct}/{samples}")


def _prompt(value: dict, image_root: Path, system_prompt: str | None, where: dict) -> RLPrompt:
    from mpo.data.media import check_data_file, resolve_data_path
    from mpo.data.prompting import chat_messages

    images = []
    for rel in value["image"]:
        try:
            path = resolve_data_path(image_root, rel)
            check_data_file(path, "image")
        except DataError as error:
            raise DataError(error.reason, field="image", **where) from None
        images.append(str(path))
    for placeholder in MEDIA_PLACEHOLDERS:
        if placeholder in value["prompt"]:
            raise DataError(f"holds {placeholder}, which the engines read as a media placeholder", field="prompt", **where)
    try:
        messages = chat_messages(value["prompt"], len(images), system_prompt)
    except DataError as error:  # the <image> count does not match the images
        raise DataError(error.reason, field="prompt", **where) from None
    answer = value["answer"]
    return RLPrompt(
        id=value["id"], dataset=value["dataset"], messages=messages,
        image_paths=tuple(value["image"]), images=tuple(images),
        answer=(answer,) if isinstance(answer, str) else tuple(answer), answer_format=value["answer_format"],
        match_modes=tuple(value["match_modes"]), match_threshold=value.get("match_threshold"),
        prompt_version=value.get("prompt_version"), max_tiles=value.get("max_tiles"),
        samples=value["samples"], correct=value["correct"],
    )


@dataclass
class Selection:
    """What :func:`select` kept, and the counts behind it."""

    prompts: list[RLPrompt]
    rates: list[dict]  # every line's correct, samples and pass_rate (for the histogram)
    per_dataset: dict[str, dict]  # {dataset: {"questions", "no_ground_truth", "below", "above", "selected"}}


def select(paths: Sequence[str | os.PathLike], image_root: str | os.PathLike, band: Band,
           system_prompt_setting: str | None = None, progress: bool = True) -> Selection:
    """Reads pass-rate files and keeps the questions whose pass rate lies in ``band``.

    Args:
        paths: pass-rate files, read in order, each in its line order (the output order).
        image_root: the directory the image paths are relative to.
        system_prompt_setting: ``auto``, ``none`` or a text (as ``--system-prompt``); None: the
            system message each question was sampled with.

    Raises:
        DataError: a bad line (naming file, line and field), a (dataset, id) seen twice, an image
            outside the root or missing.
    """
    from tqdm import tqdm

    from mpo.data.prompting import resolve_system_prompt

    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"image root {root} is not a directory", field="--image-root")
    prompts, rates, seen = [], [], {}
    per_dataset: dict[str, dict] = {}
    for path in paths:
        if not Path(path).is_file():
            raise DataError("no such file", file=str(path))
        for number, value in tqdm(iter_jsonl(path), desc=f"rl-prompts {Path(path).name}", unit="q",
                                  disable=not progress, mininterval=0.5):
            where = {"file": str(path), "line": number}
            _check_line(value, where)
            key = (value["dataset"], value["id"])
            if key in seen:
                raise DataError(f"question {key[1]!r} of dataset {key[0]!r} also on {seen[key]}", field="id", **where)
            seen[key] = f"{path}:{number}"
            rates.append({key: value[key] for key in ("correct", "samples", "pass_rate")})
            counts = per_dataset.setdefault(value["dataset"], dict.fromkeys(("questions", "no_ground_truth", "below", "above", "selected"), 0))
            counts["questions"] += 1
            if value["answer"] is None:
                counts["no_ground_truth"] += 1
                continue
            rate = exact_rate(value["correct"], value["samples"])
            if not in_range(rate, band.low, band.high):
                counts["below" if rate < band.low else "above"] += 1
                continue
            counts["selected"] += 1
            chosen = value["system_prompt"] if system_prompt_setting is None else resolve_system_prompt(system_prompt_setting)
            prompts.append(_prompt(value, root, chosen, where))
    return Selection(prompts, rates, per_dataset)


def verl_rows(prompts: Sequence[RLPrompt], image_root: str | os.PathLike) -> list[dict]:
    """verl RLHFDataset rows (see the module docstring)."""
    rows = []
    for index, prompt in enumerate(prompts):
        messages = []
        for message in prompt.messages:
            content = message["content"]
            if not isinstance(content, str):
                # The renderer's parts joined back with bare placeholders: RLHFDataset splits at
                # each <image> and yields exactly these parts again.
                content = "".join("<image>" if part["type"] == "image" else part["text"] for part in content)
            messages.append({"role": message["role"], "content": content})
        rows.append({
            "data_source": prompt.dataset, "prompt": messages, "images": list(prompt.images), "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": list(prompt.answer)},
            "extra_info": {
                "index": index, "id": prompt.id, "dataset": prompt.dataset, "answer_format": prompt.answer_format,
                "match_modes": list(prompt.match_modes), "match_threshold": prompt.match_threshold,
                "prompt_version": prompt.prompt_version, "max_tiles": prompt.max_tiles, "samples": prompt.samples,
                "correct": prompt.correct, "pass_rate": prompt.correct / prompt.samples,
                "image_root": os.path.abspath(image_root), "image_paths": list(prompt.image_paths),
            },
        })
    return rows


def trl_rows(prompts: Sequence[RLPrompt]) -> list[dict]:
    """TRL GRPOTrainer rows (see the module docstring); ``images`` as ``datasets`` Image structs."""
    rows = []
    for prompt in prompts:
        messages = []
        for message in prompt.messages:
            content = message["content"]
            # Parts everywhere: a parquet column holds one type, and the template renders a
            # one-part text list as it renders the string.
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            messages.append({"role": message["role"], "content": [{"type": p["type"], "text": p.get("text")} for p in parts]})
        rows.append({
            "prompt": messages, "images": [{"bytes": None, "path": path} for path in prompt.images],
            "solution": list(prompt.answer), "answer_format": prompt.answer_format,
            "match_modes": list(prompt.match_modes), "match_threshold": prompt.match_threshold,
            "dataset": prompt.dataset, "id": prompt.id, "pass_rate": prompt.correct / prompt.samples,
        })
    return rows


def _verl_schema():
    import pyarrow as pa

    text_list = pa.list_(pa.string())
    extra = [("index", pa.int64()), ("id", pa.string()), ("dataset", pa.string()), ("answer_format", pa.string()),
             ("match_modes", text_list), ("match_threshold", pa.float64()), ("prompt_version", pa.string()),
             ("max_tiles", pa.int64()), ("samples", pa.int64()), ("correct", pa.int64()), ("pass_rate", pa.float64()),
             ("image_root", pa.string()), ("image_paths", text_list)]
    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", text_list),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", text_list)])),
        ("extra_info", pa.struct(extra)),
    ])


def _trl_schema():
    from datasets import Features, Image, List, Value

    # Through datasets' Features, so the file carries their metadata: images load as PIL images.
    part = {"type": Value("string"), "text": Value("string")}
    return Features({
        "prompt": List({"role": Value("string"), "content": List(part)}),
        "images": List(Image()),
        "solution": List(Value("string")),
        "answer_format": Value("string"),
        "match_modes": List(Value("string")),
        "match_threshold": Value("float64"),
        "dataset": Value("string"),
        "id": Value("string"),
        "pass_rate": Value("float64"),
    }).arrow_schema


def write_parquet(path: str | os.PathLike, rows: list[dict], schema) -> None:
    """The rows as one parquet file, replaced atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    write_bytes_atomic(path, buffer.getvalue())


def export(selection: Selection, out_dir: str | os.PathLike, image_root: str | os.PathLike, formats: Sequence[str],
           band: Band, sources: Sequence[str], system_prompt_setting: str | None) -> dict:
    """Writes the chosen formats and ``selection.json``; returns the latter's content."""
    out = Path(out_dir)
    files = {}
    if "verl" in formats:
        files["verl"] = os.path.abspath(out / "verl.parquet")
        write_parquet(files["verl"], verl_rows(selection.prompts, image_root), _verl_schema())
    if "trl" in formats:
        files["trl"] = os.path.abspath(out / "trl.parquet")
        write_parquet(files["trl"], trl_rows(selection.prompts), _trl_schema())
    report = {
        "band": [float(band.low), float(band.high)], "inclusive": True,
        "selected": len(selection.prompts), "sources": [os.path.abspath(s) for s in sources],
        "image_root": os.path.abspath(image_root),
        "system_prompt": "as sampled" if system_prompt_setting is None else system_prompt_setting,
        "per_dataset": dict(sorted(selection.per_dataset.items())), "histogram": histogram(selection.rates),
        "files": files,
    }
    write_json_atomic(out / "selection.json", report)
    return report
