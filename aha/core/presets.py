"""Named algorithm presets: each is a point in the grid of aha/core/algos.py, overridable key by key.

- grpo: DeepSeekMath GRPO — group mean/std advantages, token ratios clipped at ε=0.2,
  per-output mean then mean over outputs; β = 0 here (TRL's default; set beta=0.04 for the paper).
- dr_grpo: Dr. GRPO — no std division, constant normaliser (G × max length), β = 0.
- dapo: DAPO — clip-higher (0.2 / 0.28), token mean over the batch, dynamic sampling (groups
  with equal rewards dropped and refilled), soft overlong penalty, β = 0.
- r1_zero: R1-Zero's settings at small scale — GRPO with β = 0.001, k3 KL, temperature 1.0,
  reference replaced by the policy every 400 steps.
- cispo: MiniMax-M1's CISPO — the IS weight clipped and detached, every token keeps its gradient;
  ScaleRL's cap of 5 (clip_high = 4) and no floor (clip_low = 1), token mean over the batch.
- sapo: SAPO — the soft sigmoid gate in place of the clip, τ_pos 1.0 / τ_neg 1.05 (TRL's
  defaults), per-output mean as TRL's `sapo`.
- gmpo: GMPO — the geometric mean of the token ratios, clipped in log space at ±0.4 (e^±0.4),
  mean over sequences.

On-policy (μ = 1, the default) cispo, sapo and gmpo have GRPO's gradient (tests/test_algos.py):
they differ from it only when the update runs off-policy (μ > 1, or a sampler that is not the
trainer). Every preset sets each loss knob it relies on, so an `algo` chosen in a YAML file does
not inherit another preset's surrogate.
"""

CLIP = {"surrogate": "clip", "ratio_level": "token"}

PRESETS: dict[str, dict] = {
    "grpo": {**CLIP, "advantage": "grpo", "clip_low": 0.2, "clip_high": 0.2, "aggregation": "seq_mean", "beta": 0.0},
    "dr_grpo": {
        **CLIP,
        "advantage": "dr_grpo",
        "clip_low": 0.2,
        "clip_high": 0.2,
        "aggregation": "constant",
        "beta": 0.0,
    },
    "dapo": {
        **CLIP,
        "advantage": "grpo",
        "clip_low": 0.2,
        "clip_high": 0.28,
        "aggregation": "token_mean",
        "beta": 0.0,
        "dynamic_sampling": True,
        "overlong": "soft",
    },
    "r1_zero": {
        **CLIP,
        "advantage": "grpo",
        "clip_low": 0.2,
        "clip_high": 0.2,
        "aggregation": "seq_mean",
        "beta": 0.001,
        "kl": "k3",
        "temperature": 1.0,
        "ref_refresh_every": 400,
    },
    "cispo": {
        "surrogate": "cispo",
        "ratio_level": "token",
        "advantage": "grpo",
        "clip_low": 1.0,
        "clip_high": 4.0,
        "aggregation": "token_mean",
        "beta": 0.0,
    },
    "sapo": {
        "surrogate": "sapo",
        "ratio_level": "token",
        "advantage": "grpo",
        "sapo_tau_pos": 1.0,
        "sapo_tau_neg": 1.05,
        "aggregation": "seq_mean",
        "beta": 0.0,
    },
    "gmpo": {
        "surrogate": "gmpo",
        "ratio_level": "token",
        "advantage": "grpo",
        "clip_low": 0.4,
        "clip_high": 0.4,
        "aggregation": "seq_mean",
        "beta": 0.0,
    },
}
