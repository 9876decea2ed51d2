"""DAPO's dynamic sampling (arXiv 2503.14476 §3.2), as two small pure functions.

A group whose rewards are all equal has zero advantage, hence no gradient when β = 0. DAPO
over-samples: it keeps rolling out fresh prompts, drops such groups, and trains on the first
`prompts_per_step` groups that have a spread in `dynamic_sampling_metric`: accuracy by default,
as DAPO and verl (`filter_groups.metric=acc`) do, so that with a format or overlong term a group
of answers that are all wrong but differ in length or form is not counted as informative
("reward", the weighted total, is the other choice). The loop in aha/core/train.py rolls out one
batch of prompts per try, concatenates the tries with `concat_rollouts`, and picks the groups
to train on with `kept_groups`.

Departure: DAPO samples without bound; here `max_sampling_tries` bounds the tries, and a step
that still lacks groups trains on what it has (possibly nothing).
"""

import torch
from torch import Tensor

from aha.core.rollout import concat_rollouts  # noqa: F401  (re-exported: dynamic sampling concatenates tries)


def group_spread(rewards: Tensor, group_size: int) -> Tensor:
    """(P,) bool: does group p (rows p·G … p·G+G−1 of rewards (N,)) hold two different rewards?"""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 0


def filter_values(scores: list[dict], rewards: Tensor, metric: str) -> Tensor:
    """(N,) what the filter compares within each group: one reward component by name (DAPO and
    verl's `filter_groups.metric=acc` use accuracy), or "reward", the weighted total.

    >>> scores = [{"accuracy": 0.0, "format": 1.0}, {"accuracy": 0.0, "format": 0.0}]
    >>> filter_values(scores, torch.tensor([0.1, 0.0]), "accuracy").tolist()
    [0.0, 0.0]
    """
    return rewards if metric == "reward" else torch.tensor([float(s.get(metric, 0.0)) for s in scores])


def kept_groups(spread: Tensor, wanted: int) -> Tensor:
    """(P,) bool: the first `wanted` groups with a reward spread, in sampling order.

    >>> kept_groups(torch.tensor([True, False, True, True]), 2).tolist()
    [True, False, True, False]
    """
    return spread & (spread.long().cumsum(dim=0) <= wanted)
