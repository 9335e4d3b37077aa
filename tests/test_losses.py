"""Hand-derived values for every MPO term, the reward shift delta and the combined objective.

Inputs are picked so the arithmetic is easy: rewards 0 and +-ln 3 give sigmoid values 1/2, 3/4
and 1/4, so every loss is a log of a small fraction. Each derivation sits in the test docstring.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mpo.losses import MPOLoss, RewardShift, bco_pair_loss, dpo_sigmoid_loss, sft_loss
from mpo.types import SequenceLogps

LN2, LN3 = math.log(2), math.log(3)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _logps(chosen, rejected, chosen_counts, rejected_counts=None, grad=False) -> SequenceLogps:
    return SequenceLogps(
        chosen_logps=_t(*chosen).requires_grad_(grad),
        rejected_logps=_t(*rejected).requires_grad_(grad),
        chosen_token_counts=torch.tensor(chosen_counts),
        rejected_token_counts=torch.tensor(rejected_counts or chosen_counts),
    )


# ---------------------------------------------------------------- the three terms


def test_dpo_sigmoid_loss_hand_values():
    """-log sigmoid(r_c - r_r) per pair.

    margins 0, ln3, -ln3 -> sigmoid 1/2, 3/4, 1/4 -> losses ln2, ln(4/3), ln4.
    The third pair has the same rewards as the second, swapped: a loss that ignored which side is
    chosen would give the two equal values.
    """
    chosen, rejected = _t(0.0, LN3, 0.0), _t(0.0, 0.0, LN3)
    assert_close(dpo_sigmoid_loss(chosen, rejected), _t(LN2, math.log(4 / 3), math.log(4)))


def test_dpo_depends_on_the_margin_only():
    """Shifting both rewards by the same amount (5) leaves -log sigmoid(ln3) = ln(4/3)."""
    assert_close(dpo_sigmoid_loss(_t(5 + LN3), _t(5.0)), _t(math.log(4 / 3)))


def test_bco_pair_loss_hand_values_delta_zero():
    """-log sigmoid(r_c - d) - log sigmoid(-(r_r - d)) with d = 0.

    pair 0: r_c = 0,   r_r = 0   -> ln2 + ln2              = 2 ln2
    pair 1: r_c = ln3, r_r = 0   -> -log(3/4) + ln2        = ln(4/3) + ln2
    pair 2: r_c = ln3, r_r = ln3 -> -log(3/4) - log(1/4)   = ln(4/3) + ln4
    Unlike DPO, pairs 0 and 2 have equal margins (0) but different losses: each response is
    judged on its own.
    """
    losses = bco_pair_loss(_t(0.0, LN3, LN3), _t(0.0, 0.0, LN3), 0.0)
    assert_close(losses, _t(2 * LN2, math.log(4 / 3) + LN2, math.log(4 / 3) + math.log(4)))


def test_bco_pair_loss_is_shifted_by_delta():
    """d = ln3 (as a float and as a tensor): r_c = ln3 sits on the boundary, r_r = 0 is ln3 below.

    -log sigmoid(ln3 - ln3) - log sigmoid(-(0 - ln3)) = ln2 - log(3/4) = ln2 + ln(4/3).
    A delta added with the wrong sign would give -log sigmoid(2 ln3) - log sigmoid(-ln3)
    = ln(10/9) + ln4 instead.
    """
    expected = _t(LN2 + math.log(4 / 3))
    assert_close(bco_pair_loss(_t(LN3), _t(0.0), LN3), expected)
    assert_close(bco_pair_loss(_t(LN3), _t(0.0), torch.tensor(LN3, dtype=torch.float64)), expected)


def test_sft_loss_sequence_and_token_reductions():
    """Chosen log-probs -6 and -4 over 2 and 4 tokens.

    sequence (paper): mean(6/2, 4/4) = mean(3, 1) = 2
    token (peers):    (6 + 4) / (2 + 4) = 10/6 = 5/3
    """
    logps, counts = _t(-6.0, -4.0), torch.tensor([2, 4])
    assert_close(sft_loss(logps, counts, "sequence"), torch.tensor(2.0, dtype=torch.float64))
    assert_close(sft_loss(logps, counts, "token"), torch.tensor(5 / 3, dtype=torch.float64))


def test_sft_reductions_agree_for_one_pair():
    """With one pair both are -logp / count = 9/3 = 3."""
    for reduction in ("sequence", "token"):
        assert_close(sft_loss(_t(-9.0), torch.tensor([3]), reduction), torch.tensor(3.0, dtype=torch.float64))


def test_sft_loss_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="sequence"):
        sft_loss(_t(-1.0), torch.tensor([1]), "mean")


# ---------------------------------------------------------------- the reward shift delta


def test_reward_shift_cumulative_is_the_mean_of_step_means():
    """delta after step t is the plain mean of the step means so far (no decay, no weighting).

    step 1: chosen [1, 3], rejected [-1, 1]      -> mean 4/4 = 1      -> delta 1
    step 2: two micro-batches, chosen [4] rejected [4], then chosen [2] rejected [6]
            -> mean 16/4 = 4                                           -> delta (1 + 4)/2 = 2.5
    step 3: chosen [-5], rejected [-5]            -> mean -5           -> delta (1 + 4 - 5)/3 = 0
    A mean over all rewards instead of over step means would give (4 + 16)/8 = 2.5 at step 2
    but (4 + 16 - 10)/10 = 1 at step 3.
    """
    shift = RewardShift()
    assert shift.value == 0.0
    shift.accumulate(_t(1.0, 3.0), _t(-1.0, 1.0))
    assert shift.step() == pytest.approx(1.0)
    shift.accumulate(_t(4.0), _t(4.0))
    shift.accumulate(_t(2.0), _t(6.0))
    assert shift.step() == pytest.approx(2.5)
    shift.accumulate(_t(-5.0), _t(-5.0))
    assert shift.step() == pytest.approx(0.0)
    assert shift.num_updates == 3


def test_reward_shift_ema():
    """EMA with decay 0.5: the first step takes the batch mean, later ones blend.

    step means 1, 4, -5 -> delta 1, 0.5*1 + 0.5*4 = 2.5, 0.5*2.5 + 0.5*(-5) = -1.25
    """
    shift = RewardShift(mode="ema", ema_decay=0.5)
    values = []
    for chosen, rejected in [((1.0, 3.0), (-1.0, 1.0)), ((4.0,), (4.0,)), ((-5.0,), (-5.0,))]:
        shift.accumulate(_t(*chosen), _t(*rejected))
        values.append(shift.step())
    assert values == pytest.approx([1.0, 2.5, -1.25])


def test_reward_shift_reduce_fn_sums_over_ranks():
    """Two data-parallel ranks: this one holds rewards summing to 4 over 4 values, the other
    (simulated by ``reduce_fn``, an all-reduce sum) 8 over 2. The global batch mean is
    (4 + 8)/(4 + 2) = 2; the mean of the two rank means, (1 + 4)/2 = 2.5, would be wrong.
    """
    other_rank = torch.tensor([8.0, 2.0], dtype=torch.float64)
    seen = []

    def all_reduce_sum(pending: torch.Tensor) -> torch.Tensor:
        seen.append(pending.clone())
        return pending + other_rank

    shift = RewardShift()
    shift.accumulate(_t(1.0, 3.0), _t(-1.0, 1.0))
    assert shift.step(all_reduce_sum) == pytest.approx(2.0)
    assert_close(seen[0], torch.tensor([4.0, 4.0], dtype=torch.float64))


def test_reward_shift_step_with_nothing_accumulated_keeps_delta():
    """An empty step (no rewards anywhere) changes nothing and is not counted: after step means
    1, (empty), 4 the cumulative delta is (1 + 4)/2 = 2.5, not (1 + 4)/3 or (1 + 0 + 4)/3."""
    shift = RewardShift()
    shift.accumulate(_t(1.0), _t(1.0))
    shift.step()
    assert shift.step() == 1.0
    assert shift.num_updates == 1
    shift.accumulate(_t(4.0), _t(4.0))
    assert shift.step() == pytest.approx(2.5)


def test_reward_shift_step_clears_pending():
    """Rewards of step 1 (mean 10) must not leak into step 2 (mean 0): delta (10 + 0)/2 = 5."""
    shift = RewardShift()
    shift.accumulate(_t(10.0), _t(10.0))
    shift.step()
    shift.accumulate(_t(0.0), _t(0.0))
    assert shift.step() == pytest.approx(5.0)


def test_reward_shift_detaches_rewards():
    rewards = torch.tensor([1.0, 2.0], requires_grad=True)
    shift = RewardShift()
    shift.accumulate(rewards * 2, rewards)
    assert isinstance(shift.step(), float)
    assert shift.value == pytest.approx(4.5 / 2)  # (2 + 4 + 1 + 2) / 4


@pytest.mark.parametrize("mode", ["cumulative", "ema"])
def test_reward_shift_state_dict_round_trip(mode):
    """A restored shift continues exactly like the original (value and update count both matter:
    the cumulative mean weighs the next step by 1/(n+1))."""
    original = RewardShift(mode=mode, ema_decay=0.9)
    for mean in (1.0, 4.0):
        original.accumulate(_t(mean), _t(mean))
        original.step()
    restored = RewardShift(mode=mode, ema_decay=0.5)
    restored.load_state_dict(original.state_dict())
    assert (restored.value, restored.num_updates, restored.ema_decay) == (original.value, 2, 0.9)
    for shift in (original, restored):
        shift.accumulate(_t(-2.0), _t(-2.0))
    assert restored.step() == original.step()
    # cumulative: (1 + 4 - 2)/3 = 1; ema 0.9: 0.9*1.3 + 0.1*(-2) = 0.97, after 0.9*1 + 0.1*4 = 1.3
    assert original.value == pytest.approx({"cumulative": 1.0, "ema": 0.97}[mode])


def test_reward_shift_refuses_other_mode_and_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        RewardShift("ema").load_state_dict(RewardShift("cumulative").state_dict())
    with pytest.raises(ValueError, match="cumulative"):
        RewardShift("window")


# ---------------------------------------------------------------- the combined objective


def test_step_one_total_is_1_2_ln2_plus_sft():
    """Policy == reference: every reward is 0 and delta = 0, so DPO = ln2, BCO = 2 ln2 and
    L = 0.8 ln2 + 0.2 * 2 ln2 + L_sft = 1.2 ln2 + L_sft, with L_sft = mean(6/2, 4/4) = 2."""
    policy = _logps([-6.0, -4.0], [-5.0, -9.0], [2, 4], [3, 3])
    reference = _logps([-6.0, -4.0], [-5.0, -9.0], [2, 4], [3, 3])
    out = MPOLoss()(policy, reference, delta=0.0)
    assert_close(out.terms["dpo"], torch.tensor(LN2, dtype=torch.float64))
    assert_close(out.terms["bco"], torch.tensor(2 * LN2, dtype=torch.float64))
    assert_close(out.terms["sft"], torch.tensor(2.0, dtype=torch.float64))
    assert_close(out.loss, torch.tensor(1.2 * LN2 + 2.0, dtype=torch.float64))
    assert out.loss.item() == pytest.approx(0.8317766 + 2.0, abs=1e-6)
    assert_close(out.chosen_rewards, _t(0.0, 0.0))
    assert_close(out.rejected_rewards, _t(0.0, 0.0))


def test_total_with_beta_weights_and_delta():
    """beta 0.5, weights 0.5/2/0.25, delta ln3, one pair.

    policy - reference: chosen +2 ln3, rejected 0  -> r_c = 0.5 * 2 ln3 = ln3, r_r = 0
    DPO = -log sigmoid(ln3) = ln(4/3)
    BCO = -log sigmoid(ln3 - ln3) - log sigmoid(-(0 - ln3)) = ln2 + ln(4/3)
    SFT = 3 / 3 = 1 (policy chosen logp -3 over 3 tokens)
    L = 0.5 ln(4/3) + 2 (ln2 + ln(4/3)) + 0.25
    """
    policy = _logps([-3.0], [-7.0], [3])
    reference = _logps([-3.0 - 2 * LN3], [-7.0], [3])
    out = MPOLoss(beta=0.5, dpo_weight=0.5, bco_weight=2.0, sft_weight=0.25)(policy, reference, delta=LN3)
    assert_close(out.chosen_rewards, _t(LN3))
    assert_close(out.rejected_rewards, _t(0.0))
    expected = 0.5 * math.log(4 / 3) + 2 * (LN2 + math.log(4 / 3)) + 0.25
    assert_close(out.loss, torch.tensor(expected, dtype=torch.float64))


def test_token_sft_reduction_in_the_objective():
    """sft_reduction="token": L_sft = (6 + 4)/(2 + 4) = 5/3, so L = 1.2 ln2 + 5/3 at step 1."""
    logps = _logps([-6.0, -4.0], [-5.0, -9.0], [2, 4])
    out = MPOLoss(sft_reduction="token")(logps, logps, delta=0.0)
    assert_close(out.terms["sft"], torch.tensor(5 / 3, dtype=torch.float64))
    assert_close(out.loss, torch.tensor(1.2 * LN2 + 5 / 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "weights, present, expected",
    [
        # 0.2 * 2 ln2 + 1 * 2
        ((0.0, 0.2, 1.0), {"bco", "sft"}, 0.4 * LN2 + 2.0),
        # 0.8 ln2 + 2
        ((0.8, 0.0, 1.0), {"dpo", "sft"}, 0.8 * LN2 + 2.0),
        # 0.8 ln2 + 0.2 * 2 ln2
        ((0.8, 0.2, 0.0), {"dpo", "bco"}, 1.2 * LN2),
        # DPO alone: ln2
        ((1.0, 0.0, 0.0), {"dpo"}, LN2),
    ],
)
def test_zero_weight_removes_the_term(weights, present, expected):
    """Policy == reference as above (DPO ln2, BCO 2 ln2, SFT 2); a zero weight drops its term
    from ``terms`` and from the loss."""
    dpo_weight, bco_weight, sft_weight = weights
    logps = _logps([-6.0, -4.0], [-5.0, -9.0], [2, 4])
    out = MPOLoss(dpo_weight=dpo_weight, bco_weight=bco_weight, sft_weight=sft_weight)(logps, logps, delta=0.0)
    assert set(out.terms) == present
    assert_close(out.loss, torch.tensor(expected, dtype=torch.float64))


def test_sft_only_needs_no_reference():
    """dpo and bco weights 0: no reference is needed, no rewards exist, L = SFT = 2."""
    loss = MPOLoss(dpo_weight=0.0, bco_weight=0.0)
    assert not loss.needs_reference
    out = loss(_logps([-6.0, -4.0], [-5.0, -9.0], [2, 4]), None, delta=0.0)
    assert set(out.terms) == {"sft"}
    assert out.chosen_rewards is None and out.rejected_rewards is None
    assert_close(out.loss, torch.tensor(2.0, dtype=torch.float64))


def test_reference_required_when_dpo_or_bco_is_on():
    assert MPOLoss(dpo_weight=0.0).needs_reference and MPOLoss(bco_weight=0.0).needs_reference
    with pytest.raises(ValueError, match="reference"):
        MPOLoss()(_logps([-1.0], [-1.0], [1]), None, delta=0.0)


def test_gradients_reach_chosen_and_rejected_but_not_reference():
    """Policy == reference, beta 0.1, B = 2, counts 2 and 4, default weights.

    d/dx_c [-log sigmoid(b(x_c - x_r))] = -b * sigmoid(0) = -b/2, and +b/2 for x_r (DPO);
    d/dx_c [-log sigmoid(b x_c)] = -b/2, d/dx_r [-log sigmoid(-b x_r)] = +b/2 (BCO, delta 0);
    d/dx_c [-x_c / n] = -1/n (SFT). Each term is a batch mean, so everything is divided by B:
    chosen:   (0.8 * -0.05 + 0.2 * -0.05 - 1/n) / 2 = (-0.05 - 1/n)/2 -> -0.275, -0.15
    rejected: (0.8 * 0.05 + 0.2 * 0.05) / 2 = 0.025 each
    The reference is detached: it receives no gradient.
    """
    policy = _logps([-6.0, -4.0], [-5.0, -9.0], [2, 4], [3, 3], grad=True)
    reference = _logps([-6.0, -4.0], [-5.0, -9.0], [2, 4], [3, 3], grad=True)
    MPOLoss()(policy, reference, delta=0.0).loss.backward()
    assert_close(policy.chosen_logps.grad, _t(-0.275, -0.15))
    assert_close(policy.rejected_logps.grad, _t(0.025, 0.025))
    assert reference.chosen_logps.grad is None and reference.rejected_logps.grad is None
