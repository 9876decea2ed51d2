"""The rollout engine: batched sampling with a KV cache, for RL, evaluation and chat.

- Each prompt is prefilled once; the written-out decode step (aha/core/decode_step.py) then reads
  its keys and values once for the G samples of its group, transformers' forward gets them repeated.
- The KV cache is preallocated for the whole rollout and written in place (`PreallocatedCache`),
  not grown by `torch.cat`, which copies the whole cache at every step.
- Finished rows (EOS or a stop token such as `</answer>`) leave the batch and the cache once an
  eighth of the batch has finished: reindexing the cache costs about as much as a few steps of
  carrying a finished row, whose samples are then discarded.
- Temperature, top-p, top-k. Sampling is by inverse CDF: token = the first whose cumulative
  probability exceeds u, one uniform u per row and step, u a hash of (seed, step, row)
  (`row_uniforms`): no generator state, no (rows × vocabulary) noise tensor, and a row's tokens
  depend on (seed, row, step) only, never on which other rows run beside it. So the cached engine,
  a naive full-recompute loop, a batch cut into chunks (`max_rows`) and a slice of rows on another
  process (`row_offset`) all give the same tokens (tests/test_rollout.py).
- Stop strings (`SamplingParams.stop_strings`, e.g. `</answer>` where it is several tokens): a row
  stops at the token that completes one in its decoded tail; the stop text stays in the completion.
- temperature 0 is greedy.
The log-probabilities of the sampled tokens under the policy at the sampling temperature (before
top-p/top-k) are kept: they are the "old" log-probs of the GRPO ratio.
"""

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from aha.core.cpu_linear import onednn_linears
from aha.core.decode_step import SharedPromptKV, written_out_decoder
from aha.core.sampling import SamplingParams, row_uniforms, sample_next
from aha.infra.errors import AhaError
from aha.infra.model import check_context, model_context


@dataclass
class Rollout:
    """N = prompts × group_size completions, grouped contiguously (row i is prompt i // G)."""
    prompt_ids: Tensor        # (N, Lp) left-padded with pad_id
    prompt_mask: Tensor       # (N, Lp) 1 on real prompt tokens
    completion_ids: Tensor    # (N, T) right-padded with pad_id; includes the stop token
    completion_mask: Tensor   # (N, T) 1 on generated tokens
    logprobs: Tensor          # (N, T) sampling log-probs (0 on padding)
    truncated: Tensor         # (N,) bool: hit max_new_tokens without a stop token
    group_size: int = 1
    stats: dict = field(default_factory=dict)
    # multi-turn rollouts with tools (aha/core/tools/): the completion interleaves the policy's tokens with
    # tool output it was given, which are context, not actions: they leave the loss, KL and entropy
    action_mask: Tensor | None = None   # (N, T) 1 on tokens the policy sampled; None: every completion token
    tools: "ToolRecord | None" = None   # per-row tool calls, errors and environment rewards; None: no tools

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)

    @property
    def loss_mask(self) -> Tensor:
        """(N, T) the policy's own tokens: completion_mask × action_mask."""
        return self.completion_mask if self.action_mask is None else self.completion_mask * self.action_mask


@dataclass
class ToolRecord:
    """What the tools did in each row of a Rollout (CPU tensors)."""
    calls: Tensor                   # (N,) tool calls run
    errors: Tensor                  # (N,) of them, those that failed (exception, timeout, output cut)
    rewards: Tensor | None = None   # (N,) an environment tool's reward(); None: the tools give none

    @staticmethod
    def concat(records: list["ToolRecord | None"], rows: list[int]) -> "ToolRecord | None":
        """One record for concatenated rollouts of `rows` rows each; None where none has tools."""
        if all(r is None for r in records):
            return None
        zeros = [torch.zeros(n, dtype=torch.long) for n in rows]
        rewards = None if all(r is None or r.rewards is None for r in records) else torch.cat(
            [r.rewards if r is not None and r.rewards is not None else torch.zeros(n) for r, n in zip(records, rows)])
        return ToolRecord(calls=torch.cat([r.calls if r is not None else z for r, z in zip(records, zeros)]),
                          errors=torch.cat([r.errors if r is not None else z for r, z in zip(records, zeros)]),
                          rewards=rewards)


def in_buffer(buffer: Tensor, columns: Tensor) -> Tensor:
    """A new buffer of `buffer`'s capacity for the rows of `columns` (R, H, length, D), which fill its
    first `length` positions: only what was written is copied, not the empty rest of the capacity."""
    out = buffer.new_empty((columns.shape[0], *buffer.shape[1:]))
    out[:, :, :columns.shape[2]] = columns
    return out


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views of buffers (B, H, capacity, D) allocated at the first
    update: each step writes its column in place, where `DynamicLayer` re-copies the whole cache."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self._set(key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1])),
                  value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1])))
        self.is_initialized = True

    def _set(self, key_buffer: Tensor, value_buffer: Tensor) -> None:
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[:, :, :self.length], value_buffer[:, :, :self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        self.key_buffer[:, :, start:self.length] = key_states
        self.value_buffer[:, :, start:self.length] = value_states
        self._set(self.key_buffer, self.value_buffer)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._set(*(in_buffer(buffer, buffer[:, :, :self.length].repeat_interleave(repeats, dim=0))
                        for buffer in (self.key_buffer, self.value_buffer)))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.length:
            self._set(*(in_buffer(buffer, buffer[indices, :, :self.length])
                        for buffer in (self.key_buffer, self.value_buffer)))


class PreallocatedCache(DynamicCache):
    """A `DynamicCache` of `PreallocatedLayer`s, one per attention layer, each for `capacity` positions."""

    def __init__(self, capacity: int):
        Cache.__init__(self, layer_class_to_replicate=lambda: PreallocatedLayer(capacity))


def cache_kwarg(model) -> str:
    """transformers 5.x names the KV-cache argument `cache`; older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """Where generation stops: the tokenizer's EOS, the model's own `generation_config.eos_token_id`
    (instruct models end a turn with e.g. `<|im_end|>`), and `</answer>` where it is one token."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    answer_close = tokenizer.convert_tokens_to_ids("</answer>")
    if isinstance(answer_close, int) and answer_close != tokenizer.unk_token_id:
        ids.add(answer_close)
    return tuple(sorted(i for i in ids if i is not None))


def prompt_limit(model, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves `max_new_tokens` of the model's positions (aha.infra.model.model_context)
    to answer in; None when the config states no limit."""
    context = model_context(model)
    return None if context is None else context - max_new_tokens


def encode_prompt(tokenizer, text: str, add_special_tokens: bool, limit: int | None = None,
                  max_new_tokens: int = 0) -> list[int]:
    """The prompt's token ids; an AhaError when the tokenizer cannot spell it (a character outside a
    vocabulary without an unknown token) or it is longer than `limit` (`prompt_limit`: the model's
    context less the `max_new_tokens` of its answer)."""
    try:
        ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]  # length: below
    except Exception as exc:  # tokenizers raises a bare Exception on characters it has no token for
        raise AhaError(
            f"the tokenizer cannot encode the prompt {text[:50]!r}… ({str(exc).splitlines()[0][:80]}): "
            "use a model whose tokenizer covers the task's text"
        ) from None
    if limit is not None and len(ids) > limit:
        raise AhaError(
            f"the prompt {text[:50]!r}… is {len(ids)} tokens and max_new_tokens is {max_new_tokens}: "
            f"{len(ids) + max_new_tokens} positions, more than this model's context of {limit + max_new_tokens}; "
            "use a model with a longer context, a shorter prompt, or fewer max_new_tokens"
        )
    return ids




def stop_strings(tokenizer) -> tuple[str, ...]:
    """Stop strings for the R1 answer format: `</answer>` when this tokenizer writes it as several
    tokens (one token is a stop token already, `stop_token_ids`)."""
    return () if len(tokenizer.tokenize("</answer>")) == 1 else ("</answer>",)


def left_pad(prompts: list[list[int]], pad_id: int, width: int = 0) -> tuple[Tensor, Tensor]:
    width = max(width, *(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def stopped_by_string(tokenizer, tails: list[list[int]], stops: tuple[str, ...]) -> list[bool]:
    """For each row's last tokens: does their decoded text contain a stop string?"""
    texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
    return [any(stop in text for stop in stops) for text in texts]


def generate(model, prompts: list[list[int]], group_size: int, params: SamplingParams,
             pad_id: int, seed: int, row_offset: int = 0, total_rows: int | None = None,
             max_rows: int | None = None, tokenizer=None) -> Rollout:
    """Sample `group_size` completions for each prompt (token-id lists).

    `row_offset`, `total_rows`: these prompts' rows are rows row_offset … of a batch of `total_rows`
    rows (one process's slice of the step, aha/infra/distributed.py); each row samples exactly as it would
    in the whole batch. `max_rows`: at most this many rows (whole groups, at least one) at once, so
    that the KV cache and the (rows × vocabulary) logits of a big batch need not fit together; the
    tokens are the same as in one pass. `tokenizer`: needed for `params.stop_strings`."""
    n = len(prompts) * group_size
    total_rows = n if total_rows is None else total_rows
    if not 0 <= row_offset <= total_rows - n:
        raise ValueError(f"rows {row_offset}…{row_offset + n - 1} are not inside a batch of {total_rows} rows")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer: generate(..., tokenizer=tokenizer)")
    per_chunk = max(1, (max_rows or n) // group_size)                  # prompts per pass
    width = max(len(p) for p in prompts)  # every chunk padded alike
    check_context(
        width, params.max_new_tokens, model_context(model), "use a shorter prompt or template, or lower max_new_tokens"
    )
    with torch.inference_mode(), onednn_linears(model):          # aha/core/cpu_linear.py
        parts = [_generate_rows(model, prompts[start:start + per_chunk], group_size, params, pad_id, seed,
                                row_offset + start * group_size, width, tokenizer)
                 for start in range(0, len(prompts), per_chunk)]
    return concat_rollouts(parts, pad_id)


def ready_mask(model) -> bool:
    """Does `model` take a ready 4-D additive mask at a decoding step: SDPA attention, no sliding window."""
    config = model.config
    return getattr(config, "_attn_implementation", None) == "sdpa" and getattr(config, "sliding_window", None) is None


def decode_mask(model, attention: Tensor) -> Tensor | None:
    """The attention mask of a one-token decoding step as SDPA takes it, (N, 1, 1, L): 0 where a row
    attends, −inf on its padding; None where the model's own mask must be built (`ready_mask`: not
    SDPA, or a sliding window). transformers passes a ready 4-D mask through unchanged and would
    otherwise build a boolean one at every step, which SDPA on CPU also converts at every layer; the
    same numbers, as SDPA turns a boolean mask into exactly these values (bench/decode_probes.py)."""
    if not ready_mask(model):
        return None
    dtype = next(model.parameters()).dtype
    return torch.zeros(attention.shape, dtype=dtype, device=attention.device).masked_fill(
        attention == 0, float("-inf"))[:, None, None, :]


def _prefill(model, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int, params: SamplingParams):
    """The prompts' forward: (decoder, cache, kv, logits (N, V) of each row's first token, positions).
    The written-out decode step (aha/core/decode_step.py, `decoder`) keeps each prompt's keys and values
    once (`kv`, a SharedPromptKV); for transformers' forward (`decoder` None) the cache repeats them
    for each row of the group."""
    decoder = written_out_decoder(model, params.bf16) if ready_mask(model) else None
    cache = PreallocatedCache(prompt_ids.shape[1] + (0 if decoder is not None else params.max_new_tokens))
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    kv = SharedPromptKV(cache, prompt_mask, group_size, params.max_new_tokens) if decoder is not None else None
    if group_size > 1 and kv is None:
        cache.batch_repeat_interleave(group_size)
    return decoder, cache, kv, out.logits[:, -1].repeat_interleave(group_size, dim=0), positions


@torch.inference_mode()  # no autograd bookkeeping at all: the decode step's ~400 ops run ~7% faster than under no_grad
def _generate_rows(model, prompts: list[list[int]], group_size: int, params: SamplingParams, pad_id: int, seed: int,
                   row_offset: int, prompt_width: int, tokenizer) -> Rollout:
    """One pass of `generate`: these prompts' rows, global rows row_offset …, prompts left-padded to
    `prompt_width`."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, prompt_width)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    n = len(prompts) * group_size
    vocab = model.config.vocab_size
    # the last tokens that can hold a stop string: a token decodes to ≥ 1 character, except special
    # tokens (skipped) and pieces of a character (UTF-8 bytes, up to 4 per character)
    tail = 4 * max((len(s) for s in params.stop_strings), default=0) + 16

    prompt_len = prompt_ids.shape[1]
    decoder, cache, kv, logits, positions = _prefill(model, prompt_ids, prompt_mask, group_size, params)
    cache_kw = cache_kwarg(model)
    attn = torch.ones((n, prompt_len + params.max_new_tokens), dtype=torch.long, device=device)
    attn[:, :prompt_len] = prompt_mask.repeat_interleave(group_size, dim=0)  # (N, Lp + max_new), sliced per step
    next_pos = positions[:, -1:].repeat_interleave(group_size, dim=0) + 1
    additive = decode_mask(model, attn) if kv is None else None   # (N, 1, 1, Lp + max_new) or None

    tokens = torch.full((n, params.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, params.max_new_tokens), device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    active = torch.arange(n, device=device)                 # (A,) the row in each batch slot
    running = torch.ones(n, dtype=torch.bool, device=device)  # (A,) False once the slot's row finished
    uniforms = row_uniforms(seed, torch.arange(params.max_new_tokens, device=device)[:, None],
                            row_offset + active)             # (max_new, N): each step's draws, hashed at once
    for step in range(params.max_new_tokens):
        tok, lp = sample_next(logits[:, :vocab], uniforms[step, active], params)
        # finished rows still in the batch write what they already hold: pad, log-prob 0
        tokens[active, step] = torch.where(running, tok, pad_id)
        logprobs[active, step] = torch.where(running, lp, 0.0)
        lengths[active] += running
        done = torch.isin(tok, stop_ids) & running
        if params.stop_strings and bool(running.any()):
            start = max(0, step + 1 - tail)
            slots = running.nonzero().squeeze(1)
            hits = stopped_by_string(tokenizer, tokens[active[slots], start:step + 1].tolist(), params.stop_strings)
            done[slots[torch.tensor(hits, dtype=torch.bool, device=device)]] = True
        stopped[active] |= done
        running &= ~done
        if step == params.max_new_tokens - 1:
            break
        alive = int(running.sum())
        if alive == 0:
            break
        if 8 * (active.numel() - alive) >= active.numel():
            keep = running.nonzero().squeeze(1)
            if kv is not None:
                kv.select(keep)
            else:
                cache.batch_select_indices(keep)
            active, running, tok, attn, next_pos = active[keep], running[keep], tok[keep], attn[keep], next_pos[keep]
            additive = additive[keep] if additive is not None else None
        if decoder is not None:
            logits = decoder(tok, next_pos, kv)
        else:
            mask = additive if additive is not None else attn
            logits = model(input_ids=tok[:, None], attention_mask=mask[..., :prompt_len + step + 1],
                           position_ids=next_pos, use_cache=True, **{cache_kw: cache}).logits[:, -1]
        next_pos = next_pos + 1

    width = int(lengths.max())
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    with torch.inference_mode(False):   # plain tensors: the update saves some of them for backward
        return Rollout(
            prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
            completion_ids=tokens[:, :width].clone(), completion_mask=mask.long(),
            logprobs=logprobs[:, :width] * mask, truncated=~stopped, group_size=group_size,
        )


def _pad_to(x: Tensor, width: int, value, left: bool) -> Tensor:
    pad = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from several with the same group size: prompts re-left-padded, completions
    re-right-padded to the widest, rows (and so groups) in the order given."""
    if len(rollouts) == 1:
        return rollouts[0]
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    width = max(r.completion_ids.shape[1] for r in rollouts)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(r.prompt_ids, prompt_width, pad_id, left=True) for r in rollouts]),
        prompt_mask=torch.cat([_pad_to(r.prompt_mask, prompt_width, 0, left=True) for r in rollouts]),
        completion_ids=torch.cat([_pad_to(r.completion_ids, width, pad_id, left=False) for r in rollouts]),
        completion_mask=torch.cat([_pad_to(r.completion_mask, width, 0, left=False) for r in rollouts]),
        logprobs=torch.cat([_pad_to(r.logprobs, width, 0.0, left=False) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        group_size=rollouts[0].group_size,
        action_mask=None if all(r.action_mask is None for r in rollouts) else torch.cat(
            [_pad_to(r.loss_mask, width, 0, left=False) for r in rollouts]),
        tools=ToolRecord.concat([r.tools for r in rollouts], [r.completion_ids.shape[0] for r in rollouts]),
    )
