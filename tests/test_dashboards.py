"""Live logging (report_to=tensorboard|wandb), `aha report`, and the model cards.

TensorBoard's own reader (EventAccumulator) reads the event files back into the values of
metrics.jsonl; W&B runs offline and its run file holds the same values; every saved model dir
carries a model card that transformers ignores; `aha run`'s card names its pass@1 before and after.

Run: python -m pytest tests/test_dashboards.py -q        (about a minute on 2 cores)
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aha.cli import main
from aha.infra.card import read_card, summary
from aha.infra.errors import AhaError
from aha.infra.trackers import parse_report_to

SMALL = ["eval_problems=4", "eval_k=2", "prompts_per_step=2", "group_size=4", "max_new_tokens=16", "checkpoint_every=0"]


def aha(*args, env=None):
    return subprocess.run([sys.executable, "-m", "aha", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tb_run(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tb") / "run"
    result = aha("train", "--model", str(tiny_model_dir), "--steps", "3", "--out", str(out), *SMALL,
                 "eval_every=2", "report_to=tensorboard")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_tensorboard_reads_back_metrics_jsonl(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    history = lines(tb_run / "metrics.jsonl")
    compared = 0
    for record in history:
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            logged = {e.step: e.value for e in events.Scalars(f"train/{key}")}
            assert logged[record["step"]] == pytest.approx(float(value), rel=1e-6, abs=1e-12), key   # float32 on disk
            compared += 1
    assert compared >= 3 * 15                               # reward components, pass rate, lengths, loss, times, …
    assert {e.step: e.value for e in events.Scalars("eval/pass@1")} == {2: pytest.approx(history[1]["eval_pass@1"])}


def test_model_cards_in_the_model_and_its_checkpoints(tb_run, tiny_model_dir):
    for model_dir in (tb_run / "model", tb_run / "checkpoints" / "step-3" / "model"):
        record = read_card(model_dir)
        assert record["steps"] == 3 and record["task"] == "addition" and record["method"] == "grpo"
        assert record["base_model"] == str(tiny_model_dir) and record["seed"] == 0
        assert record["hyperparameters"]["group_size"] == 4 and record["aha_version"]
        assert record["command"].startswith("aha train --model ") and "report_to=tensorboard" in record["command"]
        assert record["evals"] == [{"step": 2, "pass@1": lines(tb_run / "metrics.jsonl")[1]["eval_pass@1"]}]
        assert summary(model_dir) == record["summary"]
    assert read_card(tb_run / "checkpoints" / "step-0" / "model")["steps"] == 0     # written before any step


def test_transformers_loads_a_carded_dir_unchanged(tb_run, tmp_path):
    model_dir = tb_run / "model"
    text = (model_dir / "README.md").read_text()
    assert text.startswith("---\n") and "library_name: transformers" in text and "\n# grpo on addition" in text
    carded = AutoModelForCausalLM.from_pretrained(model_dir)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name != "README.md":
            (bare / f.name).write_bytes(f.read_bytes())
    plain = AutoModelForCausalLM.from_pretrained(bare)
    assert all(torch.equal(a, b) for a, b in zip(carded.state_dict().values(), plain.state_dict().values()))
    assert (
        AutoTokenizer.from_pretrained(model_dir)("12+3")["input_ids"]
        == AutoTokenizer.from_pretrained(bare)("12+3")["input_ids"]
    )


def test_aha_report_redraws_a_running_run(tb_run, tmp_path, capsys):
    running = tmp_path / "running"
    running.mkdir()
    text = (tb_run / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(text[:2]) + "\n" + text[2][:30])   # a line being written
    (running / "config.yaml").write_text((tb_run / "config.yaml").read_text())
    assert main(["report", str(running)]) == 0
    report = (running / "report.md").read_text()
    assert "2 of 3 steps logged" in report and "| 2 | " in report
    assert (running / "curves.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "metrics.jsonl" in stderr


def test_aha_run_card_names_pass1_before_and_after(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = aha("run", "--model", str(tiny_model_dir), "--steps", "2", "--out", str(out), *SMALL, "eval_every=0")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    record = read_card(out / "model")
    assert (record["pass1_before"], record["pass1_after"]) == (report["before_pass1"], report["after_pass1"])
    assert f"held-out pass@1 {report['before_pass1']:.3f} → {report['after_pass1']:.3f}" in record["summary"]
    text = (out / "model" / "README.md").read_text()
    assert "name: pass@1 before" in text and "name: pass@1 after" in text      # the model-index
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "qwen2"
    # report.md is redrawn from report.json alone, the same as aha run wrote it
    first = (out / "report.md").read_text()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == first


def test_wandb_runs_offline_and_logs_the_metrics(tiny_model_dir, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "WANDB_DIR": ""}
    env = {k: v for k, v in os.environ.items() if k not in env} | {"HOME": str(tmp_path)}   # no login, no settings
    result = subprocess.run([sys.executable, "-m", "aha", "train", "--model", str(tiny_model_dir), "--steps", "2",
                             "--out", str(out), *SMALL, "eval_every=0", "report_to=wandb"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1                                   # offline by default: nothing sent anywhere
    data = runs[0].read_bytes()
    for record in lines(out / "metrics.jsonl"):             # W&B stores each value as JSON text
        for key in ("reward_mean", "response_tokens", "grad_norm"):
            assert f"train/{key}".encode() in data and json.dumps(record[key]).encode() in data


def test_report_to_names_are_checked(capsys):
    assert parse_report_to("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    with pytest.raises(AhaError, match="choose from tensorboard, wandb"):
        parse_report_to("mlflow")
    assert main(["train", "report_to=mlflow", "--steps", "1"]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "report_to names 'mlflow'" in stderr


def test_chat_and_serve_show_the_card_summary(tb_run):
    from aha.serve.chat import model_summary
    assert model_summary(str(tb_run)) == ": " + summary(tb_run / "model")
    assert model_summary(str(tb_run / "model")).startswith(": grpo on addition, 3 steps from ")
    assert model_summary("/nonexistent") == ""              # no card: nothing to show


def test_a_resumed_run_hides_what_the_crashed_one_logged_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aha.infra.trackers import open_trackers
    with open_trackers("tensorboard", tmp_path, {"seed": 0}) as crashed:
        for step in range(5):
            crashed.log_step({"step": step, "loss": float(step)})
    with open_trackers("tensorboard", tmp_path, {"seed": 0}, first_step=3) as resumed:     # from checkpoint step-3
        for step in (3, 4):
            resumed.log_step({"step": step, "loss": 10.0 + step})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 13.0),
        (4, 14.0),
    ]
