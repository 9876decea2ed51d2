"""`aha bench`: aha's GRPO step against TRL's GRPOTrainer, same model, batch, lengths and sampling.

One process, alternating: TRL's own training loop runs, and after each of its steps a callback
runs one aha step, so both sides see the same machine state. Each side starts from the same
random-init weights (a deep copy). After warm-up, N timed steps per side give s/step, completion
tokens/s, peak RSS while that side ran, the time split (aha: its generate/update timers; TRL: its
`_generate` wrapped vs the rest of the step), and useful FLOP/s as a share of the matmul peak
measured in the same run.

Two workloads: `spread` — a reward with a spread in every group, so neither side can skip work;
`addition` — the built-in task's reward, where aha skips zero-advantage groups.

    aha bench --quick --json bench.json
    aha bench --steps 5 --max-new-tokens 128
"""

import copy
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aha.core.step import Learner, train_step
from aha.infra.config import Config
from aha.infra.model import cpu_has_fast_bf16, model_flops
from aha.tasks.base import Problem, Task
from aha.tasks.rewards import Reward


def spread_rewards(texts: list[str], group_size: int) -> list[float]:
    """Identical-work reward: CRC32 parity of the text plus 0.01 × the index inside its group, so
    no group is all-equal (every advantage non-zero), deterministic across processes."""
    return [float(zlib.crc32(t.encode()) % 2) + 0.01 * (i % group_size) for i, t in enumerate(texts)]


class SpreadTask(Task):
    """The built-in addition problems, rewarded by `spread_rewards` (identical work on both sides)."""
    name = "spread"

    def __init__(self, task: Task, group_size: int):
        self.task, self.group_size = task, group_size

    def train_problems(self, seed: int):
        return self.task.train_problems(seed)

    def eval_problems(self, n: int) -> list[Problem]:
        return self.task.eval_problems(n)

    def prompt(self, problem: Problem) -> str:
        return self.task.prompt(problem)

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        return {"accuracy": spread_rewards([completion], 1)[0]}

    def score_batch(self, completions: list[str], problems: list[Problem]) -> list[dict[str, float]]:
        return [{"accuracy": r} for r in spread_rewards(completions, self.group_size)]


def matmul_peak(size: int = 1024, seconds: float = 0.5) -> dict:
    """FLOP/s of a square matmul in fp32 and bf16 on this machine; the faster is the peak."""
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        result[name] = 2.0 * size ** 3 * reps / (time.perf_counter() - t0)
    result["peak"] = max(result["fp32"], result["bf16"])
    return result


def bench_model(tokenizer, hidden: int = 256, layers: int = 4, seed: int = 0):
    """Random-init Qwen2: hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 3 × hidden (3.2M)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * hidden,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class RssWatch:
    """Samples this process's RSS every few ms and keeps the peak per label (the side now running)."""

    def __init__(self):
        import psutil
        self.process, self.label, self.peaks = psutil.Process(), None, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            label = self.label
            if label is not None:
                self.peaks[label] = max(self.peaks.get(label, 0), self.process.memory_info().rss)

    def stop(self):
        self._stop.set()
        self._thread.join()


@dataclass
class Side:
    """Timed steps of one side: per-step seconds and token counts (after warm-up)."""
    steps: list[dict] = field(default_factory=list)

    def summary(self, params: int, peak_flops: float, rss: int) -> dict:
        total = sum(s["seconds"] for s in self.steps)
        n = len(self.steps)
        generated = sum(s["generated_tokens"] for s in self.steps)
        trained = sum(s["trained_tokens"] for s in self.steps)
        flops = sum(model_flops(params, s["generated_tokens"], s["trained_tokens"]) for s in self.steps)
        generate_s, update_s = sum(s["generate_s"] for s in self.steps), sum(s["update_s"] for s in self.steps)
        return {"steps": n, "s_per_step": total / n, "tokens_per_s": generated / total,
                "generate_s": generate_s / n, "update_s": update_s / n,
                "peak_rss_mb": rss / 2 ** 20, "useful_flops_per_s": flops / total,
                "mfu": flops / total / peak_flops, "flops_per_step": flops / n,
                # each part's useful FLOP/s as a share of the peak measured in this run
                "generate_share": model_flops(params, generated, 0) / max(generate_s, 1e-9) / peak_flops,
                "update_share": model_flops(params, 0, trained) / max(update_s, 1e-9) / peak_flops}


@dataclass
class AhaStepper:
    """aha's side: `train_step` of aha/core/step.py, the very step `aha train` runs (rollout → reward →
    advantage → loss rows → update); only the task (its prompts and reward) and the stops are the bench's."""
    learner: Learner
    problems: object                     # the task's problems, in the order both sides take them
    step: int = 0

    def __call__(self) -> dict:
        t0 = time.perf_counter()
        outcome = train_step(self.learner, self.problems, self.step)
        seconds = time.perf_counter() - t0
        self.step += 1
        rollout, rows = outcome.batch.rollout, outcome.rows
        return {"seconds": seconds, "generate_s": outcome.time_generate, "update_s": outcome.time_update,
                "generated_tokens": int(rollout.lengths.sum()),
                "trained_tokens": int(rollout.completion_mask[rows].sum()) if rows.numel() else 0,
                "zero_spread_groups": int((~outcome.spread).sum())}


def aha_learner(model, tokenizer, cfg: Config, task: Task, reward: Reward, workload: str) -> Learner:
    """aha train's learner (aha/core/train.py `make_learner`) on one process, every row in one pass. The
    spread workload stops on EOS alone, as TRL does, so both sides generate the same lengths."""
    from aha.core.train import make_learner
    learner = make_learner(cfg, task, reward, model, tokenizer)
    if workload == "spread":
        learner.sampling = cfg.sampling_params((tokenizer.eos_token_id,))
    return learner


def addition_setup(tokenizer, prompts_needed: int, seed: int):
    """(the built-in addition task, its first `prompts_needed` training problems from `seed`'s stream)."""
    from aha.tasks import get_task
    task = get_task("addition")
    problems = task.train_problems(seed)
    chosen = [next(problems) for _ in range(prompts_needed)]
    return task, chosen


def run_pair(workload: str, max_new_tokens: int, warmup: int, steps: int, peak_flops: float, *,
             hidden: int = 256, layers: int = 4, prompts_per_step: int = 8, group_size: int = 8,
             seed: int = 0, trl_bf16: bool = False) -> dict:
    """One workload at one length: TRL and aha alternating, `warmup` + `steps` steps each; with
    `trl_bf16`, then TRL alone once more with `bf16=True` (the best a TRL user on a fast-bf16 CPU has)."""
    import tempfile

    from aha.bench.trl import StepTimer, build_trainer
    from aha.infra.model import count_parameters
    from aha.infra.tokenizer import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    base = bench_model(tokenizer, hidden, layers, seed)
    params = count_parameters(base)
    cfg = Config(prompts_per_step=prompts_per_step, group_size=group_size, max_new_tokens=max_new_tokens,
                 temperature=1.0, seed=seed)
    total = warmup + steps
    task, problems = addition_setup(tokenizer, prompts_per_step * total, seed)
    texts = [task.prompt(p) for p in problems]
    if workload == "spread":
        task = SpreadTask(task, group_size)
    reward = Reward.build(cfg, task)               # both sides' reward: the weighted sum aha train computes

    def score(completions, indices):
        return reward.score(completions, [problems[i] for i in indices])[1].tolist()

    aha = AhaStepper(aha_learner(copy.deepcopy(base), tokenizer, cfg, task, reward, workload), iter(problems))
    aha_side, watch, record = Side(), RssWatch(), []

    def between(step: int):
        watch.label = "aha"
        result = aha()
        watch.label = None
        if step >= warmup:
            aha_side.steps.append(result)

    timer = StepTimer(warmup, between, watch, record)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(copy.deepcopy(base), tokenizer, texts, score, group_size=group_size,
                                prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens, steps=total,
                                lr=cfg.lr, seed=seed, out_dir=out_dir, timer=timer, record=record)
        trainer.train()
    trl_side = Side(timer.steps)
    result = {"workload": workload, "max_new_tokens": max_new_tokens, "params": params,
              "aha": aha_side.summary(params, peak_flops, watch.peaks.get("aha", 0)),
              "trl": trl_side.summary(params, peak_flops, watch.peaks.get("trl", 0))}
    if trl_bf16:
        watch.peaks.pop("trl", None)
        bf16_record = []
        bf16_timer = StepTimer(warmup, lambda step: None, watch, bf16_record)
        with tempfile.TemporaryDirectory() as out_dir:
            build_trainer(copy.deepcopy(base), tokenizer, texts, score, group_size=group_size,
                          prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens, steps=total, lr=cfg.lr,
                          seed=seed, out_dir=out_dir, timer=bf16_timer, record=bf16_record, bf16=True).train()
        result["trl_bf16"] = Side(bf16_timer.steps).summary(params, peak_flops, watch.peaks.get("trl", 0))
        result["speedup_bf16"] = result["trl_bf16"]["s_per_step"] / result["aha"]["s_per_step"]
    watch.stop()
    result["speedup"] = result["trl"]["s_per_step"] / result["aha"]["s_per_step"]
    # the ceiling: TRL's s/step over aha's FLOP floor (its useful FLOPs at 100% of the measured peak)
    result["ceiling"] = result["trl"]["s_per_step"] / (result["aha"]["flops_per_step"] / peak_flops)
    return result


def cpu_name(cpuinfo: str | None = None) -> str:
    r"""The CPU's model name, family and model, and its kind for this project's numbers: AMX,
    AVX512-BF16 or AVX2 (fast bf16 or not; oneDNN held to AVX2 by ONEDNN_MAX_CPU_ISA says so), e.g.
    "AMD EPYC (family 25 model 17, AVX512-BF16)". Linux /proc/cpuinfo; platform.processor() elsewhere.

    >>> cpu_name("model name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 49\nflags\t\t: fpu avx avx2\n")
    'AMD EPYC (family 23 model 49, AVX2)'
    """
    import platform
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    kind = ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
            else "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    if isa and kind in ("AMX", "AVX512-BF16") and not cpu_has_fast_bf16():
        kind += f", held to {isa}"
    parts = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    parts += [kind] if kind else []
    return f"{name} ({', '.join(parts)})" if parts else name


def format_table(results: list[dict], peak: dict, cpu: str = "") -> str:
    lines = [f"CPU: {cpu or cpu_name()}, {torch.get_num_threads()} threads",
             f"matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s "
             f"(peak {peak['peak'] / 1e9:.1f})",
             f"{'workload':<9} {'new':>4} {'side':<8} {'s/step':>7} {'tok/s':>7} {'gen s':>6} {'upd s':>6} "
             f"{'gen %pk':>7} {'upd %pk':>7} {'RSS MB':>7} {'of peak':>7} {'TRL/aha':>7} {'ceiling':>7}"]
    for r in results:
        for side in ("aha", "trl", "trl_bf16"):
            if side not in r:
                continue
            s = r[side]
            ratio = (
                f"{r['speedup']:7.2f}" if side == "aha" else (f"{r['speedup_bf16']:7.2f}" if side == "trl_bf16" else "")
            )
            ceiling = f"{r['ceiling']:7.2f}" if side == "aha" else ""
            lines.append(f"{r['workload']:<9} {r['max_new_tokens']:>4} {side:<8} {s['s_per_step']:7.3f} "
                         f"{s['tokens_per_s']:7.0f} {s['generate_s']:6.3f} {s['update_s']:6.3f} "
                         f"{s['generate_share']:7.1%} {s['update_share']:7.1%} {s['peak_rss_mb']:7.0f} "
                         f"{s['mfu']:7.1%} {ratio:>7} {ceiling:>7}")
    if any("trl_bf16" in r for r in results):
        lines.append("TRL/aha on the trl_bf16 line: TRL with bf16=True against the same aha steps")
    else:
        lines.append(
            "no trl_bf16 line: this CPU has no fast bf16 (AMX / AVX512-BF16), where TRL's bf16=True only slows it"
        )
    lines.append("ceiling: TRL s/step ÷ aha's useful FLOPs at 100% of the peak (the most any speed-up can be)")
    return "\n".join(lines)


def run_bench(lengths: tuple[int, ...], warmup: int, steps: int, workloads=("spread", "addition"),
              say=print, addition_at: tuple[int, ...] | None = None, **sizes) -> dict:
    """Every workload at every length; returns the results, the peak and `speedup_vs_trl`, the
    smallest identical-work (spread) TRL/aha ratio over the lengths."""
    from aha.infra.model import cpu_has_fast_bf16
    peak = matmul_peak()
    trl_bf16 = cpu_has_fast_bf16()             # elsewhere bf16 runs ~150× slower than fp32: not a choice anyone makes
    results = []
    for max_new_tokens in lengths:
        for workload in workloads:
            if workload == "addition" and addition_at is not None and max_new_tokens not in addition_at:
                continue
            say(f"bench: {workload}, {max_new_tokens} new tokens, {warmup} warm-up + {steps} timed steps per side")
            results.append(run_pair(workload, max_new_tokens, warmup, steps, peak["peak"],
                                    trl_bf16=trl_bf16 and workload == "spread", **sizes))
    identical = [r["speedup"] for r in results if r["workload"] == "spread"] or [r["speedup"] for r in results]
    return {"peak": peak, "cpu": cpu_name(), "threads": torch.get_num_threads(), "trl_bf16_measured": trl_bf16,
            "results": results, "speedup_vs_trl": min(identical)}
