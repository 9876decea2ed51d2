"""aha's policy_loss against TRL 1.16's own GRPOTrainer._compute_loss on the same tensors.

TRL's method is called unchanged on a bare trainer object (GRPOTrainer.__new__, no model, no
accelerate state) whose `_get_per_token_logps_and_entropies` returns prepared log-probs; only the
attributes `_compute_loss` reads are set. Run: python -m pytest tests/test_trl_parity.py -q

Settings mapped (TRL loss_type → aha): grpo → seq_mean, dr_grpo → constant (max_len =
max_completion_length), dapo → token_mean with the generation batch's token count, bnpo →
token_mean with the micro-batch's own count (norm=None); importance_sampling_level → ratio_level;
cispo → surrogate=cispo, token_mean, no floor, TRL's cap epsilon_high = 1 + clip_high; sapo →
surrogate=sapo, seq_mean; luspo → sequence ratio, seq_sum; vespo → surrogate=vespo, token_mean;
top_entropy_quantile → the same knob with the per-token entropy passed in.

The vLLM importance-sampling correction: TRL computes its ratio inside
`_generate_and_score_completions`; that method is driven here on a bare trainer too, with
`_generate` returning prepared completions and sampler log-probs and the policy forward
returning prepared trainer log-probs, and its `importance_sampling_ratio` compared with aha's
`rollout_weights` for each mode; then `_compute_loss` with `use_vllm` and that ratio against
`policy_loss` with aha's weight.

Where TRL differs from aha, on purpose:
- `use_bias_correction_kl` (TRL's default True, from DeepSeek-V3.2) multiplies the k3 term by the
  importance ratio; aha adds plain k3 as DeepSeekMath eq. 3 does. Same value on-policy, but the
  gradient differs by β·k3·∇log π (test_trl_parity_kl_bias_correction_is_the_only_difference).
- bnpo under gradient accumulation is a mean of micro-batch token means; aha's Normaliser always
  counts the whole batch, so aha matches TRL's bnpo only for one micro-batch.
- TRL's `delta` (INTELLECT-2's upper bound on the ratio for negative advantages) and the
  off-policy sequence mask (DeepSeek-V3.2) have no aha counterpart. TRL's CISPO clips the weight
  from above only (aha: both sides, as verl; clip_low = 1 is no floor).
- TRL's entropy quantile is over every completion of the batch; aha's over the rows in the loss
  (rows whose advantage is 0 are left out), so they match when no row is left out, as here.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402  (after the skip: TRL is optional)

from aha.core.advantages import ADVANTAGES
from aha.core.algos import LossSpec, Normaliser, policy_loss
from aha.core.rollout_correction import ROLLOUT_CORRECTIONS, rollout_weights  # noqa: E402

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

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    device = torch.device("cpu")
    process_index = 0


# TRL's defaults for the SAPO and VESPO knobs (GRPOConfig), which LossSpec's defaults equal
TRL_ARGS = {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0,
            "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}


def trl_loss(loss_type, logp, inputs, *, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, level="token",
             max_completion_length=None, grad_accum=1, bias_correction_kl=False, entropy=None,
             top_entropy_quantile=1.0, use_vllm=False, **args):
    """(loss, metrics) from TRL's GRPOTrainer._compute_loss with `logp` as the policy's log-probs."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.epsilon_low, trainer.epsilon_high = epsilon_low, epsilon_high
    trainer.importance_sampling_level = level
    trainer.max_completion_length = max_completion_length or logp.shape[1]
    trainer.top_entropy_quantile = top_entropy_quantile
    trainer.off_policy_mask_threshold = None
    trainer.aux_loss_enabled = False
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = use_vllm
    trainer._entropy_bonus_enabled = False
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.args = SimpleNamespace(delta=None, use_bias_correction_kl=bias_correction_kl,
                                   steps_per_generation=grad_accum, **{**TRL_ARGS, **args})
    trainer.accelerator = OneProcess()
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    entropy = torch.zeros_like(logp) if entropy is None else entropy
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, entropy, None)
    rows, width = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long),
        **inputs,
    }
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


# --- the 2026 losses: cispo, sapo, luspo, vespo; entropy masking; vLLM importance sampling --------

def compare_new(loss_type, spec, seed=0, *, off_policy=0.3, trl_kwargs=None, entropy=None, weight=None):
    """Loss and gradient w.r.t. logp from TRL's _compute_loss and aha's policy_loss on one batch."""
    logp, old_logp, _, advantages, mask = make_batch(seed, off_policy=off_policy)
    trl_logp, aha_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    inputs = {"completion_mask": mask, "advantages": advantages, "old_per_token_logps": old_logp,
              "num_items_in_batch": mask.sum()}
    if weight is not None:
        inputs["importance_sampling_ratio"] = weight
    loss_trl, metrics = trl_loss(loss_type, trl_logp, inputs, entropy=entropy, use_vllm=weight is not None,
                                 **(trl_kwargs or {}))
    norm = Normaliser(rows=mask.shape[0], tokens=int(mask.sum()), max_len=mask.shape[1])
    loss_aha, _ = policy_loss(aha_logp, old_logp, advantages, mask, spec, norm=norm, entropy=entropy,
                              rollout_weight=weight)
    loss_trl.backward()
    loss_aha.backward()
    torch.testing.assert_close(loss_aha, loss_trl, atol=ATOL, rtol=0)
    torch.testing.assert_close(aha_logp.grad, trl_logp.grad, atol=ATOL, rtol=0)
    assert trl_logp.grad.abs().max() > 1e-3                 # the comparison is not 0 == 0
    return metrics


CISPO = LossSpec(surrogate="cispo", clip_low=None, clip_high=0.25, aggregation="token_mean")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trl_parity_cispo(seed, level):
    # TRL's epsilon_high is CISPO's cap on the weight itself (ScaleRL: 5); aha's clip_high is cap − 1.
    # Off-policy enough that some weights are capped (TRL's cispo_clip_ratio > 0).
    spec = LossSpec(**{**CISPO.__dict__, "ratio_level": level})
    metrics = compare_new("cispo", spec, seed, off_policy=0.6, trl_kwargs={"epsilon_high": 1.25, "level": level})
    assert level == "sequence" or metrics["cispo_clip_ratio"][0] > 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
def test_trl_parity_sapo(seed, taus):
    spec = LossSpec(surrogate="sapo", aggregation="seq_mean", sapo_tau_pos=taus[0], sapo_tau_neg=taus[1])
    compare_new("sapo", spec, seed, off_policy=0.6,
                trl_kwargs={"sapo_temperature_pos": taus[0], "sapo_temperature_neg": taus[1]})


@pytest.mark.parametrize("seed", [0, 1])
def test_trl_parity_luspo(seed):
    spec = LossSpec(ratio_level="sequence", aggregation="seq_sum", clip_low=0.2, clip_high=0.28)
    compare_new("luspo", spec, seed, trl_kwargs={"level": "sequence", "epsilon_high": 0.28})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trl_parity_vespo(seed):
    # small drift: the sequence ratios w stay near 1, where φ(w) is far from 0 (a large drift makes φ ≈ 0 everywhere)
    spec = LossSpec(surrogate="vespo", aggregation="token_mean")
    metrics = compare_new("vespo", spec, seed, off_policy=0.1)
    assert 0.05 < metrics["vespo/phi_seq_mean"][0] < 1.5


@pytest.mark.parametrize("loss_type, spec", [("grpo", LossSpec(aggregation="seq_mean")),
                                             ("dapo", LossSpec(aggregation="token_mean", clip_high=0.28)),
                                             ("cispo", CISPO)])
@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.1])
def test_trl_parity_top_entropy_quantile(loss_type, spec, quantile):
    gen = torch.Generator().manual_seed(11)
    entropy = 3 * torch.rand(6, 7, generator=gen, dtype=torch.float64)
    spec = LossSpec(**{**spec.__dict__, "top_entropy_quantile": quantile})
    kwargs = {"top_entropy_quantile": quantile, **({"epsilon_high": 1.25} if loss_type == "cispo" else
                                                   {"epsilon_high": spec.clip_high})}
    compare_new(loss_type, spec, trl_kwargs=kwargs, entropy=entropy)


def trl_importance_ratio(mode, trainer_logp, sampler_logp, lengths, clip_min, clip_max):
    """TRL's `importance_sampling_ratio` from its own `_generate_and_score_completions`, on a bare
    trainer whose `_generate` returns these completions and sampler log-probs and whose policy
    forward returns `trainer_logp` (B, T)."""
    rows = len(lengths)
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.accelerator = OneProcess()
    trainer.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    trainer.args = SimpleNamespace(
        per_device_train_batch_size=rows,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        gradient_checkpointing_kwargs=None,
    )
    trainer.environment_factories, trainer.tools, trainer.environments = None, None, None
    trainer._tokenizer = SimpleNamespace(pad_token_id=0)
    trainer.pad_to_multiple_of, trainer.mask_truncated_completions = None, False
    trainer.num_iterations, trainer.beta = 1, 0.0
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip_min, clip_max
    trainer.num_generations, trainer.scale_rewards = 3, "group"
    trainer.multi_objective_aggregation, trainer.reward_weights = "sum_then_normalize", torch.ones(1)
    trainer.reward_func_names = ["reward"]
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
    }
    trainer._pending_extra_logs, trainer._pending_metrics = {}, {}
    completions = [[5] * n for n in lengths]
    sampled = [sampler_logp[i, :n].tolist() for i, n in enumerate(lengths)]
    trainer._generate = lambda prompts: ([[1, 2]] * rows, completions, None, ["x"] * rows, sampled, {}, None, None)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (trainer_logp, None, None)
    trainer._calculate_rewards = lambda *args: torch.arange(rows, dtype=torch.float32)[:, None]
    output = trainer._generate_and_score_completions([{"prompt": "p"}] * rows)
    return output["importance_sampling_ratio"], trainer._metrics["train"]


@pytest.mark.parametrize("mode", sorted(ROLLOUT_CORRECTIONS))
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 2.0)])
def test_trl_parity_importance_sampling_correction(mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling ratio == aha's rollout_weights, mode by mode; then the loss with
    that weight == TRL's loss with its own ratio (grpo and dapo; vespo folds it into its w)."""
    logp, old_logp, _, advantages, mask = make_batch(7)
    lengths = mask.sum(dim=1).tolist()
    gen = torch.Generator().manual_seed(8)
    # the sampler disagrees with the trainer by up to ~e^±0.8 per token: some ratios fall outside the bounds
    sampler_logp = (old_logp + 0.4 * torch.randn(old_logp.shape, generator=gen, dtype=torch.float64)) * mask
    ratio_trl, metrics = trl_importance_ratio(mode, old_logp.float(), sampler_logp.float(), lengths, clip_min, clip_max)
    weight = rollout_weights(old_logp.float(), sampler_logp.float(), mask, mode, clip_min or 0.0, clip_max)
    torch.testing.assert_close(weight, ratio_trl, atol=ATOL, rtol=0)
    assert weight.shape == ((6, 1) if mode.startswith("sequence") else (6, 7))
    delta = (old_logp - sampler_logp).abs().float()[mask.bool()]
    assert abs(metrics["sampling/sampling_logp_difference/mean"][0] - delta.mean().item()) < ATOL
    level = ROLLOUT_CORRECTIONS[mode][0]
    changed = weight != torch.exp(level(old_logp, sampler_logp, mask)).float()
    assert changed.any()                                    # the bounds did something
    weight = weight.double()
    compare_new("grpo", LossSpec(aggregation="seq_mean"), 7, weight=weight)
    compare_new("dapo", LossSpec(aggregation="token_mean", clip_high=0.28), 7, weight=weight,
                trl_kwargs={"epsilon_high": 0.28})
    if mode.startswith("token"):                            # TRL allows VESPO with token modes only
        compare_new("vespo", LossSpec(surrogate="vespo", aggregation="token_mean"), 7, off_policy=0.1, weight=weight)
