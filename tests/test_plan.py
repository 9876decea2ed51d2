"""`aha plan` (aha/core/plan.py): the breakdown's arithmetic against sizes computed by hand, the auto
micro-batch, and the one-line refusal of a run that cannot fit."""

import json

import pytest
import torch

from aha.cli import main
from aha.core.plan import ModelShape, activation_bytes_per_token, memory_plan
from aha.infra.config import Config

# a made-up model: 10M parameters, vocabulary 1,000, hidden 64, 2 layers, 4 heads, KV width 32, MLP 128
SHAPE = ModelShape(params=10_000_000, vocab=1_000, hidden=64, layers=2, heads=4, kv_width=32, intermediate=128,
                   max_positions=512)


def test_breakdown_equals_hand_computed_sizes():
    cfg = Config(prompts_per_step=4, group_size=4, max_new_tokens=20, beta=0.04, micro_batch_size="2",
                 rollout_batch_size=8, eval_problems=10, eval_k=2, autocast="off")
    plan = memory_plan(cfg, SHAPE, prompt_tokens=12, process_bytes=300_000_000, device_bytes=10**12)
    assert plan.weights == 40_000_000 and plan.gradients == 40_000_000          # fp32: 4 bytes a parameter
    assert plan.optimizer == 80_000_000 and plan.reference == 40_000_000         # AdamW's 2 moments; β > 0
    assert plan.static == 300_000_000 + 200_000_000
    # activations per token: 4 bytes × (10·64 + 4·128 + 2·32 + 3·4·32) per layer × 2 layers + 4·64·2
    per_token = 4 * (10 * 64 + 4 * 128 + 2 * 32 + 3 * 4 * 32) * 2 + 4 * 64 * 2
    assert activation_bytes_per_token(SHAPE, 32, 4) == per_token == 13_312
    # one micro-batch of 2 rows × 32 tokens, plus its logits (2 × 20 × 1,000 fp32, three copies)
    assert plan.micro_batch_rows == 2 and plan.update == 2 * 32 * per_token + 3 * 4 * 2 * 20 * 1_000
    # the rollout: KV cache of 8 rows × 32 positions × 2 layers × (K and V) × 32 × 4 bytes + sampling buffers
    assert plan.rollout_rows == 8 and plan.rollout == 8 * 32 * 2 * 2 * 32 * 4 + 8 * 1_000 * 28
    assert plan.evaluation == plan.rollout and plan.eval_rows == 8
    assert plan.checkpoint == plan.weights
    assert plan.optimizer_step == 80_000_000  # two copies of the weights
    assert plan.peak == plan.static + max(
        plan.update, plan.rollout, plan.evaluation, plan.checkpoint, plan.optimizer_step
    )
    assert plan.fits and plan.largest_micro_batch == 16                           # the whole batch fits


def test_auto_micro_batch_and_the_largest_that_fits():
    cfg = Config(prompts_per_step=8, group_size=8, max_new_tokens=100, autocast="off")
    per_row = 112 * activation_bytes_per_token(SHAPE, 112, 4)                     # 12 prompt + 100 new tokens
    roomy = memory_plan(cfg, SHAPE, 12, device_bytes=10**12)
    assert roomy.micro_batch_tokens == 8192 and roomy.micro_batch_rows == min(8192 // 112, 64)   # the token cap
    # a device with room for the static part and three rows' update: auto takes what fits (half the room)
    static = 4 * 4 * SHAPE.params
    device = int((static + 3 * per_row + 3 * 4 * 3 * 100 * 1_000) / 0.9) + 1
    tight = memory_plan(cfg, SHAPE, 12, device_bytes=device)
    assert tight.largest_micro_batch == 3
    assert 1 <= tight.micro_batch_rows <= 3
    none = memory_plan(cfg, SHAPE, 12, device_bytes=static)
    assert none.largest_micro_batch == 0 and not none.fits


def test_plan_command_prints_the_breakdown_and_train_uses_the_same_estimate(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--no-time", "--json", str(out), "prompts_per_step=4", "group_size=4"]) == 0
    text = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer", "update", "rollout", "peak", "largest micro-batch"):
        assert word in text
    result = json.loads(out.read_text())
    assert result["parameters"] > 1_000_000 and result["fits"]
    phases = ("update", "rollout", "evaluation", "checkpoint", "optimizer_step")
    assert result["peak"] == result["static"] + max(result[k] for k in phases)


def test_a_run_that_cannot_fit_is_refused_before_its_run_folder(tmp_path, capsys, monkeypatch):
    import aha.core.plan
    monkeypatch.setattr(aha.core.plan, "device_memory", lambda device: 64 * 2**20)     # a 64 MiB machine
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "aha plan" in err[0]
    assert not run.exists()


@pytest.mark.parametrize("value", ["0", "-1", "big"])
def test_bad_micro_batch_size_is_one_line(tmp_path, capsys, value):
    assert main(["train", "--out", str(tmp_path / "r"), f"micro_batch_size={value}"]) == 2
    assert "micro_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activation_count_equals_what_autograd_saves(arch):
    """10·H + 4·I + 2·KV values per token and layer: the tensors autograd keeps for the backward pass
    of transformers' own blocks (SDPA without a mask: no attention probabilities), counted by
    saved_tensors_hooks, weights left out."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    config = (LlamaConfig(vocab_size=100, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2) if arch == "llama" else
              GPT2Config(vocab_size=100, n_embd=96, n_layer=2, n_head=4))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()      # no dropout: aha trains with disable_dropout
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, saved = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen and key[0] not in weights:
            seen.add(key)
            saved[0] += t.numel() * t.element_size()
        return t
    rows, sequence = 3, 40
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model(input_ids=torch.randint(0, 100, (rows, sequence)))
    shape = ModelShape.of(config, 1)
    probabilities = 4 * 3 * shape.heads * sequence * shape.layers             # not saved by SDPA without a mask
    predicted = rows * sequence * (activation_bytes_per_token(shape, sequence, 4) - probabilities)
    assert saved[0] == pytest.approx(predicted, rel=0.05)
