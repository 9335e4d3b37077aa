"""The LM head gives fp32 logits in bf16 training: log-probs equal a float64 computation from the
same hidden states, and its hand-written backward is the true gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForImageTextToText

from mpo.data.layouts import collate_plain
from mpo.model.forward import PreferenceForward
from mpo.model.fp32_head import Float32LMHead, _Float32Logits, _Float32TokenLogps


@pytest.fixture(scope="module")
def batch(tiny_pairs, tiny_processor):
    """A single-image, a text-only and a video pair, one segment per scored token (so the
    "sequence" log-probs are the per-token ones)."""
    pairs = [tiny_pairs[kind] for kind in ("single_image", "text_only", "video")]
    plain = collate_plain(pairs, tiny_processor.tokenizer.pad_token_id)
    count = len(plain.target_ids)
    return dataclasses.replace(plain, segment_ids=torch.arange(count), num_pairs=count)


@pytest.mark.parametrize(
    ("weights", "autocast"), [(torch.bfloat16, False), (torch.float32, True)], ids=["bf16-weights", "fp32-weights-bf16-autocast"]
)
def test_bf16_log_probs_equal_a_float64_head_on_the_same_hidden_states(tiny_model_dir, batch, weights, autocast):
    """The language model runs in bf16 (its rounding is the model's, not the head's); from its
    final hidden states, float64 logits and log-softmax give every scored token's log-prob. The
    fp32 head matches that within 2e-5; a bf16 head (bf16 weights, or fp32 ones under autocast)
    rounds the logits to 8 significant bits first."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=weights).eval()
    forward = PreferenceForward(model)
    assert isinstance(model.lm_head, Float32LMHead) and model.lm_head.weight is model.get_input_embeddings().weight
    captured = []
    model.model.language_model.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = forward(batch).logps.chosen_logps
    (hidden,) = captured
    scored = hidden.flatten(0, 1)[batch.predict_index].double()
    expected = (scored @ model.lm_head.weight.double().T).log_softmax(-1).gather(-1, batch.target_ids[:, None]).squeeze(-1)
    assert got.dtype == torch.float32
    assert_close(got.double(), expected, atol=2e-5, rtol=0)


def test_head_backward_is_the_gradient_of_its_forward():
    """``gradcheck`` in float64 across vocabulary chunks (10 rows, 3 at a time), and the module
    path (any leading shape) gives the same logits as a plain matmul."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: _Float32Logits.apply(h, w, 3), (hidden, weight))
    head = Float32LMHead(torch.nn.Parameter(weight.detach().float()), chunk=3)
    batched = hidden.detach().float().reshape(2, 2, 6)
    assert_close(head(batched), (batched @ head.weight.T), atol=1e-6, rtol=0)


def test_token_log_probs_hold_no_vocabulary_sized_tensor_and_have_the_true_gradient():
    """With targets, the head gives log_softmax(h W^T)[target] (float64 reference, targets in the
    first, a middle and the last chunk of 10 rows taken 3 at a time), ``gradcheck`` passes, and
    nothing saved for backward is as large as one row of logits per token (the old head kept the
    [N, vocab] logits)."""
    torch.manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 9, 3, 4, 7])
    expected = (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert_close(_Float32TokenLogps.apply(hidden, weight, targets, 3), expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda h, w: _Float32TokenLogps.apply(h, w, targets, 3), (hidden, weight))
    head = Float32LMHead(torch.nn.Parameter(torch.randn(1000, 6)), chunk=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        head(torch.randn(5, 6, requires_grad=True), targets=targets)
    assert sorted(saved) == [5, 5, 30, 6000]  # targets, log-sum-exp, hidden states, the weight itself


def test_bf16_weight_gradient_is_the_fp32_gradient_rounded_once():
    """A bf16 weight's gradient rows are computed in fp32 and rounded to bf16 once (copied into
    the bf16 gradient); an fp32 weight's are written in place. Both equal the float64 gradient of
    the same values, within their dtype."""
    torch.manual_seed(0)
    hidden64 = torch.randn(7, 6, dtype=torch.float64)
    weight64 = torch.randn(11, 6, dtype=torch.float64)
    targets = torch.tensor([0, 10, 3, 4, 7, 5, 5])
    expected = torch.autograd.functional.jacobian(
        lambda w: (hidden64 @ w.T).log_softmax(-1).gather(1, targets[:, None]).sum(), weight64)
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 0.0)):
        hidden = hidden64.to(dtype).requires_grad_(True)
        weight = weight64.to(dtype).requires_grad_(True)
        _Float32TokenLogps.apply(hidden, weight, targets, 4).sum().backward()
        assert weight.grad.dtype == dtype
        if dtype == torch.bfloat16:  # fp32 arithmetic on the bf16 values, rounded once at the end
            exact = torch.autograd.functional.jacobian(
                lambda w: (hidden.detach().double() @ w.T).log_softmax(-1).gather(1, targets[:, None]).sum(), weight.detach().double())
            assert_close(weight.grad, exact.to(torch.bfloat16), atol=atol, rtol=0)
        else:
            assert_close(weight.grad.double(), expected, atol=atol, rtol=0)
