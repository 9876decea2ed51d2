"""The interaction loop: multi-turn rollouts in which the model calls tools mid-thought.

    engine = ToolLoop(get_toolbox("python"), "r1", max_turns=4)
    rollout = engine(model, prompts, group_size, params, pad_id, seed, tokenizer=tokenizer)

`ToolLoop` has the signature of aha/core/rollout.py `generate`, so the training loop, `aha eval` and
dynamic sampling use it unchanged (config `tools=python`, aha/core/tools/__init__.py). A rollout runs in
turns. In turn 0 every row decodes from its prompt (prefilled once per group); a row whose turn
ends in a tool call (`</tool>`, aha/core/tools/formats.py) leaves the batch at once, and its call is sent
to a pool of `workers` threads — the python tool's work happens in sandbox subprocesses, so calls
run in parallel with each other and with the rows still decoding. When every row of the turn has
finished or called, each caller gets its tool's output appended as tokens (`tool_output_tokens` at
most), and the callers decode their next turn together, their contexts (prompt + all so far)
prefilled afresh; up to `max_turns` calls per row. `params.max_new_tokens` bounds the whole
completion, tool output included (verl's `response_length`).

What the Rollout holds: `completion_ids` is the whole interaction, the model's tokens and the tool
output; `action_mask` is 1 on the model's own (sampled) tokens only, so the loss, the KL and the
entropy never see tool output (aha/core/logprobs.py returns `Rollout.loss_mask`); `logprobs` is 0 on
tool output; `tools` counts each row's calls and failed calls (and an environment's reward).

Randomness, as in `generate`: the token at step s of turn k of global row r is drawn with the
uniform `row_uniforms(turn_seed(seed, k), s, r)`; turn 0 uses `seed` itself, so a rollout with no
tool call equals `generate`'s token for token. A turn k ≥ 1 left-pads every context to the same
width (the prompts' width + max_new_tokens), so a row's numbers do not depend on which rows decode
beside it, nor on when a tool returns: chunks (`max_rows`) and slices (`row_offset`) give the same
tokens (tests/test_tools.py). The cost of that padding is attention over up to max_new_tokens more
columns in turns ≥ 1.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from aha.core.rollout import PreallocatedCache, Rollout, ToolRecord, cache_kwarg, concat_rollouts, left_pad
from aha.core.sampling import SamplingParams, row_uniforms, sample_next
from aha.core.tools.formats import FORMATS, cut_tokens
from aha.core.tools.tools import Observation, Toolbox
from aha.infra.model import check_context, model_context

TURN_SEED_STEP = 0x9E3779B97F4A7C15       # Fibonacci hashing: turns' seeds far apart


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of turn `turn`: `seed` itself for turn 0 (so no call = `generate`)."""
    return seed if turn == 0 else (seed + turn * TURN_SEED_STEP) % 2**62


@dataclass
class Row:
    """One sample's interaction so far."""
    index: int                          # global row (the uniforms' row)
    prompt: list[int]
    episode: object                     # aha.core.tools.tools.Episode
    budget: int                         # completion tokens it may still add
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    stopped: bool = False               # ended by a stop token/string (not truncated)
    pending: list = field(default_factory=list)   # [(Call, Future[Observation])] of the turn that just ended

    def add(self, tokens: list[int], logprobs: list[float], action: int) -> None:
        self.tokens += tokens
        self.logprobs += logprobs
        self.actions += [action] * len(tokens)
        self.budget -= len(tokens)


class ToolLoop:
    """`generate` with tools: see the module docstring."""

    def __init__(self, toolbox: Toolbox, call_format: str = "r1", max_turns: int = 4, output_tokens: int = 64,
                 workers: int = 4):
        self.toolbox, self.format = toolbox, FORMATS[call_format](toolbox.names)
        self.max_turns, self.output_tokens, self.workers = max_turns, output_tokens, workers

    def __call__(self, model, prompts: list[list[int]], group_size: int, params: SamplingParams, pad_id: int,
                 seed: int, row_offset: int = 0, total_rows: int | None = None, max_rows: int | None = None,
                 tokenizer=None) -> Rollout:
        n = len(prompts) * group_size
        total_rows = n if total_rows is None else total_rows
        if not 0 <= row_offset <= total_rows - n:
            raise ValueError(f"rows {row_offset}…{row_offset + n - 1} are not inside a batch of {total_rows} rows")
        if tokenizer is None:
            raise ValueError("the tool loop reads the model's calls: ToolLoop(...)(..., tokenizer=tokenizer)")
        per_chunk = max(1, (max_rows or n) // group_size)
        width = max(len(p) for p in prompts)
        check_context(
            width,
            params.max_new_tokens,
            model_context(model),
            "use a shorter prompt or template, or lower max_new_tokens",
        )
        with ThreadPoolExecutor(self.workers, thread_name_prefix="aha-tool") as pool:
            parts = [self._rows(model, prompts[start:start + per_chunk], group_size, params, pad_id, seed,
                                row_offset + start * group_size, width, tokenizer, pool)
                     for start in range(0, len(prompts), per_chunk)]
        return concat_rollouts(parts, pad_id)

    @torch.no_grad()
    def _rows(self, model, prompts, group_size, params, pad_id, seed, row_offset, width, tokenizer, pool) -> Rollout:
        """One pass: these prompts' rows, turn after turn, until every row has ended."""
        texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
        rows = [Row(row_offset + i, prompts[i // group_size], self.toolbox.episode(texts[i // group_size]),
                    params.max_new_tokens) for i in range(len(prompts) * group_size)]
        running: dict = {}                                   # (tool, text) → Future: identical stateless calls run once
        live, turn = rows, 0
        while live:
            contexts = prompts if turn == 0 else [row.prompt + row.tokens for row in live]
            on_end = lambda row, turn_ids, stopped: self._submit(
                row, tokenizer.decode(turn_ids, skip_special_tokens=True), stopped, pool, running
            )
            decode_turn(
                model,
                contexts,
                group_size if turn == 0 else 1,
                width if turn == 0 else width + params.max_new_tokens,
                live,
                params,
                pad_id,
                turn_seed(seed, turn),
                tokenizer,
                self._call_end(live),
                on_end,
            )
            live = [row for row in live if self._resume(row, tokenizer)]
            turn += 1
        return to_rollout(rows, prompts, group_size, pad_id, width, self.toolbox.stateless,
                          next(model.parameters()).device)

    def _call_end(self, rows: list[Row]) -> list[str | None]:
        """Per row: the text that pauses it for a call (None: it may call no more, or calls end turns)."""
        return [self.format.call_end if row.calls < self.max_turns else None for row in rows]

    def _submit(self, row: Row, turn: str, stopped: bool, pool, running: dict) -> None:
        """A row's turn ended: send the calls it holds (if any, and if it may still call) to the pool."""
        calls = self.format.calls(turn, stopped) if row.calls < self.max_turns else None
        for call in calls or []:
            if call.error is not None:
                future: Future = Future()
                future.set_result(call.error)
            elif self.toolbox.stateless:
                key = (call.name, call.text)
                future = running.get(key) or running.setdefault(
                    key, pool.submit(row.episode.call, call.name, call.text)
                )
            else:
                future = pool.submit(row.episode.call, call.name, call.text)
            row.pending.append((call, future))
        if not calls:
            row.stopped = stopped

    def _resume(self, row: Row, tokenizer) -> bool:
        """After a turn: append the row's tool output (mask 0); True when it goes on to another turn."""
        if not row.pending or row.budget <= 0:
            row.pending = []
            return False
        calls, observations = [], []
        for call, future in row.pending:
            try:
                observation = future.result()
            except Exception as exc:           # a tool that raised past its own guard: still only an observation
                observation = Observation(f"error: {type(exc).__name__}: {exc}"[:300], True)
            text, cut = cut_tokens(tokenizer, observation.text, self.output_tokens)
            calls.append(call)
            observations.append(Observation(text, observation.error or cut))
        row.pending = []
        ids = self.format.observation_ids(tokenizer, calls, observations)[:row.budget]
        row.add(ids, [0.0] * len(ids), action=0)
        row.calls += len(calls)
        row.errors += sum(o.error for o in observations)
        return row.budget > 0


def decode_turn(model, contexts: list[list[int]], repeat: int, width: int, rows: list[Row], params: SamplingParams,
                pad_id: int, seed: int, tokenizer, call_ends: list[str | None], on_end) -> None:
    """Decode one turn of `rows` (A,): contexts (each repeated `repeat` times, left-padded to `width`)
    prefilled, then one token per live row per step until each row stops (a stop token or string),
    pauses (its `call_ends` text), or spends its budget. Appends the tokens to each row and calls
    `on_end(row, turn token ids, stopped)` the moment a row ends, so its tool runs meanwhile."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(contexts, pad_id, width))
    steps = max(row.budget for row in rows)
    cache, cache_kw = PreallocatedCache(width + steps), cache_kwarg(model)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    if repeat > 1:
        cache.batch_repeat_interleave(repeat)
    logits = out.logits[:, -1].repeat_interleave(repeat, dim=0)                            # (A, V)
    attn = torch.ones((len(rows), width + steps), dtype=torch.long, device=device)
    attn[:, :width] = mask.repeat_interleave(repeat, dim=0)
    next_pos = positions[:, -1:].repeat_interleave(repeat, dim=0) + 1
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    row_ids = torch.tensor([row.index for row in rows], device=device)
    budgets = torch.tensor([row.budget for row in rows], device=device)
    ends = EndRules(tokenizer, params.stop_strings, call_ends, device)
    tokens = torch.full((len(rows), steps), pad_id, dtype=torch.long, device=device)       # (A, steps) this turn
    logprobs = torch.zeros((len(rows), steps), device=device)
    active = torch.arange(len(rows), device=device)       # (B,) the row in each batch slot
    running = torch.ones(len(rows), dtype=torch.bool, device=device)
    vocab = model.config.vocab_size
    for step in range(steps):
        tok, lp = sample_next(logits[:, :vocab], row_uniforms(seed, step, row_ids[active]), params)
        tokens[active, step] = torch.where(running, tok, pad_id)
        logprobs[active, step] = torch.where(running, lp, 0.0)
        stopped = torch.isin(tok, stop_ids) & running
        paused = ends.check(tokens, active, running, stopped, tok, step)
        spent = (step + 1 >= budgets[active]) & running
        ended = (stopped | paused | spent) & running
        for slot in ended.nonzero().squeeze(1).tolist():
            index = int(active[slot])
            rows[index].add(tokens[index, :step + 1].tolist(), logprobs[index, :step + 1].tolist(), action=1)
            on_end(rows[index], tokens[index, :step + 1].tolist(), bool(stopped[slot]))
        running &= ~ended
        alive = int(running.sum())
        if alive == 0 or step == steps - 1:
            break
        if 8 * (active.numel() - alive) >= active.numel():
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, running, tok, attn, next_pos = active[keep], running[keep], tok[keep], attn[keep], next_pos[keep]
        out = model(input_ids=tok[:, None], attention_mask=attn[:, :width + step + 1], position_ids=next_pos,
                    use_cache=True, **{cache_kw: cache})
        logits, next_pos = out.logits[:, -1], next_pos + 1


class EndRules:
    """Where a row's turn ends besides its stop tokens: a stop string, or the call format's end of a
    call (`</tool>`) for the rows that may still call; one token is matched by id, text on the
    decoded tail of the turn."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], call_ends: list[str | None], device):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        may_call = [end is not None for end in call_ends]
        end = next((e for e in call_ends if e), None)
        self.may_call = torch.tensor(may_call, dtype=torch.bool, device=device)          # (A,)
        pieces = tokenizer.tokenize(end) if end else []
        single = tokenizer.convert_tokens_to_ids(pieces[0]) if len(pieces) == 1 else None
        self.call_id = None if single is None else torch.tensor([single], device=device)
        self.call_text = end if end and single is None else None
        self.tail = 4 * max((len(s) for s in (*self.stop_strings, self.call_text or "")), default=0) + 16

    def check(self, tokens: Tensor, active: Tensor, running: Tensor, stopped: Tensor, tok: Tensor, step: int) -> Tensor:
        """Sets `stopped` (B,) where a stop string completed; returns paused (B,): a call just ended."""
        may_call = self.may_call[active] & running
        paused = torch.isin(tok, self.call_id) & may_call if self.call_id is not None else torch.zeros_like(stopped)
        if not (self.stop_strings or self.call_text) or not bool(running.any()):
            return paused & ~stopped
        slots = running.nonzero().squeeze(1)
        recent = tokens[active[slots], max(0, step + 1 - self.tail):step + 1].tolist()
        texts = self.tokenizer.batch_decode(recent, skip_special_tokens=True)
        if self.stop_strings:
            hits = torch.tensor([any(s in text for s in self.stop_strings) for text in texts], device=stopped.device)
            stopped[slots] |= hits
        if self.call_text:
            hits = torch.tensor([text.endswith(self.call_text) for text in texts], device=stopped.device)
            paused[slots] |= hits & may_call[slots]
        return paused & ~stopped


def to_rollout(rows: list[Row], prompts: list[list[int]], group_size: int, pad_id: int, width: int,
               stateless: bool, device) -> Rollout:
    """The Rollout of finished rows: completions right-padded, the policy's tokens in action_mask."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, width)
    longest = max(1, max(len(row.tokens) for row in rows))
    completion = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask, actions, logprobs = (
        torch.zeros((len(rows), longest), dtype=dtype) for dtype in (torch.long, torch.long, torch.float)
    )
    for i, row in enumerate(rows):
        length = len(row.tokens)
        completion[i, :length] = torch.tensor(row.tokens, dtype=torch.long)
        mask[i, :length] = 1
        actions[i, :length] = torch.tensor(row.actions, dtype=torch.long)
        logprobs[i, :length] = torch.tensor(row.logprobs)
    rewards = None if stateless else torch.tensor([float(row.episode.reward() or 0.0) for row in rows])
    tools = ToolRecord(
        calls=torch.tensor([row.calls for row in rows]),
        errors=torch.tensor([row.errors for row in rows]),
        rewards=rewards,
    )
    on = lambda t: t.to(device)
    return Rollout(
        prompt_ids=on(prompt_ids.repeat_interleave(group_size, dim=0)),
        prompt_mask=on(prompt_mask.repeat_interleave(group_size, dim=0)),
        completion_ids=on(completion),
        completion_mask=on(mask),
        logprobs=on(logprobs),
        truncated=on(torch.tensor([not row.stopped for row in rows])),
        group_size=group_size,
        action_mask=on(actions),
        tools=tools,
    )


def tool_metrics(rollout: Rollout) -> dict:
    """The step's tool figures: calls per sample, the share of calls that failed, the share of samples
    that called a tool, model turns per sample and the model's own tokens per sample; {} without tools."""
    if rollout.tools is None:
        return {}
    calls, errors = rollout.tools.calls.float(), rollout.tools.errors.float()
    policy = rollout.loss_mask.cpu()
    turns = policy[:, :1].sum(dim=1) + ((policy[:, 1:] == 1) & (policy[:, :-1] == 0)).sum(dim=1)
    metrics = {
        "tool_calls_per_sample": calls.mean().item(),
        "tool_error_rate": (errors.sum() / calls.sum().clamp(min=1)).item(),
        "tool_use_rate": (calls > 0).float().mean().item(),
        "turns_per_sample": turns.float().mean().item(),
        "policy_tokens": policy.sum(dim=1).float().mean().item(),
    }
    if rollout.tools.rewards is not None:
        metrics["reward_env_mean"] = rollout.tools.rewards.mean().item()
    return metrics
