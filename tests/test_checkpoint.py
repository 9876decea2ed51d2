"""Never lose a run: checkpoints, `--resume` bit for bit after SIGKILL at several points, SIGTERM,
the run-folder lock, a full disk while writing a checkpoint, the NaN stop with its checkpoint."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import aha.infra.checkpoint
from aha.cli import main
from aha.core.train import train
from aha.infra.checkpoint import RunLock, complete_checkpoints
from aha.infra.config import Config
from aha.infra.errors import AhaError

SETTINGS = ["prompts_per_step=4", "group_size=4", "max_new_tokens=24", "eval_problems=4", "eval_k=1", "eval_every=0",
            "checkpoint_every=2", "lr=3e-3", "dump_rollouts_every=1", "lr_schedule=cosine", "warmup_steps=1"]
STEPS = 5
KEYS = ("step", "reward_mean", "loss", "grad_norm", "entropy", "pass_rate", "response_tokens", "lr")


def aha_process(*args, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("AHA_KILL_AT", None)
    if kill_at:
        env["AHA_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "aha", "train", *args], capture_output=True, text=True, env=env, timeout=300
    )


def metrics(out) -> list[tuple]:
    return [tuple(r[k] for k in KEYS) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    result = aha_process("--steps", str(STEPS), "--out", str(out), *SETTINGS)
    assert result.returncode == 0, result.stderr[-2000:]
    lrs = [r[-1] for r in metrics(out)]
    assert lrs == pytest.approx([3e-3 * f for f in (0.5, 1.0, 0.75, 0.25, 0.0)])   # warm-up 1, cosine over 4
    return out


def test_kills_at_any_point_then_resume_give_the_uninterrupted_run_bit_for_bit(uninterrupted, tmp_path):
    out = tmp_path / "run"
    # one run, killed four times: before the first periodic checkpoint, while writing one (model
    # written, trainer state not), right after one, and between checkpoints; resumed after each kill
    first = aha_process("--steps", str(STEPS), "--out", str(out), *SETTINGS, kill_at="after_step:1")
    assert first.returncode == -signal.SIGKILL
    assert [p.name for p in complete_checkpoints(out)] == ["step-0"]
    for kill_at, survivors in [("during_checkpoint:2", ["step-0"]), ("after_checkpoint:2", ["step-0", "step-2"]),
                               ("after_step:3", ["step-0", "step-2"])]:
        result = aha_process("--resume", str(out), kill_at=kill_at)
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr[-2000:])
        assert [p.name for p in complete_checkpoints(out)] == survivors, kill_at
        if kill_at.startswith("during"):
            assert list((out / "checkpoints").glob("step-2.tmp-*")), "the write killed midway left its temp dir"
    last = aha_process("--resume", str(out))
    assert last.returncode == 0, last.stderr[-2000:]
    said = " ".join(last.stderr.split())                              # rich wraps lines at 80 columns
    assert "resuming" in said and f"at step 2 of {STEPS}" in said
    assert metrics(out) == metrics(uninterrupted)                      # every value, bit for bit
    assert [p.name for p in complete_checkpoints(out)] == ["step-4", "step-5"]    # keep_checkpoints=2
    assert not list((out / "checkpoints").glob("*.tmp-*"))
    a = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(uninterrupted / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) * 4  # no step logged twice


def test_sigterm_checkpoints_and_stops_then_resume_matches(uninterrupted, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("AHA_KILL_AT", None)
    proc = subprocess.Popen([sys.executable, "-m", "aha", "train", "--steps", str(STEPS), "--out", str(out), *SETTINGS],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("aha train: stopped by SIGTERM after step") and line.endswith(f"aha train --resume {out}")
    done = len(metrics(out))
    assert 1 <= done < STEPS and complete_checkpoints(out)[-1].name == f"step-{done}"
    result = aha_process("--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert metrics(out) == metrics(uninterrupted)


def test_resume_extends_a_finished_run_and_refuses_other_changes(uninterrupted, tmp_path, capsys):
    assert main(["train", "--resume", str(uninterrupted), "lr=1"]) == 2
    assert "lr cannot change (only steps=N can" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: no config.yaml there" in capsys.readouterr().err


def test_a_locked_run_folder_is_neither_resumed_nor_replaced(uninterrupted, capsys):
    lock = RunLock(uninterrupted).acquire()
    try:
        assert main(["train", "--resume", str(uninterrupted)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"aha train: error: run folder {uninterrupted} is in use by process {os.getpid()} "
                       f"(lock {uninterrupted / '.lock'}); wait for it to finish or choose another --out")
        assert main(["train", "--out", str(uninterrupted), "--force", "--steps", "1"]) == 2
        assert "is in use by process" in capsys.readouterr().err
        assert (uninterrupted / "metrics.jsonl").is_file()                 # --force deleted nothing
    finally:
        lock.release()


def small_config(out, **overrides) -> Config:
    settings = dict(steps=4, prompts_per_step=2, group_size=4, max_new_tokens=16, eval_every=0, checkpoint_every=2,
                    out=str(out))
    return Config(**{**settings, **overrides}).validate()


def test_a_full_disk_while_checkpointing_keeps_the_last_good_one(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:                          # step-0 fine, step-2 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(aha.infra.checkpoint.torch, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    with pytest.raises(AhaError) as info:
        train(small_config(out))
    message = str(info.value)
    assert message.startswith(f"could not write checkpoint {out / 'checkpoints' / 'step-2'}: the disk is full; "
                              f"the last good checkpoint is {out / 'checkpoints' / 'step-0'}")
    assert [p.name for p in complete_checkpoints(out)] == ["step-0"]
    assert not list((out / "checkpoints").glob("*.tmp-*"))
    state = torch.load(out / "checkpoints" / "step-0" / "trainer.pt", weights_only=False)
    assert state["steps_done"] == 0
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-0" / "model") is not None


def nan_loss(logp, old_logp, advantages, mask, spec, ref_logp=None, norm=None, **tensors):
    return (logp * float("nan")).sum(), {}


def test_the_nan_stop_leaves_the_last_good_checkpoint_loadable(tmp_path, monkeypatch):
    import aha.core.step
    import aha.core.train
    real_loss = aha.core.step.policy_loss
    monkeypatch.setattr(
        aha.core.step, "policy_loss", lambda *a, **k: nan_loss(*a, **k) if step_now[0] >= 2 else real_loss(*a, **k)
    )
    step_now = [0]
    real_record = aha.core.train.step_record

    def count(step, *args, **kwargs):
        step_now[0] = step + 1
        return real_record(step, *args, **kwargs)

    monkeypatch.setattr(aha.core.train, "step_record", count)
    out = tmp_path / "run"
    with pytest.raises(AhaError, match=r"NaN/inf for 2 steps in a row .*last good checkpoint: ") as stop:
        train(small_config(out, steps=8, max_bad_steps=2, checkpoint_every=2))
    # a step with no row to train (every group tied) is not a NaN step: where the streak ends depends
    # on the samples, so the test reads it from the records and checks the checkpoint the error names
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in records[-2:]] == [True, True] and records[-3]["skipped_update"] is False
    last = complete_checkpoints(out)[-1]
    # checkpoints come every 2 steps until the step that stops the run, which writes none
    assert str(stop.value).endswith(str(last) + ")") and last.name == f"step-{2 * ((len(records) - 1) // 2)}"
    state = torch.load(last / "trainer.pt", weights_only=False)
    assert state["steps_done"] == int(last.name[5:]) and state["bad_steps"] < 2
    weights = AutoModelForCausalLM.from_pretrained(last / "model").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_with_lora_and_a_longer_run_continues_exactly(tmp_path):
    pytest.importorskip("peft")
    small = ["prompts_per_step=2", "group_size=4", "max_new_tokens=16", "eval_every=0", "lora_rank=4", "lr=0.01",
             "checkpoint_every=0"]
    assert main(["train", "--steps", "4", "--out", str(tmp_path / "whole"), *small]) == 0
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "parts"), *small]) == 0
    assert main(["train", "--resume", str(tmp_path / "parts"), "steps=4"]) == 0       # a finished run, extended
    assert metrics(tmp_path / "parts") == metrics(tmp_path / "whole")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "parts" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_adapters_start_the_same_whatever_torch_drew_before():
    """peft draws lora_A from torch's global generator, whose start is random per process: the run seeds
    it first (aha/core/train.py `prepare_model`), so one seed gives one set of adapters in any process."""
    pytest.importorskip("peft")
    from aha.core.train import prepare_model
    from aha.infra.base import SHIPPED
    from aha.infra.config import Config
    from aha.infra.model import load_model
    adapters = []
    for draw in (1, 1000):
        torch.rand(draw)                                   # another history of the global generator
        model, _ = prepare_model(Config(lora_rank=4), load_model(SHIPPED)[0], {})
        adapters.append({k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k})
    assert adapters[0] and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
