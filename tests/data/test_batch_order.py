"""Which pairs each process scores: the global batch order and lockstep micro-batches."""

from __future__ import annotations

import pytest
import torch

from mpo.data.batch_order import GlobalBatchOrder, MicroBatchIndices, lockstep_micro_batches


def test_micro_batches_score_each_pair_once_and_match_in_count():
    """5 pairs on 2 processes, 2 per micro-batch: pairs 0,2,4 and 1,3; both run 2 forwards."""
    assert lockstep_micro_batches(range(5), 0, 2, 2) == [[0, 2], [4]]
    assert lockstep_micro_batches(range(5), 1, 2, 2) == [[1, 3], []]
    assert lockstep_micro_batches(range(1), 1, 2, 1) == [[]]  # a process with no pair still runs one forward
    assert lockstep_micro_batches(range(5), 0, 1, 2) == [[0, 1], [2, 3], [4]]


def test_global_batches_in_file_order_and_the_partial_batch_left_out():
    """10 pairs, global batch 2 x 2 x 1 = 4: steps 0 and 1 take pairs 0-3 and 4-7, pairs 8 and 9
    fill no batch and are left out, and step 2 opens the next epoch at pair 0."""
    order = GlobalBatchOrder(num_records=10, micro_batch_size=2, accumulation_steps=2, world_size=1, seed=0, shuffle=False)
    assert (order.global_batch_size, order.steps_per_epoch, order.dropped_per_epoch) == (4, 2, 2)
    assert [order.global_batch(s) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert order.micro_batches(1, 0) == [[4, 5], [6, 7]]


def test_every_split_of_the_global_batch_sees_the_same_pairs():
    """Batch 4 x accumulation 1, 2 x 2, and two processes x 1 x 2: the same 4 pairs at every step,
    each exactly once; process r's micro-batch k is the global batch's slot k * world + r."""
    splits = [(4, 1, 1), (2, 2, 1), (1, 2, 2)]
    orders = [GlobalBatchOrder(12, micro, accumulation, world, seed=5) for micro, accumulation, world in splits]
    for step in range(6):
        seen = [sorted(i for rank in range(o.world_size) for micro in o.micro_batches(step, rank) for i in micro) for o in orders]
        assert seen[0] == seen[1] == seen[2] == sorted(orders[0].global_batch(step))
    two = orders[2]
    batch = two.global_batch(0)
    assert two.micro_batches(0, 0) == [[batch[0]], [batch[2]]] and two.micro_batches(0, 1) == [[batch[1]], [batch[3]]]


def test_each_epoch_is_a_permutation_seeded_by_seed_and_epoch():
    order = GlobalBatchOrder(8, micro_batch_size=4, accumulation_steps=1, world_size=1, seed=3)
    for epoch in range(2):
        expected = torch.randperm(8, generator=torch.Generator().manual_seed(3 * 100_003 + epoch)).tolist()
        assert order.global_batch(2 * epoch) + order.global_batch(2 * epoch + 1) == expected
    assert order.global_batch(0) != order.global_batch(2)  # another epoch, another order


def test_too_few_pairs_for_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="3 pairs cannot fill one global batch of 4"):
        GlobalBatchOrder(3, micro_batch_size=2, accumulation_steps=2, world_size=1, seed=0).global_batch(0)


def test_micro_batch_indices_run_from_the_resumed_step():
    """The DataLoader's sampler from step 1 to 3 on process 1 of 2: steps 1 and 2, accumulation 2."""
    order = GlobalBatchOrder(16, micro_batch_size=1, accumulation_steps=2, world_size=2, seed=0, shuffle=False)
    sampler = MicroBatchIndices(order, start=1, stop=3, rank=1)
    assert len(sampler) == 4
    assert list(sampler) == [[5], [7], [9], [11]]
