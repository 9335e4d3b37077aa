"""The files of ``data.dataset_path`` and their rows, whatever the container.

``data.dataset_path`` names one file or a directory:

* a ``.jsonl`` file (one JSON object per line), a ``.json`` file (a JSON array of objects, or JSON
  lines under a ``.json`` name), a ``.parquet`` or an ``.arrow`` file;
* a ``save_to_disk`` directory (a Dataset, or a DatasetDict with ``data.dataset_split``);
* a directory of such files (the hub layout ``data/train-00000-of-00002.parquet``: the split's
  files when their names or folders say it, else all of them).

Each row comes with where it is, for error messages: a JSONL row by its line number (from 1, as an
editor shows it), a JSON array element, a parquet or arrow row by its index (from 0:
``json.load(f)[ROW]``, ``Dataset.from_file(FILE)[ROW]``). Images stored by ``datasets`` stay as
``{"bytes", "path"}`` here; nothing is decoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mpo.errors import DataError
from mpo.jsonl import json_object_lines

ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_BATCH_ROWS = 256


def is_save_to_disk(path: Path) -> bool:
    """Whether ``path`` is a folder ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` wrote."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def data_files(path: Path, split: str) -> list[Path]:
    """The data files of a local dataset, in row order."""
    if not path.exists():
        raise DataError("dataset not found", file=str(path), field="data.dataset_path")
    if path.is_file():
        if path.suffix not in ROW_SUFFIXES:
            raise DataError(f"expected a {', '.join(ROW_SUFFIXES)} file or a dataset folder, got a "
                            f"{path.suffix or 'suffix-less'} file", file=str(path), field="data.dataset_path")
        return [path]
    if is_save_to_disk(path):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"no split {split!r}; it has {sorted(loaded)}", file=str(path), field="data.dataset_split")
            loaded = loaded[split]
        return [Path(entry["filename"]) for entry in loaded.cache_files]
    files = sorted(p for p in path.rglob("*") if p.suffix in ROW_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"no {', '.join(ROW_SUFFIXES)} files in this directory", file=str(path), field="data.dataset_path")
    of_split = [p for p in files if p.name.startswith((f"{split}-", f"{split}.")) or split in p.relative_to(path).parts[:-1]]
    return of_split or files


def iter_rows(file: Path) -> Iterator[tuple[int, dict | DataError]]:
    """``(row, values)`` of one file, in order (see the module docstring for how rows are counted).

    A JSONL line that is not a JSON object comes as its :class:`DataError` (file, line, ``<line>``),
    for the caller to stop at or skip.
    """
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS):
            for row in batch.to_pylist():
                yield index, row
                index += 1
        return
    if file.suffix == ".arrow":
        import datasets

        index = 0
        for table in datasets.Dataset.from_file(str(file)).with_format("arrow").iter(batch_size=_BATCH_ROWS):
            for row in table.to_pylist():
                yield index, row
                index += 1
        return
    if file.suffix == ".json" and _starts_with(file, b"["):
        yield from _json_array(file)
        return
    yield from json_object_lines(file, "dataset file")


def column_names(file: Path) -> list[str]:
    """The columns of a file: a parquet or arrow schema's, else the keys of its first row (none for
    an empty file). A JSON array is not parsed beyond its first element."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(file).names)
    if file.suffix == ".json" and _starts_with(file, b"["):
        text = file.read_text(encoding="utf-8-sig")
        start = text.index("[") + 1
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            first, _ = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return []  # an empty array, or bad JSON that reading the rows reports
        return list(first) if isinstance(first, dict) else []
    return list(next((row for _, row in iter_rows(file) if isinstance(row, dict)), {}))


def _starts_with(file: Path, prefix: bytes) -> bool:
    with open(file, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(prefix)


def _json_array(file: Path) -> Iterator[tuple[int, dict | DataError]]:
    try:
        values = json.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 ({error.reason}); re-encode the file as UTF-8", file=str(file)) from None
    except json.JSONDecodeError as error:
        raise DataError(f"malformed JSON ({error.msg} at line {error.lineno}, column {error.colno})", file=str(file)) from None
    for index, value in enumerate(values):
        if not isinstance(value, dict):
            value = DataError(f"expected a JSON object, got {type(value).__name__}", file=str(file), line=index, field="<row>")
        yield index, value
