"""Split a completion into its thinking (`reasoning_content`) and its answer (`content`).

R1-style models write `<think> … </think> <answer> … </answer>`; real chat models (Qwen3,
DeepSeek-R1 distills) write `<think> … </think>` and then a plain answer, and some chat templates
end the prompt with `<think>` so the completion only *closes* the block (`in_reasoning=True`).
The rules, the same for whole texts and for streams:

- text inside `<think> … </think>` is reasoning; everything else is content;
- `<answer>` also ends an unclosed think block (small RL models often skip `</think>`);
- the four tags themselves are never emitted, and each channel is stripped of leading and
  trailing whitespace;
- reasoning is None when the model never opened a think block.

`ReasoningSplitter` does this incrementally on text deltas: a tag split across deltas (`"</thi"`,
`"nk>"`) is held back until it is complete, and trailing whitespace is held back until more text
follows, so the concatenated deltas equal `split_reasoning` of the whole text.
"""

from typing import Literal

Channel = Literal["reasoning", "content"]
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some tag (0 if none)."""
    start = text.rfind("<", max(0, len(text) - max(len(t) for t in TAGS) + 1))
    if start < 0:
        return 0
    tail = text[start:]
    return len(tail) if any(t.startswith(tail) and t != tail for t in TAGS) else 0


class ReasoningSplitter:
    """Feed text deltas, get (channel, text) deltas; call `finish()` once at the end."""

    def __init__(self, in_reasoning: bool = False):
        self.channel: Channel = "reasoning" if in_reasoning else "content"
        self.thought = in_reasoning        # a think block was opened (reasoning is not None)
        self._buffer = ""                  # unclassified text: may be the start of a tag
        self._started = {"reasoning": False, "content": False}
        self._pending_space = {"reasoning": "", "content": ""}

    def feed(self, text: str) -> list[tuple[Channel, str]]:
        self._buffer += text
        out: list[tuple[Channel, str]] = []
        while True:
            found = [(self._buffer.find(t), t) for t in TAGS if t in self._buffer]
            if not found:
                break
            at, tag = min(found)
            self._emit(self._buffer[:at], out)
            self._buffer = self._buffer[at + len(tag):]
            self._on_tag(tag)
        keep = _partial_tag_length(self._buffer)
        self._emit(self._buffer[:len(self._buffer) - keep], out)
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return out

    def finish(self) -> list[tuple[Channel, str]]:
        """Flush what is held back: an incomplete tag at the very end is plain text."""
        out: list[tuple[Channel, str]] = []
        self._emit(self._buffer, out)
        self._buffer = ""
        return out

    def _on_tag(self, tag: str) -> None:
        if tag == THINK_OPEN:
            self.channel, self.thought = "reasoning", True
        elif tag == THINK_CLOSE or tag == ANSWER_OPEN:
            self.channel = "content"

    def _emit(self, text: str, out: list[tuple[Channel, str]]) -> None:
        channel = self.channel
        if not self._started[channel]:
            text = text.lstrip()
            if not text:
                return
            self._started[channel] = True
        body = text.rstrip()
        if not body:                       # only whitespace: hold it until something follows
            self._pending_space[channel] += text
            return
        piece = self._pending_space[channel] + body
        self._pending_space[channel] = text[len(body):]
        if out and out[-1][0] == channel:
            out[-1] = (channel, out[-1][1] + piece)
        else:
            out.append((channel, piece))


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning_content or None, content) of a whole completion."""
    splitter = ReasoningSplitter(in_reasoning)
    parts = {"reasoning": "", "content": ""}
    for channel, piece in splitter.feed(text) + splitter.finish():
        parts[channel] += piece
    return (parts["reasoning"] if splitter.thought else None), parts["content"]
