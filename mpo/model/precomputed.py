"""Reference log-probs computed once, stored next to the data, and looked up during training.

The reference model is frozen, so its log-probs of every pair never change: computing them once
before training frees the memory of a second model (and its forward at every step). Unlike the
peers, this works for image and video data: the stored values are those of exactly the tiling,
truncation and chat format the trainer uses, because they are computed by the trainer's own
dataset, collator and forward.

    mpo precompute-ref RECIPE.yaml [--out PATH] [key.sub=value ...]
    accelerate launch --config_file launch/zero3.yaml -m mpo.cli.precompute_ref RECIPE.yaml   # distributed

(the pass is :func:`mpo.train.precompute.compute`; this module is the file and its lookup).

The file (safetensors: chosen/rejected summed log-probs and token counts per pair) is keyed by
each pair's source ``annotation:line`` (relative to the data directory, so the directory can be
moved) and carries a fingerprint of what the values depend on:

* the dataset: every annotation file's size and hash, ``meta.json``'s hash, the record count,
  and every image and video file the records use (``reference.image_fingerprint``: ``stat``, the
  size and modification time of each, one ``stat`` per file; or ``content``, a hash of every byte);
* the model: hashes of its config and tokenizer files, and of each weight file's size plus four
  1 MiB samples spread over it (cheap on a 16 GB checkpoint, yet any fine-tune changes them), the
  load dtype and the attention kernel (``model.attn_implementation``);
* the settings the values depend on: tiling and length (``max_dynamic_patch``, ``max_length``,
  ``overlong``, ``video_frames``), precision (``train.mixed_precision``), layout and attention
  path (``forward.layout``, ``forward.pack_length``, ``forward.attention``).

Training with ``reference.precomputed_path`` loads no reference model; a file whose fingerprint
differs from the recipe's is refused with one line naming what changed. With ``stat`` image
fingerprints (the default), an image replaced by a file of the same size whose modification
time was kept (``cp -p``, ``rsync -t``) goes unnoticed, and a copy that does not keep times
(``cp -r``) is refused although unchanged; ``content`` has neither gap but reads every image at
each start (minutes to hours on a multi-terabyte dataset).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mpo.config import ModelConfig, Recipe
from mpo.data.media import frame_files
from mpo.errors import DataError
from mpo.jsonl import atomic_path
from mpo.model.loading import reference_model
from mpo.types import PreferenceBatch, PreferenceRecord, SequenceLogps

FORMAT = "mpo-reference-logps/1"
FIELDS = ("chosen_logps", "rejected_logps", "chosen_token_counts", "rejected_token_counts")
"""The stored tensors, one row per pair."""
_SAMPLE_BYTES = 1 << 20
_SAMPLES = 4
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sampled_digest(path: Path) -> str:
    """Size plus ``_SAMPLES`` evenly spaced 1 MiB reads: a few MB of I/O per weight file."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as handle:
        for i in range(_SAMPLES):
            handle.seek(max(0, (size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1)))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def data_root(recipe: Recipe) -> Path:
    """The directory the data lives in (meta.json's, the JSONL's or the dataset's); stored keys are
    relative to it."""
    data = recipe.data
    if data.dataset_path and Path(data.dataset_path).is_dir():
        return Path(os.path.abspath(data.dataset_path))
    return Path(os.path.abspath(data.meta_path or data.jsonl_path or data.dataset_path)).parent


def _media_files(records: list[PreferenceRecord]) -> list[Path]:
    """Every image and video file the records read (a frame directory's frames), sorted."""
    files = {Path(path) for record in records for path in record.images}
    for record in records:
        if record.video:
            video = Path(record.video)
            files.update(frame_files(video) if video.is_dir() else [video])
    return sorted(files)


def _media_digest(records: list[PreferenceRecord], root: Path, mode: str) -> str:
    """One hash over each media file's path (relative to ``root``) and its stat or content hash."""
    digest = hashlib.blake2b(digest_size=16)
    for path in _media_files(records):
        if mode == "stat":
            info = path.stat()
            identity = f"{info.st_size}:{info.st_mtime_ns}"
        else:
            identity = _digest(path)
        digest.update(f"{os.path.relpath(path, root)}\0{identity}\n".encode())
    return digest.hexdigest()


def pair_key(source: str, root: Path) -> str:
    """``annotation:line`` with the annotation path relative to ``root``."""
    file, _, line = source.rpartition(":")
    return f"{os.path.relpath(file, root)}:{line}"


def _model_dir(config: ModelConfig) -> Path:
    from mpo.model.loading import resolve_model_path

    path = Path(resolve_model_path(config.name_or_path))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    # A hub id: the files of its locally cached snapshot (no download here).
    return Path(snapshot_download(config.name_or_path, local_files_only=True))


@dataclass
class Fingerprint:
    """What stored reference log-probs depend on; any difference makes them stale."""

    dataset: dict
    model: dict
    settings: dict

    @classmethod
    def of(cls, recipe: Recipe, records: list[PreferenceRecord]) -> "Fingerprint":
        """The fingerprint of a recipe's data, model and settings.

        Args:
            recipe: the training recipe.
            records: every record of its dataset, in order.
        """
        root = data_root(recipe)
        files = list(dict.fromkeys(record.source.rpartition(":")[0] for record in records))
        dataset = {
            "annotations": {os.path.relpath(f, root): [Path(f).stat().st_size, _digest(Path(f))] for f in files},
            "meta": _digest(Path(recipe.data.meta_path)) if recipe.data.meta_path else "",
            "records": len(records),
            "images": _media_digest(records, root, recipe.reference.image_fingerprint),
        }
        model_dir = _model_dir(reference_model(recipe))  # the model the values come from
        model = {"dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation}
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            name = str(path.relative_to(model_dir))
            if path.suffix in _WEIGHT_SUFFIXES:
                model[name] = _sampled_digest(path)
            elif path.suffix in (".json", ".jinja", ".txt", ".model", ".tiktoken"):
                model[name] = _digest(path)
        data, forward = recipe.data, recipe.forward
        settings = {
            "max_dynamic_patch": data.max_dynamic_patch,
            "max_length": data.max_length,
            "overlong": data.overlong,
            "video_frames": data.video_frames,
            "mixed_precision": recipe.train.mixed_precision,
            "layout": forward.layout,
            "pack_length": forward.pack_length,
            "attention": forward.attention,
            "system_prompt": data.system_prompt,
        }
        return cls(dataset=dataset, model=model, settings=settings)

    def differences(self, other: "Fingerprint") -> list[str]:
        """Human-readable names of what differs, e.g. ``["dataset (annotations)"]``."""
        found = []
        for part in ("dataset", "model", "settings"):
            mine, theirs = getattr(self, part), getattr(other, part)
            keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if keys:
                found.append(f"{part} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        return found


class PrecomputedReference:
    """Reference log-probs looked up by pair: ``reference(batch, policy_image_features)``.

    Has the interface of :mod:`mpo.model.reference`'s sources, without a model.
    """

    def __init__(self, path: Path, root: Path, keys: list[str], tensors: dict[str, torch.Tensor]):
        self.path, self.root = path, root
        self.rows = {key: row for row, key in enumerate(keys)}
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | Path, recipe: Recipe, dataset) -> "PrecomputedReference":
        """Loads ``path`` and refuses it unless it matches the recipe's data, model and settings.

        Args:
            path: a file written by ``mpo precompute-ref``.
            recipe: the training recipe.
            dataset: the training :class:`mpo.data.PreferenceDataset` (its records' sources).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError("precomputed reference log-probs not found; run `mpo precompute-ref` first", file=str(path))
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                raise DataError(f"not a {FORMAT} file", file=str(path))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        sources = [record.source for record in dataset.records]
        stored = Fingerprint(**json.loads(meta["fingerprint"]))
        changed = Fingerprint.of(recipe, dataset.records).differences(stored)
        if changed:
            raise DataError(
                f"stale precomputed reference log-probs: {'; '.join(changed)} changed since they were computed; "
                "run `mpo precompute-ref` again",
                file=str(path),
            )
        root = data_root(recipe)
        reference = cls(path, root, json.loads(meta["keys"]), tensors)
        skipped = set(json.loads(meta["skipped"]))
        missing = [s for s in sources if pair_key(s, root) not in reference.rows and pair_key(s, root) not in skipped]
        if missing:
            raise DataError(f"stale precomputed reference log-probs: no entry for {pair_key(missing[0], root)}", file=str(path))
        return reference

    def __call__(self, batch: PreferenceBatch, policy_image_features: torch.Tensor | None = None) -> SequenceLogps:
        keys = [pair_key(source, self.root) for source in batch.sources]
        for key in keys:
            if key not in self.rows:
                raise DataError(f"no precomputed reference log-probs for {key}", file=str(self.path))
        rows = torch.tensor([self.rows[key] for key in keys], dtype=torch.long)
        device = batch.input_ids.device
        logps = SequenceLogps(**{name: self.tensors[name][rows].to(device) for name in FIELDS})
        # The token counts were stored too: a pair tokenized differently now (another tokenizer,
        # chat format or truncation) would otherwise be scored against a different response.
        counts = torch.bincount(batch.segment_ids, minlength=2 * batch.num_pairs).to(device)
        stored = torch.cat([logps.chosen_token_counts, logps.rejected_token_counts])
        if not torch.equal(counts, stored):
            raise DataError(
                f"stale precomputed reference log-probs: {keys[0]}... now has other response token counts", file=str(self.path)
            )
        return logps



def write_reference_logps(out: Path, keys: list[str], table: dict[str, list[float]], skipped: list[str],
                          fingerprint: Fingerprint) -> None:
    """Writes the safetensors file atomically.

    Args:
        out: the file.
        keys: the pairs' keys (:func:`pair_key`), in row order.
        table: each key's values, in the order of ``FIELDS``.
        skipped: keys of the pairs that were left out (bad or over-long).
        fingerprint: what the values depend on.
    """
    from safetensors.torch import save_file

    tensors = {}
    for column, name in enumerate(FIELDS):
        dtype = torch.float32 if name.endswith("logps") else torch.long
        tensors[name] = torch.tensor([table[key][column] for key in keys], dtype=dtype)
    metadata = {
        "format": FORMAT,
        "keys": json.dumps(keys),
        "skipped": json.dumps(skipped),
        "fingerprint": json.dumps(asdict(fingerprint), sort_keys=True),
    }
    with atomic_path(out) as tmp:  # a data file others may read, like the annotations beside it
        save_file(tensors, str(tmp), metadata=metadata)
