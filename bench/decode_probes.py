"""The README's figures on decoding and the update's output head, reproduced (one line each):

    python bench/decode_probes.py                                   # the built-in model
    python bench/decode_probes.py models/smollm2-135m-instruct      # and a real one

- sdpa: µs of one decoding attention call (64 rows × 4 heads × 1 query × 60 keys of 48), with the
  boolean mask transformers builds and with the additive one aha passes, and whether they agree;
- ops: operator calls per decoding step (torch.profiler, 64 rows × 64 tokens);
- decode: seconds of one `generate` (64 rows) under each variant that was tried — SDPA (kept),
  eager attention, bf16 autocast — and whether its tokens equal the SDPA fp32 ones;
- head (real models): forward + backward of one 8-row micro-batch's log-probs with the output head
  chunked (aha's default) and whole, seconds and this process's peak RSS growth for each, each in
  its own process.
"""

import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from aha.core.rollout import generate
from aha.core.sampling import SamplingParams
from aha.infra.base import ensure_base_model
from aha.infra.model import load_model, return_freed_memory_to_the_os


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def sdpa_probe() -> str:
    torch.manual_seed(0)
    q, k, v = torch.randn(64, 4, 1, 48), torch.randn(64, 4, 80, 48)[:, :, :60], torch.randn(64, 4, 80, 48)[:, :, :60]
    boolean = torch.ones(64, 1, 1, 60, dtype=torch.bool)
    boolean[:8, :, :, :5] = False                                   # left padding in some rows
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, float("-inf"))
    with torch.inference_mode():
        a, b = (F.scaled_dot_product_attention(q, k, v, attn_mask=m) for m in (boolean, additive))
        us = [
            1e6 * timed(lambda m=m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), 500)
            for m in (boolean, additive)
        ]
    return f"sdpa: boolean mask {us[0]:.0f} µs, additive {us[1]:.0f} µs a call; equal: {torch.equal(a, b)}"


def prompts_for(path: str, tokenizer) -> list[list[int]]:
    texts = (["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n",
              "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"] if path else ["12+345=", "1+2="])
    return [tokenizer.encode(t) for t in texts] * 4                  # 8 prompts of two lengths


def decode_probes(path: str) -> list[str]:
    model, tokenizer = load_model(path or ensure_base_model(None))
    model.eval()
    prompts = prompts_for(path, tokenizer)
    params = SamplingParams(
        max_new_tokens=64 if not path else 32, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,)
    )
    run = lambda: generate(model, prompts, 8, params, tokenizer.pad_token_id, seed=1)   # noqa: E731
    lines = []
    if not path:
        with torch.profiler.profile() as prof:
            rollout = run()
        calls = sum(event.count for event in prof.key_averages())
        lines.append(
            f"ops: {calls / int(rollout.completion_mask.sum(dim=1).max()):.0f} operator calls a decoding step (64 rows)"
        )
    reference = run()
    results = []
    for name, attention, bf16 in [
        ("sdpa fp32", "sdpa", False),
        ("eager fp32", "eager", False),
        ("sdpa bf16", "sdpa", True),
    ]:
        model.set_attn_implementation(attention)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            seconds = timed(run, 2)
            same = torch.equal(run().completion_ids, reference.completion_ids)
        results.append(f"{name} {seconds:.2f} s ({'same' if same else 'other'} tokens)")
    model.set_attn_implementation("sdpa")
    lines.append(f"decode {path or 'built-in'}: " + ", ".join(results))
    return lines


def head_child(path: str, whole: bool) -> None:
    """One process: 8 rows × 128 completion tokens of random ids, forward + backward of the log-probs."""
    from aha.core import logprobs
    from aha.core.rollout import Rollout
    return_freed_memory_to_the_os()
    model, _ = load_model(path)
    if whole:
        logprobs.LOGIT_BYTES = 1 << 40
    g = torch.Generator().manual_seed(0)
    rollout = Rollout(
        prompt_ids=torch.randint(100, 40000, (8, 30), generator=g),
        prompt_mask=torch.ones(8, 30, dtype=torch.long),
        completion_ids=torch.randint(100, 40000, (8, 128), generator=g),
        completion_mask=torch.ones(8, 128, dtype=torch.long),
        logprobs=torch.zeros(8, 128),
        truncated=torch.zeros(8, dtype=torch.bool),
        group_size=8,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        logp, _, mask = logprobs.completion_logprobs(model, rollout, torch.arange(8), 1.0)
        (logp * mask).sum().backward()
    seconds = timed(step, 2)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{seconds:.2f} s, peak RSS +{grown:.0f} MB")


def head_probe(path: str) -> str:
    out = [subprocess.run([sys.executable, __file__, "--head-child", path, mode], capture_output=True, text=True,
                          check=True).stdout.strip() for mode in ("chunked", "whole")]
    return f"head: chunked {out[0]}; whole {out[1]} (8 rows × 128 tokens, forward + backward)"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--head-child"]:
        head_child(sys.argv[2], sys.argv[3] == "whole")
        sys.exit(0)
    return_freed_memory_to_the_os()
    print(sdpa_probe())
    for line in decode_probes(""):
        print(line)
    for path in sys.argv[1:]:
        for line in decode_probes(path):
            print(line)
        print(head_probe(path))
