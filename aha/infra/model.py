"""Models: the built-in tiny configs, loading any local transformers causal-LM dir, device/dtype.

Two built-in architectures, both plain transformers classes saved with `save_pretrained`:
- `qwen2`: Llama/Qwen2-style dense decoder (GQA, RoPE, SwiGLU) — the default (see README for
  the measured comparison);
- `deepseek_v3`: `DeepseekV3ForCausalLM` with multi-head latent attention (MLA) and a
  mixture-of-experts MLP, the architecture of DeepSeek-R1, scaled down.
"""

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    GPT2Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.utils.logging import disable_progress_bar

from aha.infra.errors import AhaError

ARCHS = ("gpt2", "qwen2", "deepseek_v3")


def tiny_config(arch: str, vocab_size: int, pad_id: int, eos_id: int, hidden: int = 256, layers: int = 4):
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=512, pad_token_id=pad_id,
                  eos_token_id=eos_id, bos_token_id=eos_id, tie_word_embeddings=True)
    if arch == "gpt2":
        # Learned absolute positions: in the built-in task every token of a document sits at a
        # fixed position, so "the digit I need" is a fixed position — found at once. GELU: GPT-2's tanh
        # form (`gelu_new`) as torch's one fused kernel, 3-4x faster than transformers' eight-op
        # `gelu_new` forward and backward (the same function; outputs within 3e-7)
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                          n_inner=3 * hidden, activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id,
                          tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, intermediate_size=3 * hidden, **common)
    if arch == "deepseek_v3":
        # MLA: queries and keys/values through low-rank latents; MoE: 4 routed experts (top-2)
        # plus one shared expert, after one dense layer, as DeepSeek-V3 does after its first three.
        return DeepseekV3Config(
            num_key_value_heads=4, intermediate_size=3 * hidden, moe_intermediate_size=hidden,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
            first_k_dense_replace=1, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
            qk_nope_head_dim=hidden // 8, qk_rope_head_dim=hidden // 8, v_head_dim=hidden // 4,
            head_dim=hidden // 8, rope_interleave=True, routed_scaling_factor=1.0, **common)
    raise AhaError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")


def build_model(arch: str, tokenizer, seed: int, **sizes):
    config = tiny_config(arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, **sizes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_tokenizer(path: Path):
    """The tokenizer saved in `path`. A tokenizer saved as a plain `tokenizers` object (aha's own)
    is loaded as exactly that: `AutoTokenizer` would rebuild it from the model type (a byte-level
    Qwen2 tokenizer for a qwen2 config), which changes its ids."""
    config = path / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    loader = PreTrainedTokenizerFast if saved in ("TokenizersBackend", "PreTrainedTokenizerFast") else AutoTokenizer
    return loader.from_pretrained(path)


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local transformers dir; a clear AhaError when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise AhaError(
            f"model dir {path} does not exist: pass a transformers model directory (config.json + weights + tokenizer)"
        )
    if not (path / "config.json").is_file():
        raise AhaError(f"model dir {path} has no config.json: is it a transformers model directory?")
    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:  # transformers raises many types here
        raise AhaError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0][:200]}") from None
    if len(tokenizer.get_vocab()) <= len(
        tokenizer.all_special_tokens
    ):  # transformers builds an empty one when files are missing
        raise AhaError(f"model dir {path} has no tokenizer (tokenizer.json, tokenizer.model or vocab files): "
                       "save the model's tokenizer into it with tokenizer.save_pretrained(dir)")
    disable_progress_bar()     # transformers' "Loading weights" bar: aha's own bars show progress
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except Exception as exc:
        raise AhaError(f"cannot load the model in {path}: {str(exc).splitlines()[0][:200]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.config.vocab_size:
        raise AhaError(
            f"tokenizer in {path} has {len(tokenizer)} tokens but the model only {model.config.vocab_size}: they do "
            f"not belong together"
        )
    return model, tokenizer


def disable_dropout(model) -> None:
    """Dropout off everywhere in `model`, as TRL's `disable_dropout_in_model` does (every
    `nn.Dropout` gets p = 0), and the attention dropout that some architectures keep as a float
    (Qwen2, Llama: `attention_dropout`). The policy then scores its own samples as the sampler
    (eval mode) and the reference model do: the on-policy ratio is 1 and the KL is 0 at step 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def model_context(model) -> int | None:
    """The positions the model can attend over (`max_position_embeddings`; GPT-2 calls it
    `n_positions`); None when its config does not say."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(context) if context else None


def check_context(prompt_tokens: int, max_new_tokens: int, context: int | None, fix: str) -> None:
    """Stop, in one line, before a prompt plus its completion would run past the model's positions
    (learned positions then fail deep in torch.embedding with a bare IndexError)."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise AhaError(
            f"the longest prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} positions, more than this model's context of {context}; {fix}"
        )


def detect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def detect_dtype(device: str) -> torch.dtype:
    """Training weights: bf16 on a CUDA GPU that supports it (half the memory, fp32's range), fp32
    everywhere else — CPU bf16 matmuls are slow and MPS support is partial. Log-probs and the loss
    are computed in fp32 either way (aha/core/train.py)."""
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: a CPU whose bf16 matmuls beat fp32 (this project's 2-core AVX2 machine
    runs them ~150× slower, see `aha bench`'s matmul line) — unless oneDNN is held to an older
    instruction set (`ONEDNN_MAX_CPU_ISA=AVX2`, e.g. to measure what an AVX2 machine would do):
    then its bf16 matmuls are emulated and slow too."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    if not (isa in ("ALL", "DEFAULT") or "BF16" in isa or "AMX" in isa or "AVX10" in isa):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_enabled(mode: str, device: str) -> bool:
    """Whether `autocast(mode, device)` turns bf16 autocast on."""
    return mode == "bf16" or (mode == "auto" and device == "cpu" and cpu_has_fast_bf16())


@contextmanager
def autocast(mode: str, device: str, model=None):
    """bf16 autocast for the update's forward passes: `bf16` always, `auto` on a CPU with fast bf16
    only, `off` never. On CUDA the weights are bf16 already (`detect_dtype`), so `auto` adds nothing.
    Log-probs are still taken in fp32 from the bf16 logits (aha/core/logprobs.py). On a CPU, `model`'s
    SDPA attention then runs in fp32 (`fp32_attention`)."""
    with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16,
                        enabled=autocast_enabled(mode, device)):
        with autocast_attention(mode, device, model):
            yield


def autocast_attention(mode: str, device: str, model):
    """`fp32_attention(model)` where `autocast(mode, device)` runs bf16 on a CPU; else a no-op context
    (no model, CUDA, autocast off)."""
    on = model is not None and device == "cpu" and autocast_enabled(mode, device)
    return fp32_attention(model) if on else nullcontext()


FP32_SDPA = "aha_sdpa_fp32"     # the name `fp32_attention` registers with transformers' attention interfaces


def _fp32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention on fp32 q, k, v with autocast off inside, the output cast back to
    the query's dtype. Off for fp32 inputs too: autocast casts SDPA's inputs to bf16 whatever they
    are, and a Llama/Qwen2 query and key leave the rotary embedding in fp32 (its cos and sin are), so
    until 2026-12-06 those models' attention ran the bf16 kernel (the bench's update at 128 new
    tokens on one replayed rollout: 798 ms, now 686 ms; `python bench/compile_probes.py attention`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


@contextmanager
def fp32_attention(model):
    """While inside, `model`'s SDPA attention runs on fp32 q, k, v with autocast off (`_fp32_sdpa`),
    whatever dtypes autocast hands it: on the CPU this was measured on (AMD EPYC family 25 model 17,
    AVX512-BF16), torch's flash-attention kernel runs its forward + backward ~2x faster in fp32 than
    in bf16 at 48 rows x 62 positions and 1.5x at 64 x 150 (`bench/speed_probes_2026_12_06.py`), and
    the whole update of `aha run` ~25% faster; attention is a small share of a step's FLOPs and fp32
    is the more exact. Every other matmul stays bf16. Models on another attention implementation are
    left as they are. The update holds it over its backward pass too (`aha/core/step.py`)."""
    from transformers import PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    if FP32_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(FP32_SDPA, _fp32_sdpa)
        AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)     # the same mask as SDPA's
    configs = {id(part.config): part.config for part in model.modules()
               if isinstance(part, PreTrainedModel) and getattr(part.config, "_attn_implementation", None) == "sdpa"}
    for config in configs.values():
        config._attn_implementation = FP32_SDPA
    try:
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder (`aha run` / `aha train --out DIR`) stands for the model it saved in DIR/model; a
    directory with its own config.json is a model dir itself."""
    path = Path(path)
    run_model = path / "model"
    return run_model if not (path / "config.json").is_file() and (run_model / "config.json").is_file() else path


def model_flops(params: int, forward_tokens: int, trained_tokens: int) -> int:
    """A model's work in FLOPs: 2·N per token read forward-only (sampling, a reference), 6·N per
    token trained (forward + backward).

    >>> model_flops(1000, forward_tokens=300, trained_tokens=100)
    1200000
    """
    return 2 * params * forward_tokens + 6 * params * trained_tokens


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


ONEDNN_CACHE_ENTRIES = 64


def bound_onednn_caches(entries: int = ONEDNN_CACHE_ENTRIES) -> None:
    """Keep at most `entries` oneDNN primitives, and as many in ideep's own cache, unless the user
    set `ONEDNN_PRIMITIVE_CACHE_CAPACITY` / `LRU_CACHE_CAPACITY`: both default to 1024, an entry per
    matmul shape, and each holds memory of its own. The update's shapes change with every micro-batch
    (rows × padded width), so under bf16 autocast, where matmuls go through oneDNN, a run's resident
    memory grew with each new shape: the built-in model's forward + backward at 300 random shapes
    ended at ~1,950 MB resident, and at 750–773 MB with both caches at 64 entries
    (AMD EPYC, `python bench/speed_probes_2026_12_06.py later`). A decoding step's few shapes stay
    cached (at 0 entries decoding ran 2x slower). Read by oneDNN and ideep at their first use:
    called once by the `aha` command, before any matmul."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


def return_freed_memory_to_the_os(threshold: int = 8 << 20, top_pad: int = 64 << 20) -> bool:
    """Tune glibc's malloc for a training process: every allocation above `threshold` bytes gets its
    own mmap, so that freeing it gives the memory back to the OS, and each heap keeps `top_pad` bytes
    when it grows or shrinks. By default glibc raises the mmap threshold up to 32 MB as big blocks are
    freed, and then keeps freed logits-sized blocks in its heap: at a 152k vocabulary the update's
    per-chunk logits (32 MB, aha/core/logprobs.py) left gigabytes resident that no tensor used any more
    (measured: 3.5 GB of RSS for 64 MB of live tensors). Too low a threshold costs time instead: at
    1 MB every activation was a fresh mmap whose pages faulted in again at each use (the default
    `aha run`: 11.5M page faults, 28 s of system time, 99 s wall; with 8 MB and the 64 MB pad 0.7M,
    3 s, 79 s, peak RSS 1.05 -> 1.22 GB). Called once by the `aha` command; False where there is no
    glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(libc.mallopt(option, value) for option, value in
               [(m_mmap_threshold, threshold), (m_trim_threshold, 2 * threshold), (m_top_pad, top_pad)])
