"""`aha train`: R1-Zero-style reinforcement learning from verifiable rewards.

The loop below reads top to bottom: config → model → task → for each step: rollout → reward →
advantage → loss → update → log. GRPO (DeepSeekMath §4.1) as in R1-Zero: G samples per prompt,
rule rewards (accuracy + format, logged apart), group-relative advantages, clipped surrogate;
the variant is only a choice of registry entries in aha/core/algos.py, never a branch here.

Departures from the paper, each for speed with no change to the maths: completions whose
advantage is exactly 0 (a group whose rewards are all equal) carry no gradient when β = 0, so
they never enter the forward/backward pass; with one update per rollout (μ = 1) the old
log-probs equal the current ones, so no extra forward pass computes them.

DAPO's extras are config switches, not branches of the algorithm: `dynamic_sampling` (rolls out
fresh prompts until `prompts_per_step` groups have a spread in `dynamic_sampling_metric`, accuracy
by default; aha/core/dynamic.py),
`overlong=mask|soft` (truncated completions out of the loss, or a length penalty as a reward
component). `ref_refresh_every` copies the policy into the reference model, as R1 did every 400 steps.

    aha train --steps 150 --out runs/grpo
    aha train --algo dapo --config my.yaml lr=1e-5 group_size=16
"""

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aha.core.algos import ADVANTAGES, LossSpec, Normaliser, loss_spec, policy_loss
from aha.core.dynamic import concat_rollouts, filter_values, group_spread, kept_groups
from aha.core.health import HealthMonitor
from aha.core.logprobs import completion_logprobs
from aha.core.rollout import (
    Rollout,
    SamplingParams,
    encode_prompt,
    generate,
    prompt_limit,
    stop_strings,
    stop_token_ids,
)
from aha.core.rollout_correction import merge_mismatch, rollout_mismatch, rollout_weights
from aha.core.schedule import lr_factor
from aha.core.tools import eval_engine, tool_engine, tool_schemas
from aha.core.tools.interact import tool_metrics
from aha.eval.evaluate import EvalSpec, evaluate
from aha.eval.passk import passed
from aha.infra.base import ensure_base_model
from aha.infra.card import rl_card, save_model
from aha.infra.checkpoint import (
    Cursor,
    RunLock,
    StopSignals,
    complete_checkpoints,
    latest_checkpoint,
    load_trainer_state,
    maybe_kill,
    open_records,
    prepare_out_dir,
    save_checkpoint,
    set_rng_states,
    trainer_state,
)
from aha.infra.config import Config, parse_reward_weights, save_config
from aha.infra.distributed import SINGLE, World, init_world, loss_scale
from aha.infra.errors import AhaError, Stopped
from aha.infra.lora import add_lora, merged
from aha.infra.model import (
    autocast,
    check_context,
    count_parameters,
    detect_device,
    detect_dtype,
    disable_dropout,
    load_model,
    model_context,
)
from aha.infra.plan import MemoryPlan, check_fits, process_rss
from aha.infra.plan import plan_for as memory_plan_for
from aha.infra.progress import progress_bar
from aha.infra.trackers import trackers_for
from aha.infra.vllm_rollout import engine_metrics, rollout_engine
from aha.tasks import get_task
from aha.tasks.base import Problem, thought
from aha.tasks.rewards import SHAPING, Sample
from aha.tasks.templates import apply_template, prompt_prefill


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % 2**62


@dataclass
class Batch:
    """One step's samples: N = prompts × G completions, grouped as in `Rollout`."""
    problems: list[Problem]     # (P,) one per group
    rollout: Rollout
    texts: list[str]            # (N,) decoded completions
    scores: list[dict]          # (N,) reward components by name
    rewards: torch.Tensor       # (N,) weighted sum of the components
    tries: int                  # rollouts it took (dynamic sampling)


def score(
    task, cfg: Config, texts: list[str], problems: list[Problem], rollout: Rollout
) -> tuple[list[dict], torch.Tensor]:
    """Reward components of each completion, and their weighted sum (N,): the task's own, then each
    shaping component of aha/tasks/rewards.py that `reward_weights` names (overlong=soft adds DAPO's
    length penalty, weight 1)."""
    batch_problems = [problems[i // cfg.group_size] for i in range(len(texts))]
    score_batch = getattr(task, "score_batch", None)  # parallel grading (aha/tasks/code.py)
    scores = (
        score_batch(texts, batch_problems) if score_batch else [task.score(t, p) for t, p in zip(texts, batch_problems)]
    )
    weights, named = cfg.component_weights(), parse_reward_weights(cfg.reward_weights)
    shaping = [name for name in SHAPING if name not in scores[0] and (named.get(name) or
                                                                      (name == "overlong" and cfg.overlong == "soft"))]
    lengths = rollout.lengths.tolist() if shaping else []
    for name in shaping:
        for s, text, length in zip(scores, texts, lengths):
            s[name] = SHAPING[name](
                Sample(text, length, cfg.max_new_tokens, s["accuracy"] >= 1, cfg.lang, cfg.overlong_cache)
            )
    tools = getattr(rollout, "tools", None)               # what the tool loop recorded (aha/core/tools/), or None
    if tools is not None and tools.rewards is not None:     # an env: tool's reward() (aha/core/tools/)
        for s, value in zip(scores, tools.rewards.tolist()):
            s["env"] = value
    rewards = torch.tensor([sum(weights.get(k, 0.0) * v for k, v in s.items()) for s in scores])
    return scores, rewards


def check_component_names(cfg: Config, task) -> None:
    """A `reward_weights` name that neither the task nor aha/tasks/rewards.py gives is a typo that would
    silently weigh 0: stop before anything runs. The task's names come from scoring an empty answer."""
    problem = (task.eval_problems(1) or [next(iter(task.train_problems(cfg.seed)))])[0]
    given = getattr(task, "components", None) or task.score("", problem)
    unknown = set(cfg.component_weights()) - {"accuracy", "format", "env"} - set(SHAPING) - set(given)
    if unknown:
        raise AhaError(f"reward_weights names {', '.join(sorted(unknown))}, but task {cfg.task!r} gives the components "
                       f"{', '.join(k for k in given if k != 'skip')} and aha/tasks/rewards.py {', '.join(SHAPING)}")
    metric = cfg.dynamic_sampling_metric
    if (
        cfg.dynamic_sampling
        and metric != "reward"
        and metric not in set(given) | set(parse_reward_weights(cfg.reward_weights))
    ):
        raise AhaError(f"dynamic_sampling_metric={metric!r} is neither 'reward' nor a component of task {cfg.task!r} "
                       f"({', '.join(k for k in given if k != 'skip')}) or of reward_weights")


def check_prompt_lengths(cfg: Config, task, tokenizer, model) -> None:
    """Before anything runs: the first step's prompts, and the held-out ones when the run evaluates
    (eval_every > 0), plus max_new_tokens, must fit the model's context, and the tokenizer must spell
    them (a later prompt that does not is caught by aha/core/rollout.py)."""
    stream = task.train_problems(cfg.seed)
    problems = (task.eval_problems(cfg.eval_problems) if cfg.eval_every else []) + \
        [next(stream) for _ in range(cfg.prompts_per_step)]
    special = getattr(task, "adds_special_tokens", True)
    longest = max(len(encode_prompt(tokenizer, task.prompt(p), special)) for p in problems)
    check_context(
        longest,
        cfg.max_new_tokens,
        model_context(model),
        f"use a shorter prompt than template={cfg.template}, lower max_new_tokens, or a model with a longer context",
    )


def fill_skipped(rewards: torch.Tensor, skip: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards (N,) for the group baseline: a skipped sample (skip (N,) bool; a `py:` reward function
    returned None) takes the mean of its group's other samples, so it moves neither the group
    mean nor, much, the spread. A group with every sample skipped keeps its rewards (all 0).

    >>> fill_skipped(torch.tensor([1., 0., 0., 5.]), torch.tensor([False, False, True, False]), 2).tolist()
    [1.0, 0.0, 5.0, 5.0]
    """
    grouped, skipped = rewards.view(-1, group_size), skip.view(-1, group_size)
    kept = (~skipped).float()
    mean = (grouped * kept).sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(skipped, mean.expand_as(grouped), grouped).reshape(-1)


def sample(model, tokenizer, task, problems, cfg: Config, sampling: SamplingParams, step: int,
           world: World = SINGLE, engine=generate, rollout_rows: int | None = None) -> Batch:
    """Roll out and score `prompts_per_step` fresh prompts; with dynamic sampling, roll out
    batches of fresh prompts again until `prompts_per_step` groups have a reward spread, or
    `max_sampling_tries` rollouts were made. `rollout_rows`: rows generated at once (aha/infra/plan.py). Under torchrun
    each process rolls out and scores its
    slice of the prompts and the slices are gathered: every process gets the whole batch."""
    parts = []
    for attempt in range(cfg.max_sampling_tries if cfg.dynamic_sampling else 1):
        chosen = [next(problems) for _ in range(cfg.prompts_per_step)]
        mine, first = world.shard(chosen)                  # this process's prompts (all of them on one)
        special, limit = getattr(task, "adds_special_tokens", True), prompt_limit(model, cfg.max_new_tokens)
        prompts = [encode_prompt(tokenizer, task.prompt(p), special, limit, cfg.max_new_tokens) for p in mine]
        rollout = engine(model, prompts, cfg.group_size, sampling, tokenizer.pad_token_id,
                         step_seed(cfg.seed, step) + attempt, row_offset=first * cfg.group_size,
                         total_rows=len(chosen) * cfg.group_size, max_rows=rollout_rows, tokenizer=tokenizer)
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        scores, rewards = score(task, cfg, texts, mine, rollout)
        parts.append((chosen, *world.gather(rollout, texts, scores, rewards, tokenizer.pad_token_id)))
        informative = [
            group_spread(filter_values(p[3], p[4], cfg.dynamic_sampling_metric), cfg.group_size) for p in parts
        ]
        if sum(int(spread.sum()) for spread in informative) >= cfg.prompts_per_step:
            break
    return Batch(problems=[p for part in parts for p in part[0]],
                 rollout=concat_rollouts([part[1] for part in parts], tokenizer.pad_token_id),
                 texts=[t for part in parts for t in part[2]], scores=[s for part in parts for s in part[3]],
                 rewards=torch.cat([part[4] for part in parts]), tries=len(parts))


def group_advantages(cfg: Config, rewards: torch.Tensor, scores: list[dict], kept: torch.Tensor):
    """(advantages (N,), rows trained on (N,) bool, skipped samples (N,) bool).

    Groups not kept (dynamic sampling) get advantage 0. Skipped samples (a custom reward said
    None: `skip` = 1) get advantage 0 and leave the loss and its normaliser; their reward is
    replaced by their group's mean so that they do not move the baseline.
    """
    group = cfg.group_size
    batch_rows = kept.repeat_interleave(group)                                       # (N,)
    skip = torch.tensor([bool(s.get("skip", 0.0)) for s in scores])                 # (N,)
    baseline_rewards = fill_skipped(rewards, skip, group)
    advantages = torch.zeros(len(scores))                                            # (N,)
    if batch_rows.any():
        advantages[batch_rows] = ADVANTAGES[cfg.advantage](baseline_rewards[batch_rows], group)
    advantages[skip] = 0.0
    return advantages, batch_rows & ~skip, skip


def loss_rows(
    cfg: Config, batch_rows: torch.Tensor, advantages: torch.Tensor, rollout: Rollout
) -> tuple[torch.Tensor, Normaliser]:
    """(indices of the rows that enter the loss (R,), the loss normaliser). overlong=mask takes
    truncated completions out of the loss, but they still count as rows of the normaliser (TRL);
    with β = 0 a row whose advantage is 0 carries no gradient and is left out."""
    in_loss = batch_rows & ~rollout.truncated.cpu() if cfg.overlong == "mask" else batch_rows
    norm = Normaliser(rows=int(batch_rows.sum()), tokens=int(rollout.loss_mask.cpu()[in_loss].sum()),
                      max_len=cfg.max_new_tokens)
    if cfg.beta == 0:
        in_loss = in_loss & (advantages != 0)
    return in_loss.nonzero().squeeze(1), norm


def micro_batches(rows: torch.Tensor, size: int, count: int, weight: float) -> list[tuple[torch.Tensor, float]]:
    """`rows` (R,) cut into `count` micro-batches of at most `size` rows, in order (a group may span
    two), each with its weight; micro-batches past this rank's rows are stand-ins (one row, weight 0)
    so that every rank runs `count` of them.

    >>> [(m.tolist(), w) for m, w in micro_batches(torch.arange(5), 2, 4, 1.0)]
    [([0, 1], 1.0), ([2, 3], 1.0), ([4], 1.0), ([0], 0.0)]
    """
    pieces = [(piece, weight) for piece in rows.split(size)]
    return pieces + [(rows[:1], 0.0)] * (count - len(pieces))


def micro_batch_size(cfg: Config, token_budget: int, rollout: Rollout, rows: torch.Tensor) -> int:
    """Rows per forward/backward: `micro_batch_size` when it is a number, else as many rows of this
    step's padded width (prompt + completion) as fit in `token_budget` tokens, at least one."""
    if cfg.micro_batch_size != "auto":
        return int(cfg.micro_batch_size)
    width = int(rollout.prompt_mask[rows].any(dim=0).sum()) + int(rollout.completion_mask[rows].sum(dim=1).max())
    return max(1, token_budget // max(width, 1))


def policy_update(model, ref_model, optimizer, rollout: Rollout, rows: torch.Tensor, advantages: torch.Tensor,
                  spec: LossSpec, norm: Normaliser, cfg: Config, world: World = SINGLE, token_budget: int = 1 << 62):
    """μ clipped-surrogate updates on `rows`, each accumulated over micro-batches; a non-finite loss or
    gradient skips the update. Every micro-batch's loss is divided by the normaliser of the WHOLE batch
    (`norm`), so the accumulated gradient equals the one-shot step's (tests/test_micro_batch.py). Under
    torchrun each process takes its own share of `rows` and DDP/FSDP sums the gradients once, after
    the last micro-batch (the loss scaling is derived in aha/infra/distributed.py). The old log-probs are
    the trainer's own, from the first inner update's forward (detached); the sampler's
    (`rollout.logprobs`) give the sampler/trainer mismatch, logged every step, and the rollout
    correction's weights. Entropy masking and Clip-/KL-Cov pick their tokens within each micro-batch.

    Returns (loss, grad_norm, loss metrics, entropy per token, skipped)."""
    loss_value, grad_norm, loss_metrics, entropy, skipped = 0.0, 0.0, {}, None, False
    rows, weight = world.local_rows(rows, cfg.prompts_per_step * cfg.group_size)   # weight 0: a stand-in row
    if not rows.numel():
        return loss_value, grad_norm, loss_metrics, entropy, skipped
    size = micro_batch_size(cfg, token_budget, rollout, rows)
    pieces = micro_batches(rows, size, world.most(-(-rows.numel() // size)), weight)
    device = rollout.prompt_ids.device.type
    old = {}                                             # micro-batch index -> (old log-probs, IS weight)
    mismatches = []
    for _ in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        total_loss, entropy_sum, tokens, metric_sums = 0.0, 0.0, 0.0, {}
        for index, (piece, piece_weight) in enumerate(pieces):
            with world.gradient_sync(model, sync=index == len(pieces) - 1):
                with autocast(cfg.autocast, device):
                    logp, token_entropy, mask = completion_logprobs(model, rollout, piece, cfg.temperature)
                if index not in old:                      # the trainer before this step's updates
                    old_logp, sampler_logp = logp.detach(), rollout.logprobs[piece][:, :logp.shape[1]]
                    is_weight = rollout_weights(old_logp, sampler_logp, mask, cfg.rollout_correction,
                                                cfg.rollout_is_low, cfg.rollout_is_high)
                    old[index] = (old_logp, is_weight)
                    if piece_weight:
                        mismatches.append(
                            (float(mask.sum()), rollout_mismatch(old_logp, sampler_logp, mask, is_weight))
                        )
                old_logp, is_weight = old[index]
                ref_logp = None
                if ref_model is not None:
                    with torch.no_grad(), autocast(cfg.autocast, device):
                        ref_logp = completion_logprobs(ref_model, rollout, piece, cfg.temperature)[0]
                loss, metrics = policy_loss(logp, old_logp, advantages[piece], mask, spec, ref_logp, norm,
                                            entropy=token_entropy, rollout_weight=is_weight)
                (loss * loss_scale(world.size, piece_weight)).backward()
            count = float(mask.sum()) * piece_weight                    # token-weighted means over the pieces
            total_loss += loss.item() * piece_weight
            entropy_sum += float((token_entropy * mask).sum()) * piece_weight
            tokens += count
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value * count
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        means = {name: total / tokens if tokens else 0.0 for name, total in metric_sums.items()}
        loss_value, step_entropy, loss_metrics = world.reduce_update(
            total_loss,
            torch.tensor(entropy_sum),
            torch.tensor(tokens),
            {**means, **merge_mismatch(mismatches, cfg.rollout_correction != "none")},
            1.0,
        )
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        entropy = step_entropy
    return loss_value, grad_norm, loss_metrics, entropy, skipped


def step_record(step: int, task, batch: Batch, spread, kept, skip, rows, loss_value, grad_norm, entropy, skipped,
                loss_metrics: dict, t_generate: float, t_update: float) -> dict:
    """The step's line of metrics.jsonl: GRPO's health signals (STYLE.md §12). pass_rate counts
    full passes (aha/eval/passk.py `passed`); reward_accuracy is the mean, partial credit included."""
    scores, texts, rewards, rollout = batch.scores, batch.texts, batch.rewards, batch.rollout
    lengths, correct = rollout.lengths.float().cpu(), torch.tensor([s["accuracy"] >= 1 for s in scores])
    length_of = lambda chosen: lengths[chosen].mean().item() if chosen.any() else None
    return {
        "step": step,
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        **{f"reward_{k}": sum(s[k] for s in scores) / len(scores) for k in scores[0]},
        "pass_rate": sum(passed(s["accuracy"]) for s in scores) / len(scores),
        "think_rate": sum(
            thought(prompt_prefill(task, batch.problems[i * len(batch.problems) // len(texts)]) + t)
            for i, t in enumerate(texts)
        )
        / len(texts),
        "response_tokens": rollout.lengths.float().mean().item(),
        "truncation_rate": rollout.truncated.float().mean().item(),
        "response_tokens_correct": length_of(correct),
        "response_tokens_wrong": length_of(~correct),
        "zero_spread_frac": 1.0 - spread.float().mean().item(),
        "sampling_tries": batch.tries,
        "groups_kept": int(kept.sum()),
        "skipped_samples": int(skip.sum()),
        "loss": loss_value,
        "entropy": entropy,
        "grad_norm": grad_norm,
        "trained_rows": int(rows.numel()),
        "skipped_update": skipped,
        "time_generate": round(t_generate, 3),
        "time_update": round(t_update, 3),
        **loss_metrics,
        **tool_metrics(rollout),
    }


def dump_rollouts(file, step: int, task, batch: Batch, group: int) -> None:
    """The first sample of each group, with its reward components, to rollouts.jsonl."""
    for i in range(0, len(batch.texts), group):
        file.write(
            json.dumps(
                {
                    "step": step,
                    "prompt": task.prompt(batch.problems[i // group]),
                    "completion": batch.texts[i],
                    "reward": batch.rewards[i].item(),
                    **batch.scores[i],
                }
            )
            + "\n"
        )
    file.flush()


def build_model(cfg: Config, console, checkpoint: Path | None):
    """(model, tokenizer, peft model or None): the configured model, or a checkpoint's weights."""
    device = detect_device()
    source = checkpoint / "model" if checkpoint is not None and not cfg.lora_rank else None
    model, tokenizer = load_model(source or cfg.model or ensure_base_model(console), device, detect_dtype(device))
    return model, tokenizer


def train(cfg: Config, force: bool = False, console=None, out: Path | None = None, model=None, tokenizer=None,
          resume: bool = False, trackers=None) -> dict:
    """RL on `cfg`. `resume`: continue the run in `cfg.out` from its latest checkpoint. Under torchrun,
    one of several processes: rank 0 alone locks and writes the run folder (aha/infra/distributed.py).
    `trackers`: live dashboards opened by the caller (aha/infra/trackers.py); by default the run opens `report_to`'s."""
    world = init_world(cfg.prompts_per_step)
    console = world.console(console)
    lock = RunLock(Path(cfg.out)).acquire() if resume and world.writes else None    # before anything is loaded
    created = None
    try:
        task = get_task(cfg.task, **cfg.task_options())
        if getattr(task, "skipped_rows", 0):
            (console.print if console else print)(
                f"skipped {task.skipped_rows} bad row(s) of {cfg.data} (skip_bad_rows)"
            )
        resume_from = latest_checkpoint(Path(cfg.out)) if resume else None
        saved = load_trainer_state(resume_from) if resume_from is not None else {}
        if model is None:
            model, tokenizer = build_model(cfg, console, resume_from)
        device = next(model.parameters()).device
        task = apply_template(task, tokenizer, cfg.template, cfg.think_prefill, tool_schemas(cfg))
        check_component_names(cfg, task)
        check_prompt_lengths(cfg, task, tokenizer, model)
        peft_model = None
        if cfg.lora_rank:
            peft_model, model = add_lora(
                model, cfg.lora_rank, cfg.lora_alpha
            )  # `model`: the same modules, adapters inside
            if saved:
                from peft import set_peft_model_state_dict
                set_peft_model_state_dict(peft_model, saved["adapter"])
        if cfg.disable_dropout:
            disable_dropout(model)                     # after LoRA: its adapters' dropout too
        if cfg.gradient_checkpointing:
            # recompute activations in the backward pass (transformers ≥ 5.x renamed the method)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine = tool_engine(cfg) or rollout_engine(
            cfg, model
        )  # the sampler: the tool loop, aha's torch engine, or vLLM
        plan = run_plan(cfg, model, task, tokenizer, world)
        if not resume and world.writes:
            if out is None:
                out = created = prepare_out_dir(cfg.out, force)   # only once the inputs are known good
            lock = RunLock(out).acquire()
            save_config(cfg, out / "config.yaml")
        return train_loop(cfg, task, model, tokenizer, peft_model, out or Path(cfg.out), saved, console, device,
                          world, engine, plan, trackers)
    except BaseException:
        metrics = created / "metrics.jsonl" if created else None
        if metrics is not None and not (metrics.exists() and metrics.stat().st_size):
            lock.release()                             # failed before its first step: leave no run folder
            lock = None
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def run_plan(cfg: Config, model, task, tokenizer, world: World = SINGLE) -> MemoryPlan:
    """The memory plan of this run (aha/infra/plan.py), with the model already loaded; refuses, before any
    run folder exists, a run in which one row per micro-batch does not fit."""
    params = count_parameters(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = memory_plan_for(cfg, model.config, task, tokenizer, params=params, trainable=trainable,
                           device=next(model.parameters()).device.type, world_size=world.size,
                           process_bytes=max(0, process_rss() - weights))[0]
    check_fits(plan, cfg)
    return plan


def train_loop(cfg: Config, task, model, tokenizer, peft_model, out: Path, saved: dict, console, device,
               world: World = SINGLE, engine=generate, plan: MemoryPlan | None = None, trackers=None) -> dict:
    torch.manual_seed(cfg.seed)
    spec = loss_spec(cfg)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    # the module that trains: `model` itself, DDP around it, or an FSDP2-sharded copy (then `model`,
    # kept whole and refreshed after each update, generates, evaluates and is saved)
    trained = world.wrap(model, cfg.dist_strategy)
    optimizer = torch.optim.AdamW(
        [p for p in trained.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    sampling = SamplingParams(
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        cfg.top_k,
        stop_token_ids(model, tokenizer),
        stop_strings(tokenizer),
    )
    plan = plan or run_plan(cfg, model, task, tokenizer, world)
    eval_spec = EvalSpec(
        cfg.eval_problems,
        cfg.eval_k,
        cfg.eval_temperature,
        cfg.eval_top_p,
        cfg.max_new_tokens,
        cfg.seed,
        rows_per_pass=plan.eval_rows,
    )
    group = cfg.group_size
    health = HealthMonitor(window=cfg.health_window)
    history, evals, bad_steps = saved.get("history", []), saved.get("evals", []), saved.get("bad_steps", 0)
    problems = Cursor(task.train_problems(cfg.seed), skip=saved.get("consumed", 0))
    if saved:
        world.load_optimizer_state(trained, optimizer, saved["optimizer"])
        set_rng_states(saved["rng"])
        if ref_model is not None:
            ref_model.load_state_dict(saved["ref_model"])
        health.history = list(history)
    first_step = len(history)
    # only rank 0 writes files; the other ranks write their records nowhere
    metrics_file, rollouts_file = (
        open_records(out, history) if world.writes else (open(os.devnull, "w"), open(os.devnull, "w"))
    )
    say = (console.print if console else print)
    if first_step:
        say(f"resuming {out} at step {first_step} of {cfg.steps}")

    def checkpoint() -> Path | None:
        state = trainer_state(cfg, optimizer, problems, bad_steps, history, evals, peft_model, ref_model)
        state["optimizer"] = world.optimizer_state(trained, optimizer)      # FSDP: gathered, so every rank calls it
        plain = model if peft_model is None else merged(peft_model, copy=True)    # training goes on unmerged
        card = rl_card(cfg, len(history), evals)
        path = (
            save_checkpoint(out, len(history), plain, tokenizer, state, cfg.keep_checkpoints, card)
            if world.writes
            else None
        )
        world.barrier()                                # the others wait for rank 0's checkpoint
        return path

    if not saved:
        checkpoint()                                   # step-0: a kill at any step can resume
    live = trackers_for(cfg.report_to, out, dataclasses.asdict(cfg), first_step, trackers, world.writes)
    with progress_bar(console) as bar, StopSignals() as stop, metrics_file, rollouts_file, live as trackers:
        job = bar.add_task("train", total=cfg.steps, completed=first_step)
        for step in range(first_step, cfg.steps):
            # 1+2. rollout and reward: G samples for each of the step's prompts, rewarded by
            # named components; with dynamic sampling, more prompts until enough groups have spread
            t0 = time.time()
            model.eval()
            batch = sample(model, tokenizer, task, problems, cfg, sampling, step, world, engine, plan.rollout_rows)
            rollout, rewards, scores = batch.rollout, batch.rewards, batch.scores
            spread = group_spread(rewards, group)                                       # (P,)
            informative = group_spread(filter_values(scores, rewards, cfg.dynamic_sampling_metric), group)
            kept = kept_groups(informative, cfg.prompts_per_step) if cfg.dynamic_sampling else torch.ones_like(spread)
            t_generate = time.time() - t0

            # 3. advantage: group-relative, by the configured estimator, over the kept groups
            advantages, batch_rows, skip = group_advantages(cfg, rewards, scores, kept)

            # 4. loss and update, on the completions that carry a gradient; the learning rate is a
            # pure function of the step, so a step without an optimizer step still advances it
            t1 = time.time()
            lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            trained.train()
            rows, norm = loss_rows(cfg, batch_rows, advantages, rollout)
            rows, advantages = rows.to(device), advantages.to(device)
            loss_value, grad_norm, loss_metrics, entropy, skipped = policy_update(
                trained,
                ref_model,
                optimizer,
                rollout,
                rows,
                advantages,
                spec,
                norm,
                cfg,
                world,
                plan.micro_batch_tokens,
            )
            world.sync(trained, model)                 # FSDP: the whole copy takes the new weights
            if ref_model is not None and cfg.ref_refresh_every and (step + 1) % cfg.ref_refresh_every == 0:
                ref_model.load_state_dict(model.state_dict())     # R1: the reference follows the policy
            t_update = time.time() - t1
            bad_steps = bad_steps + 1 if skipped else 0

            # 5. log: one JSON line per step, a console line, health warnings
            record = step_record(step, task, batch, spread, kept, skip, rows, loss_value, grad_norm, entropy, skipped,
                                 loss_metrics, t_generate, t_update)
            record["lr"] = lr
            record.update(engine_metrics(engine))      # rollout=vllm: the sampler/trainer log-prob gap, timings
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                if world.writes:                       # rank 0 evaluates; the others wait
                    result = evaluate(model, tokenizer, task, eval_spec, console=console, label=f"eval @ {step + 1}",
                                      engine=eval_engine(cfg))
                    record["eval_pass@1"] = result["pass@1"]
                    evals.append({"step": step + 1, **{k: v for k, v in result.items() if k != "samples"}})
                world.barrier()
            history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            trackers.log_step(record)
            if "eval_pass@1" in record:
                trackers.log_eval(step + 1, evals[-1])     # after the step's own line: W&B steps only go forward
            if step % cfg.dump_rollouts_every == 0:
                dump_rollouts(rollouts_file, step, task, batch, group)
            for warning in health.update(record):
                say(
                    f"[yellow]warning (step {step}): {warning}[/yellow]"
                    if console
                    else f"warning (step {step}): {warning}"
                )
            bar.update(job, advance=1, description=(
                f"train reward {record['reward_mean']:.2f} pass {record['pass_rate']:.2f} "
                f"think {record['think_rate']:.2f} len {record['response_tokens']:.0f}"))
            maybe_kill("after_step", step + 1)
            if bad_steps >= cfg.max_bad_steps:
                last = complete_checkpoints(out)
                raise AhaError(f"the loss or gradient was NaN/inf for {bad_steps} steps in a row (step {step}); "
                               f"stopping: lower lr or check the reward (metrics in {out / 'metrics.jsonl'}; "
                               f"last good checkpoint: {last[-1] if last else 'none yet'})")
            if world.any(stop.received) and not stop.received:
                stop.received = signal.SIGTERM         # another process was signalled: all stop at this step
            due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if due or stop.received or step + 1 == cfg.steps:
                saved_at = checkpoint()
                maybe_kill("after_checkpoint", step + 1)
            if stop.received:
                name = signal.Signals(stop.received).name
                raise Stopped(stop.received, f"stopped by {name} after step {step + 1} of {cfg.steps}; checkpoint "
                                             f"{saved_at}; continue with: aha train --resume {out}")

    if peft_model is not None:
        model = merged(peft_model)            # a plain transformers model: loads without peft
    if world.writes:
        save_model(model, tokenizer, out / "model", rl_card(cfg, len(history), evals))
    world.barrier()
    return {"history": history, "evals": evals, "model": model, "tokenizer": tokenizer, "out": out}
