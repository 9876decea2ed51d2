"""The one-token decode step written out, for rollouts: GPT-2 (the built-in model) and the Llama
family without per-head norms (Llama: SmolLM2; Qwen2: the bench's model).

transformers' forward pays, at every decode step, for what a fixed one-token step does not need:
its decorators, output records, mask building and the dispatch of each block and attention — on the built-in
1.6M-parameter model most of a step's time (the matmuls themselves run near the CPU's fp32 peak).
`written_out_decoder(model)` returns the same computation without that machinery: the same ops on the
same shapes in the same order as transformers' forward with SDPA attention and a ready 4-D mask (for
the Llama family through transformers' own rotary and SDPA functions), so the logits are bitwise
those of `model(...)` (tests/test_rollout.py). Any other model, or one this does not write out
(cross-attention, sliding windows, other attention implementations, training mode), gets None and
keeps transformers' forward.
"""

import torch.nn.functional as F
from torch import Tensor


def gpt2_decoder(model):
    """`step(tokens (A,), positions (A, 1), mask (A, 1, 1, L), cache) -> logits (A, V)` for a GPT-2
    LM head model in eval mode with SDPA attention; None for any other model."""
    config = model.config
    if (getattr(config, "model_type", None) != "gpt2" or getattr(config, "_attn_implementation", None) != "sdpa"
            or config.add_cross_attention or model.training or not hasattr(model, "transformer")):
        return None
    body = model.transformer
    blocks = list(body.h)

    def layer_norm(norm, x: Tensor) -> Tensor:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def step(tokens: Tensor, positions: Tensor, mask: Tensor, cache) -> Tensor:
        hidden = F.embedding(tokens[:, None], body.wte.weight) + F.embedding(positions, body.wpe.weight)   # (A,1,C)
        for index, block in enumerate(blocks):
            attn = block.attn
            residual = hidden
            query, key, value = attn.c_attn(layer_norm(block.ln_1, hidden)).split(attn.split_size, dim=2)
            shape = (*key.shape[:-1], -1, attn.head_dim)                                            # (A,1,H,D)
            key, value = cache.update(key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2), index)
            out = F.scaled_dot_product_attention(query.view(shape).transpose(1, 2), key, value, attn_mask=mask,
                                                 dropout_p=0.0, scale=attn.scaling, is_causal=False)  # (A,H,1,D)
            out = out.reshape(out.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous()
            hidden = attn.c_proj(out.reshape(*out.shape[:-2], -1).contiguous()) + residual
            residual = hidden
            mlp = block.mlp
            hidden = residual + mlp.c_proj(mlp.act(mlp.c_fc(layer_norm(block.ln_2, hidden))))
        return model.lm_head(layer_norm(body.ln_f, hidden))[:, -1]                               # (A, V)

    return step


def llama_decoder(model):
    """The same written-out step for the Llama family without per-head norms (Llama, Qwen2: SmolLM2 and
    the bench's random Qwen2), with every full-attention layer on SDPA; transformers' own
    `apply_rotary_pos_emb` and `sdpa_attention_forward` do the rotation and the attention (grouped-query
    heads included), so only the call machinery around them is left out. None for any other model."""
    import sys

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    config = model.config
    body = getattr(model, "model", None)
    if (getattr(config, "model_type", None) not in ("llama", "qwen2") or model.training or body is None
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"])):
        return None
    layers = list(body.layers[: config.num_hidden_layers])
    rotate = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb

    def step(tokens: Tensor, positions: Tensor, mask: Tensor, cache) -> Tensor:
        hidden = body.embed_tokens(tokens[:, None])                                               # (A, 1, C)
        cos, sin = body.rotary_emb(hidden, positions)
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            residual, x = hidden, layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            query, key = rotate(attn.q_proj(x).view(shape).transpose(1, 2), attn.k_proj(x).view(shape).transpose(1, 2),
                                cos, sin)
            key, value = cache.update(key, attn.v_proj(x).view(shape).transpose(1, 2), index)
            out = sdpa_attention_forward(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling,
                                         sliding_window=None)[0]
            hidden = residual + attn.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.lm_head(body.norm(hidden))[:, -1]                                            # (A, V)

    return step


def written_out_decoder(model):
    """The written-out decode step of `model` (`step(tokens (A,), positions (A, 1), mask (A, 1, 1, L),
    cache) -> logits (A, V)`), or None where transformers' forward stays — also wherever a forward
    hook watches the model or one of its modules (the step skips their calls: e.g. the experiment's
    token counter, aha/stages/experiment.py, or a profiler's hooks)."""
    from torch.nn.modules import module as torch_module
    hooked = torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks or any(
        part._forward_hooks or part._forward_pre_hooks for part in model.modules())
    return None if hooked else gpt2_decoder(model) or llama_decoder(model)
