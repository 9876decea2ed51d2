"""μ > 1: the old log-probs stored at rollout time are the policy's own log-probs, so the first
inner update starts at ratio 1 and later ones are clipped against the rollout policy."""

import json

import torch

from aha.cli import main
from aha.core.logprobs import completion_logprobs
from aha.core.rollout import generate
from aha.core.sampling import SamplingParams
from aha.infra.model import build_model
from aha.infra.tokenizer import build_char_tokenizer


def test_rollout_logprobs_equal_a_training_forward():
    tok = build_char_tokenizer()
    model = build_model("qwen2", tok, seed=4, hidden=64, layers=2).eval()
    prompts = [tok("User: 12+345\nAssistant:")["input_ids"], tok("User: 7+8\nAssistant:")["input_ids"]]
    rollout = generate(model, prompts, 3, SamplingParams(max_new_tokens=10, temperature=0.8), tok.pad_token_id, seed=3)
    rows = torch.arange(6)
    with torch.no_grad():
        logp, _, mask = completion_logprobs(model, rollout, rows, temperature=0.8)
    stored = rollout.logprobs[:, :logp.shape[1]]
    torch.testing.assert_close(logp * mask, stored * mask, atol=1e-4, rtol=1e-4)


def test_mu_2_trains_and_clips_against_the_rollout_policy(tmp_path):
    out = tmp_path / "run"   # the built-in base model: right ~20% of the time, so groups have spread
    code = main(["train", "--steps", "3", "--out", str(out), "mu=2", "lr=0.01",
                 "prompts_per_step=4", "group_size=4", "max_new_tokens=48", "eval_every=0"])
    assert code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    trained = [r for r in rows if r["trained_rows"] > 0]
    assert trained, "some step must have had a reward spread"
    # with a large lr the second inner update sees ratios far from 1: some tokens are clipped
    assert any(r["clip_frac"] > 0 for r in trained)
