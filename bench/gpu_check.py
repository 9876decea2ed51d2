"""The prepared GPU check of the scale-out work — NOT YET RUN: no GPU was lent while it was written.

On one CUDA GPU (written for an H200; ≥ 40 GB is plenty), from the repository root:

    pip install -e ".[gpu]"                       # vLLM ≥ 0.10 with its CUDA build of torch
    python bench/gpu_check.py --out /tmp/aha_gpu  # about 5-8 minutes; results in OUT/gpu_check.json

1. Builds a random-init Qwen2 of the 0.5B class (Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14
   heads, 2 KV heads, intermediate 4864, tied embeddings, bf16; vocabulary = aha's character tokenizer,
   so every sampled id decodes — 0.36B parameters without Qwen's 136M-parameter vocabulary).
2. vLLM follows the trainer: the log-probs vLLM returns for its samples equal the trainer's own
   forward pass on them (to bf16 rounding), before and after the weights move in place (the sync
   path: sleep → wake weights → load_weights → wake KV cache → generate).
3. Generation tokens/s, torch engine against vLLM, same prompts: 32 prompts × 8 samples × 256 new
   tokens at temperature 1 (random weights rarely stop, so rows run to the limit; tokens counted).
4. RL end to end, `aha train` in a fresh process each: 3 steps of the 0.5B model with rollout=torch
   and rollout=vllm (s/step, generation vs update time, peak memory), and 5 steps of the built-in
   model with rollout=vllm (its rewards are not all 0, so updates happen).
Multi-process runs are not part of it: NCCL refuses two processes on one GPU.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from aha.config import Config
from aha.model import load_model
from aha.rollout import SamplingParams, generate, stop_token_ids
from aha.tokenizer import build_char_tokenizer
from aha.vllm_rollout import rollout_engine


def build_qwen2_05b(path: Path) -> Path:
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer(f"User: {100 + 7 * i}+{300 + 11 * i}\nAssistant:")["input_ids"] for i in range(count)]


def logprob_gaps(model, tokenizer, engine) -> list[float]:
    """Mean |log p_vLLM − log p_trainer| over the tokens vLLM sampled, recomputed by the trainer's own
    forward pass: small (bf16 rounding) when vLLM samples the trainer's current weights. Twice: as
    loaded, and after the trainer's weights moved in place (a stale vLLM would show a large gap)."""
    from aha.train import completion_logprobs
    params = SamplingParams(max_new_tokens=64, temperature=1.0, stop_token_ids=stop_token_ids(model, tokenizer))
    gaps = []
    for _ in range(2):
        rollout = engine(model, prompts_of(tokenizer, 8), 4, params, tokenizer.pad_token_id, seed=0)
        rows = torch.arange(rollout.completion_ids.shape[0], device=rollout.completion_ids.device)
        with torch.no_grad():
            logp, _, mask = completion_logprobs(model, rollout, rows, 1.0)
        gap = (logp - rollout.logprobs[:, :logp.shape[1]]).abs() * mask
        gaps.append(round(float(gap.sum() / mask.sum()), 4))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return gaps


def tokens_per_second(sampler, model, tokenizer, prompts, group: int, new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=stop_token_ids(model, tokenizer))
    sampler(model, prompts[:2], group, params, tokenizer.pad_token_id, seed=1)          # warm-up
    torch.cuda.synchronize()
    start = time.time()
    rollout = sampler(model, prompts, group, params, tokenizer.pad_token_id, seed=2)
    torch.cuda.synchronize()
    seconds = time.time() - start
    tokens = int(rollout.lengths.sum())
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def train_run(out: Path, model: str, steps: int, rollout: str, extra: list[str]) -> dict:
    start = time.time()
    command = [sys.executable, "-m", "aha", "train", "--steps", str(steps), "--out", str(out), "--force",
               f"rollout={rollout}", "eval_every=0", "eval_problems=8", "eval_k=1", "checkpoint_every=0", *extra]
    if model:
        command += ["--model", model]
    result = subprocess.run(command, capture_output=True, text=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if result.returncode == 0 else []
    return {"rollout": rollout, "returncode": result.returncode, "wall_s": round(time.time() - start, 1),
            "error": result.stderr[-1500:] if result.returncode else "",
            "s_per_step_generate": [m["time_generate"] for m in metrics], "s_per_step_update": [m["time_update"] for m in metrics],
            "reward_mean": [m["reward_mean"] for m in metrics], "trained_rows": [m["trained_rows"] for m in metrics]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/aha_gpu_check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    model_dir = build_qwen2_05b(out / "qwen2-05b-random")
    model, tokenizer = load_model(model_dir, "cuda", torch.bfloat16)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    engine = rollout_engine(Config(rollout="vllm", vllm_gpu_memory=0.3), model)
    results["vllm_logprob_gap_before_after_update"] = logprob_gaps(model, tokenizer, engine)   # expect both < ~0.05
    prompts = prompts_of(tokenizer, 32)
    results["torch_engine"] = tokens_per_second(generate, model, tokenizer, prompts, 8, 256)
    results["vllm_engine"] = tokens_per_second(engine, model, tokenizer, prompts, 8, 256)
    print(json.dumps(results, indent=2), flush=True)
    del engine, model
    torch.cuda.empty_cache()
    small = ["prompts_per_step=8", "group_size=8", "max_new_tokens=128", "lr=1e-6"]
    results["train_05b"] = [train_run(out / f"train_05b_{r}", str(model_dir), 3, r, small) for r in ("torch", "vllm")]
    results["train_builtin_vllm"] = train_run(out / "train_builtin_vllm", "", 5, "vllm", [])
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
