"""GPT-2's one-token decode step written out, for the built-in model's rollouts.

transformers' forward pays, at every decode step, for what a fixed one-token step does not need:
its decorators, output records, mask building and the dispatch of each block and attention — on the built-in
1.6M-parameter model most of a step's time (the matmuls themselves run near the CPU's fp32 peak).
`gpt2_decoder(model)` returns the same computation as plain tensor ops: the same ops on the same
shapes in the same order as transformers' GPT2LMHeadModel with SDPA attention and a ready 4-D
mask, so the logits are bitwise those of `model(...)` (tests/test_rollout.py checks it step by step).
Any other model, or a GPT-2 that this does not write out (cross-attention, other attention
implementations, training mode), gets None and keeps transformers' forward.
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
