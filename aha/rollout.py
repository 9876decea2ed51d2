"""The rollout engine: batched sampling with a KV cache, for RL, evaluation and chat.

- Each prompt is prefilled once; its cache is then repeated for the G samples of its group.
- The KV cache is preallocated for the whole rollout and written in place (`PreallocatedCache`),
  not grown by `torch.cat`, which copies the whole cache at every step.
- Finished rows (EOS or a stop token such as `</answer>`) leave the batch and the cache once an
  eighth of the batch has finished: reindexing the cache costs about as much as a few steps of
  carrying a finished row, whose samples are then discarded.
- Temperature, top-p, top-k. Sampling is an exponential race, argmax(p / E) with E ~ Exp(1),
  on noise drawn for every row of the full batch at every step from one seeded generator: a
  row's tokens depend on (seed, row, step) only, never on which other rows are still running.
  So the cached engine and a naive full-recompute loop give the same tokens (tests/test_rollout.py).
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

from aha.errors import AhaError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()


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

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)


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
            self._set(self.key_buffer.repeat_interleave(repeats, dim=0),
                      self.value_buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.length:
            self._set(self.key_buffer[indices], self.value_buffer[indices])


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
    """The longest prompt that leaves `max_new_tokens` of the model's positions to answer in
    (`max_position_embeddings`, or GPT-2's `n_positions`); None when the config states no limit."""
    for name in ("max_position_embeddings", "n_positions"):
        positions = getattr(model.config, name, None)
        if isinstance(positions, int) and positions > 0:
            return positions - max_new_tokens
    return None


def encode_prompt(tokenizer, text: str, add_special_tokens: bool, limit: int | None) -> list[int]:
    """The prompt's token ids; an AhaError when the tokenizer cannot spell it (a character outside a
    vocabulary without an unknown token) or it is longer than `limit` (`prompt_limit`)."""
    try:
        ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]   # the length is checked below
    except Exception as exc:   # tokenizers raises a bare Exception on characters it has no token for
        raise AhaError(f"the tokenizer cannot encode the prompt {text[:50]!r}… ({str(exc).splitlines()[0][:80]}): "
                       "use a model whose tokenizer covers the task's text") from None
    if limit is not None and len(ids) > limit:
        raise AhaError(f"the prompt {text[:50]!r}… is {len(ids)} tokens, but the model reads {limit} before the "
                       "max_new_tokens of its answer: use a model with a longer context, or fewer max_new_tokens")
    return ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / top-p nucleus to −inf. logits: (A, V), already temperature-scaled."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, noise: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """(tokens (A,), logprobs (A,)) from last-position logits (A, V) and Exp(1) noise (A, V)."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    scaled = logits / params.temperature
    filtered = filter_logits(scaled, params.top_k, params.top_p)
    tokens = (torch.softmax(filtered, dim=-1) / noise).argmax(dim=-1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


@torch.no_grad()
def generate(model, prompts: list[list[int]], group_size: int, params: SamplingParams,
             pad_id: int, seed: int, row_offset: int = 0, total_rows: int | None = None) -> Rollout:
    """Sample `group_size` completions for each prompt (token-id lists).

    `row_offset`, `total_rows`: these prompts' rows are rows row_offset … of a batch of `total_rows`
    rows (one process's slice of the step, aha/distributed.py). The noise is drawn for all
    `total_rows` rows and only this slice's rows are kept, so every row samples exactly as it would
    in the whole batch."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    n = len(prompts) * group_size
    total_rows = n if total_rows is None else total_rows
    if not 0 <= row_offset <= total_rows - n:
        raise ValueError(f"rows {row_offset}…{row_offset + n - 1} are not inside a batch of {total_rows} rows")
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = model.config.vocab_size

    prompt_len = prompt_ids.shape[1]
    cache = PreallocatedCache(prompt_len + params.max_new_tokens)
    cache_kw = cache_kwarg(model)
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)   # (N, V)
    attn = torch.ones((n, prompt_len + params.max_new_tokens), dtype=torch.long, device=device)
    attn[:, :prompt_len] = prompt_mask.repeat_interleave(group_size, dim=0)  # (N, Lp + max_new), sliced per step
    next_pos = positions[:, -1:].repeat_interleave(group_size, dim=0) + 1

    tokens = torch.full((n, params.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, params.max_new_tokens), device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    active = torch.arange(n, device=device)                 # (A,) the row in each batch slot
    running = torch.ones(n, dtype=torch.bool, device=device)  # (A,) False once the slot's row finished
    for step in range(params.max_new_tokens):
        noise = torch.empty((total_rows, vocab), device=device).exponential_(generator=gen)
        noise = noise[row_offset:row_offset + n][active]                  # (A, V): this slice's batch slots
        tok, lp = sample_next(logits[:, :vocab], noise, params)
        # finished rows still in the batch write what they already hold: pad, log-prob 0
        tokens[active, step] = torch.where(running, tok, pad_id)
        logprobs[active, step] = torch.where(running, lp, 0.0)
        lengths[active] += running
        done = torch.isin(tok, stop_ids) & running
        stopped[active] |= done
        running &= ~done
        if step == params.max_new_tokens - 1:
            break
        alive = int(running.sum())
        if alive == 0:
            break
        if 8 * (active.numel() - alive) >= active.numel():
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, running, tok, attn, next_pos = active[keep], running[keep], tok[keep], attn[keep], next_pos[keep]
        out = model(input_ids=tok[:, None], attention_mask=attn[:, :prompt_len + step + 1], position_ids=next_pos,
                    use_cache=True, **{cache_kw: cache})
        logits, next_pos = out.logits[:, -1], next_pos + 1

    width = int(lengths.max())
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
        completion_ids=tokens[:, :width], completion_mask=mask.long(),
        logprobs=logprobs[:, :width] * mask, truncated=~stopped, group_size=group_size,
    )
