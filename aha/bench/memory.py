"""`aha bench --memory`: the peak RSS of RL steps at a real vocabulary, aha against TRL, each side in
a process of its own (the kernel's high-water mark of that process, `wait4`'s ru_maxrss).

The model is the one real vocabularies make hard: a random-init Qwen2 with Qwen2.5's 151,936-token
vocabulary (hidden 128, 2 layers, 4 heads, 2 KV heads, tied embeddings: 19.5M parameters, almost all
of them the embedding), the built-in character tokenizer padded with unused tokens to that size, and
a reward with a spread in every group (`spread_reward`), so that neither side can skip a row.
Both sides run `steps` steps of P prompts × 8 completions × `max_new_tokens` new tokens in fp32;
TRL with its defaults otherwise (micro-batches of 8 completions, gradient checkpointing on).

    aha bench --memory --completions 16,32,64,128 --max-new-tokens 128 --json memory.json
"""

import json
import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REAL_VOCAB = 151_936


def spread_reward(prompts, completions, **columns):
    """A reward with a spread in almost every group: CRC32 parity of the text + 0.001 × its length."""
    return [float(zlib.crc32(text.encode()) % 2) + 0.001 * len(text) for text in completions]


def real_vocab_model(path: Path, vocab: int = REAL_VOCAB, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Save the benchmark model and its padded tokenizer as a plain HF dir at `path`."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, Qwen2Config

    from aha.infra.tokenizer import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    # not special: they decode to text, so completions differ and every group has a reward spread
    tokenizer.add_tokens([AddedToken(f"<|unused_{i}|>", special=False) for i in range(vocab - len(tokenizer))])
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=3 * hidden, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompts_file(path: Path, count: int = 256, seed: int = 0) -> Path:
    """JSONL rows {prompt, answer} of the built-in addition task, for the `py:` reward."""
    from aha.tasks import get_task
    task = get_task("addition")
    stream = task.train_problems(seed)
    with open(path, "w") as f:
        for _ in range(count):
            problem = next(stream)
            f.write(json.dumps({"prompt": problem.question, "answer": problem.answer}) + "\n")
    return path


def aha_prompt(question: str) -> str:
    """The prompt `aha train --data` renders for a row's question (aha/tasks/data.py): the TRL side
    of the benches gets these same strings.

    >>> aha_prompt("876+530")
    'User: 876+530\\nAssistant:'
    """
    from aha.tasks.base import Problem
    from aha.tasks.data import RowTask
    return RowTask.prompt(None, Problem(question, ""))


def peak_rss(command: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[int, int, str]:
    """(peak RSS in bytes, exit code, the stderr tail) of `command` run as a process of its own."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return usage.ru_maxrss * 1024, proc.returncode, tail


def aha_command(model: Path, data: Path, out: Path, completions: int, max_new_tokens: int, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "aha",
        "train",
        "--model",
        str(model),
        "--task",
        "py:aha.bench.memory:spread_reward",
        "--data",
        str(data),
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--force",
        f"prompts_per_step={completions // 8}",
        "group_size=8",
        f"max_new_tokens={max_new_tokens}",
        "eval_every=0",
        "checkpoint_every=0",
        "autocast=off",
        "top_p=1.0",
    ]


TRL_SCRIPT = """
import sys, json
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from aha.bench.memory import aha_prompt, spread_reward
from aha.infra.model import load_model
model_dir, data, out, completions, max_new_tokens, steps = sys.argv[1:7]
completions, max_new_tokens, steps = int(completions), int(max_new_tokens), int(steps)
model, tokenizer = load_model(model_dir)
rows = [json.loads(line) for line in open(data)]
config = GRPOConfig(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=completions // 8,
                    num_generations=8, max_completion_length=max_new_tokens, beta=0.0, learning_rate=1e-4,
                    use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_steps=steps, loss_type="grpo",
                    temperature=1.0, top_p=1.0, top_k=0, seed=0, disable_tqdm=True, logging_steps=1)
trainer = GRPOTrainer(model=model, reward_funcs=spread_reward, args=config,
                      train_dataset=Dataset.from_list([{"prompt": aha_prompt(r["prompt"])} for r in rows]),
                      processing_class=tokenizer)
trainer.train()
"""


def trl_command(model: Path, data: Path, out: Path, completions: int, max_new_tokens: int, steps: int) -> list[str]:
    return [
        sys.executable,
        "-c",
        TRL_SCRIPT,
        str(model),
        str(data),
        str(out),
        str(completions),
        str(max_new_tokens),
        str(steps),
    ]


def run_memory_bench(completions: tuple[int, ...], max_new_tokens: int = 128, steps: int = 2, sides=("aha", "trl"),
                     say=print) -> dict:
    """Peak RSS per side and batch size; returns {"rows": [...], "growth_aha": peak(largest)/peak(smallest)}."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="aha_bench_memory_") as tmp:
        root = Path(tmp)
        model = real_vocab_model(root / "model")
        data = prompts_file(root / "prompts.jsonl")
        for count in completions:
            row = {"completions": count, "max_new_tokens": max_new_tokens}
            for side in sides:
                build = aha_command if side == "aha" else trl_command
                say(f"bench --memory: {side}, {count} completions × {max_new_tokens} new tokens, {steps} steps")
                peak, code, tail = peak_rss(
                    build(model, data, root / f"{side}_{count}", count, max_new_tokens, steps), env
                )
                if code != 0:
                    raise RuntimeError(f"{side} at {count} completions failed (exit {code}): {tail}")
                row[f"{side}_peak_mb"] = peak / 2**20
            if "aha_peak_mb" in row and "trl_peak_mb" in row:
                row["aha_over_trl"] = row["aha_peak_mb"] / row["trl_peak_mb"]
            rows.append(row)
    result = {"rows": rows, "vocab": REAL_VOCAB, "steps": steps}
    if "aha" in sides and len(rows) > 1:
        result["growth_aha"] = rows[-1]["aha_peak_mb"] / rows[0]["aha_peak_mb"]
    return result


def format_memory_table(result: dict) -> str:
    lines = [f"peak RSS, {result['steps']} RL steps, random-init Qwen2 with a {result['vocab']:,}-token vocabulary "
             "(19.5M parameters), fp32",
             f"{'completions':>11} {'new':>4} {'aha MB':>8} {'TRL MB':>8} {'aha/TRL':>7}"]
    for row in result["rows"]:
        trl = f"{row['trl_peak_mb']:8.0f}" if "trl_peak_mb" in row else f"{'-':>8}"
        ratio = f"{row['aha_over_trl']:7.2f}" if "aha_over_trl" in row else f"{'-':>7}"
        lines.append(
            f"{row['completions']:>11} {row['max_new_tokens']:>4} {row.get('aha_peak_mb', 0):8.0f} {trl} {ratio}"
        )
    if "growth_aha" in result:
        lines.append(f"aha's peak grows {result['growth_aha']:.2f}× from the smallest to the largest batch")
    return "\n".join(lines)
