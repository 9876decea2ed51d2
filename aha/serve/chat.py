"""`aha chat RUN_OR_MODEL_DIR`: talk to a trained model in the terminal.

    aha chat runs/train [--hide-thinking] [--temperature 0.6] [--max-tokens 256] [--tools python|none]

Answers stream token by token: the thinking (`<think> … </think>`) dimmed, or hidden with
`--hide-thinking`, the answer in bold. The conversation is multi-turn: earlier turns go back to the
model through its chat template, answers only (DeepSeek's advice: thinking is not fed back), the
oldest turns dropped when the prompt would not fit the model's context. Ctrl-C stops the answer
being written (that turn is forgotten), not the session; /exit, /quit or Ctrl-D (EOF) quit,
/reset forgets the conversation. The dialogue goes to stdout, messages about it to stderr.
Defaults follow R1's sampling advice: temperature 0.6, top-p 0.95.

Tools: a run trained with tools (`tools=python`) calls them in chat too: each call runs as in
training (the sandboxed python tool, aha/serve/live_tools.py) and its result is shown on a line of its
own (`tool → …`), even with --hide-thinking; `--tools none` turns them off, `--tools SPEC` names
others.
"""

import queue
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from aha.serve.engine import Engine, GenerationParams, encode_chat, load_engine
from aha.serve.live_tools import ToolSession
from aha.serve.reasoning import ReasoningSplitter

HELP = "/exit or Ctrl-D quits, /reset forgets the conversation, Ctrl-C stops an answer"


@dataclass(frozen=True)
class ChatSettings:
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None
    show_thinking: bool = True


@dataclass(frozen=True)
class Reply:
    reasoning: str | None
    content: str
    finish_reason: str


def fit_prompt(
    engine: Engine, messages: list[dict], tools: list[dict] | None = None
) -> tuple[list[int], bool, list[dict]]:
    """Prompt ids for `messages`, dropping the oldest exchanges until the prompt leaves room to answer."""
    while True:
        ids, in_reasoning = encode_chat(engine.tokenizer, messages, tools)
        if len(ids) < engine.max_context or len(messages) <= 1:
            return ids, in_reasoning, messages
        messages = messages[2:] if len(messages) > 2 else messages[1:]


def run_turn(engine: Engine, messages: list[dict], settings: ChatSettings, out: Console, runner=None) -> Reply:
    """Stream one answer to `out`, running its tool calls with `runner` (aha/serve/live_tools.py); KeyboardInterrupt
    cancels the generation and propagates."""
    ids, in_reasoning, _ = fit_prompt(engine, messages, runner.schemas() if runner else None)
    if len(ids) >= engine.max_context:
        out.print(f"[red](the message is too long: {len(ids)} tokens; the model's context is {engine.max_context})[/]")
        return Reply(None, "", "too_long")
    params = GenerationParams(max_tokens=max(1, min(settings.max_tokens, engine.max_context - len(ids))),
                              temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
    handle = ToolSession(engine, runner, ids, params) if runner else engine.submit(ids, params)
    splitter = ReasoningSplitter(in_reasoning)
    parts = {"reasoning": "", "content": ""}
    shown = None                           # the channel being written on screen
    try:
        while True:
            try:
                event = handle.get(timeout=0.1)   # short waits: Ctrl-C gets through promptly
            except queue.Empty:
                continue
            pieces = splitter.feed(event.text) + (splitter.finish() if event.finish_reason else [])
            for channel, text in pieces:
                parts[channel] += text
                if event.kind == "tool":
                    shown = show_tool(out, text, shown)
                else:
                    shown = show(out, channel, text, shown, settings.show_thinking)
            if event.finish_reason:
                break
    finally:
        handle.cancel()
    out.print()
    if event.error:
        out.print(f"[red](generation failed: {event.error})[/]")
    elif event.finish_reason == "length":
        out.print("[dim](cut at --max-tokens)[/]")
    return Reply(parts["reasoning"] if splitter.thought else None, parts["content"], event.finish_reason)


def show(out: Console, channel: str, text: str, shown: str | None, show_thinking: bool) -> str:
    """Print a piece of the reply; returns the channel now on screen."""
    if channel == "reasoning":
        if shown != "reasoning":
            out.print("[dim italic]thinking:[/] " if show_thinking else "[dim italic](thinking…)[/]", end="")
        if show_thinking:
            out.print(text, style="dim", end="", markup=False, highlight=False)
        return "reasoning"
    if shown == "reasoning":
        out.print()
    out.print(text, style="bold green", end="", markup=False, highlight=False)
    return "content"


def show_tool(out: Console, text: str, shown: str | None) -> None:
    """A tool's result, on a line of its own whatever is hidden: the user sees what the model was told."""
    if shown is not None:
        out.print()
    out.print(f"[yellow]tool →[/] {escape(text.strip())}")
    return None


def chat_loop(engine: Engine, settings: ChatSettings, read_line: Callable[[], str], out: Console,
              runner=None) -> list[dict]:
    """The conversation until /exit or EOF; returns the history kept."""
    messages: list[dict] = []
    while True:
        try:
            line = read_line().strip()
        except EOFError:
            out.print()
            return messages
        except KeyboardInterrupt:
            out.print(f"\n[dim]({HELP})[/]")
            continue
        if line in ("/exit", "/quit"):
            return messages
        if line == "/reset":
            messages = []
            out.print("[dim](conversation forgotten)[/]")
            continue
        if not line:
            continue
        turn = messages + [{"role": "user", "content": line}]
        try:
            reply = run_turn(engine, turn, settings, out, runner)
        except KeyboardInterrupt:
            out.print("\n[dim](stopped; this turn is forgotten)[/]")
            continue
        if reply.finish_reason in ("error", "too_long"):
            continue
        messages = turn + [{"role": "assistant", "content": reply.content}]


def add_chat_parser(subparsers) -> None:
    d = ChatSettings()
    p = subparsers.add_parser("chat", help="chat with a trained model in the terminal, thinking shown dimmed",
                              description="Multi-turn chat with a trained model; answers stream token by token, "
                                          f"the thinking dimmed (or hidden). {HELP}.")
    p.add_argument("model", metavar="RUN_OR_MODEL_DIR", help="a run folder (with model/) or a transformers model dir")
    p.add_argument("--hide-thinking", action="store_true", help="do not show the text inside <think> … </think>")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="longest answer (default: %(default)s)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--device", help="cpu, cuda or mps (default: detected)")
    p.add_argument("--tools", help="run the model's tool calls: python, py:module:function, env:module:Class, or none "
                                   "(default: the tools the run trained with)")
    p.set_defaults(handler=cmd_chat)


def model_summary(path: str) -> str:
    """": " + the model card's one-line summary (aha/infra/card.py), or "" for a model without one."""
    from aha.infra.card import summary
    from aha.infra.model import resolve_model_dir
    line = summary(resolve_model_dir(path))
    return f": {line}" if line else ""


def cmd_chat(args, console: Console) -> None:
    from aha.infra.errors import AhaError
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
        raise AhaError("need --temperature >= 0, 0 < --top-p <= 1 and --max-tokens >= 1")
    settings = ChatSettings(args.temperature, args.top_p, args.max_tokens, args.seed, not args.hide_thinking)
    from aha.serve.live_tools import tool_runner
    runner = tool_runner(args.model, args.tools)
    engine = load_engine(args.model, args.device, max_batch=1).start()
    out = Console(highlight=False)
    console.print(f"[dim]chatting with {escape(args.model + model_summary(args.model))} ({HELP})[/]")
    if runner:
        console.print(
            f"[dim]tools: {escape(runner.toolbox.spec)} ({runner.call_format} format, up to {runner.max_turns} "
            "calls an answer; --tools none turns them off)[/]"
        )
    try:
        chat_loop(engine, settings, lambda: out.input("[bold cyan]you>[/] "), out, runner)
    finally:
        engine.stop()
