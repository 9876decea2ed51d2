"""The token sampler: seeded per-row uniforms and one inverse-CDF draw per token under temperature,
top-k and top-p. The draw of row r at decode step t depends only on (seed, t, r), never on the batch
or chunk it sits in, so the KV-cached engine, naive recomputation, the serving engine and any rows-at-
once setting give the same tokens (tests/test_rollout.py).
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()   # matched on each row's decoded tail (needs `tokenizer` in generate)
    bf16: bool = False   # the written-out decode step's matmuls on bf16 weights (aha/core/decode_step.py `linears`)


def _mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32), on a Python int or an int64 tensor holding values
    < 2^32; the multiplications are split in 16-bit halves so that no product overflows int64."""
    mask = 0xFFFFFFFF
    for shift, constant in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = (x * (constant & 0xFFFF) + ((x * (constant >> 16)) << 16)) & mask
    return x ^ (x >> 16)


def row_uniforms(seed: int, step: int | Tensor, rows: Tensor) -> Tensor:
    """U[0, 1) (A,) float64 for the global row indices `rows` (A,) at decode step `step`: a hash of
    (seed, step, row) with 2^-32 resolution, the same on any device, batch or chunk. (seed, step) are
    hashed once; each row then costs two rounds of the hash. `step` may be a column of steps (T, 1):
    then (T, A), row t the uniforms of step t, equal to T calls (a whole rollout's in one go).

    >>> u = row_uniforms(0, 3, torch.arange(4)); bool(((u >= 0) & (u < 1)).all()), u.unique().numel()
    (True, 4)
    >>> torch.equal(row_uniforms(0, torch.arange(5)[:, None], torch.arange(4))[3], u)
    True
    """
    key = _mix32(_mix32(_mix32(step & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF)) ^ ((seed >> 32) & 0xFFFFFFFF))
    x = _mix32((rows.to(torch.int64) & 0xFFFFFFFF) ^ key)
    return _mix32(x ^ _mix32(key ^ 0x9E3779B9)).double() / 2.0 ** 32


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


def sample_next(logits: Tensor, uniforms: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """(tokens (A,), logprobs (A,)) from last-position logits (A, V) and one U[0, 1) (A,) per row:
    the first token whose cumulative probability (after temperature, top-k, top-p) exceeds u."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    scaled = logits / params.temperature if params.temperature != 1.0 else logits      # x / 1.0 is x
    filtered = filter_logits(scaled, params.top_k, params.top_p)
    cumulative = torch.softmax(filtered, dim=-1).double().cumsum(dim=-1)                   # (A, V)
    # u·total < total, so the search stays inside the vocabulary; a token of probability 0 adds
    # nothing to the sum and so can never be the first to exceed it
    target = (uniforms.to(cumulative.device) * cumulative[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs
