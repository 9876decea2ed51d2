"""Smoke runs of the real CLI, and bad input → one clear line, exit code 2."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM


def aha(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "aha", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


SMALL = ["eval_problems=8", "eval_k=2", "prompts_per_step=2", "group_size=4", "max_new_tokens=24", "eval_every=0"]


def test_train_smoke_writes_metrics_and_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = aha("train", "--model", str(tiny_model_dir), "--steps", "3", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    for key in ("reward_mean", "loss", "reward_accuracy", "reward_format", "pass_rate", "response_tokens",
                "zero_spread_frac", "truncation_rate", "entropy", "grad_norm", "time_generate", "time_update"):
        assert key in lines[0]
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "qwen2"
    assert (out / "config.yaml").is_file()


def test_run_smoke_writes_the_report(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = aha("run", "--model", str(tiny_model_dir), "--steps", "2", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("before_pass1", "after_pass1", "wall_seconds", "steps", "seed",
                "mean_response_tokens_first", "mean_response_tokens_last"):
        assert key in report
    assert report["steps"] == 2 and 0 <= report["after_pass1"] <= 1
    assert (out / "report.md").is_file() and (out / "curves.png").stat().st_size > 1000
    # aha eval RUN_DIR takes the run's settings from its config.yaml and reproduces its "after" figures
    evaluated = aha("eval", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert (result["pass@1"], result["think_rate"]) == (report["after_pass1"], report["after_think_rate"])
    assert (result["problems"], result["k"]) == (report["eval_problems"], report["eval_k"]) == (8, 2)
    # a non-empty --out is refused without --force, and nothing in it is touched
    again = aha("run", "--model", str(tiny_model_dir), "--steps", "2", "--out", str(out), *SMALL)
    assert again.returncode == 2 and "--force" in again.stderr
    assert json.loads((out / "report.json").read_text()) == report


@pytest.mark.parametrize("args, words", [
    (["train", "--bogus"], "unrecognized arguments"),
    (["train", "--steps", "many"], "invalid int value"),
    (["train", "--steps", "0"], "steps=0 must be at least 1"),
    (["train", "lr=fast"], "lr expects float"),
    (["train", "learning_rate=1e-5"], "did you mean 'lr'"),
    (["train", "--algo", "ppo2"], "unknown algo"),
    (["train", "--model", "/nonexistent/model"], "does not exist"),
    (["eval", "--model", "/nonexistent/model"], "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, tmp_path, capsys):
    """In-process, through main() (tests/test_bad_input.py checks a fresh interpreter prints the same)."""
    code, _, err = in_process([*args, "--out", str(tmp_path / "o")] if args[0] == "train" else args, capsys)
    assert code == 2
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert words in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `aha ARGS` run by main() in this process."""
    from aha.cli import main
    try:
        code = main(args)
    except SystemExit as exc:                     # argparse: --help, and its own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code or 0, captured.out, captured.err


def test_unreadable_model_dir(tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    result = aha("eval", "--model", str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_every_subcommand_has_help(capsys):
    from aha.cli import build_parser
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert {"run", "train", "eval", "pretrain", "plan", "bench", "import-model"} <= set(subcommands)
    for sub in subcommands:
        code, out, _ = in_process([sub, "--help"], capsys)
        assert code == 0 and "usage: aha " + sub in out, sub


def test_same_seed_gives_the_same_run(tiny_model_dir, tmp_path):
    def metrics(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = aha("train", "--model", str(tiny_model_dir), "--steps", "2", "--seed", "7", "--out", str(out), *SMALL)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(metrics(out))
    assert runs[0] == runs[1]
    other = tmp_path / "c"
    assert (
        aha(
            "train", "--model", str(tiny_model_dir), "--steps", "2", "--seed", "8", "--out", str(other), *SMALL
        ).returncode
        == 0
    )
    assert metrics(other) != runs[0]
