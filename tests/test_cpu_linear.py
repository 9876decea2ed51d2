"""Decoding's large linear layers through oneDNN (aha/core/cpu_linear.py): the same outputs as torch's
linear to fp32 rounding, only inside the context and only without autograd, small layers untouched."""

import pytest
import torch

from aha.core.cpu_linear import MIN_WEIGHT, fast_layers, onednn_available, onednn_linears
from aha.infra.base import SHIPPED

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512, bias=False),
                               torch.nn.Linear(512, 8))


def test_large_layers_match_torch_linear_and_are_restored():
    net, x = model(), torch.randn(5, 1, 512)
    assert [(layer.in_features, layer.out_features) for layer in fast_layers(net)] == [
        (512, 1024),
        (1024, 512),
    ]  # 512 × 8 < MIN_WEIGHT
    with torch.inference_mode():
        expected = net(x)
        with onednn_linears(net):
            assert all("forward" in layer.__dict__ for layer in fast_layers(net))
            got = net(x)
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not any("forward" in layer.__dict__ for layer in net.modules())          # torch's path again


def test_nothing_changes_under_autograd_or_for_small_or_bf16_layers():
    net = model()
    with onednn_linears(net):                                                # grad enabled: the op has no backward
        assert not any("forward" in layer.__dict__ for layer in net.modules())
    small = torch.nn.Linear(64, 64)
    assert 64 * 64 < MIN_WEIGHT and fast_layers(small) == []
    assert fast_layers(model().bfloat16()) == []


def test_the_serving_engine_decodes_a_large_model_through_onednn(monkeypatch):
    """`aha chat` / `aha serve`'s engine finds the large layers once and uses them at each step;
    with the threshold lowered the built-in tiny model's engine takes that path and still writes."""

    import aha.core.cpu_linear as cpu_linear
    from aha.infra.model import load_model
    from aha.serve.engine import Engine, GenerationParams
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 1)
    model, tokenizer = load_model(str(SHIPPED))
    engine = Engine(model, tokenizer)
    assert engine._fast_layers and engine._fast_layers == fast_layers(model)
    seen = []
    original = cpu_linear._onednn_forward
    monkeypatch.setattr(cpu_linear, "_onednn_forward", lambda layer: seen.append(layer) or original(layer))
    request = engine.submit(
        tokenizer("User: 2+3\nAssistant:")["input_ids"], GenerationParams(max_tokens=4, temperature=0.0)
    )
    while engine.step():
        pass
    assert seen and all("forward" not in layer.__dict__ for layer in engine._fast_layers)
    assert request.get(timeout=1) is not None
