"""What `torch.compile` and other attention kernels buy on the bench's work, measured side by side
(one line each; no model download):

    python bench/compile_probes.py              # all three
    python bench/compile_probes.py update       # or: decode, attention

- update: the bench's update (`aha bench`'s random 3.2M Qwen2, spread reward, 64 rows, 128 new
  tokens, bf16 autocast where the CPU has fast bf16) on ONE rollout, replayed: each decoder layer's
  forward as it is and through `torch.compile(dynamic=True)` (inductor), alternating. Prints the
  first compiled update (compilation included) and the median of each.
- decode: one decoding step of 64 rows of the same model (bf16 matmuls), written as plain ops with
  the attention through aha's cache (`SharedPromptKV`); the parts before and after the attention
  run as they are and compiled (`dynamic=True`), alternating, beside aha's own step.
- attention: the same replayed update under bf16 autocast (on CPUs with fast bf16) with its
  attention as before 2026-12-06 (the Qwen2 query and key leave the rotary embedding in fp32, and
  `_fp32_sdpa` passed fp32 inputs to SDPA under autocast, which ran its bf16 kernel), as now (torch's
  flash kernel in fp32, `aha/infra/model.py: fp32_attention`), and as two batched matmuls and a
  softmax in fp32, alternating.

Replaying one rollout matters: two runs that sample other completions update other lengths, and
the update's time moves with them.
"""

import copy
import os
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")      # time compilation itself, not a cache hit
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def replayed_learner(max_new_tokens: int = 128):
    """(learner, problem stream, completion tokens) of the bench's spread workload: its rollout is
    collected once, and every `train_step` after replays it."""
    import aha.core.step as step_module
    from aha.bench.bench import SpreadTask, addition_setup, aha_learner, bench_model
    from aha.infra.config import Config
    from aha.infra.model import bound_onednn_caches
    from aha.infra.tokenizer import build_char_tokenizer
    from aha.tasks.rewards import Reward
    bound_onednn_caches(64)
    tokenizer = build_char_tokenizer()
    cfg = Config(prompts_per_step=8, group_size=8, max_new_tokens=max_new_tokens, temperature=1.0, seed=0)
    task, problems = addition_setup(tokenizer, 8 * 4, 0)
    task = SpreadTask(task, 8)
    learner = aha_learner(copy.deepcopy(bench_model(tokenizer)), tokenizer, cfg, task, Reward.build(cfg, task),
                          "spread")
    collect = getattr(step_module.collect, "replayed_from", step_module.collect)   # the real one
    stream = iter(problems)
    learner.model.eval()
    batch = collect(learner, stream, 0)

    def replay(*args, **kwargs):
        return batch
    replay.replayed_from = collect
    step_module.collect = replay
    step_module.train_step(learner, stream, 0)                                       # warm-up
    tokens = int(batch.rollout.completion_mask.sum())
    return learner, stream, tokens


def update_probe(rounds: int = 5) -> str:
    from aha.core.step import train_step
    learner, stream, tokens = replayed_learner()
    layers = list(learner.model.model.layers)
    compiled = [torch.compile(layer.forward, dynamic=True) for layer in layers]

    def use(on: bool) -> None:
        for layer, forward in zip(layers, compiled):
            if on:
                layer.forward = forward
            elif "forward" in layer.__dict__:
                del layer.forward
    use(True)
    first = train_step(learner, stream, 1).time_update
    times = {"eager": [], "compiled": []}
    for index in range(rounds):
        for name in times:
            use(name == "compiled")
            times[name].append(train_step(learner, stream, 2 + index).time_update)
    use(False)
    return (f"update, bench Qwen2, one rollout of {tokens} completion tokens: first compiled update {first:.1f} s "
            f"(compilation included); then eager {median(times['eager']) * 1e3:.0f} ms, compiled layers "
            f"{median(times['compiled']) * 1e3:.0f} ms (median of {rounds}, alternating)")


def decode_probe(steps: int = 40, rounds: int = 5) -> str:
    import aha.core.rollout as rollout
    from aha.bench.bench import bench_model
    from aha.core.sampling import SamplingParams
    from aha.infra.tokenizer import build_char_tokenizer
    from aha.tasks import get_task
    tokenizer = build_char_tokenizer()
    model = bench_model(tokenizer).eval()
    task = get_task("addition")
    stream = task.train_problems(0)
    prompts = [tokenizer(task.prompt(next(stream)))["input_ids"] for _ in range(8)]
    params = SamplingParams(128, 1.0, stop_token_ids=(tokenizer.eos_token_id,), bf16=True)
    body, layers = model.model, list(model.model.layers)
    rotate = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
    head_dim, eps = layers[0].self_attn.head_dim, layers[0].input_layernorm.variance_epsilon
    bf16 = lambda *ws: torch.cat([w.detach() for w in ws]).to(torch.bfloat16)   # noqa: E731
    weights = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights.append(dict(ln1=layer.input_layernorm.weight.detach(),
                            ln2=layer.post_attention_layernorm.weight.detach(),
                            qkv=bf16(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                            qkv_bias=bf16(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias),
                            o=bf16(attn.o_proj.weight), gate_up=bf16(mlp.gate_proj.weight, mlp.up_proj.weight),
                            down=bf16(mlp.down_proj.weight)))
    hidden_size = model.config.hidden_size
    kv_size = model.config.num_key_value_heads * head_dim

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def before(hidden, ln1, qkv, qkv_bias, cos, sin):
        q, k, v = F.linear(rms(hidden, ln1).to(torch.bfloat16), qkv, qkv_bias).float().split(
            [hidden_size, kv_size, kv_size], dim=-1)
        heads = lambda x: x.view(x.shape[0], 1, -1, head_dim).transpose(1, 2)   # noqa: E731
        q, k = rotate(heads(q), heads(k), cos, sin)
        return q, k, heads(v)

    def after(hidden, out, o, ln2, gate_up, down):
        hidden = hidden + F.linear(out.transpose(1, 2).reshape(hidden.shape).to(torch.bfloat16), o).float()
        gate, up = F.linear(rms(hidden, ln2).to(torch.bfloat16), gate_up).float().chunk(2, dim=-1)
        return hidden + F.linear((F.silu(gate) * up).to(torch.bfloat16), down).float()

    def make_step(first, second):
        def step(tokens, positions, kv):
            hidden = body.embed_tokens(tokens[:, None])
            cos, sin = body.rotary_emb(hidden, positions)
            for index, w in enumerate(weights):
                q, k, v = first(hidden, w["ln1"], w["qkv"], w["qkv_bias"], cos, sin)
                hidden = second(hidden, kv.attend(index, q, k, v, head_dim ** -0.5), w["o"], w["ln2"], w["gate_up"],
                                w["down"])
            kv.advance()
            return F.linear(body.norm(hidden), model.lm_head.weight)[:, -1]
        return step

    plain = make_step(before, after)
    compiled = make_step(torch.compile(before, dynamic=True), torch.compile(after, dynamic=True))
    with torch.inference_mode():
        ids, mask = rollout.left_pad(prompts, tokenizer.pad_token_id, max(len(p) for p in prompts))
        aha_step, _, kv, _, positions = rollout._prefill(model, ids, mask, 8, params)
        tokens = torch.full((64,), 5)
        position = positions[:, -1:].repeat_interleave(8, 0) + 1
        start = time.perf_counter()
        compiled(tokens, position, kv)
        first = time.perf_counter() - start
        times = {"aha's step": [], "plain ops": [], "compiled parts": []}
        for _ in range(rounds):
            for name, step in zip(times, (aha_step, plain, compiled)):
                position = position + 1
                start = time.perf_counter()
                for _ in range(steps // rounds):
                    step(tokens, position, kv)
                    position = position + 1
                times[name].append((time.perf_counter() - start) / (steps // rounds))
    return (f"decode step, bench Qwen2, 64 rows, bf16 matmuls: compiling the parts took {first:.1f} s; ms a step "
            + ", ".join(f"{name} {median(ts) * 1e3:.2f}" for name, ts in times.items()))


def attention_probe(rounds: int = 5) -> str:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    import aha.infra.model as model_module
    from aha.core.step import train_step

    def passed_through(module, query, key, value, attention_mask, **kwargs):
        """aha's fp32 attention before 2026-12-06: fp32 inputs went to SDPA under autocast (bf16 kernel)."""
        if query.dtype == torch.float32:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return model_module._fp32_sdpa(module, query, key, value, attention_mask, **kwargs)

    def matmuls(module, query, key, value, attention_mask, scaling=None, **kwargs):
        """softmax(q kᵀ · scale + mask) v as two batched matmuls and a softmax, in fp32."""
        rows, heads, length, dim = query.shape
        kv_heads, width = key.shape[1], key.shape[2]
        if attention_mask is None:                        # transformers' causal skip: no padding anywhere
            attention_mask = torch.ones(length, width, dtype=torch.bool).tril(width - length)
        with torch.autocast("cpu", enabled=False):
            q = query.float().reshape(rows, kv_heads, heads // kv_heads * length, dim)
            scores = torch.matmul(q, key.float().transpose(-1, -2)).view(rows, heads, length, width)
            scores = scores * (dim ** -0.5 if scaling is None else scaling)
            scores = (scores.masked_fill(~attention_mask, torch.finfo(torch.float32).min)
                      if attention_mask.dtype == torch.bool else scores + attention_mask.float())
            probs = scores.softmax(-1).view(rows, kv_heads, heads // kv_heads * length, width)
            out = torch.matmul(probs, value.float()).view(rows, heads, length, dim).transpose(1, 2)
        return out.to(query.dtype), None

    variants = {"as before (bf16 kernel for fp32 q)": passed_through, "fp32 kernel (aha's)": None,
                "two matmuls + softmax, fp32": matmuls}
    for function in variants.values():
        if function is not None:
            AttentionInterface.register(f"probe_{function.__name__}", function)
            AttentionMaskInterface.register(f"probe_{function.__name__}", sdpa_mask)
    learner, stream, tokens = replayed_learner()
    registered = model_module.FP32_SDPA
    times = {name: [] for name in variants}
    for index in range(rounds):
        for name, function in variants.items():
            model_module.FP32_SDPA = registered if function is None else f"probe_{function.__name__}"
            times[name].append(train_step(learner, stream, 1 + index).time_update)
    model_module.FP32_SDPA = registered
    return (f"update attention under bf16 autocast ({'on' if model_module.cpu_has_fast_bf16() else 'off'} here), "
            f"bench Qwen2, one rollout of {tokens} completion tokens, ms (median of {rounds}, alternating): "
            + ", ".join(f"{name} {median(ts) * 1e3:.0f}" for name, ts in times.items()))


if __name__ == "__main__":
    probes = {"update": update_probe, "decode": decode_probe, "attention": attention_probe}
    chosen = [probes[sys.argv[1]]] if sys.argv[1:] else list(probes.values())
    for probe in chosen:
        print(probe(), flush=True)
