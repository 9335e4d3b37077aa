"""MMPR preference data: ``meta.json`` + JSONL annotations + images, read into :class:`PreferenceRecord`.

Every line is parsed and checked when the dataset is built (UTF-8, JSON, required fields, chosen
differing from rejected, ``<image>`` counts, the path rule of :func:`mpo.inputs.resolve_data_path`,
each image and video present, a file and not empty), so a bad dataset fails before the first
step, not hours in. Decoding is checked by ``mpo validate`` (or ``data.validate``) before
training, or lazily: :class:`mpo.data.dataset.PreferenceDataset` decodes, tiles and tokenizes.

``meta.json`` maps a subset name to ``{"root", "annotation", "repeat_time", "length",
"max_dynamic_patch"?, "system_prompt"?}``. Relative ``root``/``annotation`` paths start from
``data.data_root`` when it is set; otherwise from the folder of ``meta.json``, or, when the
annotation is not there, from its parent (the released MMPR-v1.2 writes
``"MMPR-v1.2/annotations/..."``, relative to the folder above it). ``system_prompt`` (written by
``mpo-data``) is the system message the subset's responses were sampled with, ``null`` for none; a
subset without it gets ``auto``. ``repeat_time`` < 1 keeps that fraction of the lines (a seeded
sample), >= 1 repeats every line ``int(repeat_time)`` times.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from mpo.config import DataConfig
from mpo.errors import DataError
from mpo.data.media import record_path
from mpo.jsonl import json_object_lines
from mpo.data.prompting import normalize_question, resolve_system_prompt
from mpo.types import PreferenceRecord


@dataclass
class SubsetSpec:
    name: str
    root: Path
    annotation: Path
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    system_prompt: str | None = None


def _bases(meta_path: Path, data_root: str) -> list[Path]:
    """Where relative paths of meta.json may start, in the order they are tried."""
    if data_root:
        return [Path(os.path.abspath(data_root))]
    return [meta_path.parent, meta_path.parent.parent]


def _locate(relative: str, bases: list[Path], meta: str, field: str) -> tuple[Path, Path]:
    """The annotation file under the first base that has it, and that base."""
    tried = [base / relative for base in bases]
    for base, path in zip(bases, tried):
        if path.exists():
            return path, base
    places = ", ".join(str(p) for p in dict.fromkeys(tried))
    raise DataError(f"annotation file not found; tried {places}", file=meta, field=field)


def read_meta(meta_path: str | Path, data_root: str = "") -> list[SubsetSpec]:
    """The subsets of a ``meta.json``, paths resolved (see the module docstring)."""
    meta_path = Path(os.path.abspath(meta_path))
    source = str(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("meta file not found", file=source) from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read meta file: {error}", file=source) from None
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON: {error.msg}", file=source, line=error.lineno) from None
    if not isinstance(meta, dict) or not meta:
        raise DataError("expected a non-empty mapping of subset name -> spec", file=source)
    bases = _bases(meta_path, data_root)
    subsets = []
    for name, spec in meta.items():
        if not isinstance(spec, dict):
            raise DataError("expected a mapping", file=source, field=name)
        for key in ("root", "annotation"):
            if not isinstance(spec.get(key), str) or key == "annotation" and not spec[key]:
                raise DataError("missing or not a string", file=source, field=f"{name}.{key}")
        repeat = spec.get("repeat_time", 1.0)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or repeat <= 0:
            raise DataError(f"must be a positive number, got {repeat!r}", file=source, field=f"{name}.repeat_time")
        tiles = spec.get("max_dynamic_patch")
        if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
            raise DataError(f"must be a positive integer, got {tiles!r}", file=source, field=f"{name}.max_dynamic_patch")
        system_prompt = spec.get("system_prompt", resolve_system_prompt("auto"))
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise DataError("must be a string or null", file=source, field=f"{name}.system_prompt")
        annotation, base = _locate(spec["annotation"], bases, source, f"{name}.annotation")
        # The image root starts where its folder exists, else where the annotation was found.
        root = next((b / spec["root"] for b in bases if (b / spec["root"]).is_dir()), base / spec["root"])
        subsets.append(SubsetSpec(name, Path(os.path.abspath(root)), annotation, float(repeat), tiles, system_prompt))
    return subsets


def parse_record(
    item: dict, root: Path, source: str, line: int, max_dynamic_patch: int, system_prompt: str | None = None
) -> PreferenceRecord:
    """Validates one parsed JSONL line; raises :class:`DataError` naming file, line and field."""
    for key in ("question", "chosen", "rejected"):
        if not isinstance(item.get(key), str) or (key != "question" and not item[key].strip()):
            raise DataError("missing or empty", file=source, line=line, field=key)
    if item["chosen"].strip() == item["rejected"].strip():
        raise DataError("same text as chosen: the pair has nothing to prefer", file=source, line=line, field="rejected")
    images = item.get("image") or []  # absent, null or "" all mean a text-only record
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise DataError("expected a path or a list of paths", file=source, line=line, field="image")
    paths = [record_path(root, rel, source, line, "image") for rel in images]
    video = record_path(root, item["video"], source, line, "video") if "video" in item else None
    try:
        question = normalize_question(item["question"], len(paths), video is not None)
    except DataError as error:
        raise DataError(error.reason, file=source, line=line, field="question") from None
    return PreferenceRecord(
        question=question,
        chosen=item["chosen"],
        rejected=item["rejected"],
        images=paths,
        video=video,
        source=f"{source}:{line}",
        max_dynamic_patch=max_dynamic_patch,
        system_prompt=system_prompt,
    )


def read_annotation(
    path: Path, root: Path, max_dynamic_patch: int, skipped: list[DataError] | None, system_prompt: str | None = None
) -> list[PreferenceRecord]:
    """Reads every record of one JSONL; with ``skipped`` given, bad lines go there instead of raising.

    A file without a single record is an error in both modes (an empty subset is a mistake in the
    dataset, not a bad record).
    """
    records, lines = [], 0
    for number, item in json_object_lines(path, "annotation file"):
        lines += 1
        try:
            if isinstance(item, DataError):
                raise item
            records.append(parse_record(item, root, str(path), number, max_dynamic_patch, system_prompt))
        except DataError as error:
            if skipped is None:
                raise
            skipped.append(error)
    if not lines:
        raise DataError("annotation file has no records", file=str(path))
    return records


def _sample(records: list[PreferenceRecord], subset: SubsetSpec, seed: int, meta: str) -> list[PreferenceRecord]:
    """``repeat_time`` applied: a seeded fraction in file order, or whole repeats."""
    if subset.repeat_time >= 1:
        return records * int(subset.repeat_time)
    keep = int(len(records) * subset.repeat_time)
    if keep == 0 and records:
        raise DataError(
            f"repeat_time {subset.repeat_time:g} of {len(records)} record(s) keeps none "
            f"(int({len(records) * subset.repeat_time:g}) = 0); raise it or leave the subset out",
            file=meta, field=f"{subset.name}.repeat_time",
        )
    # Sorted, so the sample does not depend on the order random.sample returns.
    return [records[i] for i in sorted(random.Random(f"{seed}:{subset.name}").sample(range(len(records)), keep))]


def read_mmpr(
    config: DataConfig, seed: int, skipped: list[DataError] | None = None, notes: list[str] | None = None
) -> list[PreferenceRecord]:
    """The records of ``data.meta_path`` (``repeat_time`` applied) or ``data.jsonl_path``, in file order.

    Args:
        notes: collects a line for each subset whose recorded system message ``data.system_prompt``
            overrides, for the caller to report.
    """
    if config.jsonl_path:
        root = Path(os.path.abspath(config.image_root or Path(config.jsonl_path).parent))
        system_prompt = resolve_system_prompt(config.system_prompt or "auto")
        return read_annotation(Path(os.path.abspath(config.jsonl_path)), root, config.max_dynamic_patch, skipped, system_prompt)
    override = resolve_system_prompt(config.system_prompt) if config.system_prompt else None
    records = []
    for subset in read_meta(config.meta_path, config.data_root):
        tiles = config.max_dynamic_patch if subset.max_dynamic_patch is None else subset.max_dynamic_patch
        system_prompt = subset.system_prompt
        if config.system_prompt and override != system_prompt:
            if notes is not None:
                notes.append(f"data.system_prompt overrides the system message meta.json records for subset {subset.name} "
                             f"({system_prompt!r} -> {override!r})")
            system_prompt = override
        lines = read_annotation(subset.annotation, subset.root, tiles, skipped, system_prompt)
        records.extend(_sample(lines, subset, seed, str(Path(os.path.abspath(config.meta_path)))))
    return records
