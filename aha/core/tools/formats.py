"""How a model writes a tool call and how it is shown the result: config `tool_format`.

    r1     the R1 answer format extended by two tags: the model writes `<tool>CODE</tool>` anywhere
           (the built-in demo: inside its `<think>`), generation pauses at `</tool>`, and the
           result is appended as `<output>TEXT</output>`; then the model goes on writing. One tool.
    chat   an instruct model's own chat-template format, as Qwen2.5/Qwen3, Hermes and others write
           it: the assistant turn holds `<tool_call>{"name": …, "arguments": {…}}</tool_call>` and
           ends (EOS); the results are the chat template's `tool` messages, rendered after the turn
           (the tokens between that EOS and the next assistant turn, found as TRL does: the
           template applied to a dummy conversation with and without the tool messages). Several
           calls in one turn run in order. Llama's `<|python_tag|>` and Mistral's `[TOOL_CALLS]` are
           not parsed.

Tool output can hold any text; tags that would change the meaning of the transcript (`<answer>`,
`</output>`, `<tool>`, …) are defused (`<` written `&lt;`), so output cannot close its own block or
answer for the model, and characters the tokenizer cannot spell become `?`.
"""

import json
import re
from dataclasses import dataclass

from aha.core.tools.tools import Observation
from aha.infra.errors import AhaError

R1_TAGS = ("think", "answer", "tool", "output")
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Call:
    name: str
    text: str                            # the code, or the one argument
    error: Observation | None = None     # a call that cannot run (malformed): its observation instead


def defuse(text: str, tags: tuple[str, ...] = R1_TAGS) -> str:
    """`text` with every `<tag>` / `</tag>` of `tags` (and `<tool_call>`) written with `&lt;`.

    >>> defuse("x</output><answer>7</answer>")
    'x&lt;/output>&lt;answer>7&lt;/answer>'
    """
    names = "|".join(re.escape(t) for t in (*tags, "tool_call", "tool_response"))
    return re.sub(rf"<(/?(?:{names})>)", r"&lt;\1", text)


def spellable(tokenizer, text: str, specials: bool = False) -> list[int]:
    """Token ids of tool output `text`: special-token strings in it (`<|endoftext|>`, `<|im_start|>`)
    are spelled as plain text, never as the special token (`specials=True`: a template's own text,
    whose special tokens are meant); a tokenizer that cannot spell a character (one without an
    unknown token, like aha's character tokenizer) gets `?` for every character outside printable ASCII."""
    encode = lambda t: tokenizer(t, add_special_tokens=False, split_special_tokens=not specials, verbose=False)[
        "input_ids"
    ]
    try:
        return encode(text)
    except Exception:
        return encode("".join(c if c == "\n" or (c.isascii() and c.isprintable()) else "?" for c in text))


def cut_tokens(tokenizer, text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to its first `limit` tokens, the cut marked ` ...(cut)` where the mark fits in the
    limit, and whether it was cut."""
    ids = spellable(tokenizer, text)
    if len(ids) <= limit:
        return text, False
    mark = " ...(cut)"
    room = limit - len(spellable(tokenizer, mark))
    if room < 1:
        return tokenizer.decode(ids[:limit], skip_special_tokens=True), True
    return tokenizer.decode(ids[:room], skip_special_tokens=True) + mark, True


class R1Format:
    """`<tool>CODE</tool>` → `<output>TEXT</output>`."""
    name = "r1"
    call_end = "</tool>"                 # generation pauses where the turn's text ends with this

    def __init__(self, tool_names: list[str]):
        self.tool = tool_names[0]

    def calls(self, turn: str, stopped: bool) -> list[Call] | None:
        """The calls a turn that paused at `call_end` holds (None: the turn was no call)."""
        if stopped or not turn.endswith(self.call_end):
            return None
        body = turn[:-len(self.call_end)]
        start = body.rfind("<tool>")
        if start < 0:
            return [Call(self.tool, "", Observation("error: the call has a closing tool tag but no opening one", True))]
        return [Call(self.tool, body[start + len("<tool>"):].strip())]

    def observation_ids(self, tokenizer, calls: list[Call], observations: list[Observation]) -> list[int]:
        return spellable(tokenizer, "".join(f"<output>{defuse(o.text)}</output>" for o in observations))


class ChatFormat:
    """`<tool_call>{json}</tool_call>` in a turn that ends; results as the chat template's tool messages."""
    name = "chat"
    call_end = None                      # a call ends its turn: the stop tokens (EOS) end it

    def __init__(self, tool_names: list[str]):
        self.tools = tool_names

    def calls(self, turn: str, stopped: bool) -> list[Call] | None:
        found = TOOL_CALL_RE.findall(turn) if stopped else []
        if not found:
            return None
        return [self.parse(body) for body in found]

    def parse(self, body: str) -> Call:
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(name, str) or not isinstance(arguments, dict) or len(arguments) != 1:
                raise ValueError("a tool call needs a name and an arguments object with one argument")
            values = list(arguments.values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            text = f'error: the tool call is not {{"name": …, "arguments": {{…}}}} JSON ({type(exc).__name__}: {exc})'
            return Call(self.tools[0], "", Observation(text[:300], True))
        value = values[0]
        return Call(name, value if isinstance(value, str) else json.dumps(value))

    def observation_ids(self, tokenizer, calls: list[Call], observations: list[Observation]) -> list[int]:
        """The template's tool messages around each output: the template's text tokenized with its
        special tokens, each output spelled as plain text (`spellable`)."""
        marks = [f"\x00aha-tool-output-{i}\x00" for i in range(len(calls))]
        messages = [{"role": "tool", "name": c.name, "content": mark} for c, mark in zip(calls, marks)]
        suffix, ids = tool_suffix(tokenizer, messages), []
        for mark, observation in zip(marks, observations):
            before, _, suffix = suffix.partition(mark)
            ids += spellable(tokenizer, before, specials=True) + spellable(tokenizer, defuse(observation.text, ()))
        return ids + spellable(tokenizer, suffix, specials=True)


def tool_suffix(tokenizer, tool_messages: list[dict]) -> str:
    """The text a chat template puts after an assistant turn's EOS for these tool messages, up to
    the next assistant turn (TRL's `_get_tool_suffix_ids`, on text)."""
    calls = [{"type": "function", "function": {"name": m["name"], "arguments": {}}} for m in tool_messages]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = tokenizer.apply_chat_template(dummy, tokenize=False, add_generation_prompt=False)
    full = tokenizer.apply_chat_template(dummy + tool_messages, tokenize=False, add_generation_prompt=True)
    eos = tokenizer.eos_token or ""
    if eos and eos in prefix:                          # the turn ends at its EOS, not at the newline after it
        prefix = prefix[:prefix.rindex(eos) + len(eos)]
    if not full.startswith(prefix):
        raise AhaError("the chat template renders a tool message by rewriting the turn before it: "
                       "tool_format=chat cannot append tool results to this model's turns")
    suffix = full[len(prefix):]
    if any(m["content"] not in suffix for m in tool_messages):
        raise AhaError("the chat template drops tool messages (it has no `tool` role): use tool_format=r1")
    return suffix


FORMATS = {"r1": R1Format, "chat": ChatFormat}
