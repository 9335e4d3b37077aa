"""MMPR preference data: ``meta.json`` + JSONL annotations + images, read into :class:`EncodedPair`.

Every line is parsed and checked when the dataset is built (JSON, required fields, ``<image>``
counts, image paths inside their root, files present), so a bad dataset fails before the first
step, not hours in. Images are decoded, tiled and tokenized lazily in ``__getitem__``.

``meta.json`` maps a subset name to ``{"root", "annotation", "repeat_time", "length",
"max_dynamic_patch"?, "system_prompt"?}``; relative paths are resolved against the directory of
``meta.json``. ``system_prompt`` (written by ``mpo-data``) is the system message the subset's
responses were sampled with, ``null`` for none; a subset without it gets ``auto``.
``repeat_time`` < 1 keeps that fraction of the lines (a seeded sample), >= 1 repeats every line
``int(repeat_time)`` times.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from mpo.config import DataConfig
from mpo.errors import DataError, OverlongPair
from mpo.inputs import load_image, load_video_frames
from mpo.prompting import IMAGE_PLACEHOLDER, encode_prompt, normalize_question, resolve_system_prompt
from mpo.types import EncodedPair, PreferenceRecord


@dataclass
class SubsetSpec:
    name: str
    root: Path
    annotation: Path
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    system_prompt: str | None = None


def read_meta(meta_path: str | Path) -> list[SubsetSpec]:
    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError("meta file not found", file=str(meta_path)) from None
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON: {error.msg}", file=str(meta_path), line=error.lineno) from None
    if not isinstance(meta, dict) or not meta:
        raise DataError("expected a non-empty mapping of subset name -> spec", file=str(meta_path))
    subsets = []
    for name, spec in meta.items():
        if not isinstance(spec, dict):
            raise DataError("expected a mapping", file=str(meta_path), field=name)
        for key in ("root", "annotation"):
            if not isinstance(spec.get(key), str):
                raise DataError("missing or not a string", file=str(meta_path), field=f"{name}.{key}")
        repeat = spec.get("repeat_time", 1.0)
        if not isinstance(repeat, (int, float)) or repeat <= 0:
            raise DataError(f"must be a positive number, got {repeat!r}", file=str(meta_path), field=f"{name}.repeat_time")
        system_prompt = spec.get("system_prompt", resolve_system_prompt("auto"))
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise DataError("must be a string or null", file=str(meta_path), field=f"{name}.system_prompt")
        subsets.append(
            SubsetSpec(
                name=name,
                root=(meta_path.parent / spec["root"]).resolve(),
                annotation=(meta_path.parent / spec["annotation"]).resolve(),
                repeat_time=float(repeat),
                max_dynamic_patch=spec.get("max_dynamic_patch"),
                system_prompt=system_prompt,
            )
        )
    return subsets


def _inside(root: Path, relative: str, source: str, line: int, field: str) -> str:
    """Resolves a record's path under its root; a path that escapes the root is refused."""
    if not isinstance(relative, str) or not relative:
        raise DataError("expected a non-empty path string", file=source, line=line, field=field)
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise DataError(f"path {relative!r} is outside the image root {root}", file=source, line=line, field=field)
    if not path.exists():
        raise DataError(f"file not found: {path}", file=source, line=line, field=field)
    return str(path)


def parse_record(
    raw: str, root: Path, source: str, line: int, max_dynamic_patch: int, system_prompt: str | None = None
) -> PreferenceRecord:
    """Validates one JSONL line; raises :class:`DataError` naming file, line and field."""
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DataError(f"malformed JSON: {error.msg}", file=source, line=line, field="<line>") from None
    if not isinstance(item, dict):
        raise DataError("expected a JSON object", file=source, line=line, field="<line>")
    for key in ("question", "chosen", "rejected"):
        if not isinstance(item.get(key), str) or (key != "question" and not item[key].strip()):
            raise DataError("missing or empty", file=source, line=line, field=key)
    images = item.get("image") or []  # absent, null or "" all mean a text-only record
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise DataError("expected a path or a list of paths", file=source, line=line, field="image")
    paths = [_inside(root, rel, source, line, "image") for rel in images]
    video = _inside(root, item["video"], source, line, "video") if "video" in item else None
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
    """Reads every record of one JSONL; with ``skipped`` given, bad lines go there instead of raising."""
    records = []
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError("annotation file not found", file=str(path)) from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                records.append(parse_record(raw, root, str(path), number, max_dynamic_patch, system_prompt))
            except DataError as error:
                if skipped is None:
                    raise
                skipped.append(error)
    return records


def load_records(
    config: DataConfig, seed: int, skipped: list[DataError] | None = None, notes: list[str] | None = None
) -> list[PreferenceRecord]:
    """All training records of a recipe, ``repeat_time`` applied, in file order.

    Args:
        notes: collects a line for each subset whose recorded system message ``data.system_prompt``
            overrides, for the caller to report.
    """
    override = resolve_system_prompt(config.system_prompt) if config.system_prompt else None
    if config.jsonl_path:
        root = Path(config.image_root or Path(config.jsonl_path).parent).resolve()
        system_prompt = resolve_system_prompt(config.system_prompt or "auto")
        return read_annotation(Path(config.jsonl_path), root, config.max_dynamic_patch, skipped, system_prompt)
    records = []
    for subset in read_meta(config.meta_path):
        tiles = subset.max_dynamic_patch or config.max_dynamic_patch
        system_prompt = subset.system_prompt
        if config.system_prompt and override != system_prompt:
            if notes is not None:
                notes.append(f"data.system_prompt overrides the system message meta.json records for subset {subset.name} "
                             f"({system_prompt!r} -> {override!r})")
            system_prompt = override
        lines = read_annotation(subset.annotation, subset.root, tiles, skipped, system_prompt)
        if subset.repeat_time < 1:
            # A seeded fraction, keeping file order so the sample does not depend on list order.
            keep = sorted(random.Random(f"{seed}:{subset.name}").sample(range(len(lines)), int(len(lines) * subset.repeat_time)))
            lines = [lines[i] for i in keep]
        else:
            lines = lines * int(subset.repeat_time)
        records.extend(lines)
    if not records:
        raise DataError("no training records", file=config.meta_path or config.jsonl_path)
    return records


class PreferenceDataset:
    """Map-style dataset of encoded pairs.

    ``__getitem__`` returns an :class:`EncodedPair`, or a :class:`DataError` for a pair that cannot
    be used (corrupt image, prompt longer than ``max_length``, or an over-long pair with
    ``overlong: drop``) so the caller decides whether that stops the run or is skipped and reported.
    """

    def __init__(self, records: list[PreferenceRecord], processor, config: DataConfig):
        self.records = records
        self.processor = processor
        self.config = config
        self.end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EncodedPair | DataError:
        record = self.records[index]
        try:
            return self.encode(record)
        except DataError as error:
            file, _, line = record.source.rpartition(":")
            return type(error)(error.reason, file=file, line=int(line) if line.isdigit() else None, field=error.field)

    def encode(self, record: PreferenceRecord) -> EncodedPair:
        images = [load_image(p) for p in record.images]
        video = load_video_frames(record.video, self.config.video_frames) if record.video else None
        prompt = encode_prompt(self.processor, record.question, images, record.max_dynamic_patch, record.system_prompt, video=video)
        prompt_ids = prompt["input_ids"][0].tolist()
        tokenizer = self.processor.tokenizer
        chosen_ids = tokenizer(record.chosen, add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        rejected_ids = tokenizer(record.rejected, add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        budget = self.config.max_length - len(prompt_ids)
        if budget < 1:
            raise OverlongPair(f"prompt alone is {len(prompt_ids)} tokens > max_length {self.config.max_length}", field="question")
        truncated = max(len(chosen_ids), len(rejected_ids)) > budget
        if truncated and self.config.overlong == "drop":
            longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
            raise OverlongPair(f"pair is {longest} tokens > max_length {self.config.max_length}", field="chosen/rejected")
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        return EncodedPair(prompt_ids, chosen_ids, rejected_ids, prompt.get("pixel_values"), record.source, truncated)


def append_skipped(output_dir: str | Path, errors: list[DataError]) -> None:
    """Appends skipped samples to ``output_dir/skipped.jsonl``, one JSON object per line."""
    if not errors:
        return
    path = Path(output_dir) / "skipped.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_APPEND writes of one short line are atomic on POSIX, so ranks may share the file.
    with open(path, "a", encoding="utf-8") as handle:
        for error in errors:
            handle.write(json.dumps(error.to_record()) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


__all__ = ["IMAGE_PLACEHOLDER", "PreferenceDataset", "append_skipped", "load_records", "parse_record", "read_meta"]
