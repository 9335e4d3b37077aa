"""The FlexAttention ``BlockMask`` of shared-prefix and packed rows, built from the pair blocks.

``torch.nn.attention.flex_attention.create_block_mask`` evaluates the mask rule at every
``(query, key)`` of the ``[rows, T, T]`` grid and sums it per 128 x 128 tile, which costs
``rows x T x T`` elements (bool, then wider integers for the sum): about 2.5 GiB per 16k-token row,
for the policy's forward and again for the reference's. The layout's rule
(:func:`mpo.model.pair_attention.may_attend`) is known block by block, so the tiles can be
classified arithmetically instead. Every pair block ``(row, start, prompt, chosen, rejected)``
(:func:`mpo.model.pair_attention.pair_blocks`) allows three disjoint regions of the grid::

    queries [prompt | chosen]  x keys [prompt | chosen]    causal (key <= query)
    queries rejected           x keys prompt               all
    queries rejected           x keys rejected             causal

and the padding (every token outside the blocks, pair id -1) is one more causal "pair". The
number of allowed ``(query, key)`` in a tile is the sum over the regions of their intersection
with it, a closed form (a rectangle, or a rectangle cut by the diagonal). A tile is *full* when
all its ``block_size**2`` entries are allowed (so a tile that crosses the row's end never is, as in
``create_block_mask``, which pads the grid with masked entries) and *partial* when some are.

The result holds exactly the tensors ``create_block_mask`` makes (``tests/model/test_block_mask.py``
compares them one by one), with the caller's ``mask_mod`` for the partial tiles, so the kernel
computes the same attention. Memory is ``O(rows x (T / block_size)**2)`` small integers, the size of
the ``BlockMask`` itself (64 KiB per 16k-token row for each of its four index tensors), never a
tensor at token resolution: :func:`block_mask_bytes` bounds it (``mpo memory`` counts it), and
``mpo memory --mask-table`` measures both builders (:mod:`mpo.tools.memory.mask_table`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128  # FlexAttention's default tile, the one its kernels are tuned for

# (row, first query, end query, first key, end key, causal): the allowed (query, key) of a region
# are query in [first query, end query), key in [first key, end key), and key <= query if causal.
Region = tuple[int, int, int, int, int, int]


def attention_regions(blocks: list[tuple[int, int, int, int, int]], rows: int, length: int) -> list[Region]:
    """The disjoint regions of the ``[rows, T, T]`` grid that the rule allows (module docstring).

    Args:
        blocks: ``(row, start, prompt, chosen, rejected)`` per pair
            (:func:`mpo.model.pair_attention.pair_blocks`).
        rows: R; length: T.

    Returns:
        The non-empty regions, as :data:`Region` tuples.
    """
    regions: list[Region] = []
    spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    for row, start, prompt, chosen, rejected in blocks:
        split, end = start + prompt + chosen, start + prompt + chosen + rejected
        regions += [(row, start, split, start, split, 1), (row, split, end, start, start + prompt, 0), (row, split, end, split, end, 1)]
        spans[row].append((start, end))
    for row, taken in enumerate(spans):
        # Padding is one pair (id -1): a pad query sees every pad key at or before it. The
        # collators leave one gap, at the end of the row; any other gap is handled the same way.
        gaps, position = [], 0
        for start, end in sorted(taken) + [(length, length)]:
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        for i, (first, end) in enumerate(gaps):
            regions += [(row, first, end, key_first, key_end, 0) for key_first, key_end in gaps[:i]]
            regions.append((row, first, end, first, end, 1))
    return [region for region in regions if region[1] < region[2] and region[3] < region[4]]


def _causal_prefix(n: torch.Tensor, key_first: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """``sum over q < n of clamp(q + 1 - key_first, 0, width)``: allowed keys of
    ``[key_first, key_first + width)`` summed over the queries before ``n`` under ``key <= query``
    (a ramp 1, 2, ..., width from query ``key_first`` on, then ``width`` per query)."""
    ramp = (n - key_first).clamp(0, None).minimum(width)
    return ramp * (ramp + 1) // 2 + (n - key_first - width).clamp(0, None) * width


def tile_counts(regions: list[Region], rows: int, length: int, block_size: int = BLOCK_SIZE, device=None) -> torch.Tensor:
    """Allowed ``(query, key)`` entries per tile.

    Only the tiles of each region's bounding box are visited, so the work and the temporaries are
    the number of tiles the regions touch (at most ``(T / block_size + 4 * pairs + 2)**2`` per row),
    a few int64 per tile.

    Args:
        regions: :func:`attention_regions`; rows: R; length: T; block_size: the tile's side.
        device: where the counts are computed and kept.

    Returns:
        ``[R, n, n]`` int64, ``n = ceil(T / block_size)``; ``[r, i, j]`` counts the allowed
        entries with query in tile ``i`` and key in tile ``j`` of row ``r``.
    """
    num = -(-length // block_size)
    counts = torch.zeros(rows * num * num, dtype=torch.long, device=device)
    if not regions:
        return counts.view(rows, num, num)
    spec = torch.tensor(regions, dtype=torch.long).to(device)
    row, q_first, q_end, k_first, k_end, causal = spec.unbind(1)
    q_tile, k_tile = q_first // block_size, k_first // block_size
    q_tiles, k_tiles = (q_end - 1) // block_size - q_tile + 1, (k_end - 1) // block_size - k_tile + 1
    sizes = q_tiles * k_tiles
    total = sum(((r[2] - 1) // block_size - r[1] // block_size + 1) * ((r[4] - 1) // block_size - r[3] // block_size + 1) for r in regions)
    # One entry per (region, tile of its bounding box): owner is the region, local the tile's
    # position in the box, row-major. The total is known on the host, so nothing waits on a device.
    owner = torch.repeat_interleave(torch.arange(len(regions), device=device), sizes, output_size=total)
    local = torch.arange(total, device=device) - (sizes.cumsum(0) - sizes)[owner]
    i = q_tile[owner] + local // k_tiles[owner]
    j = k_tile[owner] + local % k_tiles[owner]
    del local
    q_lo, q_hi = q_first[owner].maximum(i * block_size), q_end[owner].minimum((i + 1) * block_size)
    k_lo, k_hi = k_first[owner].maximum(j * block_size), k_end[owner].minimum((j + 1) * block_size)
    width = k_hi - k_lo
    below = _causal_prefix(q_hi, k_lo, width) - _causal_prefix(q_lo, k_lo, width)
    count = torch.where(causal[owner].bool(), below, (q_hi - q_lo) * width)
    return counts.index_add_(0, (row[owner] * num + i) * num + j, count).view(rows, num, num)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_blocks, indices)`` of a ``[R, 1, n, n]`` 0/1 tile map, in ``create_block_mask``'s
    order: the visible tiles first, ascending, then the others, ascending (a stable sort)."""
    dense = dense.to(torch.int32)
    return dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)


def pair_block_mask(
    blocks: list[tuple[int, int, int, int, int]],
    rows: int,
    length: int,
    mask_mod: Callable,
    device: torch.device | str | None = None,
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """The FlexAttention ``BlockMask`` of rows laid out in pair blocks.

    Equal, tensor for tensor, to ``create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length,
    KV_LEN=length, BLOCK_SIZE=block_size)`` when ``mask_mod`` is the rule of those blocks
    (:func:`mpo.model.pair_attention.pair_mask_mod`), at ``O(rows x (length / block_size)**2)``
    memory instead of ``O(rows x length**2)``.

    Args:
        blocks: ``(row, start, prompt, chosen, rejected)`` of every pair
            (:func:`mpo.model.pair_attention.pair_blocks`); every token outside them is padding.
        rows: R; length: T.
        mask_mod: the rule at token resolution, evaluated by the kernel on the partial tiles.
        device: where the mask is built and kept (the ids' device).
        block_size: the tile's side, for queries and keys alike.

    Returns:
        A ``BlockMask`` of shape ``[R, 1, T, T]`` on ``device``.
    """
    counts = tile_counts(attention_regions(blocks, rows, length), rows, length, block_size, device)[:, None]
    whole = block_size * block_size
    kv_num_blocks, kv_indices = _ordered((counts > 0) & (counts < whole))
    full_kv_num_blocks, full_kv_indices = _ordered(counts == whole)
    del counts
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def block_mask_bytes(rows: int, length: int, block_size: int = BLOCK_SIZE, pairs_per_row: int = 1) -> int:
    """Upper bound of :func:`pair_block_mask`'s peak memory (on the ids' device), for the memory
    planner. The returned ``BlockMask`` itself holds about ``16 x R x n**2`` bytes of it.

    Per row, with ``n = ceil(T / block_size)`` tiles a side: 40 bytes per tile of the grid (the
    int64 counts, the int32 tile maps, the sorts' int64 outputs, and the finished index tensors,
    forward and transposed, which the ``BlockMask`` keeps) plus 120 bytes per tile the regions touch
    (at most ``(n + 4 * pairs_per_row + 2)**2``, the int64 temporaries of :func:`tile_counts`).
    ``tests/model/test_block_mask.py`` checks it against the allocations torch's profiler records.

    Args:
        rows: R; length: T; block_size: the tile's side.
        pairs_per_row: the most pair blocks one row holds (1 for ``shared_prefix``).
    """
    num = -(-length // block_size)
    touched = (num + 4 * pairs_per_row + 2) ** 2
    return rows * (40 * num * num + 120 * touched) + 4096
