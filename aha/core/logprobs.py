"""Log-probs of sampled completions under the policy: the forward pass of the update.

    logp, entropy, mask = completion_logprobs(model, rollout, rows, temperature)

Every row's prompt is one of the step's P prompts, repeated for its G samples. TRL and verl run the
prompt through the model once per sample; here, as in generation, each prompt of the rows runs
once (`shared_prompt_logits`): its keys and values are computed with gradients, repeated to its
rows, and the completions attend to them through the KV cache. The backward pass sums the rows'
gradients into the one prompt forward, so the gradient is the same as the per-row forward's (up
to float rounding: the matmuls have other shapes), and a step computes P instead of P × G prompt
passes. With gradient checkpointing (which turns the cache off) or a distributed wrapper (world size
above 1), the plain one-pass forward runs instead.

log p = logit − logsumexp over the kept positions only: no full-vocabulary log-softmax tensor
is kept, and logits are computed for completion positions only.

A real vocabulary (49k–152k tokens) makes the logits the biggest tensor of the update: (R, T, V)
in fp32 is 5 GB for 64 completions × 128 tokens × 152k. When the logits of `rows` would exceed
`LOGIT_BYTES`, the model returns its last hidden states instead (the output head's forward is
the identity for the duration, `hidden_not_logits`), and the head runs on chunks of `chunk_tokens`
real completion tokens (padding never reaches it): each chunk's logits are recomputed in the
backward pass, so at most one chunk's logits exist at a time, forward or backward. In fp32 without
autocast this is one autograd function, `FusedHeadLogprobs`, that reuses chunk buffers,
accumulates the weight gradient in place, and keeps the probabilities for backward when they fit
`KEEP_PROBS_BYTES` (SmolLM2-135M, 64 × 128 tokens in micro-batches of 7 rows: the update 69.6 →
54.2 s and system time 51 → 23 s in `aha bench --model` with the chunks recomputed; keeping the
probabilities took off another 3–11%, `bench/speed_probes_2026_12_05.py`); otherwise each chunk
runs under `torch.utils.checkpoint`. The entropy is taken without gradient in the same chunk. The result
equals the one-shot path to float rounding (tests/test_logprobs.py).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel

from aha.core.rollout import Rollout, cache_kwarg

LOGIT_BYTES = 32 * 2**20             # fp32 logits of one forward above this: chunk the output head
CHUNK_LOGIT_BYTES = 32 * 2**20       # fp32 logits of one chunk
KEEP_PROBS_BYTES = 256 * 2**20       # the fused head keeps a micro-batch's probabilities for backward up to this


def output_head(model):
    """The output projection (a `torch.nn.Linear`) when the model's logits are exactly head(hidden),
    else None (models that scale or soft-cap their logits keep the plain path)."""
    inner = getattr(model, "module", model)                 # DDP
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0)
                             for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if type(head) is torch.nn.Linear else None


@contextmanager
def hidden_not_logits(head: torch.nn.Linear):
    """While inside, `head` returns its input: the model's forward gives hidden states (…, H)
    where it gave logits (…, V)."""
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        del head.forward


def chunk_tokens_for(vocab: int) -> int:
    """Completion tokens per head chunk: CHUNK_LOGIT_BYTES of fp32 logits."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab))


def _chunk_logprobs(hidden, weight, bias, targets, temperature: float):
    """(log p (K,), entropy (K,)) of `targets` (K,) under logits = head(hidden (K, H)) / temperature."""
    logits = F.linear(hidden, weight, bias).float()                                   # (K, V)
    if temperature > 0 and temperature != 1.0:          # x / 1.0 is x: skip a pass over (·, V)
        logits = logits / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp
    with torch.no_grad():
        entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logp, entropy


def chunked_logprobs(hidden, head: torch.nn.Linear, targets, mask, temperature: float, chunk_tokens: int):
    """(log p (R, T), entropy (R, T)) from hidden states (R, T, H): the head applied to the real
    tokens of `mask` (R, T) only, `chunk_tokens` at a time, each chunk recomputed in backward."""
    keep = mask.bool()
    flat_hidden, flat_targets = hidden[keep], targets[keep]                            # (K, H), (K,)
    if fused_head_applies(flat_hidden, head.weight):
        keep_probs = (torch.is_grad_enabled() and (flat_hidden.requires_grad or head.weight.requires_grad)
                      and 4 * flat_targets.numel() * head.out_features <= KEEP_PROBS_BYTES)
        logp, entropy = FusedHeadLogprobs.apply(flat_hidden, head.weight, head.bias, flat_targets,
                                                1.0 / temperature if temperature > 0 else 1.0, chunk_tokens, keep_probs)
    else:
        logps, entropies = [], []
        for start in range(0, flat_targets.numel(), chunk_tokens):
            piece = slice(start, start + chunk_tokens)
            if torch.is_grad_enabled():
                logp, entropy = checkpoint(_chunk_logprobs, flat_hidden[piece], head.weight, head.bias,
                                           flat_targets[piece], temperature, use_reentrant=False)
            else:
                logp, entropy = _chunk_logprobs(
                    flat_hidden[piece], head.weight, head.bias, flat_targets[piece], temperature
                )
            logps.append(logp)
            entropies.append(entropy)
        logp, entropy = torch.cat(logps), torch.cat(entropies)
    dtype = torch.float32
    logp_full = torch.zeros(mask.shape, dtype=dtype, device=hidden.device).masked_scatter(keep, logp)
    entropy_full = torch.zeros(mask.shape, dtype=dtype, device=hidden.device).masked_scatter(keep, entropy)
    return logp_full, entropy_full


def fused_head_applies(hidden, weight) -> bool:
    """The fused head (`FusedHeadLogprobs`) takes fp32 hidden states and weights as plain tensors, with
    no autocast; otherwise (bf16, autocast, FSDP's sharded tensors) each chunk runs under
    `torch.utils.checkpoint`."""
    return (hidden.dtype == weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
            and not torch.is_autocast_enabled(hidden.device.type))


def _shifted_logits(out, hidden, weight, bias, scale: float):
    """out (k, V) ← (hidden @ weight.T + bias) · scale − its row max; returns the row max (k, 1)."""
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)
    if scale != 1.0:
        out.mul_(scale)
    top = out.amax(dim=-1, keepdim=True)
    out.sub_(top)
    return top


class FusedHeadLogprobs(torch.autograd.Function):
    """log p (K,) of `targets` under softmax((hidden @ W.T + b) · scale), and the entropy (K,), `chunk`
    tokens at a time.

    The chunked head under `torch.utils.checkpoint` allocates each chunk's logits, softmax and
    logit gradient afresh and returns a whole (V, H) weight gradient per chunk that autograd then
    adds up: at a 49k vocabulary, 113 MB allocated, page-faulted in and summed 48 times a
    micro-batch. Here the chunks go through reused buffers, the logit gradient
    g · scale · (onehot − p) is formed in place, and the weight gradient is accumulated with addmm_
    into a single buffer. When the probabilities of all K tokens fit in `KEEP_PROBS_BYTES` they are
    kept from the forward pass for the backward, which then skips the head's recomputation (one of
    its four matmuls); otherwise backward recomputes each chunk. Equal to log_softmax to float
    rounding (tests/test_logprobs.py). The entropy carries no gradient. `keep`: keep the probabilities
    (the caller decides: only when a backward pass will follow and they fit)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, chunk: int, keep: bool):
        count, vocab = hidden.shape[0], weight.shape[0]
        logp = torch.empty(count, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        probs = hidden.new_empty(count, vocab) if keep else None
        logits = None if keep else hidden.new_empty(min(chunk, count), vocab)
        work = hidden.new_empty(min(chunk, count), vocab)
        for start in range(0, count, chunk):
            piece = slice(start, start + chunk)
            x = probs[piece] if keep else logits[: hidden[piece].shape[0]]
            e = work[: x.shape[0]]
            _shifted_logits(x, hidden[piece], weight, bias, scale)                 # x' = x − max
            torch.exp(x, out=e)
            total = e.sum(dim=-1)                                                  # Σ e^x'
            log_total = total.log()
            logp[piece] = x.gather(1, targets[piece, None]).squeeze(1) - log_total
            weighted = torch.bmm(e[:, None, :], x[:, :, None]).view(-1)            # Σ e^x' x', no (k, V) temporary
            entropy[piece] = log_total - weighted / total                          # log Σ − Σ p x'
            if keep:
                torch.div(e, total[:, None], out=x)                                # p, for backward
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.scale, ctx.chunk, ctx.probs = scale, chunk, probs
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        scale, chunk, probs = ctx.scale, ctx.chunk, ctx.probs
        ctx.probs = None                                  # formed into the logit gradient in place below
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (
            (torch.empty_like(weight) if hidden.shape[0] else torch.zeros_like(weight)) if need_weight else None
        )
        grad_bias = torch.zeros_like(bias) if need_bias else None
        logits = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0]) if probs is None else None
        for start in range(0, hidden.shape[0], chunk):
            piece = slice(start, start + chunk)
            if probs is None:
                x = logits[: hidden[piece].shape[0]]
                _shifted_logits(x, hidden[piece], weight, bias, scale)
                x.exp_()
                x.div_(x.sum(dim=-1, keepdim=True))                                 # p
            else:
                x = probs[piece]
            g = (grad_logp[piece] * scale)[:, None]                                 # dL/dlogits = g·scale·(onehot − p)
            x.mul_(-g).scatter_add_(1, targets[piece, None], g)
            if need_hidden:
                torch.mm(x, weight, out=grad_hidden[piece])
            if need_weight:
                if start == 0:
                    torch.mm(x.t(), hidden[piece], out=grad_weight)
                else:
                    grad_weight.addmm_(x.t(), hidden[piece])
            if need_bias:
                grad_bias.add_(x.sum(dim=0))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def can_share_prompts(model) -> bool:
    """A plain transformers model without activation checkpointing (which turns the cache off), in
    a process that is not one of several: the one-process group vLLM creates leaves sharing on."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)       # transformers ≥ 5.x
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    several = (torch.distributed.is_available() and torch.distributed.is_initialized()
               and torch.distributed.get_world_size() > 1)
    return isinstance(model, PreTrainedModel) and not checkpointing and not several


def shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups) -> torch.Tensor:
    """Logits (R, T, V) predicting each completion token, each distinct prompt run once.

    prompt_ids/mask (R, Lp) left-padded; completion_ids/mask (R, T); groups (R,) the group of each
    row (rows of one group share their prompt)."""
    unique, inverse = torch.unique(groups, return_inverse=True)                       # (U,), (R,)
    order = torch.arange(len(groups), device=groups.device)
    first_row = torch.full((len(unique),), len(groups), device=groups.device).scatter_reduce(0, inverse, order, "amin")
    ids, mask = prompt_ids[first_row], prompt_mask[first_row]                          # (U, Lp)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    first_logits = out.logits[:, -1].index_select(0, inverse)                          # (R, V)
    width = completion_ids.shape[1]
    if width == 1:
        return first_logits[:, None]
    for layer in cache.layers:          # (U, …) → (R, …), with grad: index_select, whose backward sums the rows of
        layer.keys = layer.keys.index_select(0, inverse)      # a prompt in order (`x[inverse]`'s backward adds them
        layer.values = layer.values.index_select(0, inverse)  # with atomics, in any order: not the same twice)
    attention = torch.cat([mask[inverse], completion_mask[:, :-1]], dim=1)              # (R, Lp + T − 1)
    positions = mask.sum(dim=1)[inverse][:, None] + torch.arange(width - 1, device=ids.device)
    rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions,
                 use_cache=True, **{cache_kwarg(model): cache}).logits                  # (R, T − 1, V)
    return torch.cat([first_logits[:, None], rest], dim=1)


def one_pass_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Logits (R, T, V) predicting each completion token, prompt and completion in one forward per row."""
    width = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                 logits_to_keep=width + 1, use_cache=False).logits[:, :-1]


def completion_logprobs(model, rollout: Rollout, rows: torch.Tensor, temperature: float,
                        share_prompts: bool = True, chunk_tokens: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs (R, T) of the sampled completion tokens of `rows`, per-token entropy (R, T), and
    the mask of the policy's own tokens (R, T) (`Rollout.loss_mask`: tool output is context, read by
    the forward pass but never an action: 0 there, and so are its log-probs), T trimmed to the
    longest of these rows' completions.

    `chunk_tokens`: run the output head on chunks of this many tokens (None: only when the logits
    would exceed LOGIT_BYTES, in chunks of `chunk_tokens_for(vocabulary)`)."""
    prompt_ids, prompt_mask = rollout.prompt_ids[rows], rollout.prompt_mask[rows]
    completion_ids, completion_mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
    first = int((prompt_mask.sum(dim=0) > 0).nonzero()[0])           # drop all-padding columns
    width = int(completion_mask.sum(dim=1).max())
    prompt_ids, prompt_mask = prompt_ids[:, first:], prompt_mask[:, first:]
    completion_ids, completion_mask = completion_ids[:, :width], completion_mask[:, :width]
    action_mask = rollout.loss_mask[rows][:, :width]                  # (R, T) the policy's tokens
    head = output_head(model)
    vocab = head.out_features if head is not None else 0
    if chunk_tokens is None and head is not None and 4 * len(rows) * width * vocab > LOGIT_BYTES:
        chunk_tokens = chunk_tokens_for(vocab)
    if head is None or chunk_tokens is None:
        logp, entropy, _ = _full_logits_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows,
                                                 rollout.group_size, temperature, share_prompts)
        keep = action_mask.bool()
        return logp.where(keep, 0.0), entropy.where(keep, 0.0), action_mask
    with hidden_not_logits(head):
        hidden = _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows, rollout.group_size,
                          share_prompts)                                                # (R, T, H)
    logp, entropy = chunked_logprobs(hidden, head, completion_ids, action_mask, temperature, chunk_tokens)
    return logp, entropy, action_mask


def _forward(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows, group_size: int, share_prompts: bool
):
    """The model's outputs (R, T, ·) at the positions that predict each completion token."""
    if share_prompts and can_share_prompts(model):
        groups = torch.div(rows, group_size, rounding_mode="floor")
        return shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups)
    return one_pass_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)


def _full_logits_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows, group_size: int,
                          temperature: float, share_prompts: bool):
    logits = _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows, group_size,
                      share_prompts).float()                          # (R, T, V)
    if temperature > 0 and temperature != 1.0:          # x / 1.0 is x: skip a pass over (·, V)
        logits = logits / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logsumexp
    with torch.no_grad():
        entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logp, entropy, completion_mask
