"""The MMPR layout the trainer reads: ``annotations/<subset>.jsonl`` and ``meta.json``.

``meta.json`` maps each subset name to ``{"root": image dir, "annotation": jsonl path,
"repeat_time": 1.0, "length": lines, "max_dynamic_patch": tiles, "system_prompt": text | null}``
(paths relative to meta.json's folder, which the trainer reads them from: the annotations always
(``annotations/<subset>.jsonl``), the image root when it lies inside the folder above
(``--image-root data/images --out-dir data/mmpr`` gives ``../images``), so the built folder moves
with that folder; a root elsewhere, e.g. on a shared filesystem, stays absolute.
``max_dynamic_patch`` is the tile budget the
responses were sampled with, so training tiles the images as the model saw them, and
``system_prompt`` the system message they were sampled with, which the trainer then renders its
prompts with). Several builds may write into one output directory (one per input file, or per
shard finisher): each updates only its own entries, under a lock, and every file is replaced
atomically. A ``meta.json`` left with no subset is removed rather than written as ``{}`` (which
the trainer would refuse).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.pairs import Pair, deduplicate
from data_pipeline.records import DirectoryLock
from mpo.errors import DataError
from mpo.jsonl import write_json_atomic, write_jsonl_atomic


def write_subset(out_dir: str | os.PathLike, name: str, pairs: Sequence[Pair]) -> tuple[Path | None, int, int]:
    """Writes ``annotations/<name>.jsonl`` (input order, duplicates dropped).

    Returns the path (None when there are no pairs: a stale file is removed, since an empty
    subset in meta.json would be an empty dataset for the trainer), the line count and the
    number of duplicates dropped.
    """
    path = Path(out_dir) / "annotations" / f"{name}.jsonl"
    kept, dropped = deduplicate(sorted(pairs, key=lambda p: p.line))  # sorted() is stable
    if not kept:
        path.unlink(missing_ok=True)
        return None, 0, dropped
    count = write_jsonl_atomic(path, (pair.to_mmpr() for pair in kept))
    return path, count, dropped


def update_meta(out_dir: str | os.PathLike, entries: dict[str, dict | None]) -> dict:
    """Sets (or, for None, removes) subset entries in ``meta.json``; returns the whole mapping."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    with DirectoryLock(out_dir):
        meta = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise DataError(f"not valid JSON ({error.msg}); fix or delete it", file=str(meta_path), line=error.lineno) from None
        for name, entry in entries.items():
            if entry is None:
                meta.pop(name, None)
            else:
                meta[name] = entry
        if meta:
            write_json_atomic(meta_path, dict(sorted(meta.items())))
        else:
            meta_path.unlink(missing_ok=True)
    return meta


def path_in_meta(out_dir: str | os.PathLike, path: str | os.PathLike) -> str:
    """How ``out_dir/meta.json`` names ``path``: relative to ``out_dir`` when ``path`` lies inside the
    folder above it (they move together), else absolute."""
    out_dir, path = Path(os.path.abspath(out_dir)), Path(os.path.abspath(path))
    if path == out_dir.parent or out_dir.parent in path.parents:
        return os.path.relpath(path, out_dir)
    return str(path)


def meta_entry(out_dir: str | os.PathLike, image_root: str | os.PathLike, annotation: Path, length: int, max_tiles: int,
               system_prompt: str | None) -> dict:
    return {"root": path_in_meta(out_dir, image_root), "annotation": path_in_meta(out_dir, annotation), "repeat_time": 1.0,
            "length": length, "max_dynamic_patch": max_tiles, "system_prompt": system_prompt}


def write_mmpr(out_dir: str | os.PathLike, image_root: str | os.PathLike, subsets: dict[str, Sequence[Pair]],
               max_tiles: int, system_prompts: dict[str, str | None]) -> dict[str, dict]:
    """Writes every subset and its meta entry; returns ``{name: {"pairs", "duplicates", "path"}}``.

    Args:
        max_tiles: the tile budget the responses were sampled with (``max_dynamic_patch``).
        system_prompts: each subset's system message its responses were sampled with.
    """
    entries: dict[str, dict | None] = {}
    report = {}
    for name, pairs in subsets.items():
        path, count, dropped = write_subset(out_dir, name, pairs)
        entries[name] = meta_entry(out_dir, image_root, path, count, max_tiles, system_prompts[name]) if path else None
        report[name] = {"pairs": count, "duplicates": dropped, "path": str(path) if path else None}
    update_meta(out_dir, entries)
    return report


def group_by_dataset(pairs: Sequence[Pair], suffix: str) -> dict[str, list[Pair]]:
    """``{"<dataset><suffix>": pairs}``: one MMPR subset per source dataset and kind."""
    grouped: dict[str, list[Pair]] = {}
    for pair in pairs:
        grouped.setdefault(pair.dataset + suffix, []).append(pair)
    return grouped
