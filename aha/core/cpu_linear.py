"""Decoding's linear layers through oneDNN on a CPU, where it is faster than torch's default GEMM.

    with onednn_linears(model):
        ...  # decode

torch's fp32 `linear` on a CPU calls MKL's sgemm. For the thin matmuls of decoding (a few dozen
rows against a weight of 0.3M+ entries) oneDNN's fp32 kernel, `torch.ops.mkldnn._linear_pointwise`
(the one inductor's CPU backend emits), is faster for most shapes on the AMD EPYC (family 25 model
17) this was measured on (`bench/speed_probes_2026_12_05.py`, 64 rows of SmolLM2-135M, GFLOP/s:
576→1536 167 → 200, 1536→576 103 → 188, the output head 576→49,152 112 → 176, and at 1 row, as
`aha chat` decodes, 6 → 14; one shape, 576→576, 165 → 138): a whole `generate` of 64 × 128 tokens
~15% faster. Below `MIN_WEIGHT` entries oneDNN's per-call overhead makes it slower, so those
layers (and every layer of the tiny built-in model) keep torch's own path.

Both are fp32 GEMMs that sum in different orders: the logits differ at rounding level (~1e-6
relative), so on a large model a near-tie between two tokens can resolve differently than with
MKL; same-seed runs stay identical to each other. Only during decoding (no autograd: the op has no
backward), on CPU, for plain fp32 `torch.nn.Linear` layers, on x86-64 where the op exists and
agrees with torch's linear. Measured on that AMD EPYC only; on an Intel CPU (MKL's home ground) the
two have not been compared here.

The bf16 decode step (aha/core/decode_step.py `linears`) goes through oneDNN at every size instead,
on weights packed once into its blocked layout (`bf16_matmul`): the same numbers as torch's bf16
linear, and faster per call even at the built-in model's sizes.
"""

import functools
import platform
from contextlib import contextmanager

import torch

MIN_WEIGHT = 2**18          # in_features × out_features at which oneDNN starts to pay for 64 decoding rows


def onednn_cpu() -> bool:
    """An x86-64 CPU (where oneDNN's linear was measured) and a torch built with oneDNN."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


@functools.cache
def onednn_available() -> bool:
    """oneDNN's linear exists in this torch, on an x86-64 CPU (where it was measured), and agrees
    with torch's own linear on a small check."""
    if not onednn_cpu():
        return False
    try:
        x, w = torch.randn(3, 8), torch.randn(5, 8)
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return bool(torch.allclose(y, torch.nn.functional.linear(x, w), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def packed_bf16_available() -> bool:
    """oneDNN's linear on a pre-packed bf16 weight exists in this torch (x86-64 CPU builds) and gives
    exactly torch's own bf16 linear on a small check, and its fused GELU torch's GELU to bf16 rounding."""
    if not onednn_cpu():
        return False
    try:
        x, w, b = (torch.randn(shape).to(torch.bfloat16) for shape in ((3, 1, 16), (5, 16), (5,)))
        packed, linear = torch.ops.mkldnn._reorder_linear_weight(w, 3), torch.nn.functional.linear(x, w, b)
        gelu = torch.ops.mkldnn._linear_pointwise(x, packed, b, "gelu", [], "tanh")       # the fused GELU too
        exact = torch.nn.functional.gelu(linear.float(), approximate="tanh")
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""), linear)
                    and torch.allclose(gelu.float(), exact, rtol=2 ** -6, atol=1e-2))
    except (AttributeError, RuntimeError):
        return False


def bf16_matmul(weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None):
    """x (…, in) ↦ x @ weight.T + bias, all bf16 (weight (out, in)), then GELU where `gelu` names its
    approximation ("tanh", "none"; as `F.gelu` takes it): through oneDNN's linear on the weight
    packed once into its blocked layout where available — the same numbers as `F.linear` (checked
    by `packed_bf16_available`), 12–50% faster per call at decoding's 1–64 rows, and the GELU fused
    into it (computed before the bf16 rounding; torch's bf16 GELU alone took 55 us at 64 × 576:
    the fused call 69–78 against 124 us for both) on the AMD EPYC with AVX512-BF16 this was measured
    on (`python bench/speed_probes_2026_12_06.py later`) — else `F.linear` and `F.gelu`."""
    if not packed_bf16_available():
        if gelu is None:
            return lambda x: torch.nn.functional.linear(x, weight, bias)
        return lambda x: torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate=gelu)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)           # the layout does not depend on the rows
    post, algorithm = ("none", "") if gelu is None else ("gelu", gelu)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], algorithm)


def fast_layers(model) -> list[torch.nn.Linear]:
    """The model's layers that take the oneDNN path: plain fp32 `Linear`s on CPU of ≥ MIN_WEIGHT entries."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype == torch.float32 and m.in_features * m.out_features >= MIN_WEIGHT]


def _onednn_forward(layer: torch.nn.Linear):
    weight, bias = layer.weight, layer.bias
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextmanager
def onednn_linears(model, layers: list[torch.nn.Linear] | None = None):
    """While inside, `model`'s large fp32 CPU linear layers (`layers`: `fast_layers(model)` found once
    by a caller that decodes step by step) run through oneDNN; a no-op where oneDNN is missing or
    nothing qualifies. Only for code without autograd (decoding under inference_mode)."""
    if not onednn_available() or torch.is_grad_enabled():
        layers = []
    elif layers is None:
        layers = fast_layers(model)
    for layer in layers:
        layer.forward = _onednn_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
