"""The tools a model may call mid-rollout, chosen by the config key `tools`:

    python                 the built-in tool: the call is Python code, run in aha/tasks/sandbox.py (a fresh
                           sandboxed process per call: namespaces, rlimits, `tool_timeout` wall and CPU
                           seconds, output cap); like a notebook cell, the value of a last expression
                           is printed, so `<tool>4821*397</tool>` shows `1913937`
    py:module:function     your function, text in → text out (`def search(query: str) -> str`); it runs
                           in the trainer's process, in a worker thread: trusted code, with no timeout
    env:module:Class       an environment in the spirit of TRL's `environment_factory`: one instance
                           per sample; `reset(prompt: str)` when the sample starts, `step(call: str) ->
                           str` for each call, and optionally `reward() -> float` when it ends, which
                           becomes the reward component `env` (weight 1 unless `reward_weights` says)

A call that fails — an exception, a timeout, a crash, output past the cap, output that is not
UTF-8 — is never an exception in the trainer: it becomes an `Observation` with `error=True` whose
text says what happened in one line (`error: ZeroDivisionError: division by zero`,
`error: timed out after 5 s`, …), which the model reads like any other output.
"""

import math
from dataclasses import dataclass
from typing import Protocol

from aha.infra.errors import AhaError

# the python tool prints the value of the last expression, as a notebook cell does; its own errors
# (a syntax error, an exception) end in a traceback whose last line is the message
REPL = """import ast as _ast
_tree = _ast.parse({code!r}, "<tool>")
_last = _tree.body.pop() if _tree.body and isinstance(_tree.body[-1], _ast.Expr) else None
exec(compile(_tree, "<tool>", "exec"))
if _last is not None:
    _value = eval(compile(_ast.Expression(_last.value), "<tool>", "eval"))
    if _value is not None:
        print(repr(_value))
"""


@dataclass(frozen=True)
class Observation:
    text: str           # what the model is shown (the call format wraps it, aha/core/tools/formats.py)
    error: bool = False  # the call failed: the text says how


class Episode(Protocol):
    """The tools as one sample sees them, from its start to its end."""

    def call(self, name: str, text: str) -> Observation: ...
    def reward(self) -> float | None: ...


def first_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


def sandbox_observation(result, timeout_s: float, max_bytes: int) -> Observation:
    """An Observation from an aha.tasks.sandbox.SandboxResult: the output, or one line naming the failure."""
    output = result.stdout.rstrip("\n")
    if result.timed_out:
        return Observation(f"{output}\nerror: timed out after {timeout_s:g} s".lstrip("\n"), True)
    if result.killed_reason == "output_limit":
        return Observation(f"{output[:max_bytes]}\nerror: output cut at {max_bytes} bytes", True)
    if result.killed_reason and result.killed_reason.startswith("signal"):
        what = (
            "the CPU limit"
            if "SIGXCPU" in result.killed_reason or "SIGKILL" in result.killed_reason
            else result.killed_reason
        )
        return Observation(f"{output}\nerror: killed by {what}".lstrip("\n"), True)
    if result.returncode != 0:
        message = first_line(result.stderr) or f"exit status {result.returncode}"
        return Observation(f"{output}\nerror: {message}".lstrip("\n"), True)
    if "\ufffd" in output:
        return Observation(f"{output}\nerror: the output is not UTF-8 (undecodable bytes shown as \ufffd)", True)
    return Observation(output)


@dataclass(frozen=True)
class PythonTool:
    """Model-written code in aha/tasks/sandbox.py; identical code in one rollout runs once (`stateless`)."""
    timeout_s: float = 5.0
    max_output_bytes: int = 4096
    memory_mb: int = 512
    name: str = "python"
    description: str = (
        "Run Python code in a sandbox and see what it prints (the value of a last expression is printed)."
    )
    stateless: bool = True

    def run(self, code: str) -> Observation:
        from aha.tasks.sandbox import run_python
        try:
            result = run_python(
                REPL.format(code=code),
                timeout_s=self.timeout_s,
                cpu_s=max(1, math.ceil(self.timeout_s)),
                memory_mb=self.memory_mb,
                max_output_bytes=self.max_output_bytes,
            )
        except Exception as exc:         # the sandbox itself failed (setup, resources): tell the model, keep going
            return Observation(f"error: the sandbox failed: {type(exc).__name__}: {first_line(str(exc))}", True)
        return sandbox_observation(result, self.timeout_s, self.max_output_bytes)


@dataclass(frozen=True)
class FunctionTool:
    """`py:module:function`: a str → str function of yours."""
    function: object
    name: str
    description: str = ""
    stateless: bool = True

    def run(self, text: str) -> Observation:
        try:
            value = self.function(text)
        except Exception as exc:
            return Observation(f"error: {type(exc).__name__}: {first_line(str(exc))}", True)
        return Observation(value if isinstance(value, str) else str(value))


class Stateless:
    """The episode of stateless tools: every call goes to the named tool; no reward."""

    def __init__(self, tools: dict):
        self.tools = tools

    def call(self, name: str, text: str) -> Observation:
        tool = self.tools.get(name)
        if tool is None:
            return Observation(f"error: there is no tool {name!r}; the tools are {', '.join(self.tools)}", True)
        return tool.run(text)

    def reward(self) -> float | None:
        return None


class EnvironmentEpisode:
    """One instance of an `env:module:Class` environment, for one sample."""

    def __init__(self, factory, spec: str, prompt: str):
        self.spec = spec
        try:
            self.env = factory()
            self.env.reset(prompt)
        except Exception as exc:
            raise AhaError(f"tools=env:{spec}: creating or resetting the environment raised "
                           f"{type(exc).__name__}: {first_line(str(exc))}") from exc

    def call(self, name: str, text: str) -> Observation:
        try:
            value = self.env.step(text)
        except Exception as exc:
            return Observation(f"error: {type(exc).__name__}: {first_line(str(exc))}", True)
        return Observation(value if isinstance(value, str) else str(value))

    def reward(self) -> float | None:
        get = getattr(self.env, "reward", None)
        if get is None:
            return None
        try:
            value = float(get())
        except Exception as exc:
            raise AhaError(f"tools=env:{self.spec}: reward() raised or returned no number: "
                           f"{type(exc).__name__}: {first_line(str(exc))}") from exc
        if not math.isfinite(value):
            raise AhaError(f"tools=env:{self.spec}: reward() returned {value}; return a finite float")
        return value


@dataclass
class Toolbox:
    """The configured tools: `names` for the call formats, `episode(prompt)` for each sample."""
    spec: str
    tools: dict                 # name → tool (stateless), or {} for an environment
    factory: object = None      # env:module:Class
    name: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.tools) or [self.name]

    @property
    def stateless(self) -> bool:
        return self.factory is None

    def episode(self, prompt: str) -> Episode:
        return (
            Stateless(self.tools) if self.factory is None else EnvironmentEpisode(self.factory, self.spec[4:], prompt)
        )

    def schemas(self) -> list[dict]:
        """OpenAI-style function schemas (one string argument each), for chat templates that list tools."""
        argument = {"python": "code"}
        described = {name: getattr(tool, "description", "") for name, tool in self.tools.items()} or {self.name: ""}
        return [{"type": "function", "function": {
            "name": name, "description": text,
            "parameters": {"type": "object", "properties": {argument.get(name, "input"): {"type": "string"}},
                           "required": [argument.get(name, "input")]}}} for name, text in described.items()]


def get_toolbox(spec: str, timeout_s: float = 5.0, max_output_bytes: int = 4096) -> Toolbox:
    """The tools of a `tools` config value: `python`, `py:module:function`, `env:module:Class`,
    or several stateless ones separated by commas (`python,py:my_tools:search`)."""
    from aha.tasks.custom import load_function
    if spec.startswith("env:"):
        factory = load_function(spec[4:])
        for method in ("reset", "step"):
            if not callable(getattr(factory, method, None)):
                raise AhaError(f"tools={spec}: the environment class has no {method}() method; it needs reset(prompt) "
                               "and step(call) -> str (reward() -> float is optional)")
        return Toolbox(spec, {}, factory, name=getattr(factory, "__name__", "env").lower())
    tools = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "python":
            tool = PythonTool(timeout_s=timeout_s, max_output_bytes=max_output_bytes)
        elif part.startswith("py:"):
            function = load_function(part[3:])
            tool = FunctionTool(function, getattr(function, "__name__", part.rsplit(":", 1)[-1]),
                                first_line(function.__doc__ or ""))
        else:
            raise AhaError(f"tools={spec}: {part!r} is not a tool; use python, py:module:function or env:module:Class")
        if tool.name in tools:
            raise AhaError(f"tools={spec}: two tools are named {tool.name!r}")
        tools[tool.name] = tool
    if not tools:
        raise AhaError(f"tools={spec!r} names no tool; use python, py:module:function or env:module:Class")
    return Toolbox(spec, tools)
