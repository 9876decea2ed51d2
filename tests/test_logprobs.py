"""The update's forward pass: each prompt run once for its group (aha/core/logprobs.py) gives the same
log-probs and gradients as the plain per-row forward, on every architecture aha builds, and runs
the prompt for P rows instead of P × G."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from aha.core.logprobs import completion_logprobs
from aha.core.rollout import generate
from aha.core.sampling import SamplingParams
from aha.infra.model import tiny_config
from aha.infra.tokenizer import build_char_tokenizer


def build(arch: str):
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, hidden=64, layers=2)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tokenizer


def rollout_of(model, tokenizer, group_size=4):
    texts = ["User: 12+5\nAssistant:", "User: 999+1\nAssistant:", "User: 3+4\nAssistant:"]   # unequal lengths
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    params = SamplingParams(
        max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(tokenizer.eos_token_id,)
    )
    return generate(model.eval(), prompts, group_size, params, tokenizer.pad_token_id, seed=3)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "deepseek_v3"])
def test_shared_prompts_equal_the_plain_forward_and_its_gradient(arch):
    model, tokenizer = build(arch)
    rollout = rollout_of(model, tokenizer)
    rows = torch.tensor([0, 1, 3, 5, 8, 9, 10, 11])                   # groups 0, 1, 2, partly
    model.train()
    results = {}
    for share in (True, False):
        model.zero_grad()
        logp, entropy, mask = completion_logprobs(model, rollout, rows, 0.7, share_prompts=share)
        ((logp * mask).sum() / mask.sum()).backward()
        results[share] = (
            logp.detach(),
            entropy,
            mask,
            [p.grad.clone() for p in model.parameters() if p.grad is not None],
        )
    (a, ea, ma, ga), (b, eb, mb, gb) = results[True], results[False]
    assert torch.equal(ma, mb) and a.shape == b.shape == (8, ma.shape[1])
    real = ma.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5, rtol=0)
    assert torch.allclose(ea[real], eb[real], atol=1e-5, rtol=0)
    assert len(ga) == len(gb) and all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(ga, gb))
    # and the rollout's own log-probs (temperature 1 there): the same tokens, the same numbers
    logp1, _, _ = completion_logprobs(model.eval(), rollout, rows, 1.0)
    assert torch.allclose(logp1[real], rollout.logprobs[rows][:, :logp1.shape[1]][real], atol=1e-5)


def test_each_prompt_runs_once_per_group():
    model, tokenizer = build("gpt2")
    rollout = rollout_of(model, tokenizer)
    batch_rows = []
    model.register_forward_pre_hook(lambda m, args, kwargs: batch_rows.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    rows = torch.tensor([0, 1, 2, 3, 8, 9])                            # groups 0 and 2
    logp, _, mask = completion_logprobs(model.train(), rollout, rows, 1.0)
    prompt_width = int((rollout.prompt_mask[rows].sum(dim=0) > 0).sum())
    assert batch_rows == [(2, prompt_width), (6, mask.shape[1] - 1)]  # 2 prompts, then 6 completions
    batch_rows.clear()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(
        **{
            (
                "activation_checkpointing_kwargs"
                if "activation" in enable.__name__
                else "gradient_checkpointing_kwargs"
            ): {"use_reentrant": False}
        }
    )
    completion_logprobs(model.train(), rollout, rows, 1.0)
    assert batch_rows == [(6, prompt_width + mask.shape[1])]           # checkpointing: one plain pass


def test_bf16_autocast_loss_and_gradient_stay_close_to_fp32():
    """Documented tolerance of `autocast=bf16` (aha/infra/model.py), as the update runs it (attention in
    fp32, `fp32_attention`): on this batch the GRPO loss within 1e-3, per-token log-probs within 0.02,
    gradient cosine > 0.999 against fp32 (measured on the 2-core CI machine: 1e-5, 0.0028 and 1.00000)."""
    from aha.core.algos import LossSpec, Normaliser, policy_loss
    from aha.infra.model import autocast, cpu_has_fast_bf16
    model, tokenizer = build("qwen2")
    rollout = rollout_of(model, tokenizer)
    rows = torch.arange(12)
    advantages = torch.linspace(-1.0, 2.0, 12)
    spec, results = LossSpec("token", 0.2, 0.2, "seq_mean", "k3", 0.0), {}
    for mode in ("off", "bf16"):
        model.zero_grad()
        with autocast(mode, "cpu", model):
            logp, _, mask = completion_logprobs(model.train(), rollout, rows, 1.0)
        old = rollout.logprobs[rows][:, :logp.shape[1]]
        loss, _ = policy_loss(logp, old, advantages, mask, spec, None, Normaliser(12, int(mask.sum()), 12))
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[mode] = (loss.item(), logp.detach(), mask.bool(), grad)
    (l32, p32, m, g32), (l16, p16, _, g16) = results["off"], results["bf16"]
    print(f"loss {l32:.5f} vs {l16:.5f}; max logp diff {(p16 - p32)[m].abs().max():.4f}; "
          f"grad cosine {torch.nn.functional.cosine_similarity(g16, g32, dim=0):.5f}")
    assert abs(l16 - l32) < 1e-3 and not torch.equal(p16, p32)         # bf16 really ran, and stayed close
    assert (p16 - p32)[m].abs().max() < 0.02
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.999
    with autocast("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu") == cpu_has_fast_bf16()      # auto: only where bf16 is fast


def test_fast_bf16_follows_the_cpu_flags_and_onednn_isa_limit(monkeypatch, tmp_path):
    """`cpu_has_fast_bf16`: AMX or AVX512-BF16 in /proc/cpuinfo, unless ONEDNN_MAX_CPU_ISA holds oneDNN to
    an instruction set without bf16 (AVX2: how a bench measures what an AVX2 machine would do)."""
    import aha.infra.model as model_module
    cpuinfo = tmp_path / "cpuinfo"
    real_path = model_module.Path
    monkeypatch.setattr(model_module, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for flags, isa, expected in (("fpu avx2 avx512_bf16", None, True), ("fpu avx2 amx_bf16", "AVX512_CORE_AMX", True),
                                 ("fpu avx2", None, False), ("fpu avx2 avx512_bf16", "AVX2", False),
                                 ("fpu avx2 avx512_bf16", "avx512_core_vnni", False),
                                 ("fpu avx2 avx512_bf16", "AVX512_CORE_BF16", True)):
        cpuinfo.write_text(f"flags\t\t: {flags}\n")
        if isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert model_module.cpu_has_fast_bf16() is expected, (flags, isa)


def test_fp32_attention_under_autocast():
    """`autocast(…, model)` on a CPU runs the model's SDPA attention on fp32 q, k, v: the attention
    output equals SDPA's on the upcast inputs bit for bit (fp32 inputs under autocast included: they
    ran SDPA's bf16 kernel until 2026-12-06), every attention call of the update's forward
    goes through it, and the model's own implementation is back to "sdpa" afterwards, an exception
    included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from aha.infra.model import FP32_SDPA, _fp32_sdpa, autocast
    model, tokenizer = build("qwen2")
    layer = model.model.layers[0].self_attn
    q, k, v = (torch.randn(3, 4, 5, 8).bfloat16() for _ in range(3))
    k, v = k[:, :2], v[:, :2]                                          # grouped-query: 4 query, 2 key-value heads
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(3, 1, 5, 5)
    out, _ = _fp32_sdpa(layer, q, k, v, mask, dropout=0.0, scaling=layer.scaling)
    expected, _ = sdpa_attention_forward(layer, q.float(), k.float(), v.float(), mask, dropout=0.0,
                                         scaling=layer.scaling)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.to(torch.bfloat16))
    query = torch.randn(3, 4, 5, 8)       # Qwen2's query and key leave the rotary embedding in fp32, its value is bf16:
    with torch.autocast("cpu", dtype=torch.bfloat16):              # the kernel still runs in fp32 under autocast
        out, _ = _fp32_sdpa(layer, query, k.float(), v, mask, dropout=0.0, scaling=layer.scaling)
    expected, _ = sdpa_attention_forward(layer, query, k.float(), v.float(), mask, dropout=0.0, scaling=layer.scaling)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    rollout, seen = rollout_of(model, tokenizer), []
    hook = layer.register_forward_hook(lambda *_: seen.append(model.config._attn_implementation))
    with autocast("bf16", "cpu", model):
        completion_logprobs(model.eval(), rollout, torch.arange(4), 1.0)
    hook.remove()
    assert seen and set(seen) == {FP32_SDPA} and model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), autocast("bf16", "cpu", model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    with autocast("off", "cpu", model):                                  # no autocast: nothing changes
        assert model.config._attn_implementation == "sdpa"


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors together."""
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    return num / sum(float((y.double() ** 2).sum()) for y in b) ** 0.5


@pytest.mark.parametrize("arch, share", [("gpt2", True), ("qwen2", True), ("qwen2", False)])
def test_head_in_chunks_equals_the_full_logits_and_their_gradient(arch, share):
    """The large-vocabulary path (hidden states out, the head on 5 real tokens at a time, each chunk
    recomputed in backward) against full logits: log-probs, entropy and every gradient."""
    model, tokenizer = build(arch)
    rollout = rollout_of(model, tokenizer)
    rows = torch.tensor([0, 2, 3, 5, 8, 11])
    model.train()
    results = {}
    for chunk in (None, 5):
        model.zero_grad()
        logp, entropy, mask = completion_logprobs(model, rollout, rows, 0.7, share_prompts=share, chunk_tokens=chunk)
        advantages = torch.linspace(-1.0, 1.0, len(rows))[:, None]
        (-(logp * advantages * mask).sum() / mask.sum()).backward()
        results[chunk] = (
            logp.detach(),
            entropy,
            mask,
            [p.grad.clone() for p in model.parameters() if p.grad is not None],
        )
    (a, ea, ma, ga), (b, eb, mb, gb) = results[5], results[None]
    real = ma.bool()
    assert torch.equal(ma, mb) and a.shape == b.shape
    assert relative_difference([a[real]], [b[real]]) < 1e-6 and relative_difference([ea[real]], [eb[real]]) < 1e-6
    assert len(ga) == len(gb) and relative_difference(ga, gb) < 1e-6
    assert (a[~real] == 0).all()                                       # padding: 0, as the full path after masking


def test_big_logits_switch_to_the_chunked_head(monkeypatch):
    """Above LOGIT_BYTES the chunked head runs by itself: no (R, T, V) tensor from the model."""
    import aha.core.logprobs as logprobs
    model, tokenizer = build("qwen2")
    rollout = rollout_of(model, tokenizer)
    rows = torch.arange(12)
    shapes = []
    model.register_forward_hook(lambda m, args, out: shapes.append(out.logits.shape[-1]))
    completion_logprobs(model, rollout, rows, 1.0)
    plain = len(shapes)
    monkeypatch.setattr(logprobs, "LOGIT_BYTES", 1024)
    completion_logprobs(model, rollout, rows, 1.0)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert set(shapes[:plain]) == {vocab} and set(shapes[plain:]) == {hidden}   # hidden states instead of logits


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("bias, temperature, chunk", [(False, 1.0, 4), (True, 0.7, 3), (True, 1.3, 64)])
def test_fused_head_equals_log_softmax_and_its_gradient(bias, temperature, chunk, keep):
    """The fused head (two reused chunk buffers, the logit gradient formed in place) against
    torch's log_softmax over the full logits: log-probs, entropy, and the gradients of the hidden
    states, the weight and the bias, for a last chunk shorter than the others and for one chunk;
    with the probabilities kept for backward and recomputed there."""
    from aha.core.logprobs import FusedHeadLogprobs
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).double().float()
    hidden = torch.randn(10, 16, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    upstream = torch.randn(10)                                   # dL/dlogp, as the policy loss gives it
    logp, entropy = FusedHeadLogprobs.apply(hidden, head.weight, head.bias, targets, 1.0 / temperature, chunk, keep)
    (logp * upstream).sum().backward()
    fused = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    logits = head(hidden) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    reference = log_probs.gather(1, targets[:, None]).squeeze(1)
    (reference * upstream).sum().backward()
    expected = [hidden.grad] + [p.grad for p in head.parameters()]
    assert torch.allclose(logp, reference.detach(), atol=1e-5)
    assert torch.allclose(entropy, -(log_probs.exp() * log_probs).sum(-1).detach(), atol=1e-5)
    assert not entropy.requires_grad and len(fused) == len(expected) == (3 if bias else 2)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused, expected))


def test_fused_head_only_in_fp32_without_autocast():
    """bf16 weights, or autocast on, keep the checkpointed chunks (their numerics stay as they were)."""
    from aha.core.logprobs import fused_head_applies
    hidden, weight = torch.randn(3, 4), torch.nn.Parameter(torch.randn(5, 4))
    assert fused_head_applies(hidden, weight)
    assert not fused_head_applies(hidden.bfloat16(), weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_head_applies(hidden, weight)


def test_fused_head_without_tokens_gives_zero_gradients():
    """A micro-batch with no real token (K = 0): empty log-probs, and a zero weight gradient, not
    whatever memory the gradient buffer was given."""
    from aha.core.logprobs import FusedHeadLogprobs
    head, hidden = torch.nn.Linear(16, 50), torch.randn(0, 16, requires_grad=True)
    logp, entropy = FusedHeadLogprobs.apply(
        hidden, head.weight, head.bias, torch.zeros(0, dtype=torch.long), 1.0, 4, True
    )
    (logp.sum() + 0 * head.weight.sum()).backward()
    assert logp.shape == entropy.shape == (0,)
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight)) and torch.equal(head.bias.grad, torch.zeros(50))
