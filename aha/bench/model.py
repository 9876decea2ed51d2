"""`aha bench --model DIR`: aha against TRL on a real model, each side in a process of its own.

The same work on both sides: `warmup + steps` GRPO steps of 8 prompts × 8 completions, at most
`max_new_tokens` (128) new tokens, temperature 1, top-p 1, fp32 weights and no autocast, β = 0,
one update per rollout, the loss `seq_mean` (TRL's `loss_type="grpo"`), a reward with a spread in
every group (`aha.bench.memory.spread_reward`), so neither side can skip a row, and neither
recomputes activations (TRL's `gradient_checkpointing=False`, aha's default). The prompts are the
built-in addition task's questions as `aha train --data` renders them, `User: 876+530\nAssistant:`
(no chat template), and TRL's dataset holds those same strings (`aha_prompt`). Until 2026-12-05
TRL got the bare question, 7 tokens shorter, and wrote ~10% shorter completions than aha.

aha runs its real command, `aha train --task py:aha.bench.memory:spread_reward`, and its s/step is
`time_generate + time_update` of each step in its `metrics.jsonl`. TRL 1.16 runs `GRPOTrainer.train()`
unchanged, 64 completions generated at once, trained in micro-batches of 8 (gradient accumulation 8);
a callback times each step (on_step_begin → on_step_end), and its `_generate` is wrapped with a timer.
Peak RSS is the kernel's high-water mark of each process (`wait4`), loading included. Only the
steps after warm-up are timed. Sampling differs (each side has its own random stream), so the
completion tokens per step are reported beside the times.

    aha import-model smollm2-135m --out models/smollm2-135m
    aha bench --model models/smollm2-135m --steps 2 --warmup 1 --json bench_smollm2.json
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from aha.bench.memory import peak_rss, prompts_file

TRL_SCRIPT = """
import json, sys, time
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from aha.bench.memory import aha_prompt, spread_reward
from aha.infra.model import load_model
model_dir, data, out, steps, max_new_tokens, prompts, group, lr, record = sys.argv[1:10]
steps, max_new_tokens, prompts, group = int(steps), int(max_new_tokens), int(prompts), int(group)
model, tokenizer = load_model(model_dir)
rows = [json.loads(line) for line in open(data)]
lengths, log = [], open(record, "w")

def reward(prompts, completions, completion_ids, **columns):
    lengths.extend(len(ids) for ids in completion_ids)
    return spread_reward(prompts, completions)

class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        self.t0, timer["generate"] = time.perf_counter(), 0.0
        lengths.clear()
    def on_step_end(self, args, state, control, **kwargs):
        log.write(json.dumps({"seconds": time.perf_counter() - self.t0, "generate_s": timer["generate"],
                              "completion_tokens": sum(lengths)}) + "\\n")
        log.flush()

timer = {"generate": 0.0}
config = GRPOConfig(output_dir=out, per_device_train_batch_size=group, gradient_accumulation_steps=prompts,
                    num_generations=group, max_completion_length=max_new_tokens, beta=0.0, learning_rate=float(lr),
                    use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_steps=steps, loss_type="grpo",
                    gradient_checkpointing=False, temperature=1.0, top_p=1.0, top_k=0, seed=0, disable_tqdm=True,
                    logging_steps=1)
reward.__name__ = "spread_reward"
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, callbacks=[Timer()],
                      train_dataset=Dataset.from_list([{"prompt": aha_prompt(r["prompt"])} for r in rows]),
                      processing_class=tokenizer)
generate = trainer._generate
def timed_generate(*args, **kwargs):
    t0 = time.perf_counter()
    try:
        return generate(*args, **kwargs)
    finally:
        timer["generate"] += time.perf_counter() - t0
trainer._generate = timed_generate
trainer.train()
"""


def aha_command(model: str, data: Path, out: Path, steps: int, max_new_tokens: int, prompts: int, group: int,
                lr: float) -> list[str]:
    return [sys.executable, "-m", "aha", "train", "--model", model, "--task", "py:aha.bench.memory:spread_reward",
            "--data", str(data), "--steps", str(steps), "--out", str(out), "--force", f"prompts_per_step={prompts}",
            f"group_size={group}", f"max_new_tokens={max_new_tokens}", f"lr={lr}", "eval_every=0",
            "checkpoint_every=0", "autocast=off", "temperature=1.0", "top_p=1.0", "dump_rollouts_every=1000"]


def aha_steps(out: Path, rows: int) -> list[dict]:
    """Each step of the run in `out` (rows completions a step) from its metrics.jsonl."""
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"seconds": s["time_generate"] + s["time_update"], "generate_s": s["time_generate"],
             "completion_tokens": round(s["response_tokens"] * rows)} for s in steps]


def side_summary(steps: list[dict], warmup: int, peak_bytes: int) -> dict:
    timed = steps[warmup:]
    n = len(timed)
    seconds = sum(s["seconds"] for s in timed) / n
    generate = sum(s["generate_s"] for s in timed) / n
    tokens = sum(s["completion_tokens"] for s in timed) / n
    return {"timed_steps": n, "s_per_step": seconds, "generate_s": generate, "update_s": seconds - generate,
            "completion_tokens_per_step": tokens, "peak_rss_mb": peak_bytes / 2**20, "all_steps": steps}


def run_model_bench(model: str, steps: int = 2, warmup: int = 1, max_new_tokens: int = 128, prompts: int = 8,
                    group: int = 8, lr: float = 1e-6, sides=("aha", "trl"), say=print) -> dict:
    """Both sides on `model`; {"aha": {...}, "trl": {...}, "speedup": TRL s/step ÷ aha's, "memory_ratio": aha ÷ TRL}."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    total = warmup + steps
    result = {"model": model, "prompts": prompts, "group": group, "max_new_tokens": max_new_tokens,
              "warmup": warmup, "steps": steps, "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="aha_bench_model_") as tmp:
        root = Path(tmp)
        data = prompts_file(root / "prompts.jsonl", count=prompts * total)
        for side in sides:
            say(f"bench --model: {side}, {warmup} warm-up + {steps} timed steps of {prompts} × {group} completions, "
                f"≤ {max_new_tokens} new tokens")
            out, record = root / side, root / f"{side}_steps.jsonl"
            if side == "aha":
                command = aha_command(model, data, out, total, max_new_tokens, prompts, group, lr)
            else:
                command = [
                    sys.executable,
                    "-c",
                    TRL_SCRIPT,
                    model,
                    str(data),
                    str(out),
                    str(total),
                    str(max_new_tokens),
                    str(prompts),
                    str(group),
                    str(lr),
                    str(record),
                ]
            peak, code, tail = peak_rss(command, env)
            if code != 0:
                raise RuntimeError(f"{side} failed (exit {code}): {tail}")
            records = (
                aha_steps(out, prompts * group)
                if side == "aha"
                else [json.loads(line) for line in record.read_text().splitlines()]
            )
            result[side] = side_summary(records, warmup, peak)
    result["load_average_end"] = os.getloadavg()[0]
    if "aha" in result and "trl" in result:
        result["speedup"] = result["trl"]["s_per_step"] / result["aha"]["s_per_step"]
        result["memory_ratio"] = result["aha"]["peak_rss_mb"] / result["trl"]["peak_rss_mb"]
    return result


def format_model_table(result: dict) -> str:
    lines = [
        f"{result['model']}: {result['prompts']} prompts × {result['group']} completions, ≤ {result['max_new_tokens']} "
        f"new tokens, fp32, {result['steps']} timed steps after {result['warmup']} warm-up; load average "
        f"{result['load_average_start']:.1f} → {result['load_average_end']:.1f}",
        f"{'side':<4} {'s/step':>8} {'gen s':>7} {'upd s':>7} {'tokens':>7} {'peak MB':>8}",
    ]
    for side in ("aha", "trl"):
        if side in result:
            s = result[side]
            lines.append(f"{side:<4} {s['s_per_step']:8.1f} {s['generate_s']:7.1f} {s['update_s']:7.1f} "
                         f"{s['completion_tokens_per_step']:7.0f} {s['peak_rss_mb']:8.0f}")
    if "speedup" in result:
        lines.append(f"TRL/aha time {result['speedup']:.2f}×, aha/TRL peak memory {result['memory_ratio']:.2f}")
    return "\n".join(lines)


def cmd_bench_model(args) -> None:
    """`aha bench --model DIR [--steps N] [--warmup N] [--max-new-tokens N] [--json FILE]`."""
    from aha.infra.errors import AhaError
    if not (Path(args.model) / "config.json").is_file():
        raise AhaError(
            f"--model {args.model}: no config.json there; give a transformers model dir (aha import-model makes one)"
        )
    if args.max_new_tokens and len(args.max_new_tokens) > 1:
        raise AhaError("--model takes one --max-new-tokens")
    out = run_model_bench(args.model, args.steps or 2, args.warmup, (args.max_new_tokens or [128])[0],
                          say=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_model_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
