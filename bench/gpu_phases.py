"""The phases of bench/gpu_check.py: each a function of one `Ctx`, run in its own process, writing
its results into `ctx.part` (OUT/parts/NAME.json) as they come; the vLLM and TRL phases, which need
an optional package, are in bench/gpu_optional.py.

Models are random-init Qwen2s built on the device from the shapes of Qwen2.5-0.5B and -1.5B
(bf16 on CUDA, fp32 on CPU; 151,936-token vocabulary, tied embeddings): nothing is downloaded.
Random weights rarely emit any given token, and generation gets no stop token at all
(`stop_token_ids=()`, vLLM `ignore_eos`), so every row runs to its token limit and tokens/s
counts the same work on every engine. `--tiny` swaps in a 2-layer, 512-token-vocabulary model
and a few rows, so that the same code runs on CPU in seconds.
"""

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

QWEN2 = {   # Qwen2.5's configs (hidden, layers, heads, KV heads, MLP, vocabulary, tied embeddings)
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
}
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=True)
NOMINAL_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                "L4": 121e12, "RTX 4090": 165e12}       # dense bf16 FLOP/s from the vendors' sheets


@dataclass(frozen=True)
class Sizes:
    """The work of each phase: full size on the GPU, `TINY_SIZES` for the CPU rehearsal."""
    prompt_len: int = 32
    engine_rows: tuple = (64, 256)       # rows = prompts × 8 samples
    engine_tokens: int = 256
    gap_rows: int = 64
    gap_tokens: int = 64
    rl_prompts: int = 8                  # RL: 8 prompts × 8 samples × 512 new tokens
    rl_group: int = 8
    rl_tokens: int = 512
    rl_warmup_tokens: int = 16
    rl_steps: int = 3
    matmul: int = 8192
    vllm_memory: float = 0.3


TINY_SIZES = Sizes(prompt_len=6, engine_rows=(8, 16), engine_tokens=8, gap_rows=8, gap_tokens=6, rl_prompts=2,
                   rl_group=4, rl_tokens=8, rl_warmup_tokens=4, rl_steps=2, matmul=256, vllm_memory=0.2)


class Skip(Exception):
    """This phase cannot run here (an optional package is missing); the message says why, in one line."""


@dataclass
class Part:
    """One phase's results, rewritten to its file at every `put`: a phase killed by its timeout
    still leaves what it had measured."""
    path: Path
    data: dict = field(default_factory=dict)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


@dataclass
class Ctx:
    device: str                          # cuda | cpu
    tiny: bool
    scratch: Path                        # large files (model configs for vLLM, logs): never in OUT
    part: Part
    peak_flops: float | None = None      # the bf16 matmul peak measured by the matmul phase

    @property
    def sizes(self) -> Sizes:
        return TINY_SIZES if self.tiny else Sizes()

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        """torch.cuda.max_memory_allocated since the last reset_peak (None on CPU)."""
        return torch.cuda.max_memory_allocated() if self.device == "cuda" else None


def version_of(package: str) -> str | None:
    """The installed version of `package`, None where it cannot be imported."""
    if importlib.util.find_spec(package.replace("-", "_")) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build(ctx: Ctx, size: str):
    """A random-init Qwen2 of Qwen2.5-`size`'s shape on ctx.device (`TINY_SHAPE` with --tiny); the
    last two ids are pad and EOS, which nothing here stops on."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    shape = TINY_SHAPE if ctx.tiny else QWEN2[size]
    vocab = shape["vocab_size"]
    config = Qwen2Config(**shape, max_position_embeddings=4096, pad_token_id=vocab - 2, eos_token_id=vocab - 1,
                         bos_token_id=vocab - 1)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=ctx.dtype)
    return model.eval()


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 2, (count, length), generator=gen).tolist()


def model_facts(model) -> dict:
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(next(model.parameters()).dtype),
            "attention": model.config._attn_implementation, "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, "vocab": model.config.vocab_size}


# ---- the FLOPs of an update: one pure function ----

def update_flops(body_params: int, layers: int, attention_width: int, hidden: int, vocab: int,
                 groups: list[tuple[int, list[int]]]) -> float:
    """Model FLOPs of one forward + backward (3 × the forward) over the trained rows, grouped as
    aha's update runs them: each group's prompt (p tokens) once, then each trained completion
    (c tokens) on top of it. Forward per token: 2 × body params (the decoder's matmuls) + 4 ×
    layers × attention width × the positions it attends to (QKᵀ and AV, causal); the LM head,
    2 × hidden × vocab, on completion tokens only (logits are kept for those alone).

    >>> update_flops(10, 1, 2, 3, 5, [(2, [1])])       # prompt 2·10·2 + 4·1·2·3, completion 2·10 + 2·3·5 + 4·2·3
    414.0
    """
    forward = 0.0
    for prompt, completions in groups:
        forward += 2 * body_params * prompt + 4 * layers * attention_width * prompt * (prompt + 1) / 2
        for c in completions:
            forward += (2 * body_params + 2 * hidden * vocab) * c
            forward += 4 * layers * attention_width * (c * prompt + c * (c + 1) / 2)
    return 3 * forward


def rollout_flops(model, rollout, rows: torch.Tensor) -> float:
    """`update_flops` of `rows` of `rollout` for `model`."""
    config = model.config
    body = sum(p.numel() for name, p in model.named_parameters()
               if not ("embed_tokens" in name or "lm_head" in name))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    prompt_lens, lengths = rollout.prompt_mask.sum(dim=1).tolist(), rollout.lengths.tolist()
    groups: dict[int, tuple[int, list[int]]] = {}
    for row in rows.tolist():
        groups.setdefault(row // rollout.group_size, (prompt_lens[row], []))[1].append(lengths[row])
    return update_flops(body, config.num_hidden_layers, width, config.hidden_size, config.vocab_size,
                        list(groups.values()))


# ---- phases ----

def phase_device(ctx: Ctx) -> None:
    """Versions and device facts, and whether the optional parts are here."""
    import transformers
    optional = ("vllm", "trl", "datasets", "accelerate", "peft", "flash-attn", "psutil", "rich")
    facts = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "cuda": torch.version.cuda, "platform": platform.platform(), "cpus": os.cpu_count(),
             "optional": {name: version_of(name) for name in optional},
             "aha_plan": importlib.util.find_spec("aha.core.plan") is not None}
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                     sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                     bf16=torch.cuda.is_bf16_supported(),
                     sdpa={name: getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: None)()
                           for name in ("flash", "mem_efficient", "cudnn", "math")})
        try:
            query = "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm"
            smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            facts["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            facts["nvidia_smi"] = f"unavailable: {exc}"
    ctx.part.put("facts", facts)
    versions = facts["optional"]
    ctx.part.put("summary", f"{facts.get('gpu', 'cpu')}, torch {facts['torch']} (CUDA {facts['cuda']}), transformers "
                            f"{facts['transformers']}, vllm {versions['vllm']}, trl {versions['trl']}")


def phase_matmul(ctx: Ctx) -> None:
    """bf16 (and fp32) square-matmul FLOP/s: the peak MFU is measured against."""
    n = ctx.sizes.matmul
    result = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, dtype=dtype, device=ctx.device)
        b = torch.randn(n, n, dtype=dtype, device=ctx.device)
        for _ in range(3):
            a @ b
        ctx.sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < (0.2 if ctx.tiny else 1.5):
            for _ in range(10):
                a @ b
            reps += 10
            ctx.sync()
        result[f"{name}_flops"] = 2.0 * n ** 3 * reps / (time.perf_counter() - t0)
        ctx.part.put(f"{name}_flops", result[f"{name}_flops"])
    gpu = torch.cuda.get_device_name() if ctx.device == "cuda" else ""
    nominal = next((value for key, value in NOMINAL_BF16.items() if key in gpu), None)
    ctx.part.put("size", n)
    ctx.part.put("nominal_bf16_flops", nominal)
    ctx.part.put("summary", f"bf16 {result['bf16_flops'] / 1e12:.1f} TFLOP/s, fp32 {result['fp32_flops'] / 1e12:.2f}"
                            + (f" (sheet: {nominal / 1e12:.0f})" if nominal else ""))


def gap_at(ctx: Ctx, model, sampler, prompts, group: int, params) -> dict:
    """Mean and max |log p_sampler − log p_trainer| over the sampled tokens, the trainer's from its
    own forward (aha/core/logprobs.py) at the sampling temperature, in the model's own precision (no
    autocast: bf16 weights on a GPU; on a CPU with fast bf16, `auto` would measure bf16's rounding)."""
    from aha.core.vllm_rollout import sampler_metrics, trainer_gap
    rollout = sampler(model, prompts, group, params, model.config.pad_token_id, seed=3)
    sampler_metrics(sampler)                              # a vLLM engine measured it too: drop its copy
    tokens, total, largest = trainer_gap(model, rollout, params.temperature, "off")
    return {"tokens": tokens, "mean": total / max(tokens, 1), "max": largest}


def measure_sampler(ctx: Ctx, model, sampler, label: str) -> None:
    """tokens/s at each row count of ctx.sizes, and the log-prob gap at T 1 and at T 0.7 / top-p 0.9."""
    from aha.core.sampling import SamplingParams
    from aha.core.vllm_rollout import sampler_metrics
    sizes, vocab, pad = ctx.sizes, model.config.vocab_size, model.config.pad_token_id
    group = 8 if not ctx.tiny else 4
    warm = SamplingParams(max_new_tokens=4, stop_token_ids=())
    sampler(model, random_prompts(2, sizes.prompt_len, vocab, seed=9), group, warm, pad, seed=0)
    sampler_metrics(sampler)
    for rows in sizes.engine_rows:
        prompts = random_prompts(rows // group, sizes.prompt_len, vocab, seed=rows)
        params = SamplingParams(max_new_tokens=sizes.engine_tokens, temperature=1.0, stop_token_ids=())
        ctx.reset_peak()
        ctx.sync()
        t0 = time.perf_counter()
        rollout = sampler(model, prompts, group, params, pad, seed=1)
        ctx.sync()
        seconds = time.perf_counter() - t0
        tokens = int(rollout.lengths.sum())
        result = {
            "rows": rows,
            "new_tokens": sizes.engine_tokens,
            "tokens": tokens,
            "all_ran_to_the_limit": tokens == rows * sizes.engine_tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "peak_bytes": ctx.peak_bytes(),
            **sampler_metrics(sampler),
        }
        if "vllm_generate_s" in result:      # vLLM: its generate call alone, weight sync and sleep timed apart
            result["generate_tokens_per_s"] = round(tokens / result["vllm_generate_s"], 1)
        ctx.part.put(f"{label}_rows_{rows}", result)
    prompts = random_prompts(sizes.gap_rows // group, sizes.prompt_len, vocab, seed=5)
    for name, temperature, top_p in (("t1", 1.0, 1.0), ("t0.7_p0.9", 0.7, 0.9)):
        params = SamplingParams(
            max_new_tokens=sizes.gap_tokens, temperature=temperature, top_p=top_p, stop_token_ids=()
        )
        ctx.part.put(f"{label}_logp_gap_{name}", gap_at(ctx, model, sampler, prompts, group, params))


def engine_phase(size: str):
    def phase(ctx: Ctx) -> None:
        """aha's torch engine (aha/core/rollout.py): tokens/s at 64 and 256 rows, and its log-prob gap."""
        from aha.core.rollout import generate
        model = build(ctx, size)
        ctx.part.put("model", model_facts(model))
        measure_sampler(ctx, model, generate, "torch_engine")
        rates = [ctx.part.data[f"torch_engine_rows_{r}"]["tokens_per_s"] for r in ctx.sizes.engine_rows]
        ctx.part.put("summary", f"{size}: aha engine " + ", ".join(f"{r:.0f}" for r in rates) + " tokens/s at "
                     + "/".join(map(str, ctx.sizes.engine_rows)) + " rows; gap T1 "
                     f"{ctx.part.data['torch_engine_logp_gap_t1']['mean']:.2e}")
    phase.__doc__ = f"aha's engine on the {size} model: tokens/s and the sampler/trainer log-prob gap"
    return phase


def rl_steps(ctx: Ctx, model, engine, label: str) -> None:
    """A few GRPO steps as aha/core/train.py runs them (rollout → reward → advantage → loss rows →
    policy_update), on an identical-work reward (a spread in every group, so every row trains):
    s/step, the generate/update split, the update's MFU and peak memory (with `aha plan`'s
    prediction where aha/core/plan.py exists)."""
    from aha.bench.bench import spread_rewards
    from aha.core.algos import LossSpec
    from aha.core.sampling import SamplingParams
    from aha.core.step import group_advantages, loss_rows, policy_update
    from aha.core.vllm_rollout import sampler_metrics
    from aha.infra.config import Config
    sizes, vocab = ctx.sizes, model.config.vocab_size
    cfg = Config(prompts_per_step=sizes.rl_prompts, group_size=sizes.rl_group, max_new_tokens=sizes.rl_tokens,
                 lr=1e-6, seed=0)
    ctx.part.put(f"{label}_work", {"prompts": cfg.prompts_per_step, "group": cfg.group_size,
                                   "new_tokens": cfg.max_new_tokens, "prompt_len": sizes.prompt_len,
                                   **{k: getattr(cfg, k) for k in ("micro_batch_size",) if hasattr(cfg, k)}})
    predicted, token_budget, rollout_rows = plan_prediction(cfg, model.config, sizes.prompt_len, ctx.device)
    ctx.part.put(f"{label}_plan", predicted)
    spec = LossSpec(cfg.ratio_level, cfg.clip_low, cfg.clip_high, cfg.aggregation, cfg.kl, cfg.beta)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = []
    for step in range(1 + sizes.rl_steps):               # step 0 warms up, at a few tokens
        tokens = sizes.rl_warmup_tokens if step == 0 else cfg.max_new_tokens
        sampling = SamplingParams(tokens, cfg.temperature, cfg.top_p, cfg.top_k, ())
        prompts = random_prompts(cfg.prompts_per_step, sizes.prompt_len, vocab, seed=100 + step)
        ctx.reset_peak()
        ctx.sync()
        t0 = time.perf_counter()
        model.eval()
        rollout = engine(model, prompts, cfg.group_size, sampling, model.config.pad_token_id, seed=step,
                         max_rows=rollout_rows)
        texts = [" ".join(map(str, ids)) for ids in rollout.completion_ids.tolist()]
        rewards = torch.tensor(spread_rewards(texts, cfg.group_size))
        scores = [{"accuracy": float(r)} for r in rewards]
        kept = torch.ones(cfg.prompts_per_step, dtype=torch.bool)
        advantages, batch_rows, _ = group_advantages(cfg, rewards, scores, kept)
        ctx.sync()
        t1 = time.perf_counter()
        model.train()
        rows, norm = loss_rows(cfg, batch_rows, advantages, rollout)
        rows, advantages = rows.to(ctx.device), advantages.to(ctx.device)
        update = policy_update(model, None, optimizer, rollout, rows, advantages, spec, norm, cfg,
                               token_budget=token_budget)
        ctx.sync()
        t2 = time.perf_counter()
        flops = rollout_flops(model, rollout, rows)
        record = {
            "step": step,
            "new_tokens": tokens,
            "generated": int(rollout.lengths.sum()),
            "trained_rows": int(rows.numel()),
            "generate_s": round(t1 - t0, 3),
            "update_s": round(t2 - t1, 3),
            "step_s": round(t2 - t0, 3),
            "update_flops": flops,
            "update_flops_per_s": flops / (t2 - t1),
            "peak_bytes": ctx.peak_bytes(),
            "loss": update.loss,
            "grad_norm": update.grad_norm,
            **sampler_metrics(engine),
        }
        if ctx.peak_flops:
            record["update_mfu"] = flops / (t2 - t1) / ctx.peak_flops
        steps.append(record)
        ctx.part.put(f"{label}_steps", steps)
    timed = steps[1:]
    summary = {key: sum(s[key] for s in timed) / len(timed) for key in ("step_s", "generate_s", "update_s")}
    summary["peak_bytes"] = max((s["peak_bytes"] or 0) for s in steps) or None
    if ctx.peak_flops:
        summary["update_mfu"] = sum(s["update_mfu"] for s in timed) / len(timed)
    ctx.part.put(f"{label}_mean", summary)


def plan_prediction(cfg, model_config, prompt_tokens: int, device: str) -> tuple[dict, int, int]:
    """`aha plan`'s predicted peak memory for this work (aha/core/plan.py), and the micro-batch token budget
    and rollout rows it chooses, which the steps then use as `aha train` would."""
    from aha.core.plan import ModelShape, count_parameters_of, device_memory, memory_plan, process_rss
    weight_bytes = 2 if device == "cuda" else 4
    plan = memory_plan(cfg, ModelShape.of(model_config, count_parameters_of(model_config)), prompt_tokens,
                       weight_bytes=weight_bytes, process_bytes=process_rss() if device == "cpu" else 0,
                       device_bytes=device_memory(device), gpu=device == "cuda")
    facts = {"peak_bytes": plan.peak, **{k: v for k, v in plan.as_dict().items() if isinstance(v, (int, float, bool))}}
    return facts, plan.micro_batch_tokens, plan.rollout_rows


def rl_phase(size: str):
    def phase(ctx: Ctx) -> None:
        from aha.core.rollout import generate
        model = build(ctx, size)
        ctx.part.put("model", model_facts(model))
        rl_steps(ctx, model, generate, "rl")
        mean = ctx.part.data["rl_mean"]
        mfu = f", update MFU {mean['update_mfu']:.1%}" if "update_mfu" in mean else ""
        peak = f", peak {mean['peak_bytes'] / 2 ** 30:.1f} GiB" if mean["peak_bytes"] else ""
        ctx.part.put("summary", f"{size}: {mean['step_s']:.2f} s/step (generate {mean['generate_s']:.2f}, update "
                                f"{mean['update_s']:.2f}){mfu}{peak}")
    phase.__doc__ = f"RL steps of aha's trainer on the {size} model"
    return phase
