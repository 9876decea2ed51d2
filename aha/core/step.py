"""One GRPO step, the functions `aha train` and `aha bench` both run: rollout → reward → advantage →
loss rows → update (`train_step`), each part its own function below.

Departures from the paper, each for speed with no change to the maths: completions whose advantage
is exactly 0 (a group whose rewards are all equal) carry no gradient when β = 0, so they never enter
the forward/backward pass; with one update per rollout (μ = 1) the old log-probs equal the current
ones, so no extra forward pass computes them.
"""

import math
import time
from dataclasses import dataclass

import torch

from aha.core.advantages import ADVANTAGES
from aha.core.algos import LossSpec, Normaliser, policy_loss
from aha.core.dynamic import concat_rollouts, filter_values, group_spread, kept_groups
from aha.core.logprobs import completion_logprobs
from aha.core.rollout import Rollout, encode_prompt, generate, prompt_limit
from aha.core.rollout_correction import merge_mismatch, rollout_mismatch, rollout_weights
from aha.core.sampling import SamplingParams
from aha.core.schedule import lr_factor
from aha.infra.config import Config
from aha.infra.distributed import SINGLE, World, loss_scale
from aha.infra.model import autocast, autocast_attention
from aha.tasks.base import Problem, Task
from aha.tasks.rewards import Reward, fill_skipped


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % 2**62


@dataclass
class Learner:
    """What a step needs and keeps from one step to the next: the config, the task and its reward, the
    models, the optimizer and the sampler."""
    cfg: Config
    task: Task
    reward: Reward
    tokenizer: object
    model: object                      # generates, evaluates and is saved
    trained: object                    # what trains: `model`, DDP around it, or an FSDP2-sharded copy
    optimizer: torch.optim.Optimizer
    sampling: SamplingParams
    spec: LossSpec
    ref_model: object = None           # β > 0: the frozen reference
    world: World = SINGLE
    sampler: object = generate         # `generate`, the tool loop or vLLM
    rollout_rows: int | None = None    # rows generated at once (aha/core/plan.py); None: all
    micro_batch_tokens: int = 1 << 62  # micro_batch_size=auto: tokens per forward/backward


@dataclass
class Batch:
    """One step's samples: N = prompts × G completions, grouped as in `Rollout`."""
    problems: list[Problem]     # (P,) one per group
    rollout: Rollout
    texts: list[str]            # (N,) decoded completions
    scores: list[dict]          # (N,) reward components by name
    rewards: torch.Tensor       # (N,) weighted sum of the components
    tries: int                  # rollouts it took (dynamic sampling)


@dataclass
class Update:
    """What `policy_update` did: the loss, the gradient norm, the loss's metrics, the entropy per token
    (None when nothing trained), and whether a non-finite loss or gradient skipped it."""
    loss: float = 0.0
    grad_norm: float = 0.0
    metrics: dict | None = None
    entropy: float | None = None
    skipped: bool = False


@dataclass
class StepOutcome:
    """One step's batch and what the loop logs of it."""
    batch: Batch
    spread: torch.Tensor        # (P,) groups with a reward spread
    kept: torch.Tensor          # (P,) groups trained on (dynamic sampling keeps prompts_per_step)
    skip: torch.Tensor          # (N,) samples a reward function skipped
    rows: torch.Tensor          # (R,) rows that entered the loss
    update: Update
    lr: float
    time_generate: float
    time_update: float


def collect(learner: Learner, problems, step: int) -> Batch:
    """Roll out and score `prompts_per_step` fresh prompts; with dynamic sampling, roll out
    batches of fresh prompts again until `prompts_per_step` groups have a spread, or
    `max_sampling_tries` rollouts were made. Under torchrun each process rolls out and scores its
    slice of the prompts and the slices are gathered: every process gets the whole batch."""
    cfg, task, tokenizer, world = learner.cfg, learner.task, learner.tokenizer, learner.world
    limit = prompt_limit(learner.model, cfg.max_new_tokens)
    parts = []
    for attempt in range(cfg.max_sampling_tries if cfg.dynamic_sampling else 1):
        chosen = [next(problems) for _ in range(cfg.prompts_per_step)]
        mine, first = world.shard(chosen)                  # this process's prompts (all of them on one)
        prompts = [encode_prompt(tokenizer, task.prompt(p), task.adds_special_tokens, limit, cfg.max_new_tokens)
                   for p in mine]
        rollout = learner.sampler(learner.model, prompts, cfg.group_size, learner.sampling, tokenizer.pad_token_id,
                                 step_seed(cfg.seed, step) + attempt, row_offset=first * cfg.group_size,
                                 total_rows=len(chosen) * cfg.group_size, max_rows=learner.rollout_rows,
                                 tokenizer=tokenizer)
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        tools = rollout.tools                              # an env tool's reward per row (aha/core/tools/), or None
        env = tools.rewards.tolist() if tools is not None and tools.rewards is not None else None
        scores, rewards = learner.reward.score(texts, [mine[i // cfg.group_size] for i in range(len(texts))],
                                               rollout.lengths.tolist(), env)
        parts.append(Batch(chosen, *world.gather(rollout, texts, scores, rewards, tokenizer.pad_token_id), tries=1))
        informative = [group_spread(filter_values(p.scores, p.rewards, cfg.dynamic_sampling_metric), cfg.group_size)
                       for p in parts]
        if sum(int(spread.sum()) for spread in informative) >= cfg.prompts_per_step:
            break
    return Batch(problems=[p for part in parts for p in part.problems],
                 rollout=concat_rollouts([part.rollout for part in parts], tokenizer.pad_token_id),
                 texts=[t for part in parts for t in part.texts], scores=[s for part in parts for s in part.scores],
                 rewards=torch.cat([part.rewards for part in parts]), tries=len(parts))


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


def loss_rows(cfg: Config, batch_rows: torch.Tensor, advantages: torch.Tensor,
              rollout: Rollout) -> tuple[torch.Tensor, Normaliser]:
    """(indices of the rows that enter the loss (R,), the loss normaliser). overlong=mask takes
    truncated completions out of the loss, but they still count as rows of the normaliser (TRL);
    with β = 0 a row whose advantage is 0 carries no gradient and is left out."""
    in_loss = batch_rows & ~rollout.truncated.cpu() if cfg.overlong == "mask" else batch_rows
    norm = Normaliser(rows=int(batch_rows.sum()), tokens=int(rollout.loss_mask.cpu()[in_loss].sum()),
                      max_len=cfg.max_new_tokens)
    if cfg.beta == 0:
        in_loss = in_loss & (advantages != 0)
    return in_loss.nonzero().squeeze(1), norm


BATCH_OVERHEAD_TOKENS = 384   # one more forward/backward costs about this many tokens' work (measured: below)


def micro_batches(lengths: list[int], prompt_width: int, max_rows: int, budget: int,
                  overhead: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Positions in `lengths` (R,), the completion lengths of the rows that train, cut into
    micro-batches of rows of similar length, longest first. Each micro-batch's forward/backward is
    padded to its own longest row only (`completion_logprobs` trims it), so the cut minimises

        Σ over micro-batches  rows × (prompt_width + its longest completion) + overhead

    with at most `max_rows` rows and `budget` padded tokens in each (one row always fits): an exact
    dynamic programme over the rows sorted by length. `overhead` is the price of one more
    forward/backward in padded tokens: measured ~300-340 on the bench's Qwen2 and ~460-470 on the
    built-in model (AMD EPYC, `python bench/speed_probes_2026_12_06.py later`). With a reward
    that ends some completions early and lets others run to max_new_tokens, a third of a padded
    batch can be padding.

    >>> micro_batches([5, 100, 7, 98, 6], prompt_width=10, max_rows=8, budget=10_000, overhead=50)
    [[1, 3], [2, 4, 0]]
    >>> micro_batches([5, 100, 7, 98, 6], prompt_width=10, max_rows=2, budget=10_000, overhead=50)
    [[1, 3], [2, 4], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, start_of = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):            # micro-batch order[start:end]: its longest is order[start]
            rows, width = end - start, prompt_width + lengths[order[start]]
            if rows > max_rows or (rows > 1 and rows * width > budget):
                break                                   # an earlier start only adds rows and width
            cost = best[start] + rows * width + overhead
            if cost < best[end]:
                best[end], start_of[end] = cost, start
    cuts, end = [], len(order)
    while end:
        cuts.append(order[start_of[end]:end])
        end = start_of[end]
    return cuts[::-1]


def micro_batch_pieces(cfg: Config, token_budget: int, rollout: Rollout, rows: torch.Tensor, weight: float,
                       count) -> list[tuple[torch.Tensor, float]]:
    """`rows` (R,) in micro-batches (`micro_batches`): at most `micro_batch_size` rows each when it
    is a number, else at most `token_budget` padded tokens each; each with its weight. `count(n)`
    gives how many micro-batches to run (under torchrun: the most of any rank); those past this
    rank's are stand-ins (one row, weight 0), so that every rank runs as many."""
    lengths = rollout.completion_mask[rows].sum(dim=1).tolist()
    prompt_width = int(rollout.prompt_mask[rows].any(dim=0).sum())
    auto = cfg.micro_batch_size == "auto"
    cuts = micro_batches(lengths, prompt_width, rows.numel() if auto else int(cfg.micro_batch_size),
                         token_budget if auto else 1 << 62)
    pieces = [(rows[torch.tensor(cut, device=rows.device)], weight) for cut in cuts]
    return pieces + [(rows[:1], 0.0)] * (count(len(pieces)) - len(pieces))


def policy_update(model, ref_model, optimizer, rollout: Rollout, rows: torch.Tensor, advantages: torch.Tensor,
                  spec: LossSpec, norm: Normaliser, cfg: Config, world: World = SINGLE,
                  token_budget: int = 1 << 62) -> Update:
    """μ clipped-surrogate updates on `rows`, each accumulated over micro-batches; a non-finite loss or
    gradient skips the update. Every micro-batch's loss is divided by the normaliser of the WHOLE batch
    (`norm`), so the accumulated gradient equals the one-shot step's (tests/test_step.py). Under
    torchrun each process takes its own share of `rows` and DDP/FSDP sums the gradients once, after
    the last micro-batch (the loss scaling is derived in aha/infra/distributed.py). The old log-probs are
    the trainer's own, from the first inner update's forward (detached); the sampler's
    (`rollout.logprobs`) give the sampler/trainer mismatch, logged every step, and the rollout
    correction's weights. Entropy masking and Clip-/KL-Cov pick their tokens within each micro-batch."""
    result = Update(metrics={})
    rows, weight = world.local_rows(rows, cfg.prompts_per_step * cfg.group_size)   # weight 0: a stand-in row
    if not rows.numel():
        return result
    pieces = micro_batch_pieces(cfg, token_budget, rollout, rows, weight, world.most)
    device = rollout.prompt_ids.device.type
    old = {}                                             # micro-batch index -> (old log-probs, IS weight)
    mismatches = []
    # under bf16 autocast on a CPU the attention runs in fp32 for the whole update, backward included:
    # a backward that recomputes activations (gradient checkpointing) must see the forward's attention
    with autocast_attention(cfg.autocast, device, model):
        for _ in range(cfg.mu):
            optimizer.zero_grad(set_to_none=True)
            total_loss, entropy_sum, tokens, metric_sums = 0.0, 0.0, 0.0, {}
            for index, (piece, piece_weight) in enumerate(pieces):
                with world.gradient_sync(model, sync=index == len(pieces) - 1):
                    with autocast(cfg.autocast, device):                 # the attention: autocast_attention above
                        logp, token_entropy, mask = completion_logprobs(model, rollout, piece, cfg.temperature)
                    if index not in old:                      # the trainer before this step's updates
                        old_logp, sampler_logp = logp.detach(), rollout.logprobs[piece][:, :logp.shape[1]]
                        is_weight = rollout_weights(old_logp, sampler_logp, mask, cfg.rollout_correction,
                                                    cfg.rollout_is_low, cfg.rollout_is_high)
                        old[index] = (old_logp, is_weight)
                        if piece_weight:
                            mismatch = rollout_mismatch(old_logp, sampler_logp, mask, is_weight)
                            mismatches.append((float(mask.sum()), mismatch))
                    old_logp, is_weight = old[index]
                    ref_logp = None
                    if ref_model is not None:
                        with torch.no_grad(), autocast(cfg.autocast, device, ref_model):
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
            means |= merge_mismatch(mismatches, cfg.rollout_correction != "none")
            loss_value, step_entropy, loss_metrics = world.reduce_update(
                total_loss, torch.tensor(entropy_sum), torch.tensor(tokens), means, 1.0)
            result = Update(loss_value, grad_norm, loss_metrics, result.entropy,
                            skipped=not (math.isfinite(loss_value) and math.isfinite(grad_norm)))
            if result.skipped:
                optimizer.zero_grad(set_to_none=True)
                break
            optimizer.step()
            result.entropy = step_entropy
    return result


def train_step(learner: Learner, problems, step: int) -> StepOutcome:
    """One GRPO step on the next prompts of `problems`: rollout → reward → advantage → loss → update."""
    cfg, model = learner.cfg, learner.model
    # 1+2. rollout and reward: G samples for each of the step's prompts, rewarded by named
    # components; with dynamic sampling, more prompts until enough groups have spread
    t0 = time.time()
    model.eval()
    batch = collect(learner, problems, step)
    spread = group_spread(batch.rewards, cfg.group_size)                                      # (P,)
    informative = group_spread(filter_values(batch.scores, batch.rewards, cfg.dynamic_sampling_metric),
                               cfg.group_size)
    kept = kept_groups(informative, cfg.prompts_per_step) if cfg.dynamic_sampling else torch.ones_like(spread)
    t_generate = time.time() - t0

    # 3. advantage: group-relative, by the configured estimator, over the kept groups
    advantages, batch_rows, skip = group_advantages(cfg, batch.rewards, batch.scores, kept)

    # 4. loss and update, on the completions that carry a gradient; the learning rate is a
    # pure function of the step, so a step without an optimizer step still advances it
    t1 = time.time()
    lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
    for param_group in learner.optimizer.param_groups:
        param_group["lr"] = lr
    learner.trained.train()
    rows, norm = loss_rows(cfg, batch_rows, advantages, batch.rollout)
    device = next(model.parameters()).device
    rows, advantages = rows.to(device), advantages.to(device)
    update = policy_update(learner.trained, learner.ref_model, learner.optimizer, batch.rollout, rows, advantages,
                           learner.spec, norm, cfg, learner.world, learner.micro_batch_tokens)
    learner.world.sync(learner.trained, model)            # FSDP: the whole copy takes the new weights
    if learner.ref_model is not None and cfg.ref_refresh_every and (step + 1) % cfg.ref_refresh_every == 0:
        learner.ref_model.load_state_dict(model.state_dict())     # R1: the reference follows the policy
    return StepOutcome(batch, spread, kept, skip, rows, update, lr, t_generate, time.time() - t1)
