"""A local HF dataset in TRL's vision preference columns, read into :class:`PreferenceRecord`.

``data.dataset_path`` names a ``save_to_disk`` directory (a Dataset, or a DatasetDict with
``data.dataset_split``), a parquet or arrow file, or a directory of such files (the hub layout
``data/train-00000-of-00002.parquet``: files of the split when names say it, else all). The
columns are TRL's (``DPOTrainer`` reads the same dataset unchanged):

* ``prompt``: a string, or a conversation holding one user message whose ``content`` is a string
  or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts;
* ``chosen`` / ``rejected``: a string, or one assistant message;
* ``images`` (or ``image``): a list of images (or one), each stored bytes (an ``Image`` feature
  of PIL images), raw bytes, or a path relative to ``data.image_root`` (default: the dataset's
  directory) that must stay inside it.

The prompt becomes the MMPR question: an image part is ``<image>\\n`` (the ``-hf`` chat template
renders it the same way), and a string prompt without ``<image>`` gets one per image prepended.
Every row is checked as it is read, with the MMPR rules; an error names ``FILE:ROW: COLUMN``, ROW
counting from 0 within FILE (``Dataset.from_file(FILE)[ROW]``). Embedded images are written once,
named by their content hash, to ``$MPO_CACHE/images`` (default ``~/.cache/mpo/images``), since
the trainer decodes every image lazily from a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from mpo.cache import cache_dir
from mpo.config import DataConfig
from mpo.data.media import record_path
from mpo.errors import DataError
from mpo.data.prompting import IMAGE_PLACEHOLDER, normalize_question, resolve_system_prompt
from mpo.types import PreferenceRecord

COLUMNS = ("prompt", "chosen", "rejected")
_BATCH_ROWS = 256


def data_files(path: Path, split: str) -> list[Path]:
    """The data files of a local dataset, in row order."""
    if not path.exists():
        raise DataError("dataset not found", file=str(path), field="data.dataset_path")
    if path.is_file():
        return [path]
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"no split {split!r}; it has {sorted(loaded)}", file=str(path), field="data.dataset_split")
            loaded = loaded[split]
        return [Path(entry["filename"]) for entry in loaded.cache_files]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
    of_split = [p for p in files if p.name.startswith((f"{split}-", f"{split}.")) or split in p.relative_to(path).parts[:-1]]
    if not files:
        raise DataError("no .parquet or .arrow files in this directory", file=str(path), field="data.dataset_path")
    return of_split or files


def iter_rows(file: Path) -> Iterator[dict]:
    """The rows of one file as stored (images as ``{"bytes", "path"}``, never decoded here)."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()
        return
    import datasets

    for table in datasets.Dataset.from_file(str(file)).with_format("arrow").iter(batch_size=_BATCH_ROWS):
        yield from table.to_pylist()


def _text(value, column: str, role: str, where: dict) -> tuple[str, int]:
    """A TRL column as (text with ``<image>`` per image part, number of image parts)."""
    if isinstance(value, str):
        return value, 0
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise DataError(f"expected a string or a list of one {role} message, got {_short(value)}", field=column, **where)
    message = value[0]
    if message.get("role") != role:
        raise DataError(f"expected a {role} message, got role {message.get('role')!r}", field=column, **where)
    content = message.get("content")
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise DataError(f"content: expected a string or a list of parts, got {_short(content)}", field=column, **where)
    pieces, images = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER + "\n")
            images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise DataError(f"content: expected {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got {_short(part)}",
                            field=column, **where)
    return "".join(pieces), images


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _image_path(image, column: str, root: Path, where: dict) -> str:
    """A stored image as a file the trainer can open: embedded bytes go to the image cache."""
    if isinstance(image, dict) and image.get("bytes") is None and isinstance(image.get("path"), str):
        image = image["path"]
    if isinstance(image, str):
        return record_path(root, image, where["file"], where["line"], column)
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, bytes) or not data:
        raise DataError(f"expected an image (bytes or a path), got {_short(image)}", field=column, **where)
    digest = hashlib.sha256(data).hexdigest()
    path = cache_dir() / "images" / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every process of a launch may write the same file: each its own temporary, then a rename.
        tmp = path.with_name(f".{digest}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def parse_row(row: dict, file: Path, index: int, root: Path, max_dynamic_patch: int,
              system_prompt: str | None) -> PreferenceRecord:
    """Validates one row; raises :class:`DataError` naming the file, row and column."""
    where = {"file": str(file), "line": index}
    missing = [column for column in COLUMNS if column not in row]
    if missing:
        raise DataError("missing column (TRL's preference columns: prompt, chosen, rejected, images)", field=missing[0], **where)
    question, image_parts = _text(row["prompt"], "prompt", "user", where)
    for column in ("chosen", "rejected"):
        text, response_images = _text(row[column], column, "assistant", where)
        if response_images or not text.strip():
            raise DataError("an image part in a response" if response_images else "empty response", field=column, **where)
    chosen, rejected = _text(row["chosen"], "chosen", "assistant", where)[0], _text(row["rejected"], "rejected", "assistant", where)[0]
    column = "images" if "images" in row else "image"
    images = row.get(column) or []
    images = images if isinstance(images, list) else [images]
    paths = [_image_path(image, column, root, where) for image in images]
    if image_parts and image_parts != len(paths):
        raise DataError(f"has {image_parts} image part(s) but {len(paths)} image(s) in {column}", field="prompt", **where)
    try:
        question = normalize_question(question, len(paths))
    except DataError as error:
        raise DataError(error.reason, field="prompt", **where) from None
    return PreferenceRecord(question=question, chosen=chosen, rejected=rejected, images=paths,
                            source=f"{file}:{index}", max_dynamic_patch=max_dynamic_patch, system_prompt=system_prompt)


def read_dataset(config: DataConfig, skipped: list[DataError] | None) -> list[PreferenceRecord]:
    """Every row of ``config.dataset_path``; with ``skipped`` given, bad rows go there instead of raising."""
    path = Path(config.dataset_path)
    root = Path(config.image_root or (path if path.is_dir() else path.parent)).resolve()
    # A TRL dataset records no system message: data.system_prompt, else the model family's default.
    system_prompt = resolve_system_prompt(config.system_prompt or "auto")
    records = []
    for file in data_files(path, config.dataset_split):
        for index, row in enumerate(iter_rows(file)):
            try:
                records.append(parse_row(row, file, index, root, config.max_dynamic_patch, system_prompt))
            except DataError as error:
                if skipped is None:
                    raise
                skipped.append(error)
    if not records:
        raise DataError("no training records", file=str(path))
    return records
