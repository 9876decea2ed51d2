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


if __name__ == "__main__":
    from aha.bench.bench import cpu_name
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for probe in (attention_probe, gelu_probe, decode_probe, update_probe):
        print(probe(), flush=True)
