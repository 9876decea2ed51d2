"""`aha train` on several processes: torchrun launches them, DDP or FSDP2 trains — torch's own
engines, no home-made distributed layer. One process (no torchrun) never touches torch.distributed.

    torchrun --standalone --nproc_per_node 4 -m aha train --config recipes/x.yaml --out runs/x
    aha train --nproc 4 --config recipes/x.yaml --out runs/x     # the same: re-launches itself through torchrun

W processes compute the step that one process computes with the same seed and global batch
(tests/test_distributed.py: rewards equal bit for bit, loss and weights equal to float rounding):

1. Rollout and reward. Every rank walks the same seeded problem stream and takes the step's
   P = prompts_per_step prompts; rank r generates and scores the contiguous slice r·P/W … (r+1)·P/W
   (P % W ≠ 0 is refused). `generate(..., row_offset)` draws each row's uniforms from (seed, step, global
   row), so each row samples as it does in the 1-process run.
2. Gather. The slices (Rollout, texts, reward components, rewards) are all-gathered, so every rank
   then holds the step's whole batch in the 1-process row order. Advantages, DAPO's dynamic-sampling
   stop rule and kept groups, the loss normaliser's counts and every logged batch metric are computed
   from that whole batch, identically on every rank — global by construction, with no all-reduce of
   counts and no special case for estimators that are not group-local (REINFORCE++ normalises over
   the batch). Cost: the step's token ids cross the wire once; small next to generating them.
3. Loss. Each rank runs forward/backward on its own rows only. With the 1-process loss
   L = (1/D) Σ_i ℓ_i (D: the normaliser of the WHOLE batch — rows, tokens or rows × max_len; ℓ_i: row
   i's summed, or length-averaged, token loss), rank r's share is L_r = (1/D) Σ_{i of r} ℓ_i, so
   Σ_r L_r = L. DDP (and FSDP2's reduce-scatter) AVERAGE gradients over ranks: (1/W) Σ_r ∇(s·L_r) = ∇L
   needs s = W, so each rank backpropagates W·L_r (`loss_scale`). A per-rank normaliser D_r would
   instead give the mean of per-rank means, wrong whenever ranks hold different numbers of
   tokens. Clipping then acts on the averaged, hence global, gradient; its norm is the same on all ranks.
4. A rank that owns no trainable row while others do still runs forward and backward (DDP's
   all-reduce needs every rank): on one stand-in row, with weight 0. With micro-batches, every rank
   runs as many as the rank with the most (stand-in micro-batches of weight 0 fill the gap), and
   gradients are reduced once, in the backward of the last one (`gradient_sync`).
5. Logged loss = Σ_r L_r; entropy, clip_frac and kl are token-weighted means over ranks.
6. Rank 0 alone writes files (config, metrics, rollouts, checkpoints, model) and evaluates; the
   other ranks wait at a barrier (the process-group timeout, `TIMEOUT`, bounds that wait).

`dist_strategy: ddp` (default) keeps a whole model, its gradients and AdamW state on every rank.
`dist_strategy: fsdp` shards parameters, gradients and optimizer state with FSDP2 (`fully_shard` on
every decoder layer — the classes a transformers model names in `_no_split_modules` — then the root).
Generating from sharded weights would all-gather every layer at every token, in lockstep across
ranks whose rows finish at different times; so generation, evaluation and saving use an unsharded
copy of the weights on each rank, refreshed from the shards after every update (`sync`): one extra
copy of the weights (2 bytes/parameter in bf16), while gradients and AdamW state (≥ 12 bytes/
parameter) stay sharded. Resume under FSDP needs the optimizer state gathered and scattered with
`optimizer_state` / `load_optimizer_state` (collectives: every rank must call them).
"""

import atexit
import copy
import os
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from aha.infra.errors import AhaError

# Rank 0 evaluates and writes checkpoints while the others wait at a barrier: a long eval must
# not trip the collective timeout (NCCL's default is 10 minutes).
TIMEOUT = timedelta(minutes=60)


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets; (0, 1, 0) without torchrun."""
    return tuple(int(os.environ.get(name, default)) for name, default in
                 (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def shard_bounds(count: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous, equal share of `count` items.

    >>> shard_bounds(8, 1, 4)
    (2, 4)
    """
    if count % size:
        raise AhaError(f"prompts_per_step={count} is not divisible by the {size} processes: each process "
                       f"generates an equal slice of the step's prompts; choose a multiple of {size}")
    share = count // size
    return rank * share, (rank + 1) * share


def row_owner(rows: Tensor, rows_per_try: int, size: int) -> Tensor:
    """The rank (R,) that generated each of `rows` (indices into the step's batch). A batch holds
    one or more tries (dynamic sampling) of rows_per_try = P × G rows, each split as `shard_bounds`.

    >>> row_owner(torch.tensor([0, 3, 4, 7, 8, 13]), 8, 2).tolist()
    [0, 0, 1, 1, 0, 1]
    """
    return (rows % rows_per_try) // (rows_per_try // size)


def loss_scale(size: int, weight: float) -> float:
    """The factor on a rank's share of the loss so that DDP's gradient MEAN over `size` ranks is the
    1-process gradient (see the module docstring, 3.); weight 0 for a stand-in row."""
    return weight * size


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank r of `size`, collectives on `device`."""
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> tuple[list, int]:
        """This rank's contiguous slice of the step's items, and the index of its first item."""
        start, stop = shard_bounds(len(items), self.rank, self.size)
        return items[start:stop], start

    def gather(self, rollout, texts: list[str], scores: list[dict], rewards: Tensor, pad_id: int):
        """The whole batch from every rank's slice, in rank order: (Rollout, texts, scores, rewards)."""
        if self.size == 1:
            return rollout, texts, scores, rewards
        from aha.core.dynamic import concat_rollouts
        device = rollout.completion_ids.device
        parts = [None] * self.size
        dist.all_gather_object(parts, (_rollout_to(rollout, "cpu"), texts, scores, rewards.cpu()))
        return (_rollout_to(concat_rollouts([p[0] for p in parts], pad_id), device),
                [t for p in parts for t in p[1]], [s for p in parts for s in p[2]], torch.cat([p[3] for p in parts]))

    def local_rows(self, rows: Tensor, rows_per_try: int) -> tuple[Tensor, float]:
        """This rank's share of `rows` (indices into the whole batch) and its weight: (its rows, 1),
        or (one stand-in row, 0) when it owns none while other ranks do."""
        if self.size == 1 or rows.numel() == 0:
            return rows, 1.0
        mine = rows[row_owner(rows, rows_per_try, self.size) == self.rank]
        return (mine, 1.0) if mine.numel() else (rows[:1], 0.0)

    def reduce_update(self, loss_value: float, entropy_sum: Tensor, tokens: Tensor, metrics: dict[str, float],
                      weight: float) -> tuple[float, float, dict[str, float]]:
        """(loss, entropy per token, loss metrics) of the whole batch from each rank's share: the loss
        summed (each share is already divided by the global normaliser), the per-token means weighted
        by each rank's tokens. `entropy_sum`, `tokens`: this rank's Σ entropy and token count."""
        if self.size == 1:
            return loss_value, float(entropy_sum / tokens), metrics
        names = sorted(metrics)
        count = float(tokens) * weight
        values = torch.tensor([loss_value * weight, float(entropy_sum) * weight, count,
                               *[metrics[name] * count for name in names]], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        loss, entropy, count, *sums = values.tolist()
        return loss, entropy / count, {name: total / count for name, total in zip(names, sums)}

    def wrap(self, model, strategy: str):
        """The module that trains: `model` itself (one process), DDP around it, or an FSDP2-sharded
        copy (then `model` stays whole, for generation, evaluation and saving; `sync` refreshes it)."""
        if self.size == 1:
            return model
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            # MoE experts that no token chose get no gradient: DDP must look for unused parameters
            moe = any("expert" in name for name, _ in model.named_modules())
            return DistributedDataParallel(
                model,
                device_ids=[model.device.index] if model.device.type == "cuda" else None,
                find_unused_parameters=moe,
            )
        from torch.distributed.fsdp import fully_shard
        sharded = copy.deepcopy(model)
        layers = set(getattr(model, "_no_split_modules", None) or ())
        for module in sharded.modules():
            if type(module).__name__ in layers:
                fully_shard(module)
        fully_shard(sharded)
        model.requires_grad_(False)             # the generation copy is never trained directly
        return sharded

    def sync(self, trained, model) -> None:
        """After an update: FSDP copies the gathered weights into the whole generation copy; one
        process and DDP share the parameters already."""
        from torch.distributed.fsdp import FSDPModule
        if isinstance(trained, FSDPModule):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            model.load_state_dict(get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True)))

    def optimizer_state(self, trained, optimizer) -> dict:
        """The optimizer's whole state for a checkpoint (FSDP: gathered from the shards — every rank calls it).
        Before the first update the state is empty and returned as is: torch's gatherer would first
        initialise it with a zero-gradient step, which counts as AdamW's step 1 and changes the run."""
        from torch.distributed.fsdp import FSDPModule
        if not isinstance(trained, FSDPModule) or not optimizer.state:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            trained, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(self, trained, optimizer, state: dict) -> None:
        """Inverse of `optimizer_state`: every rank loads the checkpoint's whole state (FSDP keeps its shard)."""
        from torch.distributed.fsdp import FSDPModule
        if not isinstance(trained, FSDPModule):
            optimizer.load_state_dict(state)
            return
        if not state["state"]:                  # saved before the first update: nothing to load
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(trained, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def most(self, count: int) -> int:
        """The largest `count` over the ranks (every rank must run as many micro-batches)."""
        if self.size == 1:
            return count
        value = torch.tensor([count], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def gradient_sync(self, trained, sync: bool):
        """A context for one micro-batch's backward: gradients are reduced over the ranks only when
        `sync` (the last micro-batch of the step); before, they accumulate locally (DDP's no_sync,
        FSDP2's set_requires_gradient_sync)."""
        import contextlib
        if self.size == 1 or sync:
            if self.size > 1 and hasattr(trained, "set_requires_gradient_sync"):
                trained.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if hasattr(trained, "no_sync"):
            return trained.no_sync()
        trained.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on one (e.g. a stop signal that reached one rank first)."""
        if self.size == 1:
            return bool(flag)
        value = torch.tensor([float(bool(flag))], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def console(self, console):
        """Rank 0 prints; the other ranks get a silent console (no duplicated bars or warnings)."""
        if self.writes:
            return console
        from rich.console import Console
        return Console(quiet=True)


SINGLE = World()


def _rollout_to(rollout, device):
    return replace(rollout, **{f.name: getattr(rollout, f.name).to(device) for f in fields(rollout)
                               if isinstance(getattr(rollout, f.name), Tensor)})


def init_world(prompts_per_step: int) -> World:
    """The World of this process; under torchrun the default process group is created once (gloo on
    CPU, nccl on CUDA) and the CUDA device set by LOCAL_RANK. Refuses a batch that does not split."""
    rank, size, local_rank = torchrun_env()
    if size == 1:
        return SINGLE
    shard_bounds(prompts_per_step, 0, size)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return World(rank=rank, size=size, device=f"cuda:{local_rank}" if cuda else "cpu")


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """`aha <argv>` with `--nproc N` → the torchrun command line that runs it on N processes.

    >>> torchrun_command(["train", "--nproc", "2", "--steps", "3"], 2)[1:]
    ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'aha', 'train', '--steps', '3']
    """
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "aha",
        *rest,
    ]


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `aha <argv>` under torchrun on `nproc` local processes; torchrun's exit code."""
    if torchrun_env()[1] > 1:
        raise AhaError("--nproc launches torchrun itself: under torchrun, leave --nproc out")
    return subprocess.run(torchrun_command(argv, nproc)).returncode
