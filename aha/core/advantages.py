"""Group-relative advantages, one pure function each, chosen by name (`advantage=`): GRPO (DeepSeekMath
§4.1: (r − mean) / std over the group), Dr. GRPO (no std division), RLOO (leave-one-out mean),
REINFORCE++ (batch-normalised group baseline) and pass@k training (`grpo_passk`). aha/core/algos.py
holds the rest of the loss; aha/core/step.py applies `ADVANTAGES[cfg.advantage]`.

Shapes: (rewards (B,), group_size) -> advantages (B,); B = prompts × group_size, grouped contiguously.
"""

from collections.abc import Callable

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


def passk_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """pass@k training (arXiv 2503.19595; verl `compute_grpo_passk_outcome_advantage`): only the best
    sample of each group gets an advantage, (r_max − r_second) / (std(r) + 1e-4); the rest get 0.
    Ties go to the first best sample (then r_max − r_second = 0 when two share the top).

    >>> [round(a, 3) for a in passk_advantages(torch.tensor([0., 1., 0., 0., 2., 2.]), 3).tolist()]
    [0.0, 1.732, 0.0, 0.0, 0.0, 0.0]
    """
    groups = rewards.view(-1, group_size)
    top2 = groups.topk(2, dim=1).values                                       # (P, 2)
    best = groups.argmax(dim=1, keepdim=True)                                 # (P, 1) first maximum
    gain = (top2[:, :1] - top2[:, 1:]) / (groups.std(dim=1, keepdim=True) + GRPO_STD_EPS)
    return torch.zeros_like(groups).scatter(1, best, gain).view(-1)


ADVANTAGES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "grpo_passk": passk_advantages,
}
