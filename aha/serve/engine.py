"""A continuous-batching inference engine: many concurrent requests, one shared model.

Used by `aha serve` (aha/serve/server.py) and `aha chat` (aha/serve/chat.py). A background thread runs
`step()` in a loop; each step

1. admits waiting requests while the batch has room (`max_batch` sequences): their prompts are
   prefilled together (left-padded, one forward pass), each prompt's cache row is repeated for
   its `n` sequences, and the new rows are merged into the running batch's KV cache;
2. samples one token for every running sequence, each from its own seeded `torch.Generator`
   (one uniform per token for `aha.core.sampling.sample_next`'s inverse-CDF draw), and streams the new text to its
   request;
3. drops finished or cancelled sequences from the cache, and trims cache columns that are
   padding for every row left;
4. runs one decode forward pass for all remaining sequences together.

Trade-off: one `DynamicCache` holds the whole batch, so rows of different lengths are left-padded
to a common width and masked (positions are tracked per row, so RoPE sees true positions).
Admitting requests copies the cache once (pad + concatenate), and a long-running row keeps the
others padded to its width; in exchange every decode step is a single batched forward pass, and
a new request starts after one step instead of waiting for the running ones to finish (waves).
A paged cache (vLLM) avoids both copies and padding; it is not worth its code at this scale.

Text is decoded incrementally by decoding a sequence's whole token list and sending the new
suffix; text that may still change (a trailing U+FFFD of an incomplete multi-byte character, or
the start of a stop string) is held back. Two kinds of stop: a request's `stop` strings (OpenAI's
field) end the text *before* them, and the R1 answer's close `</answer>`, where this tokenizer
writes it as several tokens (`aha.core.rollout.stop_strings`; one token is a stop token already), ends
it *after* it: the tag stays in the text, as in training, for the reasoning splitter. A
request's `end` strings end it after them too (the tool loop's `</tool>`, aha/serve/live_tools.py), and
its final event carries the sampled token ids.
"""

import asyncio
import os
import queue
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from aha.core.cpu_linear import fast_layers, onednn_available, onednn_linears
from aha.core.decode_step import PaddedCacheKV, written_out_decoder
from aha.core.rollout import cache_kwarg, decode_mask, left_pad, ready_mask, stop_strings, stop_token_ids
from aha.core.sampling import SamplingParams, sample_next
from aha.infra.errors import AhaError


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()             # stop strings: generation ends before them
    end: tuple[str, ...] = ()              # end strings: generation ends after them (kept, as `</answer>`)
    n: int = 1                             # independent sequences for the same prompt
    seed: int | None = None                # sequence i samples from Generator(seed + i)


@dataclass(frozen=True)
class Event:
    """New text of sequence `index`; a final event carries `finish_reason` ("stop", "length", "error")."""
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # a final event's sampled tokens (the tool loop extends its context with them)
    kind: str = "text"                     # "text": the model's; "tool": a tool's output (aha/serve/live_tools.py)


class Request:
    """A handle on a submitted prompt: read its events, or cancel it (frees its batch rows)."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, loop: asyncio.AbstractEventLoop | None):
        self.prompt_ids, self.params, self._loop = prompt_ids, params, loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def get(self, timeout: float | None = None) -> Event:
        """Next event (thread API); raises queue.Empty after `timeout` seconds."""
        return self._queue.get(timeout=timeout)

    async def aget(self) -> Event:
        """Next event (asyncio API, for requests submitted with `loop=`)."""
        return await self._queue.get()

    def push(self, event: Event) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:               # the event loop is closed: nobody is listening
            self.cancel()


@dataclass
class Sequence:
    request: Request
    index: int
    generator: torch.Generator
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    sent: str = ""                         # text already pushed to the request


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def merge_caches(a: DynamicCache, b: DynamicCache, width: int) -> DynamicCache:
    """Rows of `a` then rows of `b`, each left-padded with zeros to `width` cached positions."""
    return DynamicCache(ddp_cache_data=[
        (torch.cat([_pad_left(la.keys, width, 2), _pad_left(lb.keys, width, 2)]),
         torch.cat([_pad_left(la.values, width, 2), _pad_left(lb.values, width, 2)]))
        for la, lb in zip(a.layers, b.layers)])


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still change or start a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


BF16_MIN_PARAMETERS = 16_000_000   # bf16 decoding pays from about here (measured: `decode_bf16`)


def decode_bf16(model) -> bool:
    """Whether the engine decodes with its matmuls in bf16: on a CPU with fast bf16 (AMX, AVX512-BF16;
    `cpu_has_fast_bf16`), an fp32 model of ≥ `BF16_MIN_PARAMETERS`, unless `AHA_AUTOCAST=off` (the
    switch that keeps training in fp32 keeps serving in fp32 too). Measured on an AMD EPYC with
    AVX512-BF16, 2 cores (`python bench/speed_probes_2026_12_06.py final MODEL`, three runs):
    SmolLM2-135M decodes one chat row in 25–29 ms a token in bf16 against 43–55 ms in fp32, but the
    1.6M built-in model slower in bf16 (1.41–1.59 against 1.12–1.32 ms: its matmuls are too small
    for bf16 to pay for the call)."""
    from aha.infra.model import count_parameters, cpu_has_fast_bf16
    parameter = next(model.parameters())
    return (os.environ.get("AHA_AUTOCAST", "auto") != "off" and parameter.device.type == "cpu"
            and parameter.dtype == torch.float32 and cpu_has_fast_bf16()
            and count_parameters(model) >= BF16_MIN_PARAMETERS)


class Engine:
    """Serve `submit`ted prompts from one model; call `start()` for the background thread.

    Each decode step runs the written-out step of aha/core/decode_step.py where the model has one
    (GPT-2, Llama, Qwen2 on SDPA; `PaddedCacheKV` over the engine's cache), else transformers'
    forward; `bf16` (default: `decode_bf16(model)`) puts its matmuls on bf16 copies of the weights,
    made once here, with attention, the cache and the sampling in fp32."""

    def __init__(self, model, tokenizer, max_batch: int = 64, bf16: bool | None = None):
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.bf16 = decode_bf16(model) if bf16 is None else bf16
        self._decoder = written_out_decoder(model, self.bf16) if ready_mask(model) else None
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.max_context = int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.end_strings = stop_strings(tokenizer)           # kept in the text, unlike a request's `stop`
        self._cache_kw = cache_kwarg(model)
        self._fast_layers = fast_layers(model) if onednn_available() else []     # found once, not at every step
        self._waiting: deque[Request] = deque()
        self._lock, self._wake, self._stopping = threading.Lock(), threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._reset_batch()

    def _reset_batch(self) -> None:
        self.rows: list[Sequence] = []
        self._cache = DynamicCache()
        self._attn = torch.zeros((0, 0), dtype=torch.long, device=self.device)   # (B, T) 1 on real tokens
        self._next_pos = torch.zeros((0, 1), dtype=torch.long, device=self.device)  # (B, 1)
        self._logits = torch.zeros((0, self.vocab_size), device=self.device)        # (B, V) next-token logits

    def submit(self, prompt_ids: list[int], params: GenerationParams, loop=None) -> Request:
        if not prompt_ids or len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens: it must have 1 to {self.max_context - 1}")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} is more than the batch holds ({self.max_batch})")
        request = Request(list(prompt_ids), params, loop)
        with self._lock:
            self._waiting.append(request)
        self._wake.set()
        return request

    def start(self) -> "Engine":
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="aha-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self.step()
            except Exception as exc:       # a bug or out of memory: fail the batch, keep serving
                traceback.print_exc(file=sys.stderr)
                for row in self.rows:
                    row.request.push(Event(row.index, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                self._reset_batch()
                busy = True
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, sample one token for each sequence, evict, decode. False when there was nothing to do.
        A large model's linear layers run through oneDNN on CPU, as in aha/core/rollout.py (aha/core/cpu_linear.py)."""
        with onednn_linears(self.model, self._fast_layers):
            return self._step()

    def _step(self) -> bool:
        self._admit()
        if not self.rows:
            return False
        tokens = self._sample()
        keep = [i for i, (row, tok) in enumerate(zip(self.rows, tokens.tolist())) if not self._advance(row, tok)]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._cache.batch_select_indices(index)
            self.rows = [self.rows[i] for i in keep]
            self._attn, self._next_pos, tokens = self._attn[index], self._next_pos[index], tokens[index]
            self._trim_padding()
        if not self.rows:
            self._reset_batch()
            return True
        self._attn = torch.cat([self._attn, torch.ones_like(self._attn[:, :1])], dim=1)
        additive = decode_mask(self.model, self._attn)      # as aha/core/rollout.py decodes: SDPA's mask, ready
        if self._decoder is not None:
            logits = self._decoder(tokens, self._next_pos, PaddedCacheKV(self._cache, additive))
        else:
            logits = self.model(input_ids=tokens[:, None], attention_mask=self._attn if additive is None else additive,
                                position_ids=self._next_pos, use_cache=True,
                                **{self._cache_kw: self._cache}).logits[:, -1]
        self._logits, self._next_pos = logits[:, :self.vocab_size].float(), self._next_pos + 1
        return True

    def _admit(self) -> None:
        admitted: list[Request] = []
        with self._lock:
            while (
                self._waiting
                and len(self.rows) + sum(r.params.n for r in admitted) + self._waiting[0].params.n <= self.max_batch
            ):
                request = self._waiting.popleft()
                if not request.cancelled.is_set():
                    admitted.append(request)
        if not admitted:
            return
        try:
            self._prefill(admitted)
        except Exception as exc:           # e.g. out of memory on a long prompt: fail these requests only
            traceback.print_exc(file=sys.stderr)
            for request in admitted:
                for i in range(request.params.n):
                    request.push(Event(i, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def _prefill(self, admitted: list[Request]) -> None:
        """Prefill the admitted prompts together and merge their rows into the running batch."""
        ids, mask = left_pad([r.prompt_ids for r in admitted], self.tokenizer.pad_token_id or 0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        repeat = torch.tensor([i for i, r in enumerate(admitted) for _ in range(r.params.n)], device=self.device)
        cache.batch_select_indices(repeat)                 # each prompt's row repeated for its n sequences
        width = max(self._attn.shape[1], mask.shape[1])
        merged = merge_caches(self._cache, cache, width) if self.rows else cache
        attn = torch.cat([_pad_left(self._attn, width, 1), _pad_left(mask[repeat], width, 1)])
        next_pos = torch.cat([self._next_pos, positions[repeat, -1:] + 1])
        logits = torch.cat([self._logits, out.logits[repeat, -1, :self.vocab_size].float()])
        self._cache, self._attn, self._next_pos, self._logits = merged, attn, next_pos, logits
        for request in admitted:
            p = request.params
            budget = min(p.max_tokens, self.max_context - len(request.prompt_ids))
            for i in range(p.n):
                generator = torch.Generator(device=self.device)
                generator.manual_seed(p.seed + i if p.seed is not None else int.from_bytes(os.urandom(7), "little"))
                self.rows.append(Sequence(request, i, generator, budget))

    def _sample(self) -> torch.Tensor:
        """One token per row (B,), rows grouped by their (temperature, top_p)."""
        tokens = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault((row.request.params.temperature, row.request.params.top_p), []).append(i)
        for (temperature, top_p), members in groups.items():
            index = torch.tensor(members, device=self.device)
            logits = self._logits[index]                               # (A, V)
            # one U[0, 1) per row from its own generator (greedy ignores it)
            uniforms = torch.stack(
                [
                    torch.rand((), dtype=torch.float64, generator=self.rows[i].generator, device=self.device)
                    for i in members
                ]
            )
            tokens[index] = sample_next(logits, uniforms, SamplingParams(temperature=temperature, top_p=top_p))[0]
        return tokens

    def _advance(self, row: Sequence, token: int) -> bool:
        """Append `token`, push the new text; True when the sequence is finished (or cancelled)."""
        if row.request.cancelled.is_set():
            return True
        row.token_ids.append(token)
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        finish = "stop" if token in self.stop_ids else None
        stops = row.request.params.stop
        cut = min((at for at in (text.find(s) for s in stops) if at >= 0), default=-1)
        end = min(
            (at + len(s) for s in self.end_strings + row.request.params.end if (at := text.find(s)) >= 0), default=-1
        )
        if end >= 0 and (cut < 0 or end <= cut):
            text, finish = text[:end], "stop"
        elif cut >= 0:
            text, finish = text[:cut], "stop"
        if finish is None and len(row.token_ids) >= row.max_tokens:
            finish = "length"
        end = len(text) if finish else len(text) - _held_back(text, stops)
        new = text[len(row.sent):end] if end > len(row.sent) else ""
        row.sent += new
        if new or finish:
            row.request.push(
                Event(row.index, new, finish, len(row.token_ids), token_ids=tuple(row.token_ids) if finish else ())
            )
        return finish is not None

    def _trim_padding(self) -> None:
        """Drop leading cache columns that are padding in every remaining row."""
        used = self._attn.any(dim=0)
        start = int(used.nonzero()[0]) if used.any() else 0
        if start > 0:
            self._attn = self._attn[:, start:]
            self._cache = DynamicCache(ddp_cache_data=[(layer.keys[:, :, start:], layer.values[:, :, start:])
                                                       for layer in self._cache.layers])



def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], bool]:
    """(prompt token ids, whether the prompt already opened a think block) for chat `messages`; `tools`:
    function schemas for a template that lists them (tool_format=chat)."""
    if not getattr(tokenizer, "chat_template", None):
        from aha.infra.tokenizer import (
            CHAT_TEMPLATE,  # the R1-Zero "User: …\nAssistant:" format
        )
        tokenizer.chat_template = CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, text.rstrip().endswith("<think>")


def load_engine(path: str | Path, device: str | None = None, max_batch: int = 64) -> Engine:
    """An engine (not started) on the model of a run folder or model dir."""
    from aha.infra.model import detect_device, load_model, resolve_model_dir
    model, tokenizer = load_model(resolve_model_dir(path), device or detect_device())
    if tokenizer.pad_token_id is None:
        raise AhaError(f"tokenizer in {path} has no pad or EOS token")
    return Engine(model, tokenizer, max_batch=max_batch)
