"""The README's figures for the 2026-12-05 speed changes on a real model, reproduced (one line each):

    python bench/speed_probes_2026_12_05.py models/smollm2-135m-instruct

- linear: GFLOP/s of torch's fp32 linear (MKL) and of oneDNN's (`aha/core/cpu_linear.py`) for the
  model's decoding shapes at 64 rows and the output head at 1 row;
- generate: seconds of one `generate` of 64 rows × 128 tokens with oneDNN's layers and without,
  alternating, 3 times each in one process;
- engine: ms per decoding step of `aha chat`'s engine, one greedy row of 64 tokens, with and
  without, alternating 3 times;
- head: seconds of the update's forward + backward over 64 rows × 128 random completion tokens in
  micro-batches of 7 (the bench's plan), fp32: the output head as checkpointed chunks (before),
  fused with its chunks recomputed in backward, and fused with the probabilities kept (aha's
  default), each variant in turn in one process.
"""

import sys
import time

import torch

import aha.core.cpu_linear as cpu_linear
import aha.core.logprobs as logprobs
from aha.core.rollout import Rollout, generate
from aha.core.sampling import SamplingParams
from aha.infra.model import load_model, return_freed_memory_to_the_os
from aha.serve.engine import Engine, GenerationParams


def gflops(fn, flop: float, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return flop * repeat / (time.perf_counter() - start) / 1e9


def linear_probe(model) -> str:
    hidden, inter, vocab = model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size
    parts = []
    for rows, k, n in (
        (64, hidden, inter),
        (64, hidden, hidden),
        (64, inter, hidden),
        (64, hidden, vocab),
        (1, hidden, vocab),
    ):
        x, w = torch.randn(rows, 1, k), torch.randn(n, k)
        repeat = 10 if n == vocab else 200
        mkl = gflops(lambda: torch.nn.functional.linear(x, w), 2 * rows * k * n, repeat)
        dnn = gflops(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), 2 * rows * k * n, repeat)
        parts.append(f"{rows}×{k}→{n} {mkl:.0f} → {dnn:.0f}")
    return "linear GFLOP/s, MKL → oneDNN: " + ", ".join(parts)


def alternate(run, times: int = 3) -> dict[bool, list[float]]:
    """run() timed with oneDNN's layers on and off, alternating."""
    out = {True: [], False: []}
    for on in [True, False] * times:
        cpu_linear.MIN_WEIGHT = 2**18 if on else 1 << 62
        out[on].append(run())
    cpu_linear.MIN_WEIGHT = 2**18
    return out


def generate_probe(model, tokenizer) -> str:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (14,), generator=g).tolist() for _ in range(8)]
    params = SamplingParams(128, 1.0, 1.0, 0, (tokenizer.eos_token_id,))

    def run():
        start = time.perf_counter()
        generate(model, prompts, 8, params, tokenizer.pad_token_id, seed=0)
        return time.perf_counter() - start
    run()
    t = alternate(run)
    return f"generate 64 × 128 s, oneDNN {[round(x, 1) for x in t[True]]} vs MKL {[round(x, 1) for x in t[False]]}"


def engine_probe(model, tokenizer) -> str:
    ids = tokenizer("User: What is 12+7?\nAssistant:")["input_ids"]

    def run():
        engine = Engine(model, tokenizer)
        engine.submit(ids, GenerationParams(max_tokens=64, temperature=0.0))
        start, steps = time.perf_counter(), 0
        while engine.step():
            steps += 1
        return (time.perf_counter() - start) / steps * 1000
    t = alternate(run)
    return (f"engine ms/step (1 greedy row), oneDNN {[round(x, 1) for x in t[True]]} vs MKL "
            f"{[round(x, 1) for x in t[False]]}")


def head_probe(model) -> str:
    rows, width, prompt, size = 64, 128, 14, 7
    g = torch.Generator().manual_seed(0)
    rollout = Rollout(prompt_ids=torch.randint(100, 40000, (8, prompt), generator=g).repeat_interleave(8, 0),
                      prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
                      completion_ids=torch.randint(100, 40000, (rows, width), generator=g),
                      completion_mask=torch.ones(rows, width, dtype=torch.long), logprobs=torch.zeros(rows, width),
                      truncated=torch.zeros(rows, dtype=torch.bool), group_size=8)
    model.train()
    applies, keep = logprobs.fused_head_applies, logprobs.KEEP_PROBS_BYTES
    variants = {"checkpointed chunks": (lambda *a: False, keep), "fused, recomputed": (applies, 0),
                "fused, probabilities kept": (applies, keep)}

    def update():
        start = time.perf_counter()
        for first in range(0, rows, size):
            logp, _, _ = logprobs.completion_logprobs(model, rollout, torch.arange(first, min(rows, first + size)), 1.0)
            (logp.sum() / 1000).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    seconds = {}
    for name, (rule, budget) in variants.items():
        logprobs.fused_head_applies, logprobs.KEEP_PROBS_BYTES = rule, budget
        seconds[name] = update()
    logprobs.fused_head_applies, logprobs.KEEP_PROBS_BYTES = applies, keep
    model.eval()
    return "update 64 × 128 (micro-batches of 7) s: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())


if __name__ == "__main__":
    return_freed_memory_to_the_os()
    model, tokenizer = load_model(sys.argv[1])
    model.eval()
    print(linear_probe(model), flush=True)
    print(generate_probe(model, tokenizer), flush=True)
    print(engine_probe(model, tokenizer), flush=True)
    print(head_probe(model), flush=True)
