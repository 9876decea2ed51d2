"""aha's policy_loss against TRL 1.16's own GRPOTrainer._compute_loss on the same tensors.

TRL's method is called unchanged on a bare trainer object (GRPOTrainer.__new__, no model, no
accelerate state) whose `_get_per_token_logps_and_entropies` returns prepared log-probs; only the
attributes `_compute_loss` reads are set. Run: python -m pytest tests/test_trl_parity.py -q

Settings mapped (TRL loss_type → aha): grpo → seq_mean, dr_grpo → constant (max_len =
max_completion_length), dapo → token_mean with the generation batch's token count, bnpo →
token_mean with the micro-batch's own count (norm=None); importance_sampling_level → ratio_level.

Where TRL differs from aha, on purpose:
- `use_bias_correction_kl` (TRL's default True, from DeepSeek-V3.2) multiplies the k3 term by the
  importance ratio; aha adds plain k3 as DeepSeekMath eq. 3 does. Same value on-policy, but the
  gradient differs by β·k3·∇log π (test_trl_parity_kl_bias_correction_is_the_only_difference).
- bnpo under gradient accumulation is a mean of micro-batch token means; aha's Normaliser always
  counts the whole batch, so aha matches TRL's bnpo only for one micro-batch.
- TRL's `delta` (INTELLECT-2's upper bound on the ratio for negative advantages), cispo, sapo,
  vespo, luspo, entropy masks and vLLM importance weights have no aha counterpart.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402  (after the skip: TRL is optional)

from aha.algos import ADVANTAGES, LossSpec, Normaliser, policy_loss  # noqa: E402

ATOL = 1e-6


class OneProcess:
    """The part of accelerate.Accelerator that _compute_loss uses, for a single process."""
    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor


def trl_loss(loss_type, logp, inputs, *, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, level="token",
             max_completion_length=None, grad_accum=1, bias_correction_kl=False):
    """(loss, metrics) from TRL's GRPOTrainer._compute_loss with `logp` as the policy's log-probs."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.epsilon_low, trainer.epsilon_high = epsilon_low, epsilon_high
    trainer.importance_sampling_level = level
    trainer.max_completion_length = max_completion_length or logp.shape[1]
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.aux_loss_enabled = False
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = False
    trainer._entropy_bonus_enabled = False
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.args = SimpleNamespace(delta=None, use_bias_correction_kl=bias_correction_kl,
                                   steps_per_generation=grad_accum)
    trainer.accelerator = OneProcess()
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, torch.zeros_like(logp), None)
    rows, width = logp.shape
    inputs = {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), **inputs}
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


def make_batch(seed, rows=6, width=7, group_size=3, off_policy=0.3):
    """Random (logp, old_logp, ref_logp, advantages, completion_mask), float64 so the match is exact."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()                  # (B, T)
    logp = -3 * torch.rand(rows, width, generator=gen, dtype=torch.float64)
    old_logp = logp + off_policy * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    ref_logp = logp + 0.5 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 3, (rows,), generator=gen).to(torch.float64)
    return logp, old_logp, ref_logp, ADVANTAGES["grpo"](rewards, group_size), mask


def compare(loss_type, spec, seed=0, *, on_policy=False, off_policy=0.3, max_len=None, bias_correction_kl=False):
    """Loss, gradient w.r.t. logp, and the shared metrics, from TRL and from aha."""
    logp, old_logp, ref_logp, advantages, mask = make_batch(seed, off_policy=off_policy)
    trl_logp, aha_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    inputs = {"completion_mask": mask, "advantages": advantages, "ref_per_token_logps": ref_logp,
              "old_per_token_logps": None if on_policy else old_logp, "num_items_in_batch": mask.sum()}
    loss_trl, metrics_trl = trl_loss(loss_type, trl_logp, inputs, beta=spec.beta, epsilon_low=spec.clip_low,
                                     epsilon_high=spec.clip_high, level=spec.ratio_level, max_completion_length=max_len,
                                     bias_correction_kl=bias_correction_kl)
    norm = Normaliser(rows=mask.shape[0], tokens=int(mask.sum()), max_len=max_len or mask.shape[1])
    loss_aha, metrics_aha = policy_loss(aha_logp, aha_logp.detach() if on_policy else old_logp, advantages, mask,
                                        spec, ref_logp, norm)
    loss_trl.backward()
    loss_aha.backward()
    return (loss_trl, trl_logp.grad, metrics_trl), (loss_aha, aha_logp.grad, metrics_aha)


def assert_same(trl, aha, beta=0.0):
    (loss_trl, grad_trl, metrics_trl), (loss_aha, grad_aha, metrics_aha) = trl, aha
    torch.testing.assert_close(loss_aha, loss_trl, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad_aha, grad_trl, atol=ATOL, rtol=0)
    assert grad_trl.abs().max() > 1e-3                      # the comparison is not 0 == 0
    assert abs(metrics_aha["clip_frac"] - metrics_trl["clip_ratio/region_mean"][0]) < ATOL
    if beta > 0:
        assert abs(metrics_aha["kl"] - metrics_trl["kl"][0]) < ATOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trl_parity_grpo(seed):
    spec = LossSpec(aggregation="seq_mean")
    assert_same(*compare("grpo", spec, seed, on_policy=True))
    assert_same(*compare("grpo", spec, seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_trl_parity_dr_grpo(seed):
    assert_same(*compare("dr_grpo", LossSpec(aggregation="constant"), seed, max_len=16))


@pytest.mark.parametrize("seed", [0, 1])
def test_trl_parity_dapo(seed):
    assert_same(*compare("dapo", LossSpec(clip_low=0.2, clip_high=0.28, aggregation="token_mean"), seed))


def test_trl_parity_bnpo():
    assert_same(*compare("bnpo", LossSpec(aggregation="token_mean")))


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "seq_mean"), ("dapo", "token_mean")])
def test_trl_parity_k3_kl_with_beta(loss_type, aggregation):
    spec = LossSpec(aggregation=aggregation, beta=0.04, kl="k3")
    assert_same(*compare(loss_type, spec), beta=0.04)
    assert_same(*compare(loss_type, spec, on_policy=True), beta=0.04)


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "seq_mean"), ("dapo", "token_mean"),
                                                    ("dr_grpo", "constant")])
def test_trl_parity_off_policy_clipping(loss_type, aggregation):
    # num_iterations > 1: old_logp drifts far enough from logp that tokens clip on both sides
    spec = LossSpec(clip_low=0.2, clip_high=0.28, aggregation=aggregation)
    trl, aha = compare(loss_type, spec, seed=3, off_policy=0.6)
    assert_same(trl, aha)
    assert trl[2]["clip_ratio/low_mean"][0] > 0 and trl[2]["clip_ratio/high_mean"][0] > 0


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "seq_mean"), ("dapo", "token_mean")])
def test_trl_parity_gspo_sequence_ratio(loss_type, aggregation):
    # TRL's (B, 1) sequence ratio and aha's GSPO-token ratio have the same value and gradient
    spec = LossSpec(ratio_level="sequence", clip_low=0.2, clip_high=0.2, aggregation=aggregation)
    trl, aha = compare(loss_type, spec, seed=4, off_policy=0.3)
    assert_same(trl, aha)


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "seq_mean"), ("dapo", "token_mean"),
                                                    ("dr_grpo", "constant")])
def test_trl_parity_gradient_accumulation(loss_type, aggregation):
    """Two micro-batches of TRL under gradient accumulation == aha on each with a whole-batch Normaliser."""
    logp, old_logp, ref_logp, advantages, mask = make_batch(5)
    norm = Normaliser(rows=6, tokens=int(mask.sum()), max_len=mask.shape[1])
    spec = LossSpec(aggregation=aggregation)
    for rows in ([0, 1, 2], [3, 4, 5]):
        inputs = {"completion_mask": mask[rows], "advantages": advantages[rows], "old_per_token_logps": old_logp[rows],
                  "num_items_in_batch": mask.sum()}
        loss_trl, _ = trl_loss(loss_type, logp[rows], inputs, grad_accum=2, max_completion_length=mask.shape[1])
        loss_aha, _ = policy_loss(logp[rows], old_logp[rows], advantages[rows], mask[rows], spec, norm=norm)
        torch.testing.assert_close(loss_aha, loss_trl, atol=ATOL, rtol=0)


def test_trl_parity_kl_bias_correction_is_the_only_difference():
    """TRL's default KL is k3·ρ (DeepSeek-V3.2); aha's is plain k3 (DeepSeekMath).

    On-policy ρ = 1 with ∇ρ = ∇log π, so the values agree and TRL's gradient carries an extra
    β·k3·w per token (w: the aggregation weight, 1/(B·|o_i|) for grpo).
    """
    beta = 0.04
    spec = LossSpec(aggregation="seq_mean", beta=beta)
    trl, aha = compare("grpo", spec, on_policy=True, bias_correction_kl=True)
    torch.testing.assert_close(aha[0], trl[0], atol=ATOL, rtol=0)
    logp, _, ref_logp, _, mask = make_batch(0)
    k3 = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    weight = mask / (mask.shape[0] * mask.sum(dim=1, keepdim=True))
    extra = beta * k3 * weight
    assert extra.abs().max() > 1e-4
    torch.testing.assert_close(trl[1] - aha[1], extra, atol=ATOL, rtol=0)
