"""DAPO's dynamic sampling (arXiv 2503.14476 §3.2), as two small pure functions.

A group whose rewards are all equal has zero advantage, hence no gradient when β = 0. DAPO
over-samples: it keeps rolling out fresh prompts, drops such groups, and trains on the first
`prompts_per_step` groups that have a reward spread. The loop in aha/train.py rolls out one
batch of prompts per try, concatenates the tries with `concat_rollouts`, and picks the groups
to train on with `kept_groups`.

Departure: DAPO samples without bound; here `max_sampling_tries` bounds the tries, and a step
that still lacks groups trains on what it has (possibly nothing).
"""

import torch
from torch import Tensor

from aha.rollout import concat_rollouts  # noqa: F401  (re-exported: dynamic sampling concatenates tries)


def group_spread(rewards: Tensor, group_size: int) -> Tensor:
    """(P,) bool: does group p (rows p·G … p·G+G−1 of rewards (N,)) hold two different rewards?"""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 0


def kept_groups(spread: Tensor, wanted: int) -> Tensor:
    """(P,) bool: the first `wanted` groups with a reward spread, in sampling order.

    >>> kept_groups(torch.tensor([True, False, True, True]), 2).tolist()
    [True, False, True, False]
    """
    return spread & (spread.long().cumsum(dim=0) <= wanted)
