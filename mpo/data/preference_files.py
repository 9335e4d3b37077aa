"""``data.dataset_path``: preference data in the formats users bring, read into :class:`PreferenceRecord`.

The files (:mod:`mpo.data.dataset_files`: JSONL, JSON, Parquet, Arrow, ``save_to_disk`` folders)
hold rows of TRL, ms-swift or LLaMA-Factory, each file's format recognised from its columns
(:mod:`mpo.data.row_formats`, where the accepted shapes are listed). Every row is checked as it is
read, with the MMPR rules: an error names ``FILE:ROW: COLUMN`` (ROW as
:mod:`mpo.data.dataset_files` counts it), e.g.
``data/train-00000-of-00001.parquet:7: prompt: has 2 image part(s) but 1 image(s) in images``.

Images are paths inside ``data.image_root`` (default: the dataset's folder, or the file's), the
path rule of :func:`mpo.data.media.resolve_data_path` applied, or bytes stored by ``datasets``.
Embedded images are written once, named by their content hash, to ``$MPO_CACHE/images`` (default
``~/.cache/mpo/images``), since the trainer decodes every image lazily from a file.

System message: ``data.system_prompt`` when set (each file whose rows state another is reported);
else the one a row states (a system turn, LLaMA-Factory's ``system`` column, a rendered prompt with
or without its system turn); else ``auto``, InternVL's default.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mpo.cache import cache_dir
from mpo.config import DataConfig
from mpo.data.conversations import short
from mpo.data.dataset_files import column_names, data_files, iter_rows
from mpo.data.media import record_path
from mpo.data.prompting import normalize_question, resolve_system_prompt
from mpo.data.row_formats import FORMATS, MMPR_COLUMNS, RowPair, detect_format
from mpo.errors import DataError
from mpo.types import PreferenceRecord

_UNSET = object()


def _image_path(image, column: str, root: Path, file: str, row: int) -> str:
    """A stored image as a file the trainer can open: embedded bytes go to the image cache."""
    if isinstance(image, dict) and image.get("bytes") is None and isinstance(image.get("path"), str):
        image = image["path"]
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            raise DataError(f"{image!r} is a URL: images are read from disk; download them under data.image_root",
                            file=file, line=row, field=column)
        try:
            return record_path(root, image, file, row, column)
        except DataError as error:
            if os.path.isabs(image) and "outside the image root" in error.reason:
                raise DataError(error.reason + "; set data.image_root to a folder that holds the absolute paths",
                                file=file, line=row, field=column) from None
            raise
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, bytes) or not data:
        raise DataError(f"expected an image (bytes or a path), got {short(image)}", file=file, line=row, field=column)
    digest = hashlib.sha256(data).hexdigest()
    path = cache_dir() / "images" / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every process of a launch may write the same file: each its own temporary, then a rename.
        tmp = path.with_name(f".{digest}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def to_record(pair: RowPair, file: str, row: int, root: Path, max_dynamic_patch: int, override=_UNSET) -> PreferenceRecord:
    """A parsed row checked by the MMPR rules and completed into a record.

    Args:
        override: ``data.system_prompt`` resolved (text or None), or unset to keep the row's own.
    """
    if pair.chosen.strip() == pair.rejected.strip():
        raise DataError("same text as chosen: the pair has nothing to prefer", file=file, line=row, field="rejected")
    paths = [_image_path(image, pair.image_column, root, file, row) for image in pair.images]
    if pair.image_parts and pair.image_parts != len(paths):
        raise DataError(f"has {pair.image_parts} image part(s) but {len(paths)} image(s) in {pair.image_column}",
                        file=file, line=row, field=pair.prompt_field)
    if len(pair.videos) > 1:
        raise DataError(f"{len(pair.videos)} videos: a pair takes at most one", file=file, line=row, field="videos")
    video = record_path(root, pair.videos[0], file, row, "videos") if pair.videos else None
    try:
        question = normalize_question(pair.question, len(paths), video is not None)
    except DataError as error:
        raise DataError(error.reason, file=file, line=row, field=pair.prompt_field) from None
    if override is not _UNSET:
        system = override
    else:
        system = pair.system if pair.has_system else resolve_system_prompt("auto")
    # A rendered prompt is checked against the template's rendering, unless another system message replaces its own.
    rendered = pair.rendered_prompt if system == pair.system else None
    return PreferenceRecord(question=question, chosen=pair.chosen, rejected=pair.rejected, images=paths, video=video,
                            source=f"{file}:{row}", max_dynamic_patch=max_dynamic_patch, system_prompt=system,
                            rendered_prompt=rendered)


def _parse(fmt: str, row: dict, file: str, index: int) -> RowPair:
    try:
        return FORMATS[fmt].parse(row)
    except DataError as error:
        raise DataError(error.reason, file=file, line=index, field=error.field) from None


def parse_row(fmt: str, row: dict, file: str, index: int, root: Path, max_dynamic_patch: int,
              override=_UNSET) -> PreferenceRecord:
    """Validates one row of format ``fmt``; raises :class:`DataError` naming the file, row and column."""
    return to_record(_parse(fmt, row, file, index), file, index, root, max_dynamic_patch, override)


def file_format(file: Path, key: str) -> str:
    """The format of one file, from its columns; a file of no known format is refused in one line."""
    columns = column_names(file)
    fmt = detect_format(columns)
    if fmt in FORMATS:
        return fmt
    if fmt == "MMPR":
        raise DataError(f"its rows are MMPR annotation lines ({MMPR_COLUMNS}): set data.jsonl_path (one JSONL, images under "
                        "data.image_root) or data.meta_path (an MMPR meta.json) instead", file=str(file), field=key)
    known = "; ".join(f"{f.name}: {f.columns}" for f in FORMATS.values())
    raise DataError(f"columns {sorted(columns)} are no preference format mpo reads ({known})", file=str(file), field=key)


def read_dataset(config: DataConfig, skipped: list[DataError] | None, notes: list[str] | None = None) -> list[PreferenceRecord]:
    """Every row of ``config.dataset_path``; with ``skipped`` given, bad rows go there instead of raising.

    Args:
        notes: collects a line for each file whose rows' own system message ``data.system_prompt``
            replaces, for the caller to report.
    """
    path = Path(config.dataset_path)
    root = Path(config.image_root or (path if path.is_dir() else path.parent)).resolve()
    override = resolve_system_prompt(config.system_prompt) if config.system_prompt else _UNSET
    records = []
    for file in data_files(path, config.dataset_split):
        fmt, replaced = file_format(file, "data.dataset_path"), 0
        for index, row in iter_rows(file):
            try:
                if isinstance(row, DataError):
                    raise row
                pair = _parse(fmt, row, str(file), index)
                records.append(to_record(pair, str(file), index, root, config.max_dynamic_patch, override))
            except DataError as error:
                if skipped is None:
                    raise
                skipped.append(error)
                continue
            replaced += override is not _UNSET and pair.has_system and pair.system != override
        if replaced and notes is not None:
            notes.append(f"data.system_prompt replaces the system message {replaced} row(s) of {file} state")
    if not records:
        raise DataError("no training records", file=str(path))
    return records
