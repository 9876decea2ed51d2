"""The figures behind the 2026-12-06 speed changes, reproduced (one line each; no model download):

    python bench/speed_probes_2026_12_06.py

- attention: ms of one forward + backward of torch's CPU flash attention (causal mask) in fp32 and
  in bf16 at the shapes of `aha run`'s update (48 rows x 4 heads x 62 positions x 48) and of the
  bench's (64 x 4 x 150 x 64): why the update's attention runs in fp32 under bf16 autocast
  (aha/infra/model.py `fp32_attention`);
- gelu: us of transformers' `gelu_new` (eight ops) and torch's fused tanh GELU (`gelu_pytorch_tanh`,
  the built-in model's activation since) forward + backward at the update's shape (64 x 60 x 768);
- decode: seconds of one `generate` of 64 rows (8 prompts x 8) with the built-in model, 40 new
  tokens, with the prompt's keys read once per group (`SharedPromptKV`, aha's default) and with
  them repeated per row (transformers' forward, the step before the written-out one), alternating;
- update: ms of one `aha run` update step (built-in model, bf16 autocast where the CPU has fast bf16)
  with the attention in fp32 and in bf16, alternating on the same rollout.

Added later the same day (`python bench/speed_probes_2026_12_06.py later`):
- packed: us per bf16 decode matmul with torch's `F.linear` and with oneDNN's linear on a packed
  weight (`aha/core/cpu_linear.py: bf16_matmul`), and with torch's bf16 GELU after it against the
  GELU fused into the call, at the decode shapes of the built-in model and of the bench's Qwen2;
- overhead: ms of one forward + backward of the bench's Qwen2 on 1 … 64 rows of one rollout (128 new
  tokens): the slope per padded token and what one more micro-batch costs in tokens
  (`aha/core/step.py: BATCH_OVERHEAD_TOKENS`);
- micro-batches: s of the bench's update at 128 new tokens (spread reward, 64 rows), in one padded
  pass and in micro-batches of rows of similar length (`aha/core/step.py: micro_batches`),
  alternating on the same rollouts;
- caches: resident MB after forward + backward of the built-in model at 300 random shapes under bf16
  autocast, with oneDNN's and ideep's caches at torch's 1024 entries and at aha's 64
  (`aha/infra/model.py: bound_onednn_caches`), each in a fresh process;
- adamw: ms of one AdamW step with torch's default and with the fused kernel at 1.8M and 81M
  parameters (`aha/core/train.py: fused_adamw`).

Added at the end of the day (`python bench/speed_probes_2026_12_06.py final`):
- kv: us of the decode step's batched matmul over the generated keys read from memory, with a gap
  after each row's keys (a buffer sized for the whole generation, read up to the written position)
  and unbroken (`aha/core/decode_step.py: SharedPromptKV`, buffers grown 16 positions at a time),
  at the built-in model's shape and the bench's Qwen2's;
- serve: ms per token of the serving engine (`aha chat`, `aha serve`) at 1 and 8 rows with
  transformers' forward, the written-out decode step in fp32 and in bf16 (`aha/serve/engine.py`),
  on the built-in model, or on the model dir given after `final` (e.g. SmolLM2-135M-Instruct,
  imported with `aha import-model smollm2-135m --out models/smollm2-135m-instruct`).
"""

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def attention_probe() -> str:
    parts = []
    for rows, heads, length, dim in ((48, 4, 62, 48), (64, 4, 150, 64)):
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(rows, 1, length, length)
        found = {}
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(rows, heads, length, dim, dtype=dtype, requires_grad=True) for _ in range(3))

            def run():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
            found[dtype] = best_of(run, 10)
        parts.append(f"{rows}x{heads}x{length}x{dim} fp32 {found[torch.float32] * 1e3:.1f} ms, "
                     f"bf16 {found[torch.bfloat16] * 1e3:.1f} ms")
    return "attention fwd+bwd: " + "; ".join(parts)


def gelu_probe() -> str:
    from transformers.activations import NewGELUActivation, PytorchGELUTanh
    x = torch.randn(64, 60, 768, requires_grad=True)
    found = {name: best_of(lambda act=act: act(x).sum().backward(), 20)
             for name, act in (("gelu_new", NewGELUActivation()), ("gelu_pytorch_tanh", PytorchGELUTanh()))}
    return "gelu fwd+bwd 64x60x768: " + ", ".join(f"{name} {t * 1e6:.0f} us" for name, t in found.items())


def decode_probe() -> str:
    import aha.core.rollout as rollout
    from aha.core.sampling import SamplingParams
    from aha.infra.base import ensure_base_model
    from aha.infra.model import load_model
    from aha.tasks import get_task
    model, tokenizer = load_model(ensure_base_model())
    model.eval()
    task = get_task("addition")
    problems = task.train_problems(0)
    prompts = [tokenizer(task.prompt(next(problems)))["input_ids"] for _ in range(8)]
    params = SamplingParams(max_new_tokens=40, temperature=1.0)
    written_out, found = rollout.written_out_decoder, {"shared": [], "repeated": []}
    for _ in range(5):
        for name in found:
            rollout.written_out_decoder = written_out if name == "shared" else (lambda model, bf16=False: None)
            start = time.perf_counter()
            rollout.generate(model, prompts, 8, params, tokenizer.pad_token_id, 0)
            found[name].append(time.perf_counter() - start)
    rollout.written_out_decoder = written_out
    return "decode 64 rows x 40 tokens: " + ", ".join(f"{name} {min(t):.3f} s" for name, t in found.items())


def update_probe() -> str:
    import aha.infra.model as model_module
    from aha.core.step import collect, policy_update
    from aha.core.train import make_learner
    from aha.infra.base import ensure_base_model
    from aha.infra.config import Config
    from aha.tasks import get_task
    from aha.tasks.rewards import Reward
    from aha.tasks.templates import apply_template
    cfg = Config()
    model, tokenizer = model_module.load_model(ensure_base_model())
    task = apply_template(get_task(cfg.task), tokenizer, cfg.template, cfg.think_prefill, [])
    learner = make_learner(cfg, task, Reward.build(cfg, task), model, tokenizer)
    model.eval()
    batch = collect(learner, task.train_problems(cfg.seed), 0)
    rows = torch.arange(batch.rollout.completion_ids.shape[0])
    advantages = torch.linspace(-1, 1, rows.numel())
    from aha.core.algos import Normaliser
    norm = Normaliser(rows.numel(), int(batch.rollout.completion_mask.sum()), cfg.group_size)
    fp32_attention, found = model_module.fp32_attention, {"fp32": [], "bf16": []}
    for _ in range(5):
        for name in found:
            model_module.fp32_attention = fp32_attention if name == "fp32" else (lambda model: nullcontext())
            model.train()
            start = time.perf_counter()
            policy_update(model, None, learner.optimizer, batch.rollout, rows, advantages, learner.spec, norm, cfg)
            found[name].append(time.perf_counter() - start)
    model_module.fp32_attention = fp32_attention
    return (f"update step (autocast {cfg.autocast}, fast bf16: {model_module.cpu_has_fast_bf16()}), attention in "
            + ", ".join(f"{name} {min(t) * 1e3:.0f} ms" for name, t in found.items()))


def per_call_us(fn, calls: int = 2000) -> float:
    return best_of(lambda: [fn() for _ in range(calls)], 3) / calls * 1e6


def packed_probe() -> str:
    from aha.core.cpu_linear import bf16_matmul
    parts = []
    with torch.inference_mode():
        for rows, inner, outer in ((64, 192, 576), (64, 576, 192), (64, 256, 768), (64, 768, 256), (1, 256, 768)):
            weight, bias = torch.randn(outer, inner).bfloat16(), torch.randn(outer).bfloat16()
            x = torch.randn(rows, 1, inner).bfloat16()
            packed = bf16_matmul(weight, bias)
            parts.append(f"{rows}x{inner}->{outer} F.linear {per_call_us(lambda: F.linear(x, weight, bias)):.0f} us, "
                         f"packed {per_call_us(lambda: packed(x)):.0f} us")
        weight, bias = torch.randn(576, 192).bfloat16(), torch.randn(576).bfloat16()
        x = torch.randn(64, 1, 192).bfloat16()
        plain, fused = bf16_matmul(weight, bias), bf16_matmul(weight, bias, "tanh")
        apart = per_call_us(lambda: F.gelu(plain(x), approximate="tanh"))
        together = per_call_us(lambda: fused(x))
    return ("bf16 decode matmuls: " + "; ".join(parts)
            + f"; 64x192->576 then GELU: apart {apart:.0f} us, fused {together:.0f} us")


def bench_rollouts(count: int, max_new_tokens: int = 128, model=None):
    """(`model`, by default the bench's random Qwen2, and `count` rollouts of 8 prompts x 8 rows from it)."""
    from aha.bench.bench import bench_model
    from aha.core.rollout import generate
    from aha.core.sampling import SamplingParams
    from aha.infra.tokenizer import build_char_tokenizer
    from aha.tasks import get_task
    tokenizer = build_char_tokenizer()
    model = (bench_model(tokenizer) if model is None else model).eval()
    task = get_task("addition")
    problems = task.train_problems(0)
    params = SamplingParams(max_new_tokens, 1.0, stop_token_ids=(tokenizer.eos_token_id,))
    rollouts = []
    for seed in range(count):
        prompts = [tokenizer(task.prompt(next(problems)))["input_ids"] for _ in range(8)]
        rollouts.append(generate(model, prompts, 8, params, tokenizer.pad_token_id, seed))
    return model.train(), rollouts


def overhead_probe() -> str:
    """What one more forward + backward costs, in padded tokens' worth, on the bench's Qwen2 (128 new
    tokens) and on the built-in model (its base, 64 new tokens; random-init weights decode to the
    length limit more often, which is what this fit needs)."""
    from aha.core.logprobs import completion_logprobs
    from aha.infra.base import ensure_base_model
    from aha.infra.model import autocast, load_model
    parts = []
    for name, model, new_tokens in (("bench Qwen2", None, 128), ("built-in", load_model(ensure_base_model())[0], 64)):
        model, (rollout,) = bench_rollouts(1, new_tokens, model)
        points = []
        for count in (1, 4, 16, 64):
            rows = torch.arange(count) * (64 // count)

            def run(rows=rows):
                with autocast("auto", "cpu", model):
                    logp, _, mask = completion_logprobs(model, rollout, rows, 1.0)
                (logp * mask).sum().backward()
            width = int(rollout.prompt_mask[rows].any(dim=0).sum()) + int(rollout.completion_mask[rows].sum(1).max())
            points.append((count * width, best_of(run, 5)))
        (t1, s1), (t2, s2) = points[-2], points[-1]
        slope = (s2 - s1) / (t2 - t1)
        overhead = (points[0][1] - slope * points[0][0]) / slope
        parts.append(f"{name}: " + ", ".join(f"{t} padded tokens {s * 1e3:.0f} ms" for t, s in points)
                     + f"; {slope * 1e6:.0f} us a padded token, one more micro-batch ~{overhead:.0f} tokens' worth")
    return "forward + backward: " + "; ".join(parts)


def micro_batch_probe() -> str:
    import aha.core.step as step
    from aha.core.algos import LossSpec, Normaliser
    from aha.infra.config import Config
    model, rollouts = bench_rollouts(4)
    cfg = Config(prompts_per_step=8, group_size=8, max_new_tokens=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)                 # lr 0: every pass on the same weights
    spec = LossSpec("token", 0.2, 0.2, "seq_mean", "k3", 0.0)
    by_length, real, padded = step.micro_batch_pieces, 0, 0
    found = {"one pass": 0.0, "by length": 0.0}
    rows, advantages = torch.arange(64), torch.linspace(-1, 1, 64)
    for rollout in rollouts:
        lengths = rollout.completion_mask.sum(dim=1)
        real, padded = real + int(lengths.sum()), padded + 64 * int(lengths.max())
        norm = Normaliser(64, int(lengths.sum()), 128)
        times = {name: [] for name in found}
        for _ in range(3):
            for name in found:
                step.micro_batch_pieces = by_length if name == "by length" else (
                    lambda cfg, budget, rollout, rows, weight, count: [(rows, weight)])
                start = time.perf_counter()
                step.policy_update(model, None, optimizer, rollout, rows, advantages, spec, norm, cfg)
                times[name].append(time.perf_counter() - start)
        for name in found:
            found[name] += min(times[name])
    step.micro_batch_pieces = by_length
    return (f"update, bench Qwen2, 4 rollouts of 64 rows x up to 128 tokens ({real} real of {padded} padded "
            "completion tokens), the best of 3 for each, summed: "
            + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in found.items()))


CACHE_SCRIPT = """
import random, sys, psutil, torch
from aha.infra.base import ensure_base_model
from aha.infra.model import autocast, load_model
model = load_model(ensure_base_model())[0].train()
rng = random.Random(0)
for _ in range(300):
    x = torch.randint(3, 100, (rng.randint(1, 64), rng.randint(20, 90)))
    with autocast("bf16", "cpu", model):
        logits = model(input_ids=x).logits
    logits.float().sum().backward()
print(psutil.Process().memory_info().rss >> 20)
"""


def cache_probe() -> str:
    import os
    import subprocess
    import sys
    found = {}
    for entries in (1024, 64):
        env = dict(os.environ, ONEDNN_PRIMITIVE_CACHE_CAPACITY=str(entries), LRU_CACHE_CAPACITY=str(entries))
        found[entries] = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()[-1]
    return ("resident MB after 300 shapes of forward + backward under bf16 autocast: "
            + ", ".join(f"caches of {entries} entries {mb} MB" for entries, mb in found.items()))


def adamw_probe() -> str:
    parts = []
    for name, shapes in (("1.8M", [(192, 576)] * 16), ("81M", [(576, 1536)] * 60 + [(49152, 576)])):
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        times = {kind: best_of(torch.optim.AdamW(params, lr=1e-4, fused=kind == "fused").step, 5)
                 for kind in ("default", "fused")}
        parts.append(f"{name} parameters default {times['default'] * 1e3:.2f} ms, fused {times['fused'] * 1e3:.2f} ms")
    return "AdamW step: " + "; ".join(parts)


def kv_layout_probe() -> str:
    """The decode step's batched matmul over the generated keys, read from memory (a 64 MB write
    before each call evicts the caches): keys in a buffer sized for the whole generation, read up to
    the written position (a gap after each row's), against the same bytes unbroken
    (aha/core/decode_step.py `SharedPromptKV`: buffers grown `chunk` positions at a time)."""
    evict = torch.empty(16 * 2**20)

    def cold_us(fn, repeat: int = 40) -> float:
        times = []
        for _ in range(repeat):
            evict.fill_(1.0)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[repeat // 2] * 1e6

    parts = []
    with torch.inference_mode():
        for rows, heads, queries, length, dim in ((64, 4, 1, 61, 48), (64, 2, 2, 100, 64)):
            query = torch.randn(rows, heads, queries, dim)
            found = {}
            for capacity in (length, length + 4, 128):
                keys = torch.randn(rows, heads, capacity, dim)[:, :, :length]
                found[capacity] = cold_us(lambda keys=keys: torch.matmul(query, keys.transpose(-1, -2)))
            parts.append(f"{rows}x{heads}x{queries} queries, {length} positions x {dim}: unbroken "
                         f"{found[length]:.0f} us, gap of 4 positions {found[length + 4]:.0f} us, "
                         f"buffer of 128 {found[128]:.0f} us")
    return "generated keys, cold: " + "; ".join(parts)


def serve_probe(model_dir: str | None = None) -> str:
    """ms per decoded token of the serving engine (aha/serve/engine.py) at 1 and 8 rows, greedy, 48
    tokens after the prompt (stops off): transformers' forward, the written-out step in fp32, and in
    bf16, each twice (the faster kept)."""
    from aha.infra.base import SHIPPED
    from aha.infra.model import load_model
    from aha.serve.engine import Engine, GenerationParams, encode_chat
    model, tokenizer = load_model(model_dir or SHIPPED)
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": "Tell me a long story about a cat and a dog."}])
    parts = []
    for rows in (1, 8):
        found = {}
        for name in ("transformers", "fp32", "bf16", "transformers", "fp32", "bf16"):
            engine = Engine(model, tokenizer, max_batch=rows, bf16=name == "bf16")
            engine._decoder = None if name == "transformers" else engine._decoder
            engine.stop_ids, engine.end_strings = (), ()          # every row decodes all 48 tokens
            engine.submit(ids, GenerationParams(max_tokens=49, temperature=0, n=rows))
            engine.step()                                          # the prefill and the first token
            start, steps = time.perf_counter(), 0
            while engine.step():
                steps += 1
            found.setdefault(name, []).append((time.perf_counter() - start) / max(steps, 1) * 1e3)
        parts.append(f"{rows} row(s), {steps} steps: " + ", ".join(f"{name} {min(times):.2f} ms"
                                                                      for name, times in found.items()))
    return f"serving engine, ms a token ({model_dir or 'built-in model'}): " + "; ".join(parts)


if __name__ == "__main__":
    import sys

    from aha.bench.bench import cpu_name
    from aha.infra.model import bound_onednn_caches
    bound_onednn_caches()                                       # as the `aha` command does
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    groups = {"later": (packed_probe, overhead_probe, micro_batch_probe, cache_probe, adamw_probe),
              "final": (kv_layout_probe, serve_probe)}
    probes = groups.get(sys.argv[1] if sys.argv[1:] else "", (attention_probe, gelu_probe, decode_probe, update_probe))
    for probe in probes:
        print(probe(*sys.argv[2:3]) if probe is serve_probe else probe(), flush=True)
