"""The training loop's features, each with values that can fail: zero-advantage groups never reach
the forward/backward pass, DAPO dynamic sampling and overlong handling, the reference refresh, the
NaN guard, and every preset running end to end through the CLI."""

import dataclasses
import json

import pytest
import torch
import yaml

import aha.core.step
import aha.core.train
from aha.cli import main
from aha.core.dynamic import concat_rollouts, group_spread, kept_groups
from aha.core.logprobs import completion_logprobs
from aha.core.presets import PRESETS
from aha.core.rollout import Rollout, generate
from aha.core.sampling import SamplingParams
from aha.core.train import train
from aha.infra.config import Config
from aha.infra.errors import AhaError
from aha.infra.model import cpu_has_fast_bf16, load_model
from aha.tasks import get_task
from aha.tasks.rewards import Reward, overlong_penalty

# per-completion accuracies, cycled: groups of 4 → all 1 (tie), spread, all 0 (tie), spread
SCRIPT = [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0]


class ScriptedTask:
    """A real task whose accuracy follows a fixed script, one value per scored completion."""

    def __init__(self, task, values):
        self.task, self.values, self.calls = task, values, 0

    def score(self, text, problem):
        value = self.values[self.calls % len(self.values)]
        self.calls += 1
        return {"accuracy": float(value), "format": 0.0}

    def score_batch(self, texts, problems):
        return [self.score(t, p) for t, p in zip(texts, problems)]

    def __getattr__(self, name):
        return getattr(self.task, name)


@pytest.fixture
def scripted(monkeypatch):
    def use(values):
        monkeypatch.setattr(aha.core.train, "get_task", lambda name, **kw: ScriptedTask(get_task(name, **kw), values))
    return use


def grad_forward_rows(monkeypatch) -> list[int]:
    """Rows of every update forward that builds a graph (the ones a backward pass will go through)."""
    seen, real = [], aha.core.step.completion_logprobs

    def record(model, rollout, rows, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(int(rows.numel()))
        return real(model, rollout, rows, *args, **kwargs)
    monkeypatch.setattr(aha.core.step, "completion_logprobs", record)
    return seen


def run(tiny_model_dir, tmp_path, **overrides):
    model, tokenizer = load_model(tiny_model_dir)
    settings = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=8, eval_every=0, lr=1e-2,
                    out=str(tmp_path), format_weight=0.0)
    cfg = Config(**{**settings, **overrides}).validate()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        seen = grad_forward_rows(patch)
        result = train(cfg, out=tmp_path, model=model, tokenizer=tokenizer)
    return result["history"], seen, before, model


def test_zero_advantage_groups_never_reach_the_backward_pass(tiny_model_dir, tmp_path, scripted):
    scripted(SCRIPT)
    history, seen, _, _ = run(tiny_model_dir, tmp_path / "b0", beta=0.0)
    assert seen == [8, 8]                                  # the two tied groups (8 rows) are skipped
    assert [r["trained_rows"] for r in history] == [8, 8]
    assert [r["zero_spread_frac"] for r in history] == [0.5, 0.5]
    # with a KL term every row carries a gradient, so all 16 go through
    history, seen, _, _ = run(tiny_model_dir, tmp_path / "b1", beta=0.04)
    assert seen == [16, 16] and [r["trained_rows"] for r in history] == [16, 16]


def test_dynamic_sampling_refills_the_batch_from_new_prompts(tiny_model_dir, tmp_path, scripted):
    scripted(SCRIPT)
    history, seen, _, _ = run(tiny_model_dir, tmp_path / "a", dynamic_sampling=True, max_sampling_tries=4)
    assert [(r["sampling_tries"], r["groups_kept"], r["trained_rows"]) for r in history] == [(2, 4, 16)] * 2
    assert seen == [16, 16]
    scripted(SCRIPT)
    history, seen, _, _ = run(tiny_model_dir, tmp_path / "b", dynamic_sampling=True, max_sampling_tries=1)
    assert [(r["sampling_tries"], r["groups_kept"], r["trained_rows"]) for r in history] == [(1, 2, 8)] * 2
    scripted([0.0])                                         # nothing ever has a spread: bounded, trains on nothing
    history, seen, _, _ = run(tiny_model_dir, tmp_path / "c", dynamic_sampling=True, max_sampling_tries=3)
    assert [(r["sampling_tries"], r["groups_kept"], r["trained_rows"]) for r in history] == [(3, 0, 0)] * 2
    assert seen == []


def test_group_spread_and_kept_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 2.0])
    assert group_spread(rewards, 2).tolist() == [False, True, False, True]
    assert kept_groups(torch.tensor([False, True, False, True]), 1).tolist() == [False, True, False, False]


def test_concatenated_rollouts_give_the_same_logprobs(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    a = generate(model, [tokenizer("12+3=")["input_ids"]], 2, params, tokenizer.pad_token_id, seed=1)
    b = generate(model, [tokenizer("1+2=")["input_ids"], tokenizer("345+678=")["input_ids"]], 2, params,
                 tokenizer.pad_token_id, seed=2)
    both = concat_rollouts([a, b], tokenizer.pad_token_id)
    assert both.prompt_ids.shape[0] == 6 and both.group_size == 2
    with torch.no_grad():
        joint, _, joint_mask = completion_logprobs(model, both, torch.arange(6), 1.0)
        for part, rows in [(a, range(0, 2)), (b, range(2, 6))]:
            alone, _, mask = completion_logprobs(model, part, torch.arange(len(rows)), 1.0)
            width = mask.shape[1]
            assert torch.equal(joint_mask[list(rows), :width], mask)
            assert torch.allclose(joint[list(rows), :width] * mask, alone * mask, atol=1e-5)


def fake_rollout(lengths: list[int], max_new_tokens: int) -> Rollout:
    mask = (torch.arange(max_new_tokens)[None, :] < torch.tensor(lengths)[:, None]).long()
    zeros = torch.zeros_like(mask)
    return Rollout(zeros, zeros, zeros, mask, zeros.float(), torch.tensor(lengths) == max_new_tokens, group_size=4)


def score(task, cfg, texts, rollout):
    """The run's reward of `texts` (one group, no problem needed), its names checked on the plain task."""
    reward = dataclasses.replace(Reward.build(cfg, get_task("addition")), task=task)
    return reward.score(texts, [None] * len(texts), rollout.lengths.tolist())


def test_soft_overlong_penalty_is_its_own_reward_component():
    cfg = Config(overlong="soft", max_new_tokens=8, overlong_cache=4, group_size=4, format_weight=0.0).validate()
    task = ScriptedTask(get_task("addition"), [1, 0, 1, 0])
    scores, rewards = score(task, cfg, ["x"] * 4, fake_rollout([8, 6, 3, 4], 8))
    assert [s["overlong"] for s in scores] == [-1.0, -0.5, 0.0, 0.0]
    assert rewards.tolist() == [0.0, -0.5, 1.0, 0.0]
    assert overlong_penalty(7, 8, 4) == -0.75
    plain, _ = score(ScriptedTask(get_task("addition"), [1]), Config(group_size=4), ["x"] * 4, fake_rollout([8] * 4, 8))
    assert "overlong" not in plain[0]


def test_overlong_mask_keeps_truncated_completions_out_of_the_loss(tiny_model_dir, tmp_path, scripted):
    scripted([1, 0])                                        # every group has a spread, every advantage ≠ 0
    history, seen, _, _ = run(tiny_model_dir, tmp_path / "m", overlong="mask", max_new_tokens=3, steps=3)
    truncated = [round(16 * r["truncation_rate"]) for r in history]
    assert sum(truncated) > 0
    assert [r["trained_rows"] for r in history] == [16 - t for t in truncated]
    assert seen == [16 - t for t in truncated if t < 16]
    scripted([1, 0])
    history, seen, _, _ = run(tiny_model_dir, tmp_path / "n", overlong="none", max_new_tokens=3, steps=3)
    assert seen == [16, 16, 16]


def test_reference_refresh_makes_the_kl_zero_again(tiny_model_dir, tmp_path, scripted):
    scripted(SCRIPT)
    history, _, _, _ = run(tiny_model_dir, tmp_path / "r1", beta=0.04, steps=3, ref_refresh_every=1)
    assert [r["kl"] for r in history] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    scripted(SCRIPT)
    history, _, _, _ = run(tiny_model_dir, tmp_path / "r0", beta=0.04, steps=3, ref_refresh_every=0)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and history[2]["kl"] > 1e-4


def nan_loss(logp, old_logp, advantages, mask, spec, ref_logp=None, norm=None, **tensors):
    return (logp * float("nan")).sum(), {}


def test_nan_loss_skips_the_update_and_stops_after_k_in_a_row(tiny_model_dir, tmp_path, scripted, monkeypatch):
    scripted(SCRIPT)
    monkeypatch.setattr(aha.core.step, "policy_loss", nan_loss)
    model, tokenizer = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = Config(steps=5, prompts_per_step=4, group_size=4, max_new_tokens=8, eval_every=0, max_bad_steps=3).validate()
    with pytest.raises(AhaError, match="NaN/inf for 3 steps in a row"):
        train(cfg, out=tmp_path, model=model, tokenizer=tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in records] == [True, True, True]


def test_nan_stop_is_exit_2_through_the_cli(tiny_model_dir, tmp_path, scripted, monkeypatch, capsys):
    scripted(SCRIPT)
    monkeypatch.setattr(aha.core.step, "policy_loss", nan_loss)
    code = main(["train", "--model", str(tiny_model_dir), "--steps", "4", "--out", str(tmp_path / "o"),
                 "max_bad_steps=2", "prompts_per_step=4", "group_size=4", "max_new_tokens=8", "eval_every=0"])
    assert code == 2
    assert "aha train: error: the loss or gradient was NaN/inf for 2 steps in a row" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["built-in", "qwen2"])
def test_gradient_checkpointing_trains_under_bf16_autocast(which, tiny_model_dir, tmp_path, capsys):
    """Activation checkpointing recomputes the forward in the backward pass: under bf16 autocast that
    recomputation must see the same (fp32) attention as the forward, or torch stops with
    "Recomputed values ... have different metadata" (the built-in GPT-2 did until 2026-12-06;
    Qwen2's query and key, fp32 after the rotary embedding, began to once its attention really ran in
    fp32). `aha/core/step.py: policy_update` holds `fp32_attention` over the backward too."""
    out = tmp_path / "run"
    model = [] if which == "built-in" else ["--model", str(tiny_model_dir)]
    code = main(["train", *model, "--steps", "2", "--out", str(out), "prompts_per_step=2", "group_size=4",
                 "max_new_tokens=12", "eval_every=0", "autocast=bf16", "gradient_checkpointing=true"])
    assert code in (0, None), capsys.readouterr().err[-2000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


@pytest.mark.parametrize("algo", sorted(PRESETS))
def test_every_preset_trains_on_the_built_in_model(algo, tmp_path, capsys):
    out = tmp_path / algo
    code = main(["train", "--algo", algo, "--steps", "3", "--out", str(out),
                 "prompts_per_step=2", "group_size=4", "max_new_tokens=48", "eval_every=0"])
    assert code in (0, None), capsys.readouterr().err[-2000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert ("kl" in records[0]) == (algo == "r1_zero")
    assert ("reward_overlong" in records[0]) == (algo == "dapo")
    assert (out / "model" / "config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["surrogate"] == PRESETS[algo]["surrogate"]
    mode = Config().autocast                                  # the update under bf16: $AHA_AUTOCAST, or auto on AMX
    bf16 = mode == "bf16" or (mode == "auto" and cpu_has_fast_bf16())
    for r in (r for r in records if r["trained_rows"]):
        # aha's engine samples with the trainer's own weights in fp32: the sampler/trainer mismatch is ~0;
        # a bf16 update differs from the fp32 sampler by bf16's rounding (README, "Numerics differ by CPU")
        bound = (0.1, 1.0, 1e-2) if bf16 else (1e-5, 1e-4, 1e-8)
        assert r["rollout_logp_diff_mean"] < bound[0] and r["rollout_logp_diff_max"] < bound[1], r
        assert 0 <= r["rollout_kl"] < bound[2], r
