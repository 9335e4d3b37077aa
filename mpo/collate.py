"""Lays encoded pairs out in rows for one forward pass.

The ``plain`` layout is the peers' concatenated forward: one row per chosen response and one per
rejected response, chosen rows first, right-padded. Example with pad id 0, two text-only pairs
(prompt ids ``[5, 6]`` / ``[7]``, chosen ``[8]`` / ``[9, 9]``, rejected ``[3, 3]`` / ``[4]``)::

    input_ids      = [[5, 6, 8, 0],     # pair 0 chosen
                      [7, 9, 9, 0],     # pair 1 chosen
                      [5, 6, 3, 3],     # pair 0 rejected
                      [7, 4, 0, 0]]     # pair 1 rejected
    attention_mask = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    predict_index  = [1, 4, 5, 9, 10, 12]   # flat index (row * 4 + col) of the predicting state
    target_ids     = [8, 9, 9, 3, 3, 4]
    segment_ids    = [0, 1, 1, 2, 2, 3]     # pair j chosen -> j, pair j rejected -> 2 + j

``tests/test_collate.py`` checks exactly these tensors. The shared-prefix and packed layouts live
in :mod:`mpo.packing`; all layouts produce the same scoring index, so log-probs are computed the
same way for each.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from mpo.config import DataConfig, ForwardConfig
from mpo.types import EncodedPair, PreferenceBatch


def _pixel_values(pairs: list[EncodedPair]) -> torch.Tensor | None:
    tiles = [p.pixel_values for p in pairs if p.pixel_values is not None]
    return torch.cat(tiles) if tiles else None


def collate_plain(pairs: list[EncodedPair], pad_id: int, dedupe_vision: bool = True) -> PreferenceBatch:
    """Chosen rows then rejected rows, right-padded (see the module docstring).

    Args:
        pairs: the micro-batch.
        pad_id: the tokenizer's pad id (masked out, never scored).
        dedupe_vision: keep each pair's tiles once; the forward computes their features once and
            uses them for both rows. Off, the tiles are repeated for the rejected rows, the way
            the peers run the vision tower twice per pair.
    """
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predict, targets, segments = [], [], []
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    for row, (ids, response) in enumerate(zip(rows, responses)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        start = len(ids) - len(response)
        # token t is predicted by the hidden state at t - 1
        predict.extend(row * width + t - 1 for t in range(start, len(ids)))
        targets.extend(response)
        segments.extend([row] * len(response))
    pixel_values = _pixel_values(pairs)
    if pixel_values is not None and not dedupe_vision:
        pixel_values = torch.cat([pixel_values, pixel_values])
    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pair_ids=None,
        part_ids=None,
        position_ids=None,
        pixel_values=pixel_values,
        pair_tile_counts=[p.num_tiles for p in pairs],
        predict_index=torch.tensor(predict, dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
        segment_ids=torch.tensor(segments, dtype=torch.long),
        num_pairs=len(pairs),
        layout="plain",
        feature_repeat=2 if dedupe_vision else 1,
        sources=[p.source for p in pairs],
    )


def build_collator(forward: ForwardConfig, data: DataConfig, pad_id: int) -> Callable[[list[EncodedPair]], PreferenceBatch]:
    """The recipe's layout as a ``pairs -> PreferenceBatch`` function."""
    if forward.layout == "plain":
        return partial(collate_plain, pad_id=pad_id, dedupe_vision=forward.dedupe_vision)
    from mpo.packing import build_prefix_collator

    return build_prefix_collator(forward, data, pad_id)
