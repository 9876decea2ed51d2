"""Micro-batched update (aha/core/step.py `policy_update`): the gradient accumulated over micro-batches
equals the one-shot step's, because every micro-batch divides by the normaliser of the whole batch.

Checked to 1e-6 relative for each aggregation, with β > 0 (a reference model), with μ > 1 (the
later inner updates clip against the rollout policy), and through the shared-prompt forward,
with micro-batches that cut groups in two."""

import copy

import pytest
import torch

from aha.core.algos import LossSpec, Normaliser
from aha.core.rollout import generate
from aha.core.sampling import SamplingParams
from aha.core.step import micro_batch_pieces, micro_batches, policy_update
from aha.infra.config import Config
from aha.infra.model import build_model
from aha.infra.tokenizer import build_char_tokenizer


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    return num / sum(float((y.double() ** 2).sum()) for y in b) ** 0.5


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_model("qwen2", tok, seed=2, hidden=64, layers=2)
    prompts = [tok(f"User: {q}\nAssistant:")["input_ids"] for q in ("12+345", "7+8", "60+71")]
    params = SamplingParams(
        max_new_tokens=12, temperature=1.0, stop_token_ids=tuple(tok.convert_tokens_to_ids(["7", "a"]))
    )
    rollout = generate(model.eval(), prompts, 4, params, tok.pad_token_id, seed=1)
    return model, rollout


def run_update(model, rollout, cfg: Config, micro: str, spec: LossSpec):
    """Gradients and weights after `policy_update` with micro_batch_size=`micro`."""
    torch.manual_seed(0)
    policy = copy.deepcopy(model).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    if ref is not None:
        with torch.no_grad():                          # a reference that differs from the policy
            for p in ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
    cfg.micro_batch_size = micro
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    rows = torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 10, 11])             # groups 0 and 2 whole, group 1 in part
    advantages = torch.linspace(-1.0, 1.5, 12)
    norm = Normaliser(rows=12, tokens=int(rollout.completion_mask.sum()), max_len=12)
    update = policy_update(policy, ref, optimizer, rollout, rows, advantages, spec, norm, cfg)
    assert not update.skipped
    loss, grad_norm, metrics, entropy = update.loss, update.grad_norm, update.metrics, update.entropy
    grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    return grads, [p.detach().clone() for p in policy.parameters()], loss, grad_norm, metrics, entropy


@pytest.mark.parametrize("aggregation, beta, mu", [("seq_mean", 0.0, 1), ("token_mean", 0.0, 1), ("constant", 0.0, 1),
                                                   ("seq_mean", 0.1, 1), ("token_mean", 0.0, 2), ("seq_mean", 0.1, 2)])
def test_accumulated_micro_batches_equal_the_one_shot_step(setup, aggregation, beta, mu):
    model, rollout = setup
    cfg = Config(group_size=4, prompts_per_step=3, max_new_tokens=12, beta=beta, mu=mu, aggregation=aggregation,
                 autocast="off", temperature=1.0)
    spec = LossSpec("token", 0.2, 0.2, aggregation, "k3", beta)
    whole = run_update(model, rollout, cfg, "auto", spec)             # the budget holds every row: one pass
    for micro in ("1", "3"):                                          # 3 cuts groups 0 and 2 in two
        part = run_update(model, rollout, cfg, micro, spec)
        assert relative(part[0], whole[0]) < 1e-6, micro
        assert relative(part[1], whole[1]) < 1e-6, micro
        assert part[2] == pytest.approx(whole[2], rel=1e-6, abs=1e-9)   # the logged loss
        assert part[3] == pytest.approx(whole[3], rel=1e-6)             # grad norm
        assert part[5] == pytest.approx(whole[5], rel=1e-6)             # entropy per token
        assert part[4].keys() == whole[4].keys()
        for name in part[4]:                                            # clip_frac, kl: token-weighted means
            assert part[4][name] == pytest.approx(whole[4][name], rel=1e-5, abs=1e-7), name
    if mu > 1:
        assert whole[4]["clip_frac"] >= 0


def brute_force_cuts(lengths, prompt_width, max_rows, budget, overhead):
    """The cheapest cut of the rows into micro-batches, by trying every set partition (small R only)."""
    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            for i in range(len(part)):
                yield part[:i] + [[first] + part[i]] + part[i + 1:]
            yield [[first]] + part

    def cost(part):
        total = 0
        for batch in part:
            rows, width = len(batch), prompt_width + max(lengths[i] for i in batch)
            if rows > max_rows or (rows > 1 and rows * width > budget):
                return float("inf")
            total += rows * width + overhead
        return total
    return min(cost(part) for part in partitions(list(range(len(lengths)))))


@pytest.mark.parametrize("seed", range(6))
def test_micro_batches_cost_no_more_than_any_partition_of_the_rows(seed):
    """The dynamic programme over rows sorted by length finds the cheapest of ALL set partitions (a
    brute force over every one, not just contiguous cuts of the sorted order), within the row and
    token caps, and every row is in exactly one micro-batch."""
    import random
    rng = random.Random(seed)
    lengths = [rng.choice([1, 3, 8, 20, 64]) for _ in range(7)]
    prompt_width, max_rows = rng.choice([0, 5]), rng.choice([2, 3, 7])
    budget, overhead = rng.choice([60, 200, 10**9]), rng.choice([0, 10, 100])
    cuts = micro_batches(lengths, prompt_width, max_rows, budget, overhead)
    assert sorted(i for cut in cuts for i in cut) == list(range(7))
    widths = [prompt_width + max(lengths[i] for i in cut) for cut in cuts]
    assert all(len(cut) <= max_rows and (len(cut) == 1 or len(cut) * w <= budget) for cut, w in zip(cuts, widths))
    found = sum(len(cut) * w + overhead for cut, w in zip(cuts, widths))
    assert found == brute_force_cuts(lengths, prompt_width, max_rows, budget, overhead)


def test_micro_batch_pieces_cap_rows_or_tokens_and_pad_with_weightless_stand_ins(setup):
    _, rollout = setup
    rows = torch.arange(12)
    lengths = rollout.completion_mask.sum(dim=1)
    width = int(rollout.prompt_mask.any(dim=0).sum()) + int(lengths.max())
    cfg = Config()
    one = micro_batch_pieces(cfg, 12 * width, rollout, rows, 1.0, lambda n: n)   # every row fits: one pass
    assert [(sorted(p.tolist()), w) for p, w in one] == [(list(range(12)), 1.0)]
    tight = micro_batch_pieces(cfg, 5 * width, rollout, rows, 1.0, lambda n: n + 2)
    assert all(len(p) * (width - int(lengths.max()) + int(lengths[p].max())) <= 5 * width for p, w in tight if w)
    assert [w for _, w in tight[-2:]] == [0.0, 0.0] and all(len(p) == 1 for p, _ in tight[-2:])   # stand-ins
    assert sorted(i for p, w in tight if w for i in p.tolist()) == list(range(12))
    assert all(len(p) == 1 for p, _ in micro_batch_pieces(cfg, 1, rollout, rows, 1.0, lambda n: n))   # ≥ 1 row
    cfg.micro_batch_size = "7"
    assert max(len(p) for p, _ in micro_batch_pieces(cfg, 1, rollout, rows, 1.0, lambda n: n)) <= 7


