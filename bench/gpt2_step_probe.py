"""The README's figure on the written-out GPT-2 decode step (aha/core/gpt2_decode.py), reproduced:

    python bench/gpt2_step_probe.py

`generate` on the built-in model (8 prompts × 8 samples, up to 64 new tokens, T = 1), ten calls per
round, six rounds alternating transformers' forward and the written-out step in one process; prints
each round's seconds, the medians and their ratio, and whether both give the same tokens and log-probs
(they must: the step is the same ops in the same order).
"""

import statistics
import time

import torch

import aha.core.rollout as rollout
from aha.core.rollout import generate, stop_strings, stop_token_ids
from aha.core.sampling import SamplingParams
from aha.infra.base import SHIPPED
from aha.infra.model import load_model
from aha.tasks import get_task


def main() -> None:
    model, tokenizer = load_model(SHIPPED)
    model.eval()
    problems = get_task("addition").train_problems(0)
    prompts = [tokenizer(get_task("addition").prompt(next(problems)))["input_ids"] for _ in range(8)]
    params = SamplingParams(64, 1.0, 1.0, 0, stop_token_ids(model, tokenizer), stop_strings(tokenizer))
    written_out = rollout.gpt2_decoder
    variants = {"transformers forward": lambda model: None, "written-out step": written_out}
    seconds, outputs = {name: [] for name in variants}, {}
    for _ in range(6):
        for name, decoder in variants.items():
            rollout.gpt2_decoder = decoder
            start = time.perf_counter()
            outputs[name] = [generate(model, prompts, 8, params, tokenizer.pad_token_id, seed) for seed in range(10)]
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.3f} s", flush=True)
    rollout.gpt2_decoder = written_out
    same = all(torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
               for a, b in zip(*outputs.values()))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"median s per 10 generate calls: {medians}; written-out / transformers = "
          f"{medians['written-out step'] / medians['transformers forward']:.2f}; same tokens and log-probs: {same}")


if __name__ == "__main__":
    main()
