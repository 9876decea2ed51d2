"""The GRPO family as pure functions: KL estimators, ratios, surrogates, aggregations, the policy loss
(the advantages are in aha/core/advantages.py).

Each function is one equation. Variants are points in one grid of knobs — advantage estimator,
ratio level, surrogate, clip range, loss aggregation, KL estimator and β, entropy masking, rollout
correction — and each knob is looked up by name in a registry, so the training loop never
branches on a variant.

- `grpo_advantages`: DeepSeekMath (arXiv 2402.03300) §4.1.2, Â_i = (r_i − mean r) / std r.
- `dr_grpo_advantages`, `constant_aggregate`: Dr. GRPO (arXiv 2503.20783), no std, no 1/|o|.
- `rloo_advantages`: leave-one-out baseline; `reinforce_pp_advantages`: REINFORCE++-baseline;
  `passk_advantages`: pass@k training, only a group's best sample is pushed (verl `grpo_passk`).
- `kl_k1/k2/k3`: Schulman's estimators; k3 is DeepSeekMath eq. 4.
- `clip_surrogate` + `seq_mean_aggregate`: DeepSeekMath eq. 3 (with β·KL inside the token loss);
  with clip_high > clip_low and `token_mean_aggregate`: the DAPO objective (arXiv 2503.14476);
  `dual_clip`: verl's bound −c·A for negative advantages.
- `sequence_log_ratio`: GSPO (arXiv 2507.18071) s_i = (π_θ/π_old)^(1/|o_i|), as GSPO-token;
  with `seq_sum_aggregate`: LUSPO (TRL 'luspo').
- `cispo_surrogate` (MiniMax-M1), `sapo_surrogate` (soft gate), `gmpo_surrogate` (geometric mean),
  `vespo_surrogate` (gamma-weighted sequence ratio), `clip_cov_surrogate` / `kl_cov_surrogate`
  (covariance-based entropy control): one surrogate each, the same signature.
- `high_entropy_mask`: train on the top-q share of tokens by entropy (arXiv 2506.01939).
- The rollout correction (TIS / MIS, when the sampler is not the trainer) computes the weight
  `policy_loss` takes: aha/core/rollout_correction.py.

Departures from the papers: a group whose rewards are all equal (max == min) gets advantage
exactly 0 under every estimator (float32 rounds the mean of `[0.1] * 8`, which leaves a −7e-9 residue
that the std division would blow up to −7e-5); the std gets + 1e-4 and is the unbiased one; log-ratios
are clamped to ±20 before exp (verl does the same) so the loss stays finite; the aggregation divides
by a `Normaliser` counted over the whole batch, so rows skipped for zero advantage change nothing.
Batch statistics — Clip-Cov/KL-Cov's covariance and token counts, the entropy quantile — are taken
over the rows that enter the loss (aha leaves out rows whose advantage is 0; TRL and verl keep them
in), per process under torchrun.
tests/test_trl_parity.py checks the losses against TRL 1.16's own code; tests/test_algos.py the
verl-only ones against values computed by hand from the papers' formulas.

Shapes: B completions (prompts × group_size, grouped contiguously), T completion tokens.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Log-ratios are clamped to ±20 before exp (as verl does): e^20 ≈ 5e8 keeps the loss and its
# gradient finite in float32 even for wildly off-policy tokens, and no sane update reaches it.
MAX_LOG_RATIO = 20.0

# --- KL to the reference policy, per token: (logp (B,T), ref_logp (B,T)) -> (B,T) ---------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log π_θ − log π_ref: unbiased, can be negative."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """½ (log π_θ − log π_ref)²: always ≥ 0, biased."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """π_ref/π_θ − log(π_ref/π_θ) − 1 (GRPO's estimator): unbiased and always ≥ 0."""
    log_ratio = (ref_logp - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# --- log-ratio level: (logp, old_logp, mask) -> (B,T) ---------------------------------------------


def token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log ρ_t = log π_θ(o_t) − log π_old(o_t), one ratio per token (GRPO, PPO)."""
    return logp - old_logp


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO: one length-normalised ratio per sequence, (1/|o|) Σ_t log ρ_t, broadcast to its tokens.

    The value is per sequence, but the gradient flows to each token as in GSPO-token.
    """
    per_token = (logp - old_logp) * mask
    seq = per_token.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return logp - logp.detach() + seq.detach().expand_as(logp)


RATIO_LEVELS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}

# --- aggregation of per-token losses: (loss (B,T), mask (B,T), Normaliser) -> scalar -------------
# The normaliser counts the whole batch, including rows the trainer skipped because their
# advantage is zero: skipping them then changes nothing but the time spent.


@dataclass(frozen=True)
class Normaliser:
    rows: int           # completions in the whole batch (B)
    tokens: int         # completion tokens in the whole batch
    max_len: int        # maximum completion length (Dr. GRPO's constant)


def seq_mean_aggregate(token_loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """GRPO: mean over each output's tokens, then over outputs (1/G Σ_i 1/|o_i| Σ_t)."""
    return ((token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / norm.rows


def token_mean_aggregate(token_loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """DAPO / TRL 'dapo' and 'bnpo': sum over all tokens of the batch / number of tokens."""
    return (token_loss * mask).sum() / max(norm.tokens, 1)


def constant_aggregate(token_loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """Dr. GRPO: sum over all tokens / (B × max completion length), a constant normaliser."""
    return (token_loss * mask).sum() / (norm.rows * norm.max_len)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, Normaliser], Tensor]] = {
    "seq_mean": seq_mean_aggregate,
    "token_mean": token_mean_aggregate,
    "constant": constant_aggregate,
}



def seq_sum_aggregate(token_loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """LUSPO (TRL 'luspo'): sum over each output's tokens, then mean over outputs (1/G Σ_i Σ_t): a
    sequence's loss scales with its length, undoing GSPO's 1/|o|."""
    return (token_loss * mask).sum() / norm.rows


AGGREGATIONS["seq_sum"] = seq_sum_aggregate


@dataclass(frozen=True)
class LossSpec:
    """The knobs of the policy loss; every published variant is one setting of them."""
    ratio_level: str = "token"
    clip_low: float | None = 0.2      # ratio floor 1 − clip_low; None: no floor (gmpo: log-ratio floor −clip_low)
    clip_high: float | None = 0.2     # ratio ceiling 1 + clip_high; > clip_low: DAPO clip-higher (gmpo: log space)
    aggregation: str = "token_mean"
    kl: str = "k3"
    beta: float = 0.0
    surrogate: str = "clip"           # the per-token objective, SURROGATES
    dual_clip: float = 0.0            # c > 1: for A < 0 the clip surrogate's loss is at most −c·A (verl: 3); 0 = off
    sapo_tau_pos: float = 1.0         # SAPO gate temperatures for A > 0 and A ≤ 0 (TRL's defaults)
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0          # VESPO gamma weight φ(w) = e^λ w^k e^(−λw), for A ≥ 0 and A < 0 (TRL's defaults)
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    cov_share: float = 0.0002         # Clip-Cov / KL-Cov: share of the batch's tokens they touch (verl: 2e-4)
    clip_cov_low: float = 1.0         # Clip-Cov: only tokens with covariance in (low, high) may be cut (verl: 1, 5)
    clip_cov_high: float = 5.0
    kl_cov_coef: float = 1.0          # KL-Cov: weight of |log ρ| on the selected tokens (verl: 1)
    top_entropy_quantile: float = 1.0  # train on the top-q share of tokens by entropy (TRL; 0.2 in the paper); 1 = all


@dataclass
class TokenTerms:
    """What a surrogate reads, for B rows of T tokens."""
    logp: Tensor                      # (B, T) log π_θ of the sampled tokens, 0 on padding
    log_ratio: Tensor                 # (B, T) log ρ at the spec's ratio level, 0 on padding
    adv: Tensor                       # (B, 1) advantages
    mask: Tensor                      # (B, T) 1.0 on completion tokens
    rollout_weight: Tensor | None     # (B, T) or (B, 1) sampler → trainer correction (`rollout_weights`), or None
    generator: torch.Generator | None  # Clip-Cov's random choice; None: torch's global generator


def ratio_of(log_ratio: Tensor) -> Tensor:
    return torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def corrected(token_loss: Tensor, weight: Tensor | None) -> Tensor:
    """The rollout correction multiplies the policy term of each token (TRL, verl)."""
    return token_loss if weight is None else token_loss * weight


def bounds(spec: LossSpec) -> tuple[float | None, float | None]:
    return (
        None if spec.clip_low is None else 1 - spec.clip_low,
        None if spec.clip_high is None else 1 + spec.clip_high,
    )


def clamp(x: Tensor, low: float | None, high: float | None) -> Tensor:
    """torch.clamp that lets both bounds be None (then x itself)."""
    return x if low is None and high is None else x.clamp(low, high)


# --- surrogates, the per-token objective: (TokenTerms, LossSpec) -> (loss (B,T), clipped (B,T) bool) ----
# `clipped` marks the tokens whose gradient the surrogate cut (logged as clip_frac).


def clip_surrogate(x: TokenTerms, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """PPO/GRPO: −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A). Dual-clip (Ye et al. 2019; verl `clip_ratio_c`,
    `compute_policy_loss_vanilla`): with c > 1, for A < 0 the loss is also at most −c·A, so a token
    whose ratio has run far above 1 cannot push an unbounded loss."""
    ratio = ratio_of(x.log_ratio)
    unclipped = ratio * x.adv
    low, high = bounds(spec)
    surrogate = torch.minimum(unclipped, clamp(ratio, low, high) * x.adv)
    clipped = surrogate < unclipped                   # the pessimistic bound won: no gradient
    loss = -surrogate
    if spec.dual_clip:
        ceiling = -spec.dual_clip * x.adv             # (B, 1), > 0 where A < 0
        dual = (x.adv < 0) & (loss > ceiling)
        loss, clipped = torch.where(dual, ceiling, loss), clipped | dual
    return corrected(loss, x.rollout_weight), clipped


def cispo_surrogate(x: TokenTerms, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·log π_θ. No token's
    gradient is dropped: each keeps A·w·∇log π, only the weight w is capped (ScaleRL: ε_high = 4,
    a cap of 5, and no floor, clip_low = 1). `clipped`: tokens whose weight was capped."""
    ratio = ratio_of(x.log_ratio).detach()
    weight = clamp(ratio, *bounds(spec))
    return corrected(-weight * x.adv * x.logp, x.rollout_weight), weight != ratio


def sapo_surrogate(x: TokenTerms, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """SAPO (arXiv 2511.20347): −f_τ(ρ)·A, the soft gate f_τ(ρ) = σ(τ(ρ − 1))·4/τ in place of the
    clip; τ = τ_pos where A > 0, τ_neg elsewhere. f'(1) = 1, so on-policy the gradient is GRPO's;
    off-policy it fades smoothly as ρ leaves 1 (faster for A ≤ 0, τ_neg > τ_pos). Cuts nothing."""
    tau = torch.where(x.adv > 0, spec.sapo_tau_pos, spec.sapo_tau_neg)           # (B, 1)
    gate = torch.sigmoid(tau * (ratio_of(x.log_ratio) - 1)) * 4 / tau
    return corrected(-gate * x.adv, x.rollout_weight), torch.zeros_like(x.mask, dtype=torch.bool)


def gmpo_surrogate(x: TokenTerms, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """GMPO (arXiv 2507.20673; verl `compute_policy_loss_geo_mean`): one loss per sequence,
    −A·exp((1/|o|) Σ_t sgn(A)·min(sgn(A)·log ρ_t, sgn(A)·clip(log ρ_t, −ε_low, ε_high))): the
    geometric mean of the token ratios, each clipped pessimistically in log space (the paper:
    ε = 0.4, ratios in e^±0.4). Broadcast to the sequence's tokens: `seq_mean` aggregation then
    gives verl's mean over sequences. Rollout weights enter as their geometric mean per sequence."""
    sign = torch.sign(x.adv)                                                     # (B, 1)
    log_ratio = x.log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    clamped = clamp(log_ratio, None if spec.clip_low is None else -spec.clip_low, spec.clip_high)
    chosen = sign * torch.minimum(sign * log_ratio, sign * clamped)                # (B, T)
    tokens = x.mask.sum(dim=1, keepdim=True).clamp(min=1)
    loss = -x.adv * torch.exp((chosen * x.mask).sum(dim=1, keepdim=True) / tokens)  # (B, 1)
    if x.rollout_weight is not None:
        log_weight = torch.log(x.rollout_weight + 1e-10).expand_as(x.mask)
        loss = loss * torch.exp((log_weight * x.mask).sum(dim=1, keepdim=True) / tokens)
    return loss.expand_as(x.logp), sign * clamped < sign * log_ratio


VESPO_MIN_LOG_W = math.log(1e-8)


def vespo_surrogate(x: TokenTerms, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """VESPO (arXiv 2602.10693) as TRL 1.16 (`get_gamma_weights`): −sg(φ(w))·A·log π_θ, with the
    sequence ratio w = Π_t ρ_t (times Π_t of the token rollout weights, when given: they enter w, not
    the loss) and the gamma weight φ(w) = e^λ·w^k·e^(−λw), φ(1) = 1; (k, λ) = (k_pos, λ_pos) for
    A ≥ 0, else (k_neg, λ_neg). log w is clamped to [log 1e-8, 20]. Cuts nothing."""
    log_w = (x.log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO) * x.mask).sum(dim=1, keepdim=True)   # (B, 1)
    if x.rollout_weight is not None:
        log_weight = torch.log(x.rollout_weight).clamp(VESPO_MIN_LOG_W, MAX_LOG_RATIO)
        log_w = log_w + (log_weight * x.mask).sum(dim=1, keepdim=True)
    log_w = log_w.clamp(VESPO_MIN_LOG_W, MAX_LOG_RATIO).detach()
    positive = x.adv >= 0
    k = torch.where(positive, spec.vespo_k_pos, spec.vespo_k_neg)
    lam = torch.where(positive, spec.vespo_lambda_pos, spec.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * x.adv * x.logp, torch.zeros_like(x.mask, dtype=torch.bool)


def token_covariance(x: TokenTerms) -> Tensor:
    """(A − Ā)·(log π − mean log π) per token (B, T), means over the batch's tokens, no gradient:
    the covariance whose large values drive entropy down (Cui et al., arXiv 2505.22617)."""
    mask, count = x.mask, x.mask.sum().clamp(min=1)
    adv = x.adv.expand_as(mask)
    logp = x.logp.detach()
    return (adv - (adv * mask).sum() / count) * (logp - (logp * mask).sum() / count)


def cov_count(spec: LossSpec, mask: Tensor) -> int:
    """Tokens Clip-Cov / KL-Cov touch: max(1, ⌊share × tokens⌋), as verl."""
    return max(1, int(spec.cov_share * float(mask.sum())))


def clip_cov_surrogate(x: TokenTerms, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """Clip-Cov (arXiv 2505.22617; verl `compute_policy_loss_clip_cov`): the clip surrogate, with
    the loss of max(1, ⌊r·N⌋) tokens set to 0, chosen at random among the tokens whose covariance
    lies in (clip_cov_low, clip_cov_high) and that the clip did not already cut (N: the batch's tokens)."""
    loss, clipped = clip_surrogate(x, spec)
    cov = token_covariance(x)
    eligible = ((cov > spec.clip_cov_low) & (cov < spec.clip_cov_high) & x.mask.bool() & ~clipped).nonzero()
    order = torch.randperm(len(eligible), generator=x.generator)[:cov_count(spec, x.mask)]
    chosen = eligible[order.to(eligible.device)]
    cut = torch.zeros_like(clipped)
    cut[chosen[:, 0], chosen[:, 1]] = True
    return loss.masked_fill(cut, 0.0), clipped | cut


def kl_cov_surrogate(x: TokenTerms, spec: LossSpec) -> tuple[Tensor, Tensor]:
    """KL-Cov (arXiv 2505.22617; verl `compute_policy_loss_kl_cov`): the unclipped −ρ·A, plus
    κ·|log ρ| on the max(1, ⌊k·N⌋) tokens of largest covariance. Nothing is clipped; `clipped`
    marks the penalised tokens. On-policy (ρ = 1, μ = 1) the penalty and its gradient are 0."""
    cov = token_covariance(x).masked_fill(~x.mask.bool(), -torch.inf).flatten()
    top = torch.topk(cov, min(cov_count(spec, x.mask), int(x.mask.sum()))).indices
    penalised = torch.zeros_like(cov, dtype=torch.bool).index_fill(0, top, True).view_as(x.mask)
    loss = -ratio_of(x.log_ratio) * x.adv + spec.kl_cov_coef * x.log_ratio.abs() * penalised
    return corrected(loss, x.rollout_weight), penalised


SURROGATES: dict[str, Callable[[TokenTerms, LossSpec], tuple[Tensor, Tensor]]] = {
    "clip": clip_surrogate,
    "cispo": cispo_surrogate,
    "sapo": sapo_surrogate,
    "gmpo": gmpo_surrogate,
    "vespo": vespo_surrogate,
    "clip_cov": clip_cov_surrogate,
    "kl_cov": kl_cov_surrogate,
}


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Tokens (B, T) bool whose entropy is at least the (1 − q) quantile of the batch's token
    entropies: the top-q share ("Beyond the 80/20 rule", arXiv 2506.01939; TRL `top_entropy_quantile`).
    q = 0 keeps the highest-entropy token(s) only; padding is never kept."""
    keep = mask.bool()
    values = entropy[keep].float()
    if values.numel() == 0:
        return torch.zeros_like(keep)
    threshold = torch.quantile(values, 1 - quantile)
    return (entropy * mask >= threshold) & keep


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, spec: LossSpec,
                ref_logp: Tensor | None = None, norm: Normaliser | None = None, entropy: Tensor | None = None,
                rollout_weight: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """The surrogate of `spec` per token (e.g. −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)), times the
    rollout weight, masked to the high-entropy tokens if asked, + β·KL, aggregated as `spec` says.

    logp, old_logp, ref_logp, mask, entropy (per-token, needed for top_entropy_quantile < 1):
    (B, T); advantages: (B,); rollout_weight (`rollout_weights`): (B, T) or (B, 1). `norm`
    defaults to this batch's own counts. Returns (loss, metrics).
    """
    keep = mask.bool()
    mask = mask.to(logp.dtype)
    # Padding may hold anything (0, −inf, a stale log-prob): zero it before exp, so that no
    # inf·0 = NaN can leak from a masked position into the loss or its gradient.
    logp, old_logp = logp.where(keep, 0.0), old_logp.where(keep, 0.0)
    if norm is None:
        norm = Normaliser(rows=mask.shape[0], tokens=int(mask.sum()), max_len=mask.shape[1])
    log_ratio = RATIO_LEVELS[spec.ratio_level](logp, old_logp, mask)
    terms = TokenTerms(logp, log_ratio, advantages.unsqueeze(1), mask, rollout_weight, generator)
    token_loss, clipped = SURROGATES[spec.surrogate](terms, spec)
    metrics = {}
    if spec.top_entropy_quantile < 1:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropy")
        high = high_entropy_mask(entropy, mask, spec.top_entropy_quantile)
        token_loss = token_loss * high
        metrics["entropy_mask_frac"] = float(high.sum() / mask.sum().clamp(min=1))
    if spec.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = KL_ESTIMATORS[spec.kl](logp, ref_logp.where(keep, 0.0))
        token_loss = token_loss + spec.beta * kl
        metrics["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    loss = AGGREGATIONS[spec.aggregation](token_loss, mask, norm)
    n = mask.sum().clamp(min=1)
    metrics["clip_frac"] = float((clipped.to(mask.dtype) * mask).sum() / n)
    return loss, metrics
