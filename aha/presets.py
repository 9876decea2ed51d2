"""Named algorithm presets: each is a point in the grid of aha/algos.py, overridable key by key.

- grpo: DeepSeekMath GRPO — group mean/std advantages, token ratios clipped at ε=0.2,
  per-output mean then mean over outputs; β = 0 here (TRL's default; set beta=0.04 for the paper).
- dr_grpo: Dr. GRPO — no std division, constant normaliser (G × max length), β = 0.
- dapo: DAPO — clip-higher (0.2 / 0.28), token mean over the batch, dynamic sampling (groups
  with equal rewards dropped and refilled), soft overlong penalty, β = 0.
- r1_zero: R1-Zero's settings at small scale — GRPO with β = 0.001, k3 KL, temperature 1.0,
  reference replaced by the policy every 400 steps.
"""

PRESETS: dict[str, dict] = {
    "grpo": {"advantage": "grpo", "ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
             "aggregation": "seq_mean", "beta": 0.0},
    "dr_grpo": {"advantage": "dr_grpo", "ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                "aggregation": "constant", "beta": 0.0},
    "dapo": {"advantage": "grpo", "ratio_level": "token", "clip_low": 0.2, "clip_high": 0.28,
             "aggregation": "token_mean", "beta": 0.0, "dynamic_sampling": True, "overlong": "soft"},
    "r1_zero": {"advantage": "grpo", "ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                "aggregation": "seq_mean", "beta": 0.001, "kl": "k3", "temperature": 1.0,
                "ref_refresh_every": 400},
}
