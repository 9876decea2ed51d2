"""Learning-rate schedules: a factor of `lr` for each RL step.

    lr_schedule=constant|linear|cosine warmup_steps=N     (aha train key=value)

Linear warm-up from lr/(N+1) over the first N steps, then constant, linear decay to 0, or cosine
decay to 0 at the last step — TRL's and transformers' schedules, one step per RL step (not per
inner μ update). aha/core/train.py sets the optimizer's lr from `lr_factor(step)` at the start of each
step, with no scheduler object: a step that makes no optimizer step (every advantage 0) still
advances the schedule, without torch's "lr_scheduler.step() before optimizer.step()" warning, and
a resumed run needs no scheduler state to continue exactly.
"""

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant") -> float:
    """The factor of the base lr at RL step `step` (0-based) of `total`.

    >>> [lr_factor(s, 10, warmup=2) for s in (0, 1, 2, 9)]
    [0.3333333333333333, 0.6666666666666666, 1.0, 1.0]
    >>> [round(lr_factor(s, 5, schedule="cosine"), 3) for s in range(5)]
    [1.0, 0.854, 0.5, 0.146, 0.0]
    >>> [round(lr_factor(s, 4, schedule="linear"), 3) for s in range(4)]
    [1.0, 0.667, 0.333, 0.0]
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup - 1)
    progress = min(progress, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
