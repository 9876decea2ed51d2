"""The one-token decode step written out, for rollouts: GPT-2 (the built-in model) and the Llama
family without per-head norms (Llama: SmolLM2; Qwen2: the bench's model).

transformers' forward pays, at every decode step, for what a fixed one-token step does not need:
its decorators, output records, mask building and the dispatch of each block and attention — on the built-in
1.6M-parameter model most of a step's time (the matmuls themselves run near the CPU's fp32 peak).
`written_out_decoder(model)` returns the same computation without that machinery: the same ops on the
same shapes in the same order as transformers' forward (for the Llama family through transformers' own
rotary function), but for the attention, which reads each prompt's keys and values once for its whole
group (`SharedPromptKV`): the logits equal those of `model(...)` to float rounding (~1e-6) and the
sampled tokens are the same (tests/test_rollout.py). Any other model, or one this does not write out
(cross-attention, sliding windows, other attention implementations, training mode), gets None and
keeps transformers' forward.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aha.core.cpu_linear import bf16_matmul

SHARE_PROMPT_BYTES = 4 * 2**20   # a layer's prompt keys + values repeated per row below this: one cache per row


def row_attention(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float) -> Tensor:
    """One decoding step's attention (A, Hq, 1, D) of each row over its own cache, keys and values
    (A, Hkv, L, D), with the additive mask `bias` (A, 1, 1, L): one matmul of the Hq / Hkv query heads
    that share a key head (head h reads key head h // (Hq / Hkv), as transformers' `repeat_kv` pairs
    them), a softmax and one matmul."""
    q = query.reshape(*keys.shape[:2], -1, query.shape[-1])                                  # (A, Hkv, R, D)
    probs = (torch.matmul(q, keys.transpose(-1, -2)) * scale + bias).softmax(dim=-1)
    return torch.matmul(probs, values).reshape(query.shape)


class SharedPromptKV:
    """The keys and values of a group-sampled decode, each prompt's stored once for its G rows.

    transformers' cache repeats a prompt's keys and values for each of its G samples, and a decode
    step's attention then reads them G times: on a CPU that step is bound by reading the cache
    (the built-in model's attention ran at ~10 GB/s, a third of the memory's bandwidth, and took a
    third of a step), and in `aha run` the prompt is most of what each row attends to. Here the
    prompt part stays (P, Hkv, Lp, D) from the prefill and is read once per step as a matmul of all
    G × (query heads per key head) queries of a group; each row's generated keys and values are
    written in place to (N, Hkv, width, D). One softmax runs over both parts, with −inf on the
    prompts' left padding.

    The generated part grows `chunk` positions at a time, and a step reads the whole of it, its
    not-yet-written tail zeros under −inf: each row's keys are then one unbroken run of memory.
    Read up to the written position out of a buffer sized for the whole generation, they leave a
    gap after each row's, and the CPU's prefetcher starts over at each: the batched matmul over the
    generated keys, from memory, took 1.9–2.5× as long with the gap as unbroken at the built-in
    model's shape (64 rows × 4 heads × 61 positions × 48; 188–409 against 87–198 µs) and 1.5–2.3× at
    the bench's Qwen2's (0.94× in one run of eight) (AMD EPYC, `python
    bench/speed_probes_2026_12_06.py final`, eight runs; the absolute times move with the memory's
    speed at the time, the ratio within a run much less). A growth lays the written part out anew
    once (`_lay_out`, into memory allocated once).

    Once rows leave the batch the groups are ragged: the cache then becomes one per row (each
    prompt's keys and values copied to its remaining rows, once, then the generated ones), and a
    step's attention is the same two matmuls and softmax over it, −inf on each row's prompt padding
    and unwritten tail (as fast as SDPA's kernel on the same bytes or faster, and it reads the
    unbroken rows the same way). A short generation loses rows early, and there the shared part's
    extra calls cost more than they save (measured on the built-in model's base, ~15 tokens a row:
    1.0–1.3 against 0.9 s for 10 `generate` calls). Short prompts start per row: where a layer's
    prompt keys and values, repeated for every row, come to under `share_bytes` (`SHARE_PROMPT_BYTES`), reading
    them G times costs less than the shared part's seven extra calls a layer (AMD EPYC, `generate`
    A/B: per row 2–7% faster on `aha run`'s prompts of ~24 tokens, 2–6% slower at 96–192)."""

    def __init__(self, prefilled, prompt_mask: Tensor, group_size: int, capacity: int, chunk: int = 16,
                 share_bytes: int | None = None):
        self.prompt = [(layer.keys, layer.values) for layer in prefilled.layers]   # (P, Hkv, Lp, D) each
        dtype = self.prompt[0][0].dtype
        self.bias = torch.zeros(prompt_mask.shape, dtype=dtype, device=prompt_mask.device).masked_fill(
            prompt_mask == 0, float("-inf"))                                           # (P, Lp)
        self.group_size, self.capacity, self.chunk, self.length, self.shared = group_size, capacity, chunk, 0, True
        self.width = min(chunk, capacity)                       # generated positions each buffer holds
        self.row_prompt = torch.arange(prompt_mask.shape[0], device=prompt_mask.device).repeat_interleave(group_size)
        self.row_bias = self.bias[self.row_prompt][:, None, None, :]                 # shared: (N, 1, 1, Lp)
        self.tail_bias = self._tail()                                                # shared: (width,)
        self.generated: list[tuple[Tensor, Tensor] | None] = [None] * len(self.prompt)   # views of `slabs`
        self.slabs: list[tuple[Tensor, Tensor] | None] = [None] * len(self.prompt)
        self.scratch: Tensor | None = None
        keys = self.prompt[0][0]
        if self.row_prompt.numel() * keys[0].numel() * keys.element_size() * 2 < (
                SHARE_PROMPT_BYTES if share_bytes is None else share_bytes):
            self.select(torch.arange(self.row_prompt.numel(), device=prompt_mask.device))   # one cache per row

    def _tail(self) -> Tensor:
        """(width,): 0 on the generated positions written by this step's end, −inf on the rest."""
        return self.bias.new_zeros(self.width).masked_fill(
            torch.arange(self.width, device=self.bias.device) > self.length, float("-inf"))

    def _lay_out(self, index: int, rows: int, heads: int, positions: int, fill) -> None:
        """Layer `index`'s keys and values become (rows, heads, positions, D), contiguous at the start of
        the layer's slab (allocated once, big enough for any shape here: (N, Hkv, Lp + capacity, D));
        `fill(k, old, out)` writes the new content of keys (k = 0) or values (k = 1) into `out` from the
        `old` view (None at first). A new layout is written to a scratch shared by all layers and copied
        back, so no shape change allocates (fresh memory cost ~1 ms a growth in page faults)."""
        prompt_keys = self.prompt[index][0]
        shape = (rows, heads, positions, prompt_keys.shape[3])
        size = math.prod(shape)
        if self.slabs[index] is None:
            full = self.row_prompt.numel() * heads * (prompt_keys.shape[2] + self.capacity) * shape[3]
            self.slabs[index] = (prompt_keys.new_empty(full), prompt_keys.new_empty(full))
            self.scratch = prompt_keys.new_empty(full) if self.scratch is None else self.scratch
        views = []
        for k, slab in enumerate(self.slabs[index]):
            old = None if self.generated[index] is None else self.generated[index][k]
            view = slab[:size].view(shape)
            if old is None:
                fill(k, None, view)
            else:
                out = self.scratch[:size].view(shape)
                fill(k, old, out)
                view.copy_(out)
            views.append(view)
        self.generated[index] = tuple(views)

    def select(self, keep: Tensor) -> None:
        """Keep only the rows at these positions of the batch (the others finished)."""
        self.row_prompt = self.row_prompt[keep]
        if not self.shared:
            self.row_bias = self.row_bias[keep]
            for index, kv in enumerate(self.generated):
                if kv is not None:
                    self._lay_out(index, keep.numel(), kv[0].shape[1], kv[0].shape[2],
                                  lambda k, old, out: torch.index_select(old, 0, keep, out=out))
            return
        self.shared = False
        self.row_bias = torch.cat([self.bias[self.row_prompt], self.tail_bias.expand(keep.numel(), -1)],
                                  dim=1)[:, None, None, :]                           # (A, 1, 1, Lp + width)
        for index, kv in enumerate(self.generated):
            if kv is not None:
                self._lay_out(index, keep.numel(), kv[0].shape[1], self.bias.shape[1] + kv[0].shape[2],
                              lambda k, old, out, index=index: self._per_row(out, self.prompt[index][k], old[keep]))

    def _per_row(self, out: Tensor, prompt: Tensor, generated: Tensor | None) -> None:
        """out (A, Hkv, Lp + width, D) ← each row's prompt part, then its generated part (zeros if None)."""
        width = prompt.shape[2]
        out[:, :, :width] = prompt[self.row_prompt]
        if generated is None:
            out[:, :, width:].zero_()
        else:
            out[:, :, width:width + generated.shape[2]] = generated
            out[:, :, width + generated.shape[2]:].zero_()

    def attend(self, index: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Attention output (A, Hq, 1, D) of layer `index` for this step's query (A, Hq, 1, D) after
        writing its key and value (A, Hkv, 1, D); query head h reads key head h // (Hq / Hkv), as
        transformers' `repeat_kv` pairs them. In the dtype of the prompt's keys, whatever the query's."""
        query = query.to(self.prompt[index][0].dtype)      # the prefill's dtype (bf16 linears: fp32 attention)
        offset = 0 if self.shared else self.bias.shape[1]
        if self.generated[index] is None:                    # this layer's first step: empty buffers
            self._lay_out(index, query.shape[0], key.shape[1], offset + self.width,
                          lambda k, old, out: out.zero_() if self.shared else self._per_row(
                              out, self.prompt[index][k], None))
        elif self.generated[index][0].shape[2] < offset + self.width:       # the generated part grows by `chunk`
            def grow(k, old, out):
                out[:, :, :old.shape[2]] = old
                out[:, :, old.shape[2]:].zero_()
            self._lay_out(index, query.shape[0], key.shape[1], offset + self.width, grow)
        keys, values = self.generated[index]
        keys[:, :, offset + self.length] = key[:, :, 0]
        values[:, :, offset + self.length] = value[:, :, 0]
        if not self.shared:                                  # ragged groups: each row's own cache
            return row_attention(query, keys, values, self.row_bias, scale)
        return self._attend_shared(index, query, keys, values, scale)

    def _attend_shared(self, index: int, query: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
        """Every row in the batch: the prompt part per group, the generated part per row, one softmax."""
        prompt_keys, prompt_values = self.prompt[index]
        rows, heads = query.shape[0], keys.shape[1]
        q = query.reshape(rows, heads, -1, query.shape[-1])                                   # (A, Hkv, R, D)
        prompt_scores = self._rows(torch.matmul(self._grid(q), prompt_keys.transpose(-1, -2)))   # (A, Hkv, R, Lp)
        scores = torch.cat([prompt_scores * scale + self.row_bias,
                            torch.matmul(q, keys.transpose(-1, -2)) * scale + self.tail_bias], dim=-1)
        probs = scores.softmax(dim=-1)
        width = prompt_keys.shape[2]
        out = self._rows(torch.matmul(self._grid(probs[..., :width]), prompt_values)) + torch.matmul(
            probs[..., width:], values)                                                          # (A, Hkv, R, D)
        return out.reshape(query.shape)

    def _grid(self, x: Tensor) -> Tensor:
        """(N, Hkv, R, ·) per row → (P, Hkv, G·R, ·) per prompt."""
        p, g = self.bias.shape[0], self.group_size
        return x.view(p, g, *x.shape[1:]).transpose(1, 2).reshape(p, x.shape[1], g * x.shape[2], x.shape[3])

    def _rows(self, x: Tensor) -> Tensor:
        """The inverse of `_grid`: (P, Hkv, G·R, ·) → (N, Hkv, R, ·)."""
        p, heads, g = x.shape[0], x.shape[1], self.group_size
        return x.view(p, heads, g, -1, x.shape[-1]).transpose(1, 2).reshape(p * g, heads, -1, x.shape[-1])

    def advance(self) -> None:
        """One more generated position written in every layer: the next step writes position
        `length`, in buffers `chunk` positions longer once the current ones are full."""
        self.length += 1
        if self.length >= self.width:
            self.width = min(self.width + self.chunk, max(self.capacity, self.length + 1))
        if self.shared:
            self.tail_bias = self._tail()
        else:
            width = self.bias.shape[1]
            grow = width + self.width - self.row_bias.shape[-1]
            if grow:
                self.row_bias = torch.cat([self.row_bias, self.row_bias.new_full((*self.row_bias.shape[:-1], grow),
                                                                                  float("-inf"))], dim=-1)
            self.row_bias[..., width + self.length] = 0.0


class PaddedCacheKV:
    """The written-out step's attention over the serving engine's cache (aha/serve/engine.py): a
    transformers `DynamicCache` whose rows are left-padded to one width, and this step's additive
    mask `bias` (A, 1, 1, L + 1): 0 where a row attends, −inf on its padding. Each layer appends
    the step's key and value to the cache (in the cache's dtype), then attends over it
    (`row_attention`)."""

    def __init__(self, cache, bias: Tensor):
        self.cache, self.bias = cache, bias

    def attend(self, index: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        layer = self.cache.layers[index]
        dtype = layer.keys.dtype
        keys, values = layer.update(key.to(dtype), value.to(dtype))                     # (A, Hkv, L + 1, D)
        return row_attention(query.to(dtype), keys, values, self.bias, scale)

    def advance(self) -> None:
        """Nothing to do: each layer's cache grew when it attended."""


def linears(model, bf16: bool):
    """`apply(layers, x, act=None, gelu=None)`: a linear layer of `model` on `x` (or a tuple of layers
    that read the same `x`, giving a tuple of outputs), then `act` on its output if given. Its own
    forward, or with `bf16` its matmul on a bf16 copy of its weight and bias, made here once per
    decoder (once per `generate`), the input cast to bf16 and the output left in bf16
    (torch.nn.Linear, and GPT-2's Conv1D as transformers computes it: bias + x @ weight; any other
    layer, e.g. LoRA's, runs its own forward in fp32). On a CPU with fast bf16 (AVX512-BF16, AMX)
    the decode step's matmuls then run ~2x faster; attention, the KV cache, norms and the residual
    stream stay fp32, and the log-probs are taken in fp32 from the bf16 logits
    (aha/core/sampling.py). In bf16 a tuple of layers is one matmul on their weights stacked (a
    Llama layer's query, key and value projections; its gate and up projections): one call and one
    cast of `x` instead of three or two. Each matmul's weight is laid out once in oneDNN's blocked
    format where this torch has it, and a GELU `act` whose approximation `gelu` names is fused into
    it (`bf16_matmul`)."""
    if not bf16:
        def own(layers, x: Tensor, act=None, gelu: str | None = None):
            outs = tuple(layer(x) if act is None else act(layer(x)) for layer in (
                layers if isinstance(layers, tuple) else (layers,)))
            return outs if isinstance(layers, tuple) else outs[0]
        return own
    weights = {}                                                                         # layer -> (out, in), bias
    for module in model.modules():
        if type(module) is torch.nn.Linear or type(module).__name__ == "Conv1D":
            weight = module.weight.detach().to(torch.bfloat16)
            weight = weight if type(module) is torch.nn.Linear else weight.t().contiguous()    # Conv1D: (in, out)
            weights[module] = (weight, None if module.bias is None else module.bias.detach().to(torch.bfloat16))
    matmuls = {}

    def matmul(group: tuple, gelu: str | None):
        if (group, gelu) not in matmuls:
            stacked = [weights[layer] for layer in group]
            bias = None if all(b is None for _, b in stacked) else torch.cat(
                [b if b is not None else w.new_zeros(w.shape[0]) for w, b in stacked])
            matmuls[group, gelu] = (bf16_matmul(torch.cat([w for w, _ in stacked]), bias, gelu),
                                    [w.shape[0] for w, _ in stacked])
        return matmuls[group, gelu]

    def apply(layers, x: Tensor, act=None, gelu: str | None = None):
        group = layers if isinstance(layers, tuple) else (layers,)
        if any(layer not in weights for layer in group):    # e.g. a LoRA-wrapped layer (peft): its own fp32 forward
            outs = tuple(layer(x.float()) if act is None else act(layer(x.float())) for layer in group)
        else:
            run, sizes = matmul(group, gelu if act is not None else None)
            out = run(x.to(torch.bfloat16))
            out = act(out) if act is not None and gelu is None else out
            outs = out.split(sizes, dim=-1) if len(group) > 1 else (out,)
        return outs if isinstance(layers, tuple) else outs[0]
    return apply


GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}   # GPT-2's, as F.gelu names them


def gpt2_decoder(model, bf16: bool = False):
    """`step(tokens (A,), positions (A, 1), kv: SharedPromptKV) -> logits (A, V)` for a GPT-2 LM head
    model in eval mode with SDPA attention (`bf16`: its matmuls on bf16 weights, `linears`); None for
    any other model."""
    config = model.config
    if (getattr(config, "model_type", None) != "gpt2" or getattr(config, "_attn_implementation", None) != "sdpa"
            or config.add_cross_attention or model.training or not hasattr(model, "transformer")):
        return None
    body = model.transformer
    blocks = list(body.h)
    linear = linears(model, bf16)
    gelu = GELU_APPROXIMATION.get(config.activation_function)     # bf16: fused into the c_fc matmul

    def layer_norm(norm, x: Tensor) -> Tensor:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def step(tokens: Tensor, positions: Tensor, kv: SharedPromptKV) -> Tensor:
        hidden = F.embedding(tokens[:, None], body.wte.weight) + F.embedding(positions, body.wpe.weight)   # (A,1,C)
        for index, block in enumerate(blocks):
            attn = block.attn
            residual = hidden
            query, key, value = linear(attn.c_attn, layer_norm(block.ln_1, hidden)).split(attn.split_size, dim=2)
            shape = (*key.shape[:-1], -1, attn.head_dim)                                            # (A,1,H,D)
            out = kv.attend(index, query.view(shape).transpose(1, 2), key.view(shape).transpose(1, 2),
                            value.view(shape).transpose(1, 2), attn.scaling)                      # (A,H,1,D)
            hidden = linear(attn.c_proj, out.transpose(1, 2).reshape(residual.shape)) + residual
            residual = hidden
            mlp = block.mlp
            inner = linear(mlp.c_fc, layer_norm(block.ln_2, hidden), act=mlp.act, gelu=gelu)
            hidden = residual + linear(mlp.c_proj, inner)
        kv.advance()
        return linear(model.lm_head, layer_norm(body.ln_f, hidden))[:, -1]                       # (A, V)

    return step


def llama_decoder(model, bf16: bool = False):
    """The same written-out step for the Llama family without per-head norms (Llama, Qwen2: SmolLM2 and
    the bench's random Qwen2), with every full-attention layer on SDPA; transformers' own
    `apply_rotary_pos_emb` does the rotation, `SharedPromptKV` the attention (grouped-query heads
    included). None for any other model."""
    import sys

    config = model.config
    body = getattr(model, "model", None)
    if (getattr(config, "model_type", None) not in ("llama", "qwen2") or model.training or body is None
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"])):
        return None
    layers = list(body.layers[: config.num_hidden_layers])
    rotate = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
    linear = linears(model, bf16)

    def step(tokens: Tensor, positions: Tensor, kv: SharedPromptKV) -> Tensor:
        hidden = body.embed_tokens(tokens[:, None])                                               # (A, 1, C)
        cos, sin = body.rotary_emb(hidden, positions)
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            residual, x = hidden, layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            query, key, value = linear((attn.q_proj, attn.k_proj, attn.v_proj), x)
            query, key = rotate(query.view(shape).transpose(1, 2), key.view(shape).transpose(1, 2), cos, sin)
            out = kv.attend(index, query, key, value.view(shape).transpose(1, 2), attn.scaling)
            hidden = residual + linear(attn.o_proj, out.transpose(1, 2).reshape(residual.shape))  # (A, 1, C)
            mlp, x = layer.mlp, layer.post_attention_layernorm(hidden)
            gate, up = linear((mlp.gate_proj, mlp.up_proj), x)
            hidden = hidden + linear(mlp.down_proj, mlp.act_fn(gate) * up)
        kv.advance()
        return linear(model.lm_head, body.norm(hidden))[:, -1]                                            # (A, V)

    return step


def written_out_decoder(model, bf16: bool = False):
    """The written-out decode step of `model` (`step(tokens (A,), positions (A, 1), kv: SharedPromptKV)
    -> logits (A, V)`), or None where transformers' forward stays — also wherever a forward
    hook watches the model or one of its modules (the step skips their calls: e.g. the experiment's
    token counter, aha/stages/experiment.py, or a profiler's hooks)."""
    from torch.nn.modules import module as torch_module
    hooked = torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks or any(
        part._forward_hooks or part._forward_pre_hooks for part in model.modules())
    parameter = next(model.parameters())
    bf16 = bf16 and parameter.dtype == torch.float32 and parameter.device.type == "cpu"   # `linears`
    return None if hooked else gpt2_decoder(model, bf16) or llama_decoder(model, bf16)
