"""The tool loop for live generation: `aha chat` and `aha serve` run a model's tool calls as training did.

    runner = ToolRunner.from_config(cfg)               # or tool_runner(run_dir, "python")
    handle = ToolSession(engine, runner, prompt_ids, GenerationParams(max_tokens=256, n=2))
    handle.get() / await handle.aget() / handle.cancel()          # the Request API of aha/serve/engine.py

Each of a request's `n` sequences is an interaction of turns on the continuous-batching engine
(aha/serve/engine.py), driven by a thread of its own: a turn is one engine request that ends after the
call format's `</tool>` (tool_format=r1), or at the model's EOS (tool_format=chat, whose calls are
`<tool_call>` JSON in the turn). A turn that holds a call runs it (the sandboxed python tool, your
`py:` function, or an `env:` environment, aha/core/tools/tools.py), streams its result as an event of
kind "tool", and submits the next turn: the context so far (prompt + the turn's tokens + the
result's tokens, exactly what aha/core/tools/interact.py builds in training) as a new prompt, so the
other requests keep decoding meanwhile. Up to `max_turns` calls; `max_tokens` bounds the whole
interaction, tool output included, as `max_new_tokens` does in training.

Events are the engine's: text deltas, then one final event per sequence with `finish_reason`
("stop", "length", "error") and the model's own tokens in `completion_tokens` (tool output is not
counted: it is not the model's). Sampling seeds: turn k of sequence i samples from
`turn_seed(seed + i, k)`, so a fixed `seed` gives the same interaction again.
"""

import itertools
import queue
import threading
from dataclasses import dataclass, replace

from aha.core.tools.formats import FORMATS, cut_tokens
from aha.core.tools.interact import turn_seed
from aha.core.tools.tools import Observation, Toolbox, get_toolbox
from aha.serve.engine import Event, GenerationParams, Request


@dataclass(frozen=True)
class ToolRunner:
    """The tools a live model may call, and how it calls them."""
    toolbox: Toolbox
    call_format: str = "r1"
    max_turns: int = 4
    output_tokens: int = 64

    @classmethod
    def from_config(cls, cfg, tools: str | None = None) -> "ToolRunner":
        """A run's tool settings (aha/infra/config.py Config), `tools` replacing its `tools` key."""
        return cls(
            get_toolbox(tools or cfg.tools, cfg.tool_timeout), cfg.tool_format, cfg.max_turns, cfg.tool_output_tokens
        )

    @property
    def format(self):
        return FORMATS[self.call_format](self.toolbox.names)

    def schemas(self) -> list[dict] | None:
        """The function schemas a chat template lists for the model (tool_format=chat), else None."""
        return self.toolbox.schemas() if self.call_format == "chat" else None


def tool_runner(path, tools: str | None = None) -> ToolRunner | None:
    """The tool loop for a run folder or model dir: `tools` ("none": no tools), else the tools the run
    trained with (the tool keys of its config.yaml), else None."""
    from pathlib import Path

    from aha.core.tools import CONFIG_KEYS, validate
    from aha.infra.config import Config
    from aha.infra.reader import read_yaml_mapping
    if tools == "none":
        return None
    path = Path(path)
    saved = next((f for f in (path / "config.yaml", path.parent / "config.yaml")
                  if f.is_file() and (f.parent / "model" / "config.json").is_file()), None)
    keys = {k: v for k, v in (read_yaml_mapping(saved) if saved else {}).items() if k in CONFIG_KEYS}
    cfg = Config(**(keys | ({"tools": tools} if tools else {})))
    if not cfg.tools:
        return None
    validate(cfg)
    return ToolRunner.from_config(cfg)


def run_calls(episode, calls: list, tokenizer, output_tokens: int) -> list[Observation]:
    """Each call's observation, cut to `output_tokens` tokens: a tool that raises is an observation too."""
    observations = []
    for call in calls:
        if call.error is not None:
            observations.append(call.error)
            continue
        try:
            observation = episode.call(call.name, call.text)
        except Exception as exc:
            observation = Observation(f"error: {type(exc).__name__}: {exc}"[:300], True)
        text, cut = cut_tokens(tokenizer, observation.text, output_tokens)
        observations.append(Observation(text, observation.error or cut))
    return observations


class ToolSession:
    """One request whose sequences may call tools; the handle API of aha/serve/engine.py's Request."""

    def __init__(self, engine, runner: ToolRunner, prompt_ids: list[int], params: GenerationParams, loop=None):
        self.engine, self.runner, self.params = engine, runner, params
        self.format = runner.format
        self._out = Request(list(prompt_ids), params, loop)
        self._turns: list[Request | None] = [None] * params.n
        self._lock = threading.Lock()
        prompt = engine.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        self._threads = [
            threading.Thread(
                target=self._guarded,
                args=(i, list(prompt_ids), runner.toolbox.episode(prompt)),
                name=f"aha-tools-{i}",
                daemon=True,
            )
            for i in range(params.n)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def cancelled(self) -> threading.Event:
        return self._out.cancelled

    def cancel(self) -> None:
        self._out.cancel()
        with self._lock:
            for turn in self._turns:
                if turn is not None:
                    turn.cancel()

    def get(self, timeout: float | None = None) -> Event:
        return self._out.get(timeout)

    async def aget(self) -> Event:
        return await self._out.aget()

    def _guarded(self, index: int, context: list[int], episode) -> None:
        try:
            self._drive(index, context, episode)
        except Exception as exc:          # a bug, or a tool past its guard: this sequence fails, the server goes on
            self._out.push(Event(index, finish_reason="error", error=f"{type(exc).__name__}: {exc}"[:300]))

    def _drive(self, index: int, context: list[int], episode) -> None:
        """Sequence `index`, turn after turn, until a turn holds no call or the budget is spent."""
        tokenizer, p = self.engine.tokenizer, self.params
        budget, own, calls = p.max_tokens, 0, 0
        for turn in itertools.count():       # ends: a turn without a call, or after max_turns calls
            room = min(budget, self.engine.max_context - len(context))
            if room < 1:
                return self._out.push(Event(index, finish_reason="length", completion_tokens=own))
            may_call = calls < self.runner.max_turns
            end = (self.format.call_end,) if may_call and self.format.call_end else ()
            turn_params = replace(p, n=1, max_tokens=room, end=end,
                                  seed=None if p.seed is None else turn_seed(p.seed + index, turn))
            final, text = self._turn(index, context, turn_params)
            if final is None:                                     # cancelled
                return
            own += final.completion_tokens
            budget -= final.completion_tokens
            context += list(final.token_ids)
            stopped = final.finish_reason == "stop" and not (end and text.endswith(end[0]))
            found = self.format.calls(text, stopped) if may_call and final.finish_reason != "error" else None
            if not found or budget < 1:
                return self._out.push(replace(final, index=index, text="", completion_tokens=own, token_ids=()))
            observations = run_calls(episode, found, tokenizer, self.runner.output_tokens)
            ids = self.format.observation_ids(tokenizer, found, observations)[:budget]
            calls += len(found)
            budget -= len(ids)
            context += ids
            self._out.push(Event(index, shown(self.format, tokenizer, ids, observations), kind="tool"))

    def _turn(self, index: int, context: list[int], params: GenerationParams) -> tuple[Event | None, str]:
        """One engine request, its text relayed as it comes: (the final event, or None when cancelled; the text)."""
        text = ""
        with self._lock:
            if self._out.cancelled.is_set():
                return None, text
            handle = self._turns[index] = self.engine.submit(context, params)
        try:
            while True:
                try:
                    event = handle.get(timeout=0.1)
                except queue.Empty:
                    if self._out.cancelled.is_set():
                        return None, text
                    continue
                if event.text:
                    text += event.text
                    self._out.push(Event(index, event.text))
                if event.finish_reason:
                    return event, text
        finally:
            handle.cancel()


def shown(call_format, tokenizer, ids: list[int], observations: list[Observation]) -> str:
    """A tool result as the user sees it: the R1 format's exact `<output>…</output>`; the chat
    format's results as `<tool_response>` blocks (its template's role markers are special tokens)."""
    if call_format.name == "r1":
        return tokenizer.decode(ids, skip_special_tokens=True)
    return "".join(f"\n<tool_response>{o.text}</tool_response>\n" for o in observations)
