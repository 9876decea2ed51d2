"""Rollout correction: importance weights between the sampler and the trainer, and their mismatch.

When the sampler is not the trainer — vLLM (`rollout=vllm`), or sampling in bf16 while the update
runs in fp32 — the tokens come from π_sampler while the loss assumes π_trainer. With
ρ = π_trainer / π_sampler of the sampled tokens, per token or per sequence (the product over its
tokens), TIS truncates ρ to [low, high] and MIS drops (weight 0) what falls outside; the weight
multiplies each token's policy term in `aha.core.algos.policy_loss` (TRL 1.16
`vllm_importance_sampling_mode`: token_truncate, token_mask, sequence_truncate, sequence_mask;
verl's rollout correction). π_trainer is the trainer's log-prob before the update (the first
inner update's detached forward); π_sampler the rollout's own (`Rollout.logprobs`).

`rollout_mismatch` is what every run logs per step: mean and max |Δ log p| and the KL between the
two. On CPU with aha's own engine in fp32 both compute the same function of the same weights, so
it is ~0 by construction (README: measured).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from aha.core.algos import MAX_LOG_RATIO


def token_log_rho(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log ρ_t = log π_trainer(o_t) − log π_sampler(o_t), (B, T), 0 on padding."""
    return ((trainer_logp - sampler_logp) * mask).nan_to_num(nan=0.0)


def sequence_log_rho(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log ρ = Σ_t log ρ_t, one per sequence, (B, 1)."""
    return token_log_rho(trainer_logp, sampler_logp, mask).sum(dim=1, keepdim=True)


def truncated(rho: Tensor, low: float, high: float | None) -> Tensor:
    """TIS: clip(ρ, low, high)."""
    return rho.clamp(low, high)


def masked(rho: Tensor, low: float, high: float | None) -> Tensor:
    """MIS: ρ where low ≤ ρ ≤ high, else 0."""
    outside = (rho < low) | (rho > (math.inf if high is None else high))
    return rho.masked_fill(outside, 0.0)


ROLLOUT_CORRECTIONS: dict[str, tuple[Callable, Callable]] = {
    "token_truncate": (token_log_rho, truncated),
    "token_mask": (token_log_rho, masked),
    "sequence_truncate": (sequence_log_rho, truncated),
    "sequence_mask": (sequence_log_rho, masked),
}


def rollout_weights(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: str, low: float = 0.0,
                    high: float | None = 3.0) -> Tensor | None:
    """The correction weight: (B, T) for token_* modes, (B, 1) for sequence_* modes, no gradient;
    None for mode "none" (no correction).

    >>> trainer, sampler = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -0.5]])
    >>> rollout_weights(trainer, sampler, torch.ones(1, 2), "token_mask", 0.5, 2.0)
    tensor([[1.6487, 0.0000]])
    """
    if mode == "none":
        return None
    level, bound = ROLLOUT_CORRECTIONS[mode]
    return bound(torch.exp(level(trainer_logp.detach(), sampler_logp, mask).clamp(max=MAX_LOG_RATIO)), low, high)


def rollout_mismatch(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor,
                     weight: Tensor | None = None) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's on the sampled tokens: mean and max of
    |Δ log p|, and KL(π_sampler ‖ π_trainer) per token, estimated by k3 on the sampler's own
    samples, E[ρ − 1 − log ρ] with ρ = π_trainer/π_sampler (≥ 0, 0 iff they agree). With a
    correction `weight`, also its mean and the share of it that is 0 (MIS drops).

    >>> rollout_mismatch(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.5]]), torch.ones(1, 2))
    {'rollout_logp_diff_mean': 0.25, 'rollout_logp_diff_max': 0.5, 'rollout_kl': 0.0743...}
    """
    keep = mask.bool()
    delta = (trainer_logp.detach() - sampler_logp)[keep].nan_to_num(nan=0.0)
    if delta.numel() == 0:
        return {}
    log_rho = delta.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).double()     # expm1 in float64: exact near 0, never < 0
    metrics = {"rollout_logp_diff_mean": float(delta.abs().mean()), "rollout_logp_diff_max": float(delta.abs().max()),
               "rollout_kl": float((torch.expm1(log_rho) - log_rho).clamp(min=0).mean())}
    if weight is not None:
        values = weight.expand_as(mask)[keep]
        metrics.update(
            rollout_weight_mean=float(values.mean()), rollout_weight_zero_frac=float((values == 0).float().mean())
        )
    return metrics


MISMATCH_KEYS = ("rollout_logp_diff_mean", "rollout_logp_diff_max", "rollout_kl")
WEIGHT_KEYS = ("rollout_weight_mean", "rollout_weight_zero_frac")


def merge_mismatch(parts: list[tuple[float, dict[str, float]]], corrected: bool = False) -> dict[str, float]:
    """One step's mismatch from its micro-batches' [(tokens, rollout_mismatch(…))]: the maximum of
    the maxima, token-weighted means of the rest. The keys are always the same (`MISMATCH_KEYS`, and
    `WEIGHT_KEYS` when `corrected`), 0 where no part has tokens, so that every process of a torchrun
    job reduces the same metrics.

    >>> merge_mismatch([(1.0, {"rollout_logp_diff_mean": 0.4, "rollout_logp_diff_max": 0.4, "rollout_kl": 0.1}),
    ...                 (3.0, {"rollout_logp_diff_mean": 0.0, "rollout_logp_diff_max": 0.1, "rollout_kl": 0.1})])
    {'rollout_logp_diff_mean': 0.1, 'rollout_logp_diff_max': 0.4, 'rollout_kl': 0.1}
    """
    parts = [(tokens, metrics) for tokens, metrics in parts if metrics and tokens > 0]
    merged = {}
    for name in MISMATCH_KEYS + (WEIGHT_KEYS if corrected else ()):
        values = [(tokens, metrics[name]) for tokens, metrics in parts if name in metrics]
        if not values:
            merged[name] = 0.0
        elif name.endswith("_max"):
            merged[name] = max(v for _, v in values)
        else:
            merged[name] = sum(t * v for t, v in values) / sum(t for t, _ in values)
    return merged
