"""`aha experiment length-bias` and `aha experiment entropy` (aha/stages/findings.py): the summary over
seeds by hand, and one tiny end-to-end run of each through the CLI.

Run: python -m pytest tests/test_findings.py -q
"""

import json

import pytest

from aha.cli import main
from aha.infra.errors import AhaError
from aha.stages.findings import FINDINGS, FindingConfig, markdown, padded_base, run_finding, summarise


def test_summary_is_mean_and_std_of_window_means_over_seeds():
    per_seed = [
        {
            "seed": 0,
            "arms": {"grpo": {"curves": {"entropy": [1.0, 0.8, 0.4, 0.2]}, "evals": [{"step": 4, "pass@1": 0.5}]}},
        },
        {
            "seed": 1,
            "arms": {"grpo": {"curves": {"entropy": [0.8, None, 0.6, 0.4]}, "evals": [{"step": 4, "pass@1": 0.7}]}},
        },
    ]
    summary = summarise(per_seed, window=2)["grpo"]
    # first 2 present values: (1.0 + 0.8)/2 = 0.9 and (0.8 + 0.6)/2 = 0.7 → 0.8 ± √((0.1² + 0.1²)/1)
    assert summary["entropy"]["first"] == pytest.approx([0.8, 0.1414213562], abs=1e-9)
    assert summary["entropy"]["last"] == pytest.approx([0.4, 0.1414213562], abs=1e-9)       # 0.3 and 0.5
    assert summary["final_pass@1"] == pytest.approx([0.6, 0.1414213562], abs=1e-9)


def tiny(name, out):
    return ["experiment", name, "--quick", "--seeds", "1", "--out", str(out), "steps=2", "eval_problems=2",
            "rl={prompts_per_step: 2, group_size: 2, max_new_tokens: 40}"]


def test_entropy_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "entropy"
    assert main(tiny("entropy", out)) == 0
    report = json.loads((out / "experiment.json").read_text())
    arms = report["seeds"][0]["arms"]
    assert list(arms) == ["grpo", "clip_higher", "clip_cov"]
    for arm in arms.values():
        assert len(arm["curves"]["entropy"]) == 2 and arm["evals"][-1]["step"] == 2
    config = lambda arm: (out / "seed0" / arm / "config.yaml").read_text()
    assert (
        "mu: 2" in config("grpo")
        and "clip_high: 0.28" in config("clip_higher")
        and "surrogate: clip_cov" in config("clip_cov")
    )
    table = (out / "experiment.md").read_text()
    assert table.count("\n| ") == 1 + 3 and table in capsys.readouterr().out
    assert (out / "curves.png").stat().st_size > 1000


def test_length_bias_on_the_padded_model(tmp_path):
    out = tmp_path / "length"
    assert main(tiny("length-bias", out)) == 0
    report = json.loads((out / "experiment.json").read_text())
    assert list(report["summary"]) == ["grpo", "dr_grpo"]
    assert "padded_n16_p4" in report["settings"]["model"] and report["settings"]["dump_rollouts_every"] == 1
    curves = report["seeds"][0]["arms"]["grpo"]["curves"]
    assert len(curves["padding_wrong"]) == 2 and len(curves["response_tokens_wrong"]) == 2
    assert (out / "cache").is_dir() and (out / "curves.png").is_file()
    cached = next((out / "cache").iterdir())
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert padded_base(FindingConfig(pad_examples=16), out / "cache") == cached     # made once, then reused
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_padding_changes_neither_score_nor_format():
    from aha.stages.findings import answer_padding
    from aha.tasks.addition import AdditionTask
    task = AdditionTask()
    problem = next(task.train_problems(0))
    for think in (True, False):
        plain = task.corpus_document(problem, think)
        padded = task.corpus_document(problem, think, padding=3)
        assert padded == plain.replace("</answer>", "   </answer>") and answer_padding(padded) == 3
        response = padded[len(task.prompt(problem)):]
        assert task.score(response, problem) == task.score(plain[len(task.prompt(problem)):], problem)
        assert task.score(response, problem)["format"] == 1.0


def test_bad_finding_config(tmp_path):
    with pytest.raises(AhaError, match="base='big' is not one of padded, builtin"):
        run_finding("length-bias", FindingConfig(out=str(tmp_path / "x"), base="big"))
    assert not (tmp_path / "x").exists()
    assert markdown({"seeds": [{}], "config": {"window": 1, "steps": 1}, "summary": {}, "experiment": "entropy"},
                    FINDINGS["entropy"]).count("|---|") == 1


def test_tool_call_curve_counts_calls_of_either_format(tmp_path):
    from aha.stages.findings import tool_call_curve
    rows = [{"step": 0, "completion": " <think><tool>12*34</tool><output>408</output></think> <answer>408</answer>"},
            {"step": 0, "completion": " <think>12*4=48, 12*30=360</think> <answer>408</answer>"},
            {"step": 1, "completion": '<tool_call>{"name": "python"}</tool_call>'},
            {"step": 1, "completion": " <answer>408</answer>"}, {"step": 1, "completion": "<tool>1</tool>"}]
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tool_call_curve(tmp_path, 3) == {"tool_call_rate": [0.5, 2 / 3, None]}


def test_summary_of_evals_before_and_after():
    run = lambda before, after, tools: {"curves": {}, "evals": [{"step": 0, "pass@1": before, **tools},
                                                                 {"step": 5, "pass@1": after, **tools}]}
    per_seed = [{"arms": {"tools": run(0.1, 0.5, {"tool_use_rate": 0.2}), "no_tools": run(0.1, 0.2, {})}},
                {"arms": {"tools": run(0.3, 0.7, {"tool_use_rate": 0.4}), "no_tools": run(0.1, 0.2, {})}}]
    summary = summarise(per_seed, window=1)
    assert (
        summary["tools"]["before_pass@1"] == pytest.approx([0.2, 0.1414213562])
        and summary["tools"]["final_pass@1"][0] == 0.6
    )
    assert summary["tools"]["before_tool_use_rate"] == pytest.approx([0.3, 0.1414213562])
    assert summary["no_tools"]["final_pass@1"] == [0.2, 0.0] and "final_tool_use_rate" not in summary["no_tools"]
    row = markdown({"seeds": per_seed, "config": {"window": 1, "steps": 5}, "summary": summary, "experiment": "tools"},
                   FINDINGS["tools"]).splitlines()[-1]
    assert row.endswith("| 0.100 ± 0.000 → 0.200 ± 0.000 | – → – |")


def test_tools_quick_end_to_end(tmp_path):
    out = tmp_path / "tools"
    assert main(tiny("tools", out)) == 0
    report = json.loads((out / "experiment.json").read_text())
    arms = report["seeds"][0]["arms"]
    assert list(arms) == ["tools", "no_tools"] and report["settings"]["task"] == "multiplication"
    assert "tools: python" in (out / "seed0" / "tools" / "config.yaml").read_text()
    assert "tools: ''" in (out / "seed0" / "no_tools" / "config.yaml").read_text()
    for name, arm in arms.items():
        assert [e["step"] for e in arm["evals"]] == [0, 2] and len(arm["curves"]["tool_call_rate"]) == 2
        assert ("tool_use_rate" in arm["evals"][0]) == (name == "tools")     # through the arm's own loop
    assert (out / "cache" / "multiplication_d4_w0.6_t0.3_s3" / "config.json").is_file()
