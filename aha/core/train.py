"""`aha train`: R1-Zero-style reinforcement learning from verifiable rewards.

The loop below reads top to bottom: config → model → task → for each step: `train_step` (rollout →
reward → advantage → loss → update, aha/core/step.py) → log → evaluate → checkpoint. GRPO
(DeepSeekMath §4.1) as in R1-Zero: G samples per prompt, rule rewards (accuracy + format, logged
apart), group-relative advantages, clipped surrogate; the variant is only a choice of registry
entries in aha/core/algos.py, never a branch here.

DAPO's extras are config switches, not branches of the algorithm: `dynamic_sampling` (rolls out
fresh prompts until `prompts_per_step` groups have a spread in `dynamic_sampling_metric`, accuracy
by default; aha/core/dynamic.py), `overlong=mask|soft` (truncated completions out of the loss, or a
length penalty as a reward component). `ref_refresh_every` copies the policy into the reference
model, as R1 did every 400 steps.

    aha train --steps 150 --out runs/grpo
    aha train --algo dapo --config my.yaml lr=1e-5 group_size=16
"""

import copy
import dataclasses
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aha.core.health import HealthMonitor
from aha.core.plan import MemoryPlan, check_fits, process_rss
from aha.core.plan import plan_for as memory_plan_for
from aha.core.rollout import encode_prompt, stop_strings, stop_token_ids
from aha.core.step import Learner, StepOutcome, train_step
from aha.core.tools import eval_sampler, tool_loop, tool_schemas
from aha.core.tools.interact import tool_metrics
from aha.core.vllm_rollout import rollout_sampler, sampler_metrics
from aha.eval.evaluate import evaluate
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
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from aha.infra.config import Config, save_config
from aha.infra.distributed import SINGLE, World, init_world
from aha.infra.errors import AhaError, Stopped
from aha.infra.lora import add_lora, merged
from aha.infra.model import (
    check_context,
    count_parameters,
    detect_device,
    detect_dtype,
    disable_dropout,
    load_model,
    model_context,
)
from aha.infra.progress import progress_bar
from aha.infra.trackers import trackers_for
from aha.tasks import get_task
from aha.tasks.base import thought
from aha.tasks.rewards import Reward
from aha.tasks.templates import apply_template, prompt_prefill


@dataclass
class TrainState:
    """What a run carries from one step to the next besides the weights and the optimizer, and what
    its checkpoints save with them: the place in the problem stream, the step records, the evals
    and the NaN/inf steps in a row."""
    problems: Cursor
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    bad_steps: int = 0

    def saved(self, optimizer_state: dict, peft_model=None, ref_model=None) -> dict:
        """Everything besides the weights that the next step depends on (aha/infra/checkpoint.py). The
        learning rate needs no state: it is a function of the step (aha/core/schedule.py)."""
        state = {"steps_done": len(self.history), "optimizer": optimizer_state, "rng": rng_states(),
                 "consumed": self.problems.consumed, "bad_steps": self.bad_steps, "history": self.history,
                 "evals": self.evals}
        if peft_model is not None:
            from peft import get_peft_model_state_dict
            state["adapter"] = get_peft_model_state_dict(peft_model)
        if ref_model is not None:
            state["ref_model"] = ref_model.state_dict()
        return state


def check_prompt_lengths(cfg: Config, task, tokenizer, model) -> None:
    """Before anything runs: the first step's prompts, and the held-out ones when the run evaluates
    (eval_every > 0), plus max_new_tokens, must fit the model's context, and the tokenizer must spell
    them (a later prompt that does not is caught by aha/core/rollout.py)."""
    stream = task.train_problems(cfg.seed)
    problems = (task.eval_problems(cfg.eval_problems) if cfg.eval_every else []) + \
        [next(stream) for _ in range(cfg.prompts_per_step)]
    longest = max(len(encode_prompt(tokenizer, task.prompt(p), task.adds_special_tokens)) for p in problems)
    check_context(longest, cfg.max_new_tokens, model_context(model), f"use a shorter prompt than "
                  f"template={cfg.template}, lower max_new_tokens, or a model with a longer context")


def step_record(step: int, task, outcome: StepOutcome) -> dict:
    """The step's line of metrics.jsonl: GRPO's health signals (reward and each component, pass rate,
    lengths, truncation, zero-spread groups, loss, KL, entropy, grad norm, time split). pass_rate counts
    full passes (aha/eval/passk.py `passed`); reward_accuracy is the mean, partial credit included."""
    batch, update = outcome.batch, outcome.update
    scores, texts, rewards, rollout = batch.scores, batch.texts, batch.rewards, batch.rollout
    lengths, correct = rollout.lengths.float().cpu(), torch.tensor([s["accuracy"] >= 1 for s in scores])
    length_of = lambda chosen: lengths[chosen].mean().item() if chosen.any() else None
    thinking = [thought(prompt_prefill(task, batch.problems[i * len(batch.problems) // len(texts)]) + text)
                for i, text in enumerate(texts)]
    return {
        "step": step, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
        **{f"reward_{k}": sum(s[k] for s in scores) / len(scores) for k in scores[0]},
        "pass_rate": sum(passed(s["accuracy"]) for s in scores) / len(scores),
        "think_rate": sum(thinking) / len(texts),
        "response_tokens": rollout.lengths.float().mean().item(),
        "truncation_rate": rollout.truncated.float().mean().item(),
        "response_tokens_correct": length_of(correct), "response_tokens_wrong": length_of(~correct),
        "zero_spread_frac": 1.0 - outcome.spread.float().mean().item(), "sampling_tries": batch.tries,
        "groups_kept": int(outcome.kept.sum()), "skipped_samples": int(outcome.skip.sum()), "loss": update.loss,
        "entropy": update.entropy, "grad_norm": update.grad_norm, "trained_rows": int(outcome.rows.numel()),
        "skipped_update": update.skipped, "time_generate": round(outcome.time_generate, 3),
        "time_update": round(outcome.time_update, 3), **update.metrics, **tool_metrics(rollout),
        "lr": outcome.lr,
    }


def dump_rollouts(file, step: int, task, outcome: StepOutcome, group: int) -> None:
    """The first sample of each group, with its reward components, to rollouts.jsonl."""
    batch = outcome.batch
    for i in range(0, len(batch.texts), group):
        file.write(json.dumps({"step": step, "prompt": task.prompt(batch.problems[i // group]),
                               "completion": batch.texts[i], "reward": batch.rewards[i].item(),
                               **batch.scores[i]}) + "\n")
    file.flush()


def build_model(cfg: Config, console, checkpoint: Path | None):
    """(model, tokenizer): the configured model, or a checkpoint's weights."""
    device = detect_device()
    source = checkpoint / "model" if checkpoint is not None and not cfg.lora_rank else None
    model, tokenizer = load_model(source or cfg.model or ensure_base_model(console), device, detect_dtype(device))
    return model, tokenizer


def prepare_model(cfg: Config, model, saved: dict):
    """(model, peft model or None): LoRA adapters (their saved weights on resume), dropout off and
    activation recomputation, as the config asks."""
    peft_model = None
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)        # peft draws lora_A from torch's generator, whose start is random per process
        peft_model, model = add_lora(model, cfg.lora_rank, cfg.lora_alpha)   # `model`: the same modules, adapters in
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
    return model, peft_model


def train(cfg: Config, force: bool = False, console=None, out: Path | None = None, model=None, tokenizer=None,
          resume: bool = False, trackers=None) -> dict:
    """RL on `cfg`. `resume`: continue the run in `cfg.out` from its latest checkpoint. Under torchrun,
    one of several processes: rank 0 alone locks and writes the run folder (aha/infra/distributed.py).
    `trackers`: live dashboards opened by the caller (aha/infra/trackers.py); by default the run opens
    `report_to`'s."""
    world = init_world(cfg.prompts_per_step)
    console = world.console(console)
    lock = RunLock(Path(cfg.out)).acquire() if resume and world.writes else None    # before anything is loaded
    created = None
    try:
        task = get_task(cfg.task, **cfg.task_options())
        if task.skipped_rows:
            (console.print if console else print)(f"skipped {task.skipped_rows} bad row(s) of {cfg.data} "
                                                  "(skip_bad_rows)")
        resume_from = latest_checkpoint(Path(cfg.out)) if resume else None
        saved = load_trainer_state(resume_from) if resume_from is not None else {}
        if model is None:
            model, tokenizer = build_model(cfg, console, resume_from)
        task = apply_template(task, tokenizer, cfg.template, cfg.think_prefill, tool_schemas(cfg))
        reward = Reward.build(cfg, task)               # checks the component names before anything runs
        check_prompt_lengths(cfg, task, tokenizer, model)
        model, peft_model = prepare_model(cfg, model, saved)
        sampler = tool_loop(cfg) or rollout_sampler(cfg, model)   # the tool loop, torch, or vLLM
        plan = run_plan(cfg, model, task, tokenizer, world)
        if not resume and world.writes:
            if out is None:
                out = created = prepare_out_dir(cfg.out, force)   # only once the inputs are known good
            lock = RunLock(out).acquire()
            save_config(cfg, out / "config.yaml")
        learner = make_learner(cfg, task, reward, model, tokenizer, world, sampler, plan)
        return train_loop(learner, peft_model, out or Path(cfg.out), saved, console, plan, trackers)
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
    """The memory plan of this run (aha/core/plan.py), with the model already loaded; refuses, before any
    run folder exists, a run in which one row per micro-batch does not fit."""
    params = count_parameters(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = memory_plan_for(cfg, model.config, task, tokenizer, params=params, trainable=trainable,
                           device=next(model.parameters()).device.type, world_size=world.size,
                           process_bytes=max(0, process_rss() - weights))[0]
    check_fits(plan, cfg)
    return plan


def fused_adamw(params) -> bool | None:
    """True where every parameter is a plain tensor on CPU or CUDA: torch's fused AdamW then updates
    each in one kernel, the same step within fp32 rounding (1.5e-8 after 5 steps on the built-in
    model) and ~4x faster on a CPU than the default per-op path (AMD EPYC, 2 cores: 0.62–0.75
    against 2.36–3.81 ms at the built-in model's 1.8M parameters, 27–39 against 147–171 ms at 81M,
    `python bench/speed_probes_2026_12_06.py later`). None (torch's default) for anything else,
    e.g. FSDP2's sharded DTensors."""
    return True if params and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                  for p in params) else None


def make_learner(cfg: Config, task, reward: Reward, model, tokenizer, world: World = SINGLE, sampler=None,
                 plan: MemoryPlan | None = None) -> Learner:
    """The step's parts for `model`: the module that trains (the model itself, DDP around it, or an
    FSDP2-sharded copy, then `model`, kept whole and refreshed after each update, generates,
    evaluates and is saved), the frozen reference when β > 0, AdamW, the sampler's settings."""
    torch.manual_seed(cfg.seed)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    trained = world.wrap(model, cfg.dist_strategy)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_adamw(params))
    sampling = cfg.sampling_params(stop_token_ids(model, tokenizer), stop_strings(tokenizer))
    return Learner(cfg, task, reward, tokenizer, model, trained, optimizer, sampling, cfg.loss_spec(), ref_model,
                   world, sampler or rollout_sampler(cfg, model), plan.rollout_rows if plan else None,
                   plan.micro_batch_tokens if plan else 1 << 62)


def resume_state(learner: Learner, saved: dict) -> TrainState:
    """The state of a fresh run, or of the checkpoint `saved` (optimizer, random generators and
    reference model restored)."""
    state = TrainState(Cursor(learner.task.train_problems(learner.cfg.seed), skip=saved.get("consumed", 0)),
                       saved.get("history", []), saved.get("evals", []), saved.get("bad_steps", 0))
    if saved:
        learner.world.load_optimizer_state(learner.trained, learner.optimizer, saved["optimizer"])
        set_rng_states(saved["rng"])
        if learner.ref_model is not None:
            learner.ref_model.load_state_dict(saved["ref_model"])
    return state


def evaluate_now(learner: Learner, state: TrainState, step: int, eval_rows: int, console) -> dict:
    """Held-out pass@1 after `step` when eval_every says so (rank 0 evaluates; the others wait):
    {"eval_pass@1": …}, or {}."""
    cfg = learner.cfg
    if not (cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps):
        return {}
    found = {}
    if learner.world.writes:
        result = evaluate(learner.model, learner.tokenizer, learner.task, cfg.eval_spec(eval_rows),
                          console=console, label=f"eval @ {step + 1}", sampler=eval_sampler(cfg))
        found["eval_pass@1"] = result["pass@1"]
        state.evals.append({"step": step + 1, **{k: v for k, v in result.items() if k != "samples"}})
    learner.world.barrier()
    return found


def train_loop(learner: Learner, peft_model, out: Path, saved: dict, console, plan: MemoryPlan,
               trackers=None) -> dict:
    cfg, model, tokenizer, world = learner.cfg, learner.model, learner.tokenizer, learner.world
    state = resume_state(learner, saved)
    health = HealthMonitor(window=cfg.health_window)
    health.history = list(state.history)
    first_step = len(state.history)
    # only rank 0 writes files; the other ranks write their records nowhere
    metrics_file, rollouts_file = (open_records(out, state.history) if world.writes
                                   else (open(os.devnull, "w"), open(os.devnull, "w")))
    say = (console.print if console else print)
    if first_step:
        say(f"resuming {out} at step {first_step} of {cfg.steps}")

    def checkpoint() -> Path | None:
        saved = state.saved(world.optimizer_state(learner.trained, learner.optimizer), peft_model, learner.ref_model)
        plain = model if peft_model is None else merged(peft_model, copy=True)    # training goes on unmerged
        card = rl_card(cfg, len(state.history), state.evals)
        path = (save_checkpoint(out, len(state.history), plain, tokenizer, saved, cfg.keep_checkpoints, card)
                if world.writes else None)
        world.barrier()                                # the others wait for rank 0's checkpoint
        return path

    if not saved:
        checkpoint()                                   # step-0: a kill at any step can resume
    live = trackers_for(cfg.report_to, out, dataclasses.asdict(cfg), first_step, trackers, world.writes)
    with progress_bar(console) as bar, StopSignals() as stop, metrics_file, rollouts_file, live as trackers:
        job = bar.add_task("train", total=cfg.steps, completed=first_step)
        for step in range(first_step, cfg.steps):
            outcome = train_step(learner, state.problems, step)      # rollout → reward → advantage → update
            state.bad_steps = state.bad_steps + 1 if outcome.update.skipped else 0
            # log: one JSON line per step, a console line, health warnings
            record = step_record(step, learner.task, outcome)
            record.update(sampler_metrics(learner.sampler))   # rollout=vllm: the sampler/trainer gap, timings
            record.update(evaluate_now(learner, state, step, plan.eval_rows, console))
            state.history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            trackers.log_step(record)
            if "eval_pass@1" in record:
                trackers.log_eval(step + 1, state.evals[-1])   # after the step's own line: W&B steps only go on
            if step % cfg.dump_rollouts_every == 0:
                dump_rollouts(rollouts_file, step, learner.task, outcome, cfg.group_size)
            for warning in health.update(record):
                say(f"[yellow]warning (step {step}): {warning}[/yellow]" if console
                    else f"warning (step {step}): {warning}")
            bar.update(job, advance=1, description=(
                f"train reward {record['reward_mean']:.2f} pass {record['pass_rate']:.2f} "
                f"think {record['think_rate']:.2f} len {record['response_tokens']:.0f}"))
            maybe_kill("after_step", step + 1)
            if state.bad_steps >= cfg.max_bad_steps:
                last = complete_checkpoints(out)
                raise AhaError(f"the loss or gradient was NaN/inf for {state.bad_steps} steps in a row (step {step}); "
                               f"stopping: lower lr or check the reward (metrics in {out / 'metrics.jsonl'}; "
                               f"last good checkpoint: {last[-1] if last else 'none yet'})")
            if world.any(stop.received) and not stop.received:
                stop.received = signal.SIGTERM         # another process was signalled: all stop at this step
            due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if due or stop.received or step + 1 == cfg.steps:
                saved_at = checkpoint()
                maybe_kill("after_checkpoint", step + 1)
            if stop.received:
                raise Stopped(stop.received, f"stopped by {signal.Signals(stop.received).name} after step "
                                             f"{step + 1} of {cfg.steps}; checkpoint {saved_at}; continue with: "
                                             f"aha train --resume {out}")
    if peft_model is not None:
        model = merged(peft_model)            # a plain transformers model: loads without peft
    if world.writes:
        save_model(model, tokenizer, out / "model", rl_card(cfg, len(state.history), state.evals))
    world.barrier()
    return {"history": state.history, "evals": state.evals, "model": model, "tokenizer": tokenizer, "out": out}
