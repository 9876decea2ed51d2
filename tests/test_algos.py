"""aha/core/algos.py against values computed by hand, plus properties that must hold for any input.

Run: python -m pytest tests/test_algos.py -q
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aha.core.advantages import ADVANTAGES
from aha.core.algos import AGGREGATIONS, KL_ESTIMATORS, LossSpec, Normaliser, high_entropy_mask, policy_loss
from aha.core.rollout_correction import rollout_mismatch, rollout_weights

NO_CLIP = LossSpec(clip_low=None, clip_high=None)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


# --- advantages -------------------------------------------------------------------------------

def test_grpo_advantages_use_unbiased_std():
    # mean 0.5; unbiased std sqrt(4·0.25 / 3) = 0.5774 → ±0.5/0.5774 = ±0.866.
    # The population std (0.5) would give ±1 exactly; aha follows torch.std / TRL / verl.
    adv = ADVANTAGES["grpo"](torch.tensor([1.0, 0.0, 1.0, 0.0]), 4)
    close(adv, [0.866, -0.866, 0.866, -0.866], tol=1e-3)
    assert abs(adv[0].item() - 1.0) > 0.1


def test_grpo_advantages_are_per_group_and_zero_without_spread():
    adv = ADVANTAGES["grpo"](torch.tensor([3.0, 1.0, 5.0, 5.0]), 2)
    # group (3, 1): ±1/std, std = sqrt(2) → ±0.7071; group (5, 5): exactly 0, not 0/0
    close(adv, [0.7071, -0.7071, 0.0, 0.0], tol=1e-3)
    assert adv[2].item() == 0.0 and adv[3].item() == 0.0


def test_dr_grpo_advantages_only_subtract_the_mean():
    close(ADVANTAGES["dr_grpo"](torch.tensor([1.0, 0.0, 0.0, 0.0]), 4), [0.75, -0.25, -0.25, -0.25])
    close(ADVANTAGES["dr_grpo"](torch.tensor([2.0, 0.0, 1.0, 1.0, 4.0, 4.0]), 2), [1, -1, 0, 0, 0, 0])


def test_rloo_leave_one_out_by_hand():
    # [3, 1, 2, 2]: 3 − (1+2+2)/3 = 4/3; 1 − (3+2+2)/3 = −4/3; 2 − (3+1+2)/3 = 0
    close(ADVANTAGES["rloo"](torch.tensor([3.0, 1.0, 2.0, 2.0]), 4), [4 / 3, -4 / 3, 0, 0])
    # [1, 0, 0, 0]: 1 − 0 = 1; 0 − 1/3
    close(ADVANTAGES["rloo"](torch.tensor([1.0, 0.0, 0.0, 0.0]), 4), [1, -1 / 3, -1 / 3, -1 / 3])


def test_reinforce_pp_normalises_over_the_whole_batch():
    # group-centred: [.75 −.25 −.25 −.25 | .5 .5 −.5 −.5]; batch mean 0;
    # unbiased batch std: sqrt((.5625 + 3·.0625 + 4·.25) / 7) = sqrt(0.25) = 0.5 → ×2
    adv = ADVANTAGES["reinforce_pp"](torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0]), 4)
    close(adv, [1.5, -0.5, -0.5, -0.5, 1, 1, -1, -1], tol=1e-3)
    # per-group std would give the second group ±0.866, not ±1: the batch std is what is used
    assert abs(adv[4].item() - 0.866) > 0.1


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
@pytest.mark.parametrize("group_size", [8, 16])
def test_a_tied_group_gets_exactly_zero_advantage(name, group_size):
    # format_weight=0.1: a group of well-formed wrong answers has rewards [0.1] * G. float32 rounds
    # their mean, so r − mean is −7.45e-9, not 0, and the std division made that −7.45e-5.
    tied = torch.full((group_size,), 0.1)
    spread = torch.tensor([1.1] + [0.1] * (group_size - 1))
    adv = ADVANTAGES[name](torch.cat([tied, spread, tied]), group_size)
    assert adv[:group_size].tolist() == [0.0] * group_size
    assert adv[2 * group_size:].tolist() == [0.0] * group_size
    assert adv[group_size].item() > 0.1 and (adv[group_size + 1:2 * group_size] < 0).all()


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["grpo", "dr_grpo", "rloo"]), group_size=st.integers(2, 6), groups=st.integers(1, 3),
       data=st.data())
def test_advantages_sum_to_zero_per_group(name, group_size, groups, data):
    rewards = data.draw(st.lists(st.floats(-10, 10), min_size=group_size * groups, max_size=group_size * groups))
    adv = ADVANTAGES[name](torch.tensor(rewards, dtype=torch.float64), group_size)
    assert adv.shape == (group_size * groups,)
    assert torch.allclose(adv.view(groups, group_size).sum(dim=1), torch.zeros(groups, dtype=torch.float64), atol=1e-6)


# --- the clipped surrogate on one token -----------------------------------------------------------

def one_token_loss(ratio: float, advantage: float, spec: LossSpec):
    """(loss, d loss / d logp, clip_frac) for one token with π_old = 1 and π_θ = ratio."""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old_logp = torch.zeros(1, 1, dtype=torch.float64)
    loss, metrics = policy_loss(logp, old_logp, torch.tensor([advantage], dtype=torch.float64),
                                torch.ones(1, 1), spec)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics["clip_frac"]


@pytest.mark.parametrize("ratio, advantage, loss, grad, clipped", [
    # A > 0: only the top clips (min(ρA, 1.2A)); below 1 − ε the unclipped ρA is already smaller
    (1.1, 1.0, -1.1, -1.1, 0), (1.3, 1.0, -1.2, 0.0, 1), (0.7, 1.0, -0.7, -0.7, 0),
    # A < 0: only the bottom clips (min(−ρ, −0.8)); above 1 + ε the unclipped −ρ is smaller
    (0.9, -1.0, 0.9, 0.9, 0), (0.7, -1.0, 0.8, 0.0, 1), (1.3, -1.0, 1.3, 1.3, 0),
    # the advantage scales the loss and the gradient
    (1.1, 2.0, -2.2, -2.2, 0), (0.5, -3.0, 2.4, 0.0, 1),
])
def test_clip_boundaries(ratio, advantage, loss, grad, clipped):
    # d(−ρA)/d log π = −ρA when unclipped; 0 when the constant (1 ± ε)A wins
    got_loss, got_grad, clip_frac = one_token_loss(ratio, advantage, LossSpec(clip_low=0.2, clip_high=0.2))
    close(got_loss, loss)
    close(got_grad, grad)
    assert clip_frac == clipped


@pytest.mark.parametrize("ratio, advantage, loss, grad", [
    (1.25, 1.0, -1.25, -1.25),   # inside 1 + 0.28 (symmetric 0.2 would clip it)
    (1.3, 1.0, -1.28, 0.0),      # above 1.28
    (0.79, -1.0, 0.8, 0.0),      # the low side still clips at 1 − 0.2
    (0.81, -1.0, 0.81, 0.81),
])
def test_clip_higher_is_decoupled(ratio, advantage, loss, grad):
    got_loss, got_grad, _ = one_token_loss(ratio, advantage, LossSpec(clip_low=0.2, clip_high=0.28))
    close(got_loss, loss)
    close(got_grad, grad)


@pytest.mark.parametrize("spec, ratio, advantage, loss, grad", [
    (NO_CLIP, 1.5, 1.0, -1.5, -1.5), (NO_CLIP, 0.5, -1.0, 0.5, 0.5), (NO_CLIP, 3.0, -2.0, 6.0, 6.0),
    # one side open: no floor, the ceiling still clips
    (LossSpec(clip_low=None, clip_high=0.2), 0.5, -1.0, 0.5, 0.5),
    (LossSpec(clip_low=None, clip_high=0.2), 1.5, 1.0, -1.2, 0.0),
])
def test_clip_none_means_no_clipping(spec, ratio, advantage, loss, grad):
    got_loss, got_grad, clip_frac = one_token_loss(ratio, advantage, spec)
    close(got_loss, loss)
    close(got_grad, grad)


# --- KL estimators --------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    logp, ref_logp = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    log2 = math.log(2)
    close(KL_ESTIMATORS["k1"](logp, ref_logp), [log2, -log2])
    close(KL_ESTIMATORS["k2"](logp, ref_logp), [0.5 * log2 ** 2, 0.5 * log2 ** 2])
    # k3 = r − log r − 1 with r = π_ref/π_θ: r = 0.5 → 0.5 + log 2 − 1 = 0.1931; r = 2 → 1 − log 2
    close(KL_ESTIMATORS["k3"](logp, ref_logp), [0.5 + log2 - 1, 1 - log2])


@settings(max_examples=60, deadline=None)
@given(logp=st.floats(-30, 0), ref_logp=st.floats(-30, 0))
def test_k3_is_nonnegative_and_zero_on_the_reference(logp, ref_logp):
    a, b = torch.tensor([logp], dtype=torch.float64), torch.tensor([ref_logp], dtype=torch.float64)
    assert KL_ESTIMATORS["k3"](a, b).item() >= 0
    assert KL_ESTIMATORS["k3"](a, a).item() == 0
    assert KL_ESTIMATORS["k2"](a, b).item() >= 0


def test_kl_is_added_with_beta_and_needs_a_reference():
    logp = torch.log(torch.tensor([[0.5]]))
    spec = LossSpec(beta=0.1, kl="k3")
    loss, metrics = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), spec,
                                ref_logp=torch.log(torch.tensor([[0.25]])))
    close(loss, 0.1 * (0.5 + math.log(2) - 1))
    close(metrics["kl"], 0.5 + math.log(2) - 1)
    with pytest.raises(ValueError):
        policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), spec)


# --- aggregation ----------------------------------------------------------------------------------

TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("name, expected", [
    ("seq_mean", (6 / 3 + 4 / 1) / 2),   # mean per output, then over outputs
    ("token_mean", (6 + 4) / 4),         # all tokens of the batch
    ("constant", (6 + 4) / (2 * 5)),     # B × max_len, whatever the lengths
])
def test_aggregations_by_hand(name, expected):
    close(AGGREGATIONS[name](TOKEN_LOSS, MASK, Normaliser(rows=2, tokens=4, max_len=5)), expected)


@pytest.mark.parametrize("aggregation, expected", [
    ("seq_mean", (-1 + 2) / 2), ("token_mean", (-3 + 2) / 4), ("constant", (-3 + 2) / (2 * 3)),
])
def test_policy_loss_aggregates_with_the_batch_counts_by_default(aggregation, expected):
    # on-policy, ratio 1: the token loss is −A, i.e. −1 on row 0's 3 tokens and +2 on row 1's 1 token
    logp = torch.full((2, 3), -1.0)
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0, -2.0]), MASK, LossSpec(aggregation=aggregation))
    close(loss, expected)


# --- the sequence-level ratio (GSPO) --------------------------------------------------------------

def test_sequence_ratio_by_hand():
    # row 0: log-ratios 0.1, 0.3 (and a masked 5.0) → s = exp(0.2) = 1.2214; row 1: −0.4 → s = exp(−0.4)
    delta = torch.tensor([[0.1, 0.3, 5.0], [-0.4, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    old_logp = torch.full((2, 3), -2.0, dtype=torch.float64)
    logp = (old_logp + delta).requires_grad_()
    s0, s1 = math.exp(0.2), math.exp(-0.4)
    loss, _ = policy_loss(logp, old_logp, torch.tensor([1.0, 1.0], dtype=torch.float64), mask,
                          LossSpec(ratio_level="sequence", clip_low=None, clip_high=None, aggregation="seq_mean"))
    close(loss, -(s0 + s1) / 2)
    loss.backward()
    # GSPO's gradient: d(−s_i/B)/d logp_t = −s_i / (B·|o_i|) on o_i's tokens, 0 on padding
    close(logp.grad, [[-s0 / 4, -s0 / 4, 0], [-s1 / 2, 0, 0]])

    # clipped at 1.2: row 0 is a constant −1.2 with no gradient; row 1 (A > 0, s < 1) is not clipped
    logp.grad = None
    loss, metrics = policy_loss(logp, old_logp, torch.tensor([1.0, 1.0], dtype=torch.float64), mask,
                                LossSpec(ratio_level="sequence", aggregation="seq_mean"))
    close(loss, -(1.2 + s1) / 2)
    loss.backward()
    close(logp.grad, [[0, 0, 0], [-s1 / 2, 0, 0]])
    close(metrics["clip_frac"], 2 / 3)


# --- the loss as a whole --------------------------------------------------------------------------

def random_batch(seed, rows=6, width=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()               # (B, T)
    logp = -3 * torch.rand(rows, width, generator=gen, dtype=dtype)
    old_logp = logp + 0.3 * torch.randn(rows, width, generator=gen, dtype=dtype)
    ref_logp = logp + 0.3 * torch.randn(rows, width, generator=gen, dtype=dtype)
    advantages = torch.randn(rows, generator=gen, dtype=dtype)
    return logp, old_logp, ref_logp, advantages, mask


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_skipping_zero_advantage_rows_changes_nothing(aggregation, ratio_level):
    logp, old_logp, _, advantages, mask = random_batch(0)
    advantages[[1, 4]] = 0.0
    spec = LossSpec(ratio_level=ratio_level, aggregation=aggregation, beta=0.0)
    norm = Normaliser(rows=6, tokens=int(mask.sum()), max_len=mask.shape[1])
    full = logp.clone().requires_grad_()
    full_loss, _ = policy_loss(full, old_logp, advantages, mask, spec)   # own counts == norm
    full_loss.backward()
    kept = [0, 2, 3, 5]
    part = logp[kept].clone().requires_grad_()
    part_loss, _ = policy_loss(part, old_logp[kept], advantages[kept], mask[kept], spec, norm=norm)
    part_loss.backward()
    close(part_loss, full_loss.detach(), tol=1e-12)
    close(part.grad, full.grad[kept], tol=1e-12)
    close(full.grad[[1, 4]], torch.zeros(2, 5), tol=0)
    # without the whole-batch normaliser the skipped rows would change the scale
    own_loss, _ = policy_loss(logp[kept], old_logp[kept], advantages[kept], mask[kept], spec)
    assert abs(own_loss.item() - full_loss.item()) > 1e-6


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("spec_kwargs", [{}, {"clip_low": None, "clip_high": None}, {"ratio_level": "sequence"}])
@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo", "gmpo", "vespo", "kl_cov"])
def test_on_policy_gradient_is_reinforce(aggregation, spec_kwargs, surrogate):
    """With π_old = sg(π_θ), ∇ loss = −Σ_i A_i Σ_t w_it ∇log π(o_it), w the aggregation weights.

    So on-policy (μ = 1) CISPO, SAPO (f'(1) = 1), GMPO (d/dθ of exp(mean log ρ) at ρ = 1 is the
    mean of ∇log π, broadcast back over the |o| tokens), VESPO (φ(1) = 1) and KL-Cov (|log ρ| = 0)
    all have GRPO's gradient: they differ only off-policy."""
    gen = torch.Generator().manual_seed(1)
    rows, width, vocab = 4, 5, 7
    logits = torch.randn(rows, width, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(vocab, (rows, width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor([5, 2, 3, 1])[:, None]).long()
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    max_len = 8
    norm = Normaliser(rows=rows, tokens=int(mask.sum()), max_len=max_len)

    logp = torch.log_softmax(logits, dim=-1).gather(2, tokens[..., None]).squeeze(2)   # (B, T)
    spec = LossSpec(aggregation=aggregation, surrogate=surrogate, **spec_kwargs)
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask, spec, norm=norm)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)

    lengths = mask.sum(dim=1, keepdim=True).to(logp.dtype)
    weight = {"seq_mean": 1 / (rows * lengths), "token_mean": torch.full_like(lengths, 1 / norm.tokens),
              "constant": torch.full_like(lengths, 1 / (rows * max_len)),
              "seq_sum": torch.full_like(lengths, 1 / rows)}[aggregation]                 # (B, 1)
    reinforce = -(advantages[:, None] * weight * logp * mask).sum()
    (expected,) = torch.autograd.grad(reinforce, logits)
    close(grad, expected, tol=1e-12)
    assert grad.abs().max() > 1e-3


SPECS = [LossSpec(), LossSpec(clip_low=0.2, clip_high=0.28), NO_CLIP, LossSpec(aggregation="seq_mean", beta=0.1),
         LossSpec(ratio_level="sequence", aggregation="constant", beta=0.05, kl="k2"),
         LossSpec(aggregation="seq_mean", beta=0.05, kl="k1"), LossSpec(dual_clip=3.0),
         LossSpec(surrogate="cispo", clip_low=None, clip_high=4.0), LossSpec(surrogate="sapo", aggregation="seq_mean"),
         LossSpec(surrogate="gmpo", clip_low=0.4, clip_high=0.4, aggregation="seq_mean"),
         LossSpec(surrogate="vespo"), LossSpec(surrogate="kl_cov", cov_share=0.2),
         LossSpec(ratio_level="sequence", aggregation="seq_sum")]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 16), spec=st.sampled_from(SPECS),
       garbage=st.sampled_from([0.0, -1e4, 1e4, -math.inf, math.inf, math.nan]))
def test_masked_positions_never_affect_the_loss(seed, spec, garbage):
    logp, old_logp, ref_logp, advantages, mask = random_batch(seed)
    results = []
    for fill in (None, garbage):
        tensors = [t.clone() for t in (logp, old_logp, ref_logp)]
        if fill is not None:
            for t in tensors:
                t[mask == 0] = fill
        leaf = tensors[0].requires_grad_()
        loss, metrics = policy_loss(leaf, tensors[1], advantages, mask, spec, tensors[2])
        loss.backward()
        results.append((loss.detach(), leaf.grad, metrics))
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = results
    assert torch.isfinite(loss_b)
    close(loss_b, loss_a, tol=1e-12)
    close(grad_b, grad_a, tol=1e-12)
    assert metrics_a == metrics_b


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(SPECS), data=st.data(), advantage_scale=st.sampled_from([1.0, 1e3, 1e6]))
def test_loss_is_finite_for_extreme_logps(spec, data, advantage_scale):
    rows, width = 4, 3
    values = st.lists(st.sampled_from([-50.0, 50.0, 0.0, -1e-3]), min_size=rows * width, max_size=rows * width)
    logp, old_logp, ref_logp = (torch.tensor(data.draw(values), dtype=torch.float32).view(rows, width)
                                for _ in range(3))
    advantages = advantage_scale * torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0, 0.0]),
                                                                   min_size=rows, max_size=rows)))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    logp.requires_grad_()
    loss, metrics = policy_loss(logp, old_logp, advantages, mask, spec, ref_logp)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


# --- the 2026 family: verl-only methods by hand from the papers' formulas ------------------------

@pytest.mark.parametrize("ratio, advantage, loss, grad, clipped", [
    (5.0, -1.0, 3.0, 0.0, 1),    # the plain clip leaves 5 (A < 0 does not clip above 1 + ε); bounded at c·|A| = 3
    (2.0, -1.0, 2.0, 2.0, 0),    # under the bound: the usual −ρA, gradient −ρA
    (4.0, -2.0, 6.0, 0.0, 1),    # bound c·|A| = 6 < 8
    (5.0, 1.0, -1.2, 0.0, 1),    # A > 0: only the usual clip
])
def test_dual_clip_bounds_negative_advantages(ratio, advantage, loss, grad, clipped):
    """verl verl/trainer/ppo/core_algos.py `compute_policy_loss_vanilla` (clip_ratio_c = 3): for A < 0,
    min(max(−ρA, −clip(ρ)A), −c·A)."""
    got_loss, got_grad, clip_frac = one_token_loss(ratio, advantage, LossSpec(dual_clip=3.0))
    close(got_loss, loss)
    close(got_grad, grad)
    assert clip_frac == clipped


@pytest.mark.parametrize("ratio, advantage, loss, grad, clipped", [
    (1.5, 1.0, -1.2 * math.log(1.5), -1.2, 1),      # weight capped at 1.2, the gradient stays: −w·A
    (0.5, -1.0, 0.8 * math.log(0.5), 0.8, 1),       # floored at 0.8
    (1.1, 2.0, -2.2 * math.log(1.1), -2.2, 0),      # inside: −ρ·A·log π, gradient −ρA as GRPO's
])
def test_cispo_keeps_every_gradient(ratio, advantage, loss, grad, clipped):
    """CISPO: −sg(clip(ρ, 0.8, 1.2))·A·log π (π_old = 1 here, so log π = log ρ); where the clip
    surrogate's gradient is 0 (first two rows), CISPO's is the capped weight times A."""
    got_loss, got_grad, clip_frac = one_token_loss(ratio, advantage, LossSpec(surrogate="cispo"))
    close(got_loss, loss)
    close(got_grad, grad)
    assert clip_frac == clipped


def test_gmpo_by_hand():
    """verl verl/trainer/ppo/core_algos.py `compute_policy_loss_geo_mean` (GMPO, arXiv 2507.20673)."""
    # row 0: A = 1, log ρ = (0.1, 0.5): A > 0 caps at +0.4 → mean(0.1, 0.4) = 0.25, loss −e^0.25
    # row 1: A = −2, log ρ = (−0.6, 0.2, −0.1): A < 0 floors at −0.4 → mean(−0.4, 0.2, −0.1) = −0.1, loss 2·e^−0.1
    delta = torch.tensor([[0.1, 0.5, 0.0], [-0.6, 0.2, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    old_logp = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp = (old_logp + delta).requires_grad_()
    spec = LossSpec(surrogate="gmpo", clip_low=0.4, clip_high=0.4, aggregation="seq_mean")
    loss, metrics = policy_loss(logp, old_logp, torch.tensor([1.0, -2.0], dtype=torch.float64), mask, spec)
    g0, g1 = math.exp(0.25), math.exp(-0.1)
    close(loss, (-g0 + 2 * g1) / 2, tol=1e-12)            # mean over the two sequences
    loss.backward()
    # d/d log π_t of −A·exp(mean) = −A·exp(mean)/|o| on unclipped tokens, 0 on clipped ones; then / B
    close(logp.grad, [[-g0 / 2 / 2, 0, 0], [0, 2 * g1 / 3 / 2, 2 * g1 / 3 / 2]], tol=1e-12)
    close(metrics["clip_frac"], 2 / 5)


def cov_batch(shift=None):
    """2 rows × 2 tokens, A = (2, −2); log π = (−0.1, −3.0 | −0.2, −3.0): token covariances
    (A − Ā)(log π − mean log π) with Ā = 0, mean log π = −1.575: (2.95, −2.85 | −2.75, 2.85)."""
    logp = torch.tensor([[-0.1, -3.0], [-0.2, -3.0]], dtype=torch.float64)
    old_logp = logp - (0.0 if shift is None else shift)
    return logp.clone().requires_grad_(), old_logp, torch.tensor([2.0, -2.0], dtype=torch.float64), torch.ones(2, 2)


def test_clip_cov_cuts_high_covariance_tokens_by_hand():
    """verl verl/trainer/ppo/core_algos.py `compute_policy_loss_clip_cov` (arXiv 2505.22617): the loss of
    max(1, ⌊r·N⌋) random tokens with covariance in (1, 5), not already clipped, is set to 0."""
    # r = 0.5 → 2 tokens; the eligible ones are (0, 0) at 2.95 and (1, 1) at 2.85: both cut
    logp, old_logp, adv, mask = cov_batch()
    loss, metrics = policy_loss(logp, old_logp, adv, mask, LossSpec(surrogate="clip_cov", cov_share=0.5))
    loss.backward()
    close(loss, (-2 + 2) / 4)                               # on-policy −ρA = ∓2 on the two uncut tokens
    close(logp.grad, [[0, -2 / 4], [2 / 4, 0]])
    close(metrics["clip_frac"], 0.5)
    # r = 0.25 → one of the two, at random (seeded): exactly one eligible token loses its gradient
    for seed in range(4):
        logp, old_logp, adv, mask = cov_batch()
        loss, metrics = policy_loss(logp, old_logp, adv, mask, LossSpec(surrogate="clip_cov", cov_share=0.25),
                                    generator=torch.Generator().manual_seed(seed))
        loss.backward()
        cut = logp.grad == 0
        assert cut.sum() == 1 and (cut[0, 0] or cut[1, 1]) and metrics["clip_frac"] == 0.25
    # a token the clip already cut is not eligible: (0, 0) at ρ = 1.5 > 1.2 is clipped, so only (1, 1) is cut
    logp, old_logp, adv, mask = cov_batch(torch.tensor([[math.log(1.5), 0.0], [0.0, 0.0]], dtype=torch.float64))
    loss, metrics = policy_loss(logp, old_logp, adv, mask, LossSpec(surrogate="clip_cov", cov_share=0.5))
    loss.backward()
    close(logp.grad, [[0, -2 / 4], [2 / 4, 0]])
    close(loss, (-2 * 1.2 - 2 + 2) / 4)                     # (0, 0) keeps its clipped value −1.2·A
    # outside the window (1, 2.5) nothing is eligible: the plain clip surrogate
    logp, old_logp, adv, mask = cov_batch()
    spec = LossSpec(surrogate="clip_cov", cov_share=0.5, clip_cov_high=2.5)
    close(policy_loss(logp, old_logp, adv, mask, spec)[0], policy_loss(logp, old_logp, adv, mask, LossSpec())[0])


def test_kl_cov_penalises_the_top_covariance_tokens_by_hand():
    """verl verl/trainer/ppo/core_algos.py `compute_policy_loss_kl_cov`: unclipped −ρA, plus κ|log ρ| on
    the max(1, ⌊k·N⌋) tokens of largest covariance."""
    shift = torch.tensor([[0.1, 0.2], [0.3, -0.1]], dtype=torch.float64)       # log ρ per token
    logp, old_logp, adv, mask = cov_batch(shift)
    loss, metrics = policy_loss(
        logp, old_logp, adv, mask, LossSpec(surrogate="kl_cov", cov_share=0.25, kl_cov_coef=1.0)
    )
    loss.backward()
    e = math.exp
    # k·N = 1 token: (0, 0), covariance 2.95, gets + |0.1|; no clipping anywhere (ρ = e^0.2 would clip at 1.2)
    close(loss, (-2 * e(0.1) + 0.1 - 2 * e(0.2) + 2 * e(0.3) + 2 * e(-0.1)) / 4)
    close(logp.grad, [[(-2 * e(0.1) + 1) / 4, -2 * e(0.2) / 4], [2 * e(0.3) / 4, 2 * e(-0.1) / 4]])
    close(metrics["clip_frac"], 0.25)                       # the penalised share


def test_passk_advantage_by_hand():
    """verl verl/trainer/ppo/core_algos.py `compute_grpo_passk_outcome_advantage` (arXiv 2503.19595)."""
    rewards = torch.tensor([0.2, 1.0, 0.5, 0.0, 0.0, 1.0, 0.5, 1.0])
    # group 0: best 1.0 (index 1), second 0.5 → 0.5 / (std + 1e-4), unbiased std = sqrt(0.5675 / 3)
    # group 1: two samples share the top 1.0 → r_max − r_second = 0 for every sample
    expected = [0, 0.5 / (math.sqrt(0.5675 / 3) + 1e-4), 0, 0, 0, 0, 0, 0]
    close(ADVANTAGES["grpo_passk"](rewards, 4), expected)


def test_entropy_mask_keeps_the_top_quantile_by_hand():
    """TRL `get_high_entropy_mask`: tokens at or above the (1 − q) quantile of the batch's entropies."""
    entropy = torch.tensor([[0.1, 2.0, 0.5], [3.0, 0.2, 9.0]], dtype=torch.float64)     # 9.0 is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # q = 0.4: the 0.6 quantile of (0.1, 0.2, 0.5, 2.0, 3.0) is 0.5 + 0.4·(2.0 − 0.5) = 1.1 → 2.0 and 3.0
    assert high_entropy_mask(entropy, mask, 0.4).tolist() == [[False, True, False], [True, False, False]]
    logp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64), mask,
                                LossSpec(top_entropy_quantile=0.4), entropy=entropy)
    loss.backward()
    close(loss, (-1 + 1) / 5)                                # the normaliser still counts all 5 tokens (TRL)
    close(logp.grad, [[0, -1 / 5, 0], [1 / 5, 0, 0]])
    close(metrics["entropy_mask_frac"], 2 / 5)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, LossSpec(top_entropy_quantile=0.4))


def test_rollout_weights_by_hand():
    trainer = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # token ρ: e^0.5 = 1.6487, 1 | e^−1 = 0.3679, padding 1; sequence ρ: e^0.5 | e^−1
    close(rollout_weights(trainer, sampler, mask, "token_truncate", 0.5, 1.5), [[1.5, 1.0], [0.5, 1.0]])
    close(rollout_weights(trainer, sampler, mask, "token_mask", 0.5, 1.5), [[0.0, 1.0], [0.0, 1.0]])
    close(rollout_weights(trainer, sampler, mask, "sequence_truncate", 0.5, 2.0), [[math.exp(0.5)], [0.5]])
    close(rollout_weights(trainer, sampler, mask, "sequence_mask", 0.5, 2.0), [[math.exp(0.5)], [0.0]])
    assert rollout_weights(trainer, sampler, mask, "none") is None
    # the mismatch over real tokens: |Δ| = 0.5, 0, 1 → mean 0.5, max 1; k3 = (e^0.5 − 1.5 + 0 + e^−1 − 0) / 3
    metrics = rollout_mismatch(trainer, sampler, mask)
    close(metrics["rollout_logp_diff_mean"], 0.5)
    close(metrics["rollout_logp_diff_max"], 1.0)
    close(metrics["rollout_kl"], (math.exp(0.5) - 1.5 + math.exp(-1)) / 3)
    assert rollout_mismatch(trainer, trainer, mask)["rollout_kl"] == 0.0
