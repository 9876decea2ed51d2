"""Tool output is context, never an action: its log-probs never reach the loss, the KL or the entropy.

A rollout whose completions hold a span of tool output (action_mask 0) goes through the real update
(aha/core/step.py `loss_rows` + `policy_update`, β > 0). Its gradient must equal a hand-written loss that
sums over the model's own tokens only, with the log-probs of every completion token computed in
one plain forward pass — and must differ from the gradient with the mask dropped (the check can fail)."""

import copy
from dataclasses import replace

import pytest
import torch

from aha.core.algos import LossSpec, kl_k3
from aha.core.logprobs import completion_logprobs, one_pass_logits
from aha.core.rollout import generate
from aha.core.sampling import SamplingParams
from aha.core.step import loss_rows, policy_update
from aha.infra.config import Config
from aha.infra.model import build_model
from aha.infra.tokenizer import build_char_tokenizer

BETA = 0.1


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_model("gpt2", tok, seed=3, hidden=64, layers=2)
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("12+345", "7+8")]
    rollout = generate(
        model.eval(), prompts, 3, SamplingParams(max_new_tokens=14, temperature=1.0), tok.pad_token_id, seed=2
    )
    actions = torch.ones_like(rollout.completion_mask)
    actions[:, 4:9] = 0                                  # tokens 4…8 of every row: "tool output"
    actions[1, :] = 1                                    # one row that called no tool
    rollout = replace(rollout, action_mask=actions)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, ref, rollout


def cfg_for(aggregation: str) -> Config:
    return Config(prompts_per_step=2, group_size=3, max_new_tokens=14, beta=BETA, aggregation=aggregation,
                  max_grad_norm=1e9, autocast="off")


def update_gradient(model, ref, rollout, aggregation):
    policy = copy.deepcopy(model).train()
    cfg = cfg_for(aggregation)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.7, 0.0, -0.7])
    rows, norm = loss_rows(cfg, torch.ones(6, dtype=torch.bool), advantages, rollout)
    spec = LossSpec(aggregation=aggregation, kl="k3", beta=BETA)
    update = policy_update(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.0), rollout, rows, advantages, spec,
                           norm, cfg)
    metrics, entropy = update.metrics, update.entropy
    return [p.grad.clone() for p in policy.parameters()], metrics, entropy, norm


def hand_gradient(model, ref, rollout, aggregation):
    """The GRPO loss at ratio 1 with k3 KL, written out over the policy's tokens only."""
    policy = copy.deepcopy(model).train()
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    logits = one_pass_logits(policy, *args).float()                                      # (N, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    with torch.no_grad():
        ref_logp = torch.log_softmax(one_pass_logits(ref, *args).float(), -1).gather(
            -1, rollout.completion_ids[..., None]).squeeze(-1)
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    mask = (rollout.completion_mask * rollout.action_mask).float()                       # the policy's tokens
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.7, 0.0, -0.7])
    token_loss = -torch.exp(logp - logp.detach()) * advantages[:, None] + BETA * kl_k3(logp, ref_logp)
    if aggregation == "seq_mean":
        loss = ((token_loss * mask).sum(1) / mask.sum(1)).sum() / 6
    else:
        loss = (token_loss * mask).sum() / mask.sum()
    loss.backward()
    kl = float((kl_k3(logp, ref_logp).detach() * mask).sum() / mask.sum())
    return [p.grad.clone() for p in policy.parameters()], kl, float((entropy * mask).sum() / mask.sum())


def close(a, b, tol=1e-5) -> bool:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    return num <= tol * sum(float(y.pow(2).sum()) for y in b) ** 0.5


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_tool_output_never_reaches_the_loss_kl_or_entropy(setup, aggregation):
    model, ref, rollout = setup
    grads, metrics, entropy, norm = update_gradient(model, ref, rollout, aggregation)
    want, kl, want_entropy = hand_gradient(model, ref, rollout, aggregation)
    assert (
        norm.tokens == int((rollout.completion_mask * rollout.action_mask).sum()) < int(rollout.completion_mask.sum())
    )
    assert close(grads, want)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4)
    assert entropy == pytest.approx(want_entropy, rel=1e-4)
    unmasked, _, _, _ = update_gradient(model, ref, replace(rollout, action_mask=None), aggregation)
    assert not close(unmasked, want, tol=1e-2)            # with the tool tokens in, the gradient is another


def test_completion_logprobs_returns_the_policy_mask_and_zero_on_tool_output(setup):
    model, _, rollout = setup
    rows = torch.arange(6)
    logp, entropy, mask = completion_logprobs(model, rollout, rows, 1.0)
    width = logp.shape[1]
    assert torch.equal(mask, (rollout.completion_mask * rollout.action_mask)[:, :width])
    assert float(logp.detach()[mask == 0].abs().sum()) == 0.0 and float(entropy[mask == 0].abs().sum()) == 0.0
    chunked = completion_logprobs(model, rollout, rows, 1.0, chunk_tokens=5)     # the chunked output head
    assert torch.allclose(chunked[0], logp, atol=1e-5) and torch.equal(chunked[2], mask)
