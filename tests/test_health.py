"""The health monitor: every warning is provoked, once; and an end-to-end run where no group
has a reward spread says so on the console (stderr)."""

import json
import subprocess
import sys

import pytest

from aha.core.health import HealthMonitor


def healthy(step: int, **changes) -> dict:
    record = {"step": step, "reward_mean": 0.1 * step, "zero_spread_frac": 0.5, "truncation_rate": 0.0,
              "entropy": 1.0, "pass_rate": 0.5, "kl": None, "skipped_update": False}
    return {**record, **changes}


def feed(monitor: HealthMonitor, records: list[dict]) -> list[list[str]]:
    return [monitor.update(r) for r in records]


def test_healthy_run_never_warns():
    assert feed(HealthMonitor(window=3), [healthy(i) for i in range(20)]) == [[]] * 20


def test_zero_spread_warns_after_the_window_once_and_again_after_recovery():
    records = [healthy(i, zero_spread_frac=1.0) for i in range(5)] + [healthy(5)] + \
              [healthy(i, zero_spread_frac=1.0) for i in range(6, 9)]
    warnings = feed(HealthMonitor(window=3), records)
    fired = [i for i, w in enumerate(warnings) if any("zero reward spread" in x for x in w)]
    assert fired == [2, 8]


@pytest.mark.parametrize("changes, words", [
    ({"truncation_rate": 0.8}, "hit max_new_tokens"),
    ({"entropy": 0.001}, "entropy fell below"),
])
def test_windowed_symptoms_warn_only_after_the_window(changes, words):
    warnings = feed(HealthMonitor(window=3), [healthy(i, **changes) for i in range(4)])
    assert [any(words in x for x in w) for w in warnings] == [False, False, True, False]


def test_entropy_collapse_is_fine_once_the_task_is_solved():
    warnings = feed(HealthMonitor(window=3), [healthy(i, entropy=0.001, pass_rate=1.0) for i in range(5)])
    assert warnings == [[]] * 5


def test_flat_reward_needs_three_windows():
    warnings = feed(HealthMonitor(window=2), [healthy(i, reward_mean=0.25) for i in range(7)])
    fired = [i for i, w in enumerate(warnings) if any("has not moved for 6 steps" in x for x in w)]
    assert fired == [5]


@pytest.mark.parametrize("changes, words", [
    ({"kl": 2.5}, "KL to the reference jumped to 2.500"),
    ({"skipped_update": True}, "NaN/inf"),
])
def test_immediate_symptoms_warn_on_the_step(changes, words):
    warnings = feed(HealthMonitor(window=3), [healthy(0), healthy(1, **changes), healthy(2)])
    assert [any(words in x for x in w) for w in warnings] == [False, True, False]


def test_a_run_where_every_group_ties_warns_on_the_console(tiny_model_dir, tmp_path):
    (tmp_path / "tie_reward.py").write_text(
        "def reward(prompts, completions, **columns):\n    return [0.5 for _ in completions]\n")
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(40)))
    result = subprocess.run(
        [sys.executable, "-m", "aha", "train", "--model", str(tiny_model_dir), "--task", "py:tie_reward:reward",
         "--steps", "3", "--out", str(tmp_path / "run"), f"data={data}", "health_window=2",
         "prompts_per_step=2", "group_size=4", "max_new_tokens=8", "eval_every=0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning (step 1): every group had zero reward spread for 2 steps" in " ".join(result.stderr.split())
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["zero_spread_frac"] for r in records] == [1.0, 1.0, 1.0]
    assert [r["trained_rows"] for r in records] == [0, 0, 0]
