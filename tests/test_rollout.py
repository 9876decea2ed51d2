import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from aha.core.rollout import generate, left_pad
from aha.core.sampling import SamplingParams, filter_logits, row_uniforms, sample_next
from aha.infra.model import build_model
from aha.infra.tokenizer import build_char_tokenizer


def naive_generate(model, prompts, group_size, params, pad_id, seed):
    """Reference: recompute the whole sequence every step, no KV cache, the same uniforms per (step, row)."""
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    n = ids.shape[0]
    out = [[] for _ in range(n)]
    active = list(range(n))
    for step in range(params.max_new_tokens):
        rows = torch.tensor(active)
        seq = torch.cat([ids[rows], torch.tensor([out[r] for r in active], dtype=torch.long).view(len(active), -1)], 1)
        att = torch.cat([mask[rows], torch.ones(len(active), len(out[active[0]]), dtype=torch.long)], 1)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=att, position_ids=pos).logits[:, -1]
        tokens, _ = sample_next(logits, row_uniforms(seed, step, rows), params)
        still = []
        for r, t in zip(active, tokens.tolist()):
            out[r].append(t)
            if t not in params.stop_token_ids:
                still.append(r)
        # rows that stopped leave; the naive loop needs equal lengths, so run survivors together
        if not still:
            break
        active = still
        if len({len(out[r]) for r in active}) != 1:
            raise AssertionError("survivors must share a length")
    return out


def test_kv_cache_sampling_equals_naive_recompute():
    tok = build_char_tokenizer()
    model = build_model("qwen2", tok, seed=1, hidden=64, layers=2).eval()
    prompts = [
        tok("User: 12+345\nAssistant:")["input_ids"],
        tok("User: 7+8\nAssistant:")["input_ids"],
    ]  # unequal lengths
    stop = tok.convert_tokens_to_ids("7")   # a common character, so some rows stop early
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, stop_token_ids=(stop,))
    # the first seed whose samples stop early in some rows: the test must exercise rows leaving the batch
    for seed in range(50):
        reference = naive_generate(model, prompts, 3, params, tok.pad_token_id, seed=seed)
        if any(len(r) < 12 for r in reference):
            break
    assert any(len(r) < 12 for r in reference), "no seed of 50 stops a row early"
    rollout = generate(model, prompts, 3, params, tok.pad_token_id, seed=seed)
    for row, ref in enumerate(reference):
        length = int(rollout.completion_mask[row].sum())
        assert rollout.completion_ids[row, :length].tolist() == ref
        assert bool(rollout.truncated[row]) == (ref[-1] != stop)


def tiny_model(arch: str, tok, seed: int):
    if arch in ("llama", "qwen3"):
        config_class, extra = (LlamaConfig, {}) if arch == "llama" else (Qwen3Config, {"head_dim": 16})
        config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **extra)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return build_model(arch, tok, seed=seed, hidden=64, layers=2).eval()


STOP_CHARS = "7e a"   # common characters, so rows finish at several different steps


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3", "deepseek_v3"])
def test_preallocated_cache_and_lazy_row_removal_equal_naive_recompute(arch):
    """12 rows finishing at several steps: a row that finishes alone stays in the batch (under an
    eighth), more trigger the cache reindex; every architecture's attention reads the preallocated
    cache. Temperature 0.3 so that the random-init model's logits, not the noise alone, pick tokens."""
    tok = build_char_tokenizer()
    model = tiny_model(arch, tok, seed=4)
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("3+4", "12+345", "60+7")]
    stops = tuple(tok.convert_tokens_to_ids(list(STOP_CHARS)))
    params = SamplingParams(max_new_tokens=16, temperature=0.3, stop_token_ids=stops)
    rollout = generate(model, prompts, 4, params, tok.pad_token_id, seed=11)
    reference = naive_generate(model, prompts, 4, params, tok.pad_token_id, seed=11)
    assert len({len(r) for r in reference if r[-1] in stops}) >= 3, "rows should finish at 3+ different steps"
    for row, ref in enumerate(reference):
        length = int(rollout.completion_mask[row].sum())
        assert rollout.completion_ids[row, :length].tolist() == ref
        assert (rollout.completion_ids[row, length:] == tok.pad_token_id).all()
        assert (rollout.logprobs[row, length:] == 0).all() and (rollout.logprobs[row, :length] < 0).all()
        assert bool(rollout.truncated[row]) == (ref[-1] not in stops)


def test_temperature_zero_is_deterministic_and_greedy():
    tok = build_char_tokenizer()
    model = build_model("qwen2", tok, seed=2, hidden=64, layers=2).eval()
    prompts = [tok("User: 1+2\nAssistant:")["input_ids"]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    a = generate(model, prompts, 2, params, tok.pad_token_id, seed=1)
    b = generate(model, prompts, 2, params, tok.pad_token_id, seed=99)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, -1].argmax().item()
    assert a.completion_ids[0, 0].item() == first


def test_same_seed_same_samples_and_logprobs_match_policy():
    tok = build_char_tokenizer()
    model = build_model("qwen2", tok, seed=3, hidden=64, layers=2).eval()
    prompts = [tok("User: 5+5\nAssistant:")["input_ids"]]
    params = SamplingParams(max_new_tokens=5, temperature=0.7)
    a = generate(model, prompts, 4, params, tok.pad_token_id, seed=7)
    b = generate(model, prompts, 4, params, tok.pad_token_id, seed=7)
    assert torch.equal(a.completion_ids, b.completion_ids)
    # stored log-probs are log softmax(logits / T) of the sampled tokens
    seq = torch.cat([torch.tensor(prompts[0]), a.completion_ids[0]])
    with torch.no_grad():
        logits = model(input_ids=seq[None]).logits[0, len(prompts[0]) - 1:-1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(1, a.completion_ids[0][:, None]).squeeze(1)
    torch.testing.assert_close(a.logprobs[0], expected, atol=1e-5, rtol=1e-5)


def test_top_k_and_top_p_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7))   # 0.5 < 0.7 ≤ 0.8: two tokens
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.5))   # the first token reaches p
    assert kept.tolist() == [[True, False, False, False]]


def test_a_batch_cut_into_chunks_samples_the_same_tokens():
    """max_rows: 3 prompts × 4 rows in passes of 4 (one group) or 8 (groups do not split) rows give
    the one-pass rollout exactly: each row's uniforms depend on (seed, step, row) only."""
    tok = build_char_tokenizer()
    model = tiny_model("qwen2", tok, seed=4)
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("3+4", "12+345", "60+7")]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95,
                            stop_token_ids=tuple(tok.convert_tokens_to_ids(list(STOP_CHARS))))
    whole = generate(model, prompts, 4, params, tok.pad_token_id, seed=2)
    assert len(set(whole.lengths.tolist())) > 1, "rows should finish at different steps"
    for max_rows in (1, 4, 8):
        chunked = generate(model, prompts, 4, params, tok.pad_token_id, seed=2, max_rows=max_rows)
        width = int(whole.lengths.max())
        assert torch.equal(chunked.completion_ids[:, :width], whole.completion_ids)
        assert torch.equal(chunked.completion_mask[:, :width], whole.completion_mask)
        assert torch.equal(chunked.truncated, whole.truncated)
        torch.testing.assert_close(chunked.logprobs[:, :width], whole.logprobs, atol=1e-6, rtol=0)


def naive_stop_string_generate(model, tok, prompt, params, seed):
    """Reference for stop strings: full recompute, decode the whole completion after every token,
    stop as soon as it contains a stop string."""
    ids = list(prompt)
    out = []
    for step in range(params.max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[:, -1]
        token, _ = sample_next(logits, row_uniforms(seed, step, torch.tensor([0])), params)
        out.append(int(token))
        if out[-1] in params.stop_token_ids or any(
            s in tok.decode(out, skip_special_tokens=True) for s in params.stop_strings
        ):
            break
    return out


def test_stop_strings_of_several_tokens_end_the_completion_after_the_stop_text():
    """A tokenizer where `</answer>` is several tokens (the char tokenizer without its tags): the
    completion ends on the token that completes the stop string, the text is kept, and the tokens
    equal a naive decode-and-check loop."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = list("</answer>")[:-1] + [">"]            # 9 distinct characters: random text hits 2-char stops often
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["[PAD]", "[EOS]", *chars])}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("[PAD]", "[EOS]")])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")
    assert len(tok.tokenize("</answer>")) == 9
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    from aha.core.rollout import stop_strings
    assert stop_strings(tok) == ("</answer>",)
    found = 0
    for stop in ("</answer>", "an", "e>", "sw"):
        params = SamplingParams(max_new_tokens=40, temperature=1.0, stop_strings=(stop,))
        prompt = tok("<answer>")["input_ids"]
        for seed in range(6):
            rollout = generate(model, [prompt], 2, params, tok.pad_token_id, seed=seed, tokenizer=tok)
            for row in range(2):
                length = int(rollout.lengths[row])
                got = rollout.completion_ids[row, :length].tolist()
                text = tok.decode(got, skip_special_tokens=True)
                if stop in text:
                    found += 1
                    assert text.endswith(stop[-1]) and not rollout.truncated[row]      # ends on the stop text
                    assert stop not in tok.decode(got[:-1], skip_special_tokens=True)   # and no later
                # row 0 draws the uniforms of global row 0, as the naive loop does
            length = int(rollout.lengths[0])
            assert rollout.completion_ids[0, :length].tolist() == naive_stop_string_generate(
                model, tok, prompt, params, seed
            )
    assert found >= 3, "the stop strings should be hit"
    with pytest.raises(ValueError, match="need the tokenizer"):
        generate(model, [prompt], 1, params, tok.pad_token_id, seed=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_the_ready_decode_mask_samples_what_the_models_own_mask_does(arch, monkeypatch):
    """The additive (N, 1, 1, L) decode mask (aha/core/rollout.py `decode_mask`) against transformers'
    own mask, built at each step: the same tokens and bit-identical log-probs, padding included."""
    import aha.core.rollout as rollout_module
    tok = build_char_tokenizer()
    model = tiny_model(arch, tok, seed=4)
    assert rollout_module.decode_mask(model, torch.ones(2, 5, dtype=torch.long)) is not None
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("3+4", "12+345", "60+7")]  # unequal lengths
    params = SamplingParams(
        max_new_tokens=16, temperature=1.0, stop_token_ids=tuple(tok.convert_tokens_to_ids(list(STOP_CHARS)))
    )
    ours = generate(model, prompts, 4, params, tok.pad_token_id, seed=3)
    monkeypatch.setattr(rollout_module, "decode_mask", lambda model, attention: None)
    theirs = generate(model, prompts, 4, params, tok.pad_token_id, seed=3)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.equal(ours.logprobs, theirs.logprobs)


def assert_written_out_samples_as_transformers(model, tok, prompts, group, params, seed, monkeypatch):
    """The written-out step against transformers' forward: the same tokens, log-probs within 2e-5
    (not equal: the shared-prompt attention sums in another order), rows leaving at different steps."""
    import aha.core.rollout as rollout_module
    ours = generate(model, prompts, group, params, tok.pad_token_id, seed=seed)
    monkeypatch.setattr(rollout_module, "written_out_decoder", lambda model, bf16=False: None)
    theirs = generate(model, prompts, group, params, tok.pad_token_id, seed=seed)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.allclose(ours.logprobs, theirs.logprobs, rtol=0, atol=2e-5)
    assert not torch.equal(ours.logprobs, theirs.logprobs)
    assert ours.lengths.min() < ours.lengths.max()


@pytest.mark.parametrize("share_bytes", [0, 1 << 40])
def test_the_written_out_gpt2_step_is_transformers_forward(share_bytes, monkeypatch):
    """aha/core/decode_step.py against transformers' own forward on the built-in model's real weights:
    the same tokens and log-probs within 2e-5 (the prompt's keys read once per group, `SharedPromptKV`,
    sum in another order), rows leaving the batch at different steps included, with the prompts' keys
    shared by each group and with one cache per row from the start; other architectures, and a model
    in training mode, keep transformers' forward."""
    import aha.core.decode_step as decode_step
    monkeypatch.setattr(decode_step, "SHARE_PROMPT_BYTES", share_bytes)
    from aha.core.decode_step import gpt2_decoder
    from aha.core.rollout import stop_token_ids
    from aha.infra.base import SHIPPED
    from aha.infra.model import load_model
    model, tok = load_model(SHIPPED)
    model.eval()
    assert gpt2_decoder(model) is not None
    assert gpt2_decoder(tiny_model("llama", build_char_tokenizer(), seed=0)) is None
    assert gpt2_decoder(model.train()) is None
    model.eval()
    from aha.core.decode_step import written_out_decoder
    hook = model.transformer.h[1].register_forward_pre_hook(lambda module, args: None)   # e.g. a token counter
    assert written_out_decoder(model) is None                       # hooks must see their calls: transformers'
    hook.remove()
    assert written_out_decoder(model) is not None
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("219+107", "5+5", "463+372")]   # unequal
    params = SamplingParams(max_new_tokens=48, temperature=1.0, stop_token_ids=stop_token_ids(model, tok))
    assert_written_out_samples_as_transformers(model, tok, prompts, 8, params, 5, monkeypatch)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("share_bytes", [0, 1 << 40])
def test_the_written_out_llama_family_step_is_transformers_forward(arch, share_bytes, monkeypatch):
    """aha/core/decode_step.py's Llama/Qwen2 step (grouped-query heads: 4 query, 2 key/value) against
    transformers' own forward: the same tokens and log-probs within 2e-5, rows leaving the batch
    included, prompts shared or one cache per row; Qwen3 (per-head norms) keeps transformers' forward."""
    import aha.core.decode_step as decode_step
    monkeypatch.setattr(decode_step, "SHARE_PROMPT_BYTES", share_bytes)
    from aha.core.decode_step import written_out_decoder
    tok = build_char_tokenizer()
    model = tiny_model(arch, tok, seed=7)
    assert written_out_decoder(model) is not None and written_out_decoder(tiny_model("qwen3", tok, seed=0)) is None
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("3+4", "12+345", "60+7")]      # unequal lengths
    params = SamplingParams(max_new_tokens=24, temperature=1.0,
                            stop_token_ids=tuple(tok.convert_tokens_to_ids(list(STOP_CHARS))))
    assert_written_out_samples_as_transformers(model, tok, prompts, 4, params, 2, monkeypatch)


@pytest.mark.parametrize("leave_at", [(2, 4), (0, 3), (5, 6)])
@pytest.mark.parametrize("chunk", [16, 2])
@pytest.mark.parametrize("share_bytes", [0, 1 << 40])
def test_shared_prompt_attention_is_sdpa_over_the_repeated_cache(leave_at, chunk, share_bytes):
    """`SharedPromptKV.attend` against SDPA on the cache transformers would hold (each prompt's keys
    and values repeated for its G rows, then the generated ones), with left-padded prompts, 4 query
    heads on 2 key-value heads, and rows leaving the batch between steps (the cache then turns into
    one per row: after some steps, or before the first); with `chunk` 2 the buffers grow every other
    step, before and after rows leave; with `share_bytes` above the prompts' size, one cache per row from
    the start."""
    from types import SimpleNamespace

    from aha.core.decode_step import SharedPromptKV
    torch.manual_seed(0)
    prompts, group, heads, kv_heads, dim, width = 3, 4, 4, 2, 8, 5
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    layer = SimpleNamespace(keys=torch.randn(prompts, kv_heads, width, dim),
                            values=torch.randn(prompts, kv_heads, width, dim))
    kv = SharedPromptKV(SimpleNamespace(layers=[layer]), prompt_mask, group, capacity=7, chunk=chunk,
                        share_bytes=share_bytes)
    rows = torch.arange(prompts * group)                                   # the original row of each batch slot
    keys = layer.keys.repeat_interleave(group, 0)                          # what transformers' cache would hold
    values = layer.values.repeat_interleave(group, 0)
    bias = torch.zeros(prompt_mask.shape).masked_fill(prompt_mask == 0, float("-inf")).repeat_interleave(group, 0)
    for step in range(7):
        if step in leave_at:                                               # rows finish and leave
            keep = torch.tensor([i for i in range(rows.numel()) if (i + step) % 3])
            kv.select(keep)
            rows, keys, values, bias = rows[keep], keys[keep], values[keep], bias[keep]
        query = torch.randn(rows.numel(), heads, 1, dim)
        key, value = torch.randn(rows.numel(), kv_heads, 1, dim), torch.randn(rows.numel(), kv_heads, 1, dim)
        keys, values = torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2)
        bias = torch.cat([bias, torch.zeros(rows.numel(), 1)], dim=1)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys.repeat_interleave(heads // kv_heads, 1), values.repeat_interleave(heads // kv_heads, 1),
            attn_mask=bias[:, None, None, :], scale=0.3)
        out = kv.attend(0, query, key, value, 0.3)
        kv.advance()
        assert out.shape == expected.shape and torch.allclose(out, expected, rtol=0, atol=1e-5), step
        assert kv.shared == (step < leave_at[0] and not share_bytes)
        assert kv.generated[0][0].shape[2] == (0 if kv.shared else width) + min(7, -(-(step + 1) // chunk) * chunk)


def test_padded_cache_attention_is_sdpa_over_the_cache():
    """`PaddedCacheKV` (the serving engine's cache, aha/serve/engine.py) against SDPA over the same
    left-padded cache with its mask, 4 query heads on 2 key-value heads: the step's key and value
    appended to the cache, the padding (random keys here, not zeros) never read."""
    from transformers import DynamicCache

    from aha.core.decode_step import PaddedCacheKV
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, width = 3, 4, 2, 8, 6
    keys, values = torch.randn(rows, kv_heads, width, dim), torch.randn(rows, kv_heads, width, dim)
    cache = DynamicCache(ddp_cache_data=[(keys.clone(), values.clone())])
    attention = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    for step in range(3):
        attention = torch.cat([attention, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        bias = torch.zeros(attention.shape).masked_fill(attention == 0, float("-inf"))[:, None, None, :]
        query = torch.randn(rows, heads, 1, dim)
        key, value = torch.randn(rows, kv_heads, 1, dim), torch.randn(rows, kv_heads, 1, dim)
        keys, values = torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys.repeat_interleave(heads // kv_heads, 1), values.repeat_interleave(heads // kv_heads, 1),
            attn_mask=bias, scale=0.3)
        kv = PaddedCacheKV(cache, bias)
        out = kv.attend(0, query, key, value, 0.3)
        kv.advance()
        assert torch.allclose(out, expected, rtol=0, atol=1e-6), step
        assert torch.equal(cache.layers[0].keys, keys)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_bf16_decode_stays_within_tolerance_of_fp32(arch):
    """`SamplingParams.bf16` (aha/core/decode_step.py `linears`: the decode step's matmuls on bf16
    weights, attention and log-probs in fp32). Documented tolerance: the sampler's log-probs of its
    own tokens within 0.1 of the fp32 policy's (mean within 0.01; measured on the built-in model:
    0.022 and 0.0012), and ≥ 90% of tokens sampled as the fp32 step samples them (measured: 99.9%).
    The fp32 weights are untouched."""
    import dataclasses

    from aha.core.logprobs import completion_logprobs
    from aha.infra.base import SHIPPED
    from aha.infra.model import load_model
    if arch == "gpt2":
        model, tok = load_model(SHIPPED)
    else:
        tok = build_char_tokenizer()
        model = tiny_model(arch, tok, seed=3)
    model.eval()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("219+107", "5+5", "463+372")]
    params = SamplingParams(max_new_tokens=32, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    fp32 = generate(model, prompts, 8, params, tok.pad_token_id, seed=5)
    bf16 = generate(model, prompts, 8, dataclasses.replace(params, bf16=True), tok.pad_token_id, seed=5)
    assert not torch.equal(fp32.logprobs, bf16.logprobs)                                # bf16 really ran
    assert (fp32.completion_ids == bf16.completion_ids).float().mean() >= 0.9
    with torch.no_grad():
        logp, _, mask = completion_logprobs(model, bf16, torch.arange(24), 1.0)
    gap = (logp - bf16.logprobs[:, :logp.shape[1]])[mask.bool()].abs()
    alike = float((fp32.completion_ids == bf16.completion_ids).float().mean())
    print(f"{arch}: bf16 sampler vs fp32 policy log-probs: max {gap.max():.4f}, mean {gap.mean():.5f}; "
          f"tokens alike {alike:.1%}")
    assert gap.max() < 0.1 and gap.mean() < 0.01
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_bf16_linears_stack_layers_and_pack_weights_without_changing_the_numbers():
    """`linears(model, bf16=True)`: a tuple of layers (a Llama layer's q/k/v, its gate/up) is one
    matmul on their stacked bf16 weights, the outputs split back; `bf16_matmul` runs oneDNN's linear
    on a packed weight where this torch has it, GELU fused. Against torch's own bf16 linear per
    layer: the stacked matmul within one bf16 rounding of the output, the packed one equal to it;
    the fused GELU within one bf16 rounding of fp32's GELU of the same bf16 inputs."""
    from aha.core.cpu_linear import bf16_matmul
    from aha.core.decode_step import linears
    tok = build_char_tokenizer()
    model = tiny_model("qwen2", tok, seed=3).eval()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    apply = linears(model, bf16=True)
    x = torch.randn(5, 1, model.config.hidden_size)
    with torch.inference_mode():
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            outs = apply(group, x)
            assert len(outs) == len(group)
            for layer, out in zip(group, outs):
                bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
                expected = torch.nn.functional.linear(x.to(torch.bfloat16), layer.weight.to(torch.bfloat16), bias)
                assert out.dtype == torch.bfloat16 and out.shape == expected.shape
                assert torch.allclose(out.float(), expected.float(), rtol=2 ** -7, atol=1e-3)
        for shape, bias in (((3, 16), True), ((4, 1, 16), False)):
            w, v = torch.randn(8, 16).bfloat16(), torch.randn(shape).bfloat16()
            b = torch.randn(8).bfloat16() if bias else None
            assert torch.equal(bf16_matmul(w, b)(v), torch.nn.functional.linear(v, w, b))
            for approximation in ("tanh", "none"):                    # GELU fused into the matmul
                exact = torch.nn.functional.gelu(torch.nn.functional.linear(
                    v.float(), w.float(), None if b is None else b.float()), approximate=approximation)
                found = bf16_matmul(w, b, approximation)(v)
                assert found.dtype == torch.bfloat16 and torch.allclose(found.float(), exact, rtol=2 ** -7, atol=2e-3)
        fp32 = linears(model, bf16=False)
        assert all(torch.equal(o, layer(x)) for o, layer in zip(fp32((attn.q_proj, attn.k_proj), x),
                                                                 (attn.q_proj, attn.k_proj)))


def test_sampling_params_decode_in_bf16_only_where_the_update_does_on_a_fast_bf16_cpu():
    from aha.infra.config import Config
    from aha.infra.model import cpu_has_fast_bf16
    assert Config(autocast="off").sampling_params().bf16 is False
    assert Config(autocast="auto").sampling_params().bf16 is cpu_has_fast_bf16()
    assert Config(autocast="bf16").sampling_params().bf16 is cpu_has_fast_bf16()    # never on a slow-bf16 CPU


def test_bf16_decode_runs_lora_wrapped_layers_in_fp32():
    """A LoRA-wrapped layer (peft) has no bf16 copy: it runs its own forward in fp32 inside the bf16
    step (a bf16 input from the layer before it cast back), and the rollout stays within tolerance."""
    pytest.importorskip("peft")
    import dataclasses

    from aha.infra.base import SHIPPED
    from aha.infra.lora import add_lora
    from aha.infra.model import load_model
    model, tok = load_model(SHIPPED)
    torch.manual_seed(0)
    _, model = add_lora(model, 4, 8)
    model.eval()
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.02)                           # adapters that change the output
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("219+107", "5+5")]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    fp32 = generate(model, prompts, 4, params, tok.pad_token_id, seed=1)
    bf16 = generate(model, prompts, 4, dataclasses.replace(params, bf16=True), tok.pad_token_id, seed=1)
    assert not torch.equal(fp32.logprobs, bf16.logprobs)
    assert (fp32.completion_ids == bf16.completion_ids).float().mean() >= 0.9
