"""The 2026 loss family in the real loop: the rollout correction fed from the rollout's own
log-probs, off-policy (μ = 2, GMPO), and the loss keys' errors. (`aha train --algo
cispo|sapo|gmpo --steps 3` on the built-in model, with the sampler/trainer mismatch ~0: every
preset in tests/test_train.py::test_every_preset_trains_on_the_built_in_model.)

Run: python -m pytest tests/test_loss_family.py -q
"""

import json

import pytest
import torch

import aha.core.train
from aha.cli import main
from aha.core.rollout import generate
from aha.infra.config import load_config
from aha.infra.errors import AhaError

SMALL = ["prompts_per_step=2", "group_size=4", "max_new_tokens=40", "eval_every=0", "eval_problems=4", "eval_k=1"]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rollout_correction_reads_the_samplers_logprobs(tiny_model_dir, tmp_path, monkeypatch):
    """A sampler whose log-probs are 0.5 above the trainer's on every token: the logged mismatch is
    0.5, and token_mask keeps every token with [0.5, 3] (ρ = e^−0.5 = 0.61) and none with [0.7, 3].
    GMPO with μ = 2: the second inner update is off-policy against the trainer's first forward."""
    def skewed_engine(cfg, model):
        def engine(*args, **kwargs):
            rollout = generate(*args, **kwargs)
            rollout.logprobs = rollout.logprobs + 0.5 * rollout.completion_mask
            return rollout
        return engine
    monkeypatch.setattr(aha.core.train, "rollout_sampler", skewed_engine)
    for low, kept in [(0.5, 1.0), (0.7, 0.0)]:
        out = tmp_path / f"low{low}"
        assert (
            main(
                [
                    "train",
                    "--model",
                    str(tiny_model_dir),
                    "--algo",
                    "gmpo",
                    "--steps",
                    "2",
                    "--out",
                    str(out),
                    *SMALL,
                    "mu=2",
                    "max_new_tokens=12",
                    "rollout_correction=token_mask",
                    f"rollout_is_low={low}",
                    "autocast=off",
                    "reward_weights=accuracy=1,cosine=1",
                ]
            )
            == 0
        )       # cosine: a length reward, so groups have spread
        trained = [r for r in records(out) if r["trained_rows"]]
        assert trained
        for r in trained:
            assert abs(r["rollout_logp_diff_mean"] - 0.5) < 1e-4 and abs(r["rollout_logp_diff_max"] - 0.5) < 1e-4
            assert abs(r["rollout_kl"] - (torch.exp(torch.tensor(-0.5)).item() - 1 + 0.5)) < 1e-4
            assert abs(r["rollout_weight_zero_frac"] - (1 - kept)) < 1e-9


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"surrogate": "ppo"}, "surrogate='ppo' is not one of clip, cispo"),
        ({"rollout_correction": "tis"}, "rollout_correction='tis' is not one of none, token_truncate"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile=1.5 must be in [0, 1]"),
        ({"dual_clip": 0.5}, "dual_clip=0.5 must be 0 (off) or above 1"),
        (
            {"surrogate": "vespo", "rollout_correction": "sequence_mask"},
            "use rollout_correction=token_truncate or token_mask",
        ),
        ({"rollout_is_low": 2.0, "rollout_is_high": 1.0}, "rollout_is_low < rollout_is_high"),
    ],
)
def test_loss_config_errors_name_the_key(overrides, words):
    with pytest.raises(AhaError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)
