"""The GRPO family as pure functions: advantages, KL estimators, the clipped policy loss.

Each function is one equation. Variants are points in one grid of knobs — advantage estimator,
ratio level, clip range, loss aggregation, KL estimator and β — and each knob is looked up by name
in a registry, so the training loop never branches on a variant.

- `grpo_advantages`: DeepSeekMath (arXiv 2402.03300) §4.1.2, Â_i = (r_i − mean r) / std r.
- `dr_grpo_advantages`, `constant_aggregate`: Dr. GRPO (arXiv 2503.20783), no std, no 1/|o|.
- `rloo_advantages`: leave-one-out baseline; `reinforce_pp_advantages`: REINFORCE++-baseline.
- `kl_k1/k2/k3`: Schulman's estimators; k3 is DeepSeekMath eq. 4.
- `policy_loss` + `seq_mean_aggregate`: DeepSeekMath eq. 3 (with β·KL inside the token loss);
  with clip_high > clip_low and `token_mean_aggregate`: the DAPO objective (arXiv 2503.14476).
- `sequence_log_ratio`: GSPO (arXiv 2507.18071) s_i = (π_θ/π_old)^(1/|o_i|), as GSPO-token.

Departures from the papers: a group whose rewards are all equal (max == min) gets advantage
exactly 0 under every estimator (float32 rounds the mean of `[0.1] * 8`, which leaves a −7e-9 residue
that the std division would blow up to −7e-5); the std gets + 1e-4 and is the unbiased one; log-ratios are clamped to ±20 before exp (verl does the same) so the loss stays
finite; the aggregation divides by a `Normaliser` counted over the whole batch, so rows skipped
for zero advantage change nothing. tests/test_trl_parity.py checks the loss against TRL 1.16.

Shapes: B completions (prompts × group_size, grouped contiguously), T completion tokens.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# --- advantages: (rewards (B,), group_size) -> (B,) ------------------------------------------

GRPO_STD_EPS = 1e-4


def tied_rows(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) bool: the rows of groups whose rewards are all equal (max == min, exactly).

    >>> tied_rows(torch.tensor([0.1, 0.1, 1.0, 0.0]), 2).tolist()
    [True, True, False, False]
    """
    groups = rewards.view(-1, group_size)
    tied = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)      # (P, 1)
    return tied.expand_as(groups).reshape(-1)


def grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = (r_i − mean(r)) / (std(r) + 1e-4) within each group; exactly 0 in a tied group.

    Std convention: unbiased (Bessel-corrected, as torch.std, TRL and verl); rewards [1,0,1,0]
    give ±0.866.
    """
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    advantages = (centered / (groups.std(dim=1, keepdim=True) + GRPO_STD_EPS)).view(-1)
    return advantages.masked_fill(tied_rows(rewards, group_size), 0.0)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = r_i − mean(r): Dr. GRPO drops the std division (it over-weights easy/hard groups)."""
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    return advantages.masked_fill(tied_rows(rewards, group_size), 0.0)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = r_i − mean_{j≠i} r_j: the leave-one-out baseline (= G/(G−1) × Dr. GRPO's)."""
    groups = rewards.view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).view(-1).masked_fill(tied_rows(rewards, group_size), 0.0)


def reinforce_pp_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE++ (baseline variant): group mean removed, then normalised over the whole batch;
    a tied group stays at 0 (its rows would otherwise take −mean/std of the batch)."""
    centered = dr_grpo_advantages(rewards, group_size)
    advantages = (centered - centered.mean()) / (centered.std() + GRPO_STD_EPS)
    return advantages.masked_fill(tied_rows(rewards, group_size), 0.0)


ADVANTAGES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}

# Log-ratios are clamped to ±20 before exp (as verl does): e^20 ≈ 5e8 keeps the loss and its
# gradient finite in float32 even for wildly off-policy tokens, and no sane update reaches it.
MAX_LOG_RATIO = 20.0

# --- KL to the reference policy, per token: (logp (B,T), ref_logp (B,T)) -> (B,T) ---------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log π_θ − log π_ref: unbiased, can be negative."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """½ (log π_θ − log π_ref)²: always ≥ 0, biased."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """π_ref/π_θ − log(π_ref/π_θ) − 1 (GRPO's estimator): unbiased and always ≥ 0."""
    log_ratio = (ref_logp - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# --- log-ratio level: (logp, old_logp, mask) -> (B,T) ---------------------------------------------


def token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log ρ_t = log π_θ(o_t) − log π_old(o_t), one ratio per token (GRPO, PPO)."""
    return logp - old_logp


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO: one length-normalised ratio per sequence, (1/|o|) Σ_t log ρ_t, broadcast to its tokens.

    The value is per sequence, but the gradient flows to each token as in GSPO-token.
    """
    per_token = (logp - old_logp) * mask
    seq = per_token.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return logp - logp.detach() + seq.detach().expand_as(logp)


RATIO_LEVELS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}

# --- aggregation of per-token losses: (loss (B,T), mask (B,T), Normaliser) -> scalar -------------
# The normaliser counts the whole batch, including rows the trainer skipped because their
# advantage is zero: skipping them then changes nothing but the time spent.


@dataclass(frozen=True)
class Normaliser:
    rows: int           # completions in the whole batch (B)
    tokens: int         # completion tokens in the whole batch
    max_len: int        # maximum completion length (Dr. GRPO's constant)


def seq_mean_aggregate(token_loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """GRPO: mean over each output's tokens, then over outputs (1/G Σ_i 1/|o_i| Σ_t)."""
    return ((token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / norm.rows


def token_mean_aggregate(token_loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """DAPO / TRL 'dapo' and 'bnpo': sum over all tokens of the batch / number of tokens."""
    return (token_loss * mask).sum() / max(norm.tokens, 1)


def constant_aggregate(token_loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """Dr. GRPO: sum over all tokens / (B × max completion length), a constant normaliser."""
    return (token_loss * mask).sum() / (norm.rows * norm.max_len)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, Normaliser], Tensor]] = {
    "seq_mean": seq_mean_aggregate,
    "token_mean": token_mean_aggregate,
    "constant": constant_aggregate,
}


@dataclass(frozen=True)
class LossSpec:
    """The knobs of the clipped surrogate; every published variant is one setting of them."""
    ratio_level: str = "token"
    clip_low: float | None = 0.2      # ratio floor 1 − clip_low; None: no floor
    clip_high: float | None = 0.2     # ratio ceiling 1 + clip_high; > clip_low: DAPO clip-higher
    aggregation: str = "token_mean"
    kl: str = "k3"
    beta: float = 0.0


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, spec: LossSpec,
                ref_logp: Tensor | None = None, norm: Normaliser | None = None) -> tuple[Tensor, dict[str, float]]:
    """−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL per token, aggregated as `spec` says.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). `norm` defaults to this batch's
    own counts. Returns (loss, metrics).
    """
    keep = mask.bool()
    mask = mask.to(logp.dtype)
    # Padding may hold anything (0, −inf, a stale log-prob): zero it before exp, so that no
    # inf·0 = NaN can leak from a masked position into the loss or its gradient.
    logp, old_logp = logp.where(keep, 0.0), old_logp.where(keep, 0.0)
    if norm is None:
        norm = Normaliser(rows=mask.shape[0], tokens=int(mask.sum()), max_len=mask.shape[1])
    log_ratio = RATIO_LEVELS[spec.ratio_level](logp, old_logp, mask)
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))      # (B, T)
    adv = advantages.unsqueeze(1)                                            # (B, 1)
    unclipped = ratio * adv
    low = None if spec.clip_low is None else 1 - spec.clip_low
    high = None if spec.clip_high is None else 1 + spec.clip_high
    if low is None and high is None:
        surrogate = unclipped
    else:
        surrogate = torch.minimum(unclipped, torch.clamp(ratio, low, high) * adv)
    clipped = surrogate < unclipped  # the pessimistic bound won: this token carries no gradient
    token_loss = -surrogate
    metrics = {}
    if spec.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = KL_ESTIMATORS[spec.kl](logp, ref_logp.where(keep, 0.0))
        token_loss = token_loss + spec.beta * kl
        metrics["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    loss = AGGREGATIONS[spec.aggregation](token_loss, mask, norm)
    n = mask.sum().clamp(min=1)
    metrics["clip_frac"] = float((clipped.to(mask.dtype) * mask).sum() / n)
    return loss, metrics
