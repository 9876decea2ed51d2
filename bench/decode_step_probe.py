"""The README's figures on the written-out decode step (aha/core/decode_step.py), reproduced:

    python bench/decode_step_probe.py

`generate` (8 prompts × 8 samples, up to 64 new tokens, T = 1) on the built-in GPT-2 model and on the
bench's random 3.2M Qwen2 (`aha bench`'s model): ten calls per round, six rounds alternating
transformers' forward, the written-out step, and the written-out step with its matmuls on bf16
weights (`SamplingParams.bf16`, on by default where the CPU has fast bf16) in one process; prints the
medians, their ratios to transformers', whether the fp32 step gives the same tokens (it must; its
log-probs equal to 2e-5) and the share of tokens the bf16 step samples alike.
"""

import dataclasses
import statistics
import time

import torch

import aha.core.rollout as rollout
from aha.bench.bench import bench_model
from aha.core.rollout import generate, stop_strings, stop_token_ids
from aha.core.sampling import SamplingParams
from aha.infra.base import SHIPPED
from aha.infra.model import load_model
from aha.infra.tokenizer import build_char_tokenizer
from aha.tasks import get_task


def race(label: str, model, tokenizer) -> None:
    model.eval()
    task = get_task("addition")
    problems = task.train_problems(0)
    prompts = [tokenizer(task.prompt(next(problems)))["input_ids"] for _ in range(8)]
    params = SamplingParams(64, 1.0, 1.0, 0, stop_token_ids(model, tokenizer), stop_strings(tokenizer))
    written_out = rollout.written_out_decoder
    variants = {"transformers": (lambda model, bf16=False: None, params), "written out": (written_out, params),
                "written out bf16": (written_out, dataclasses.replace(params, bf16=True))}
    seconds, outputs = {name: [] for name in variants}, {}
    for _ in range(6):
        for name, (decoder, chosen) in variants.items():
            rollout.written_out_decoder = decoder
            start = time.perf_counter()
            outputs[name] = [generate(model, prompts, 8, chosen, tokenizer.pad_token_id, seed) for seed in range(10)]
            seconds[name].append(time.perf_counter() - start)
    rollout.written_out_decoder = written_out
    pairs = list(zip(outputs["transformers"], outputs["written out"]))
    same = all(torch.equal(a.completion_ids, b.completion_ids) and torch.allclose(a.logprobs, b.logprobs, atol=2e-5)
               for a, b in pairs)
    agree = statistics.mean(float((a.completion_ids == b.completion_ids).float().mean())
                            for a, b in zip(outputs["written out"], outputs["written out bf16"]))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{label}: median s per 10 generate calls, transformers {medians['transformers']:.3f}, written out "
          f"{medians['written out']:.3f} ({medians['written out'] / medians['transformers']:.2f}×), bf16 "
          f"{medians['written out bf16']:.3f} ({medians['written out bf16'] / medians['transformers']:.2f}×); "
          f"fp32: same tokens {same}; bf16: {agree:.1%} of tokens alike", flush=True)


def main() -> None:
    race("built-in GPT-2", *load_model(SHIPPED))
    tokenizer = build_char_tokenizer()
    race("bench Qwen2 (3.2M, random)", bench_model(tokenizer), tokenizer)


if __name__ == "__main__":
    main()
