"""The reference pass of ``mpo precompute-ref``: every pair's reference log-probs, computed once.

It runs the trainer's own dataset, collator and reference forward (so the values are those of
exactly the tiling, truncation and chat format training uses), sharded over the launched
processes, and writes :mod:`mpo.model.precomputed`'s file on the main process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mpo.config import Recipe
from mpo.data.batch_order import lockstep_micro_batches
from mpo.data.checks import load_checked_records
from mpo.data.dataset import PreferenceDataset
from mpo.data.layouts import build_collator
from mpo.data.records import unique_by_source
from mpo.errors import DataError, OverlongPair
from mpo.model.loading import load_processor, reference_model
from mpo.model.precomputed import FIELDS, Fingerprint, data_root, pair_key, write_reference_logps
from mpo.train.console import quiet_libraries
from mpo.train.distributed import configure_deepspeed, is_deepspeed, load_frozen_reference, make_accelerator, text_hidden_size
from mpo.types import EncodedPair


def default_output(recipe: Recipe) -> Path:
    """``<data directory>/reference_logps-<reference model name>.safetensors``."""
    name = reference_model(recipe).name_or_path
    return data_root(recipe) / f"reference_logps-{Path(name.replace(':', '-')).name}.safetensors"


def compute(recipe: Recipe, out: Path | None) -> Path:
    """Runs the reference over the recipe's dataset (sharded over the launched processes) and
    writes the file on the main process. Returns its path."""
    from accelerate.utils import gather_object

    quiet_libraries()
    accelerator = make_accelerator(recipe)
    processor = load_processor(recipe.model)
    skip = recipe.data.on_bad_sample == "skip"
    records = load_checked_records(recipe, accelerator, [] if skip else None)
    unique = unique_by_source(records)  # repeat_time copies share their values
    dataset = PreferenceDataset(unique, processor, recipe.data)
    collate = build_collator(recipe.forward, recipe.data, processor.tokenizer.pad_token_id)
    root = data_root(recipe)
    out = out or default_output(recipe)
    if is_deepspeed(accelerator):
        # Before loading: under ZeRO-3 the weights are partitioned as they load.
        configure_deepspeed(accelerator, recipe.train.micro_batch_size, 1, recipe.train.max_grad_norm, text_hidden_size(recipe.model))
    reference = load_frozen_reference(recipe, accelerator)

    results: list[tuple[str, list[float]]] = []
    skipped: list[str] = []
    fallback: list[EncodedPair] = []
    batches = lockstep_micro_batches(range(len(unique)), accelerator.process_index, accelerator.num_processes,
                                     recipe.train.micro_batch_size)
    for indices in batches:
        pairs = []
        for index in indices:
            item = dataset[index]
            if isinstance(item, EncodedPair):
                pairs.append(item)
            elif skip or isinstance(item, OverlongPair):
                skipped.append(pair_key(unique[index].source, root))
            else:
                raise item
        # A micro-batch with no usable pair still runs a forward (its values discarded) so that
        # ZeRO-3's per-layer gathers stay in step across processes.
        forward_pairs = pairs or fallback or [_first_usable(dataset)]
        fallback = forward_pairs
        batch = collate(forward_pairs).to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            logps = reference(batch).logps
        for j, pair in enumerate(pairs):
            results.append((pair_key(pair.source, root), [float(getattr(logps, name)[j]) for name in FIELDS]))

    results = gather_object(results)
    skipped = sorted(set(gather_object(skipped)))
    if accelerator.is_main_process:
        table = dict(results)
        keys = sorted(table)
        write_reference_logps(out, keys, table, skipped, Fingerprint.of(recipe, records))
        print(f"wrote reference log-probs of {len(keys)} pair(s) to {out} ({len(skipped)} skipped)")
        print(f"train with: reference.precomputed_path={out}")
    accelerator.wait_for_everyone()
    return out


def _first_usable(dataset: PreferenceDataset) -> EncodedPair:
    """Any usable pair, for a process that has none of its own to run its lockstep forward on."""
    for index in range(len(dataset)):
        item = dataset[index]
        if isinstance(item, EncodedPair):
            return item
    raise DataError("every pair of the dataset is unusable")
