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
"""

import torch
from transformers import DynamicCache, PreTrainedModel

from aha.rollout import Rollout, cache_kwarg


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
    first_logits = out.logits[:, -1][inverse]                                          # (R, V)
    width = completion_ids.shape[1]
    if width == 1:
        return first_logits[:, None]
    cache.batch_select_indices(inverse)                                                 # (U, …) → (R, …), with grad
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
                        share_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs (R, T) of the sampled completion tokens of `rows`, per-token entropy (R, T), and
    the completion mask (R, T), T trimmed to the longest of these rows' completions."""
    prompt_ids, prompt_mask = rollout.prompt_ids[rows], rollout.prompt_mask[rows]
    completion_ids, completion_mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
    first = int((prompt_mask.sum(dim=0) > 0).nonzero()[0])           # drop all-padding columns
    width = int(completion_mask.sum(dim=1).max())
    prompt_ids, prompt_mask = prompt_ids[:, first:], prompt_mask[:, first:]
    completion_ids, completion_mask = completion_ids[:, :width], completion_mask[:, :width]
    if share_prompts and can_share_prompts(model):
        groups = torch.div(rows, rollout.group_size, rounding_mode="floor")
        logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups)
    else:
        logits = one_pass_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    logits = logits.float()                                           # (R, T, V)
    if temperature > 0:
        logits = logits / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logsumexp
    with torch.no_grad():
        entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logp, entropy, completion_mask
