"""PreferenceForward against the plain HF forward, token by token.

The reference computation is the one every peer uses: one ``model(input_ids, pixel_values)`` call
per row, the full ``[T, vocab]`` logits, ``log_softmax``, and the log-prob of each response token
gathered at the position before it. PreferenceForward must give the same numbers while batching
rows, running the vision tower once per pair and the LM head on response positions only.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.testing import assert_close

from mpo.data.layouts import collate_plain
from mpo.model.forward import PreferenceForward
from mpo.types import PreferenceBatch

def _hf_token_logps(tiny_hf_model, prompt_ids: list[int], response_ids: list[int], pixel_values) -> torch.Tensor:
    """Per-token log-probs of ``response_ids`` after ``prompt_ids``, from one plain HF call."""
    input_ids = torch.tensor([prompt_ids + response_ids])
    logits = tiny_hf_model(input_ids=input_ids, pixel_values=pixel_values).logits[0].float()
    logps = logits.log_softmax(-1)
    positions = torch.arange(len(prompt_ids), len(prompt_ids) + len(response_ids))
    return logps[positions - 1, torch.tensor(response_ids)]


def _per_token(forward: PreferenceForward, batch: PreferenceBatch) -> torch.Tensor:
    """PreferenceForward's log-prob of every scored token, in scoring order.

    Giving each token its own segment (``num_pairs`` = N, segments 0..N-1) makes the per-sequence
    sums the per-token values themselves.
    """
    count = len(batch.target_ids)
    single = dataclasses.replace(batch, segment_ids=torch.arange(count), num_pairs=count)
    return forward(single).logps.chosen_logps


@pytest.fixture(scope="module")
def hf_logps(tiny_hf_model, tiny_pairs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token (chosen, rejected) log-probs of each pair from plain HF forwards, computed once."""
    with torch.no_grad():
        return {
            kind: tuple(_hf_token_logps(tiny_hf_model, pair.prompt_ids, ids, pair.pixel_values)
                        for ids in (pair.chosen_ids, pair.rejected_ids))
            for kind, pair in tiny_pairs.items()
        }


@pytest.mark.parametrize("kinds", [["single_image"], ["multi_image"], ["text_only"], ["video"],
                                   ["single_image", "text_only", "multi_image", "video"]])
def test_logps_match_plain_hf_forward(tiny_hf_model, tiny_processor, tiny_pairs, hf_logps, kinds):
    """Per token within 1e-5, and the per-sequence sums within 1e-4 (float32 rounding of ~30
    terms), for each kind of pair alone and for all four in one batch."""
    batch_pairs = [tiny_pairs[k] for k in kinds]
    batch = collate_plain(batch_pairs, tiny_processor.tokenizer.pad_token_id)
    forward = PreferenceForward(tiny_hf_model)
    with torch.no_grad():
        got_tokens = _per_token(forward, batch)
        got = forward(batch).logps
    # chosen rows first, then rejected rows, as the layout orders them
    expected = [hf_logps[k][0] for k in kinds] + [hf_logps[k][1] for k in kinds]
    assert_close(got_tokens, torch.cat(expected), atol=1e-5, rtol=0)
    sums = torch.stack([tokens.sum() for tokens in expected])
    assert_close(got.chosen_logps, sums[: len(kinds)], atol=1e-4, rtol=0)
    assert_close(got.rejected_logps, sums[len(kinds) :], atol=1e-4, rtol=0)
    assert got.chosen_token_counts.tolist() == [len(p.chosen_ids) for p in batch_pairs]
    assert got.rejected_token_counts.tolist() == [len(p.rejected_ids) for p in batch_pairs]


def test_images_reach_the_language_model(tiny_hf_model, tiny_processor, tiny_pairs):
    """Guards the comparison above against a model that ignores its images: other pixels give
    other log-probs for an image pair (and the same for a text-only pair)."""
    forward = PreferenceForward(tiny_hf_model)
    batch = collate_plain([tiny_pairs["single_image"], tiny_pairs["text_only"]], tiny_processor.tokenizer.pad_token_id)
    blank = dataclasses.replace(batch, pixel_values=torch.zeros_like(batch.pixel_values))
    with torch.no_grad():
        real, other = forward(batch).logps, forward(blank).logps
    assert (real.chosen_logps[0] - other.chosen_logps[0]).abs() > 1e-3
    assert_close(real.chosen_logps[1], other.chosen_logps[1], atol=1e-4, rtol=0)


def test_dedupe_vision_on_and_off_give_identical_logps(tiny_hf_model, tiny_processor, tiny_pairs):
    """Running the vision tower once per pair (features reused for the rejected rows) or once
    per row gives the same log-probs; dedupe computes half as many tile features."""
    batch_pairs = list(tiny_pairs.values())
    pad_id = tiny_processor.tokenizer.pad_token_id
    forward = PreferenceForward(tiny_hf_model)
    with torch.no_grad():
        on = forward(collate_plain(batch_pairs, pad_id, dedupe_vision=True))
        off = forward(collate_plain(batch_pairs, pad_id, dedupe_vision=False))
    tiles = sum(p.num_tiles for p in batch_pairs)
    assert on.image_features.shape[0] == tiles and off.image_features.shape[0] == 2 * tiles
    assert_close(on.logps.chosen_logps, off.logps.chosen_logps, atol=1e-5, rtol=0)
    assert_close(on.logps.rejected_logps, off.logps.rejected_logps, atol=1e-5, rtol=0)


def test_precomputed_image_features_are_reused(tiny_hf_model, tiny_processor, tiny_pairs):
    """Features handed in (the policy's, for a reference with the same frozen vision tower) give
    the same log-probs as computing them again."""
    batch = collate_plain(list(tiny_pairs.values()), tiny_processor.tokenizer.pad_token_id)
    forward = PreferenceForward(tiny_hf_model)
    with torch.no_grad():
        first = forward(batch)
        again = forward(batch, image_features=first.image_features)
    assert again.image_features is first.image_features
    assert_close(again.logps.chosen_logps, first.logps.chosen_logps)
    assert_close(again.logps.rejected_logps, first.logps.rejected_logps)


def test_gradients_flow_to_the_vision_tower_and_language_model(tiny_hf_model, tiny_processor, tiny_pairs):
    """With dedupe on, the loss still reaches the vision tower (through the shared features) and
    the language model."""
    trainable = copy.deepcopy(tiny_hf_model)
    batch = collate_plain([tiny_pairs["single_image"]], tiny_processor.tokenizer.pad_token_id)
    out = PreferenceForward(trainable)(batch)
    (out.logps.chosen_logps - out.logps.rejected_logps).sum().backward()
    vision_grads = [p.grad for n, p in trainable.named_parameters() if "vision_tower" in n]
    language_grads = [p.grad for n, p in trainable.named_parameters() if "language_model" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in vision_grads)
    assert any(g is not None and g.abs().sum() > 0 for g in language_grads)


def test_sparse_tied_embedding_gradient_gives_the_same_dense_gradient(tiny_hf_model, tiny_processor, tiny_pairs):
    """The tiny model ties its embeddings: with the lookup's gradient sparse, the shared weight
    still ends with one dense gradient, equal to the dense path's up to the order of its float
    additions (the lookup's rows added into the LM head's gradient instead of into a zero [V, H]
    tensor first); every other gradient is bit for bit the same; the embedding module is flagged
    sparse only when tied."""
    from mpo.data.layouts import collate_shared_prefix
    from mpo.model.forward import use_sparse_tied_embedding_gradient

    batch = collate_shared_prefix(list(tiny_pairs.values()), tiny_processor.tokenizer.pad_token_id)
    grads = []
    for sparse in (False, True):
        model = copy.deepcopy(tiny_hf_model).requires_grad_(True)
        out = PreferenceForward(model, sparse_embedding_gradient=sparse)(batch)
        (out.logps.chosen_logps - 0.5 * out.logps.rejected_logps).sum().backward()
        assert model.get_input_embeddings().sparse is sparse
        assert not model.get_input_embeddings().weight.grad.is_sparse
        grads.append({name: p.grad for name, p in model.named_parameters()})
    dense, sparse = grads
    assert dense.keys() == sparse.keys()
    shared = "model.language_model.embed_tokens.weight"  # the tied weight, listed once
    for name in dense:
        if name != shared:
            assert torch.equal(sparse[name], dense[name]), name
    # the same sums in another order: within a few float32 roundings of its largest entry
    assert_close(sparse[shared], dense[shared], rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(dense[shared].abs().max()))
    untied = copy.deepcopy(tiny_hf_model)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert use_sparse_tied_embedding_gradient(untied) is False and untied.get_input_embeddings().sparse is False
