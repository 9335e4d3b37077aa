"""Data in a recipe key that reads another format: recognised, and answered with the key it goes in.

Each data key reads one format: ``data.meta_path`` an MMPR ``meta.json``, ``data.jsonl_path`` one
MMPR annotation JSONL, ``data.dataset_path`` the peers' preference rows (TRL, ms-swift,
LLaMA-Factory) in any container. Before a key's file is read, :func:`check_data_key` looks at what
it holds (a folder's kind, a file's suffix, the columns of its first row) and, when that is the
format of another key, stops with one line naming that key, instead of the reader's own failure
(a JSON error on a folder, ``question: missing or empty`` on a TRL row, a pyarrow traceback).
"""

from __future__ import annotations

import json
from pathlib import Path

from mpo.data.dataset_files import ROW_SUFFIXES, column_names, is_save_to_disk
from mpo.data.row_formats import FORMATS, MMPR_COLUMNS, detect_format
from mpo.errors import DataError

KEYS = {"meta": "meta_path", "mmpr": "jsonl_path", "peer": "dataset_path"}
"""The key (after ``data.`` and its ``eval_`` prefix) that reads each kind of data."""


def _is_meta(value) -> bool:
    """Whether parsed JSON is an MMPR ``meta.json``: subsets mapped to specs with an annotation."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, dict) and "annotation" in v for v in value.values())


def _meta_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            if not handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
                return False  # a JSON array or JSON lines of rows, never parsed whole here
        return _is_meta(json.loads(path.read_text(encoding="utf-8-sig")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def sniff(path: Path) -> tuple[str, str] | None:
    """``(kind, what it is)`` of the data at ``path`` (kind a key of :data:`KEYS`), or None when not
    recognised (the key's own reader then says what is wrong)."""
    if path.is_dir():
        if (path / "meta.json").is_file() and _meta_file(path / "meta.json"):
            return "meta", "an MMPR folder"
        if is_save_to_disk(path):
            return "peer", "a dataset folder written by save_to_disk"
        first = next((p for p in path.rglob("*") if p.suffix in ROW_SUFFIXES and p.is_file()), None)
        found = sniff(first) if first is not None else None
        return (found[0], f"a folder of {found[1]}") if found else None
    if not path.is_file() or path.suffix not in ROW_SUFFIXES:
        return None
    if path.suffix == ".json" and _meta_file(path):
        return "meta", "an MMPR meta.json"
    try:
        fmt = detect_format(column_names(path))
    except (DataError, OSError, ValueError):
        return None
    if fmt == "MMPR":
        return "mmpr", f"MMPR annotation lines ({MMPR_COLUMNS})"
    if fmt in FORMATS:
        return "peer", f"{fmt} preference rows ({FORMATS[fmt].columns})"
    if path.suffix in (".parquet", ".arrow"):
        return "peer", f"a {path.suffix[1:]} dataset file"
    return None


def check_data_key(path: str, key: str, prefix: str = "") -> None:
    """Stops with one line when the data at ``path`` goes in another data key than ``key``.

    Args:
        path: the key's value.
        key: ``meta_path``, ``jsonl_path`` or ``dataset_path``.
        prefix: ``""`` for the training data, ``"eval_"`` for the held-out pairs.
    """
    found = sniff(Path(path))
    if found is None:
        return
    kind, what = found
    if KEYS[kind] == key and not (kind == "meta" and Path(path).is_dir()):
        return
    if kind == "peer" and prefix:
        where = (f"held-out pairs are read from MMPR data (data.eval_meta_path, data.eval_jsonl_path); hold out "
                 f"data.eval_fraction of data.dataset_path={path} instead")
    elif kind == "meta" and Path(path).is_dir():
        where = f"set data.{prefix}meta_path={Path(path) / 'meta.json'} instead"
    else:
        where = f"set data.{prefix}{KEYS[kind]}={path} instead"
    reads = {"meta_path": "an MMPR meta.json", "jsonl_path": "one MMPR annotation JSONL",
             "dataset_path": "TRL, ms-swift or LLaMA-Factory preference rows"}[key]
    raise DataError(f"found {what}: {where} (data.{prefix}{key} reads {reads})", file=path, field=f"data.{prefix}{key}")
