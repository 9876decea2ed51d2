"""R1's four-stage pipeline (aha/stages/pipeline.py) and the distill-vs-rl experiment (aha/stages/experiment.py)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from aha.infra.base import SHIPPED
from aha.infra.errors import AhaError
from aha.infra.model import model_flops
from aha.stages.experiment import TokenCounter, aggregate, matched_sft_rows, mean_std, sft_budget_tokens
from aha.stages.pipeline import QUICK, PipelineConfig, load_pipeline_config, pipeline
from aha.tasks import get_task

ROOT = Path(__file__).parent.parent


def write(tmp_path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_stage_sizes_and_rl_keys_reach_aha_train(tmp_path):
    cfg = load_pipeline_config(
        write(tmp_path, "rl_steps: 7\nsample_k: 3\nsft_lr: 1e-3\nrl: {algo: dapo, lr: 5.0e-5}\n"),
        {"final_rl_steps": "5"},
    )
    assert (cfg.rl_steps, cfg.final_rl_steps, cfg.sample_k, cfg.sft_lr) == (7, 5, 3, 1e-3)
    rl = cfg.rl_config(cfg.final_rl_steps, "/tmp/x", "/m")
    assert (rl.steps, rl.lr, rl.algo, rl.clip_high, rl.eval_every, rl.model) == (5, 5e-5, "dapo", 0.28, 0, "/m")
    assert (rl.eval_problems, rl.eval_k, rl.max_new_tokens, rl.seed) == (200, 4, 64, 0)


def test_quick_recipe_is_quick():
    recipe = load_pipeline_config(str(ROOT / "recipes" / "pipeline_quick.yaml"))
    assert recipe == load_pipeline_config(quick=True)
    assert {key: getattr(recipe, key) for key in QUICK} == QUICK


@pytest.mark.parametrize("text, words", [
    ("rl_step: 3\n", "unknown config key 'rl_step'; did you mean 'rl_steps'?"),
    ("rl_steps: many\n", "rl_steps expects int, got 'many'"),
    ("rl: {lrr: 1}\n", "rl: unknown config key 'lrr'; did you mean 'lr'?"),
    ("rl: {lr: fast}\n", "lr expects float"),
    ("rl: {steps: 3}\n", "rl: sets steps; set it at the top level"),
    ("rl: 3\n", "rl expects a mapping"),
    ("sample_k: 0\n", "sample_k=0 must be at least 1"),
    ("cold_start_data: /nonexistent.jsonl\n", "cold_start_data='/nonexistent.jsonl' does not exist"),
    ("- a\n", "must be a mapping"),
])
def test_config_errors_name_the_key(tmp_path, text, words):
    with pytest.raises(AhaError, match=words.replace("?", r"\?").replace("{", r"\{")):
        load_pipeline_config(write(tmp_path, text))


def test_cli_bad_key_is_one_line_exit_2(tmp_path, capsys):
    from aha.cli import main
    assert main(["pipeline", "--config", write(tmp_path, "eval_problem: 3\n"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'eval_problems'?" in err[0]
    assert not (tmp_path / "o").exists()


def test_pipeline_runs_the_four_stages(tmp_path):
    out = tmp_path / "pipe"
    cfg = PipelineConfig(
        out=str(out),
        model=str(SHIPPED),
        cold_start_examples=6,
        cold_start_epochs=1,
        sft_epochs=1,
        sft_lr=1e-3,
        sft_batch_tokens=512,
        rl_steps=2,
        final_rl_steps=2,
        rl={"prompts_per_step": 2, "group_size": 4},
        sample_prompts=8,
        sample_k=2,
        eval_problems=6,
        eval_k=2,
    ).validate()
    pipeline(cfg)
    report = json.loads((out / "pipeline.json").read_text())
    stages = report["stages"]
    assert [s["stage"] for s in stages] == ["base", "cold_start", "reasoning_rl", "rejection_sft", "final_rl"]
    assert [Path(s["folder"]).name for s in stages] == [
        "0_base",
        "1_cold_start",
        "2_reasoning_rl",
        "3_rejection_sft",
        "4_final_rl",
    ]
    for s in stages:
        assert 0.0 <= s["pass@1"] <= 1.0 and s["wall_seconds"] >= 0 and s["mean_response_tokens"] > 0
        assert json.loads((Path(s["folder"]) / "eval.json").read_text())["pass@1"] == s["pass@1"]
        if s["stage"] != "base":
            assert AutoModelForCausalLM.from_pretrained(s["model"]).config.model_type == "gpt2"
    # (1) the cold start is the task's own worked solutions: right, reasoned, from training problems
    task = get_task("addition")
    cold = [json.loads(x) for x in (out / "1_cold_start" / "sft_data.jsonl").read_text().splitlines()]
    assert len(cold) == 6 and all(r["response"].startswith(" <think>") for r in cold)
    # (2) and (4): RL ran its steps; (3): SFT of the BASE model on the kept samples plus the cold start
    for folder in ("2_reasoning_rl", "4_final_rl"):
        assert len((out / folder / "metrics.jsonl").read_text().splitlines()) == 2
    kept = (out / "3_rejection_sft" / "samples.jsonl").read_text().splitlines()
    sft = json.loads((out / "3_rejection_sft" / "model" / "sft.json").read_text())
    assert sft["base_model"] == str(SHIPPED) and sft["examples"] == len(kept) + 6
    assert stages[3]["details"]["sample"]["kept"] == len(kept) > 0
    for row in map(json.loads, kept):
        assert row["accuracy"] == 1.0 and row["model"].endswith("2_reasoning_rl/model")
    table = (out / "pipeline.md").read_text()
    assert table.count("\n| ") == 1 + 5 and f"| {stages[4]['pass@1']:.3f} |" in table
    assert task.score(cold[0]["response"], next(task.train_problems(cfg.seed + 7_777)))["accuracy"] == 1.0


# --- distill vs RL: compute matching and aggregation, by hand ---

def test_flops_and_the_matched_sft_budget():
    assert model_flops(1000, forward_tokens=300, trained_tokens=100) == 2 * 1000 * 300 + 6 * 1000 * 100 == 1_200_000
    budget = sft_budget_tokens(forward_tokens=300, train_tokens=100)        # 300/3 + 100
    assert budget == 200 and model_flops(1000, 0, budget) == 1_200_000
    # rows of 50 and 70 tokens, cycled: 50, 120, 170 — adding 70 more (240) would land farther from 200
    assert matched_sft_rows([50, 70], 200) == [0, 1, 0]
    assert matched_sft_rows([10, 20, 30], 75) == [0, 1, 2, 0]           # 70: a second epoch, begun
    assert matched_sft_rows([10, 20, 30], 81) == [0, 1, 2, 0, 1]        # 90 is nearer to 81 than 70 is
    assert matched_sft_rows([100], 1) == [0]                            # never empty
    with pytest.raises(AhaError, match="nothing to distill"):
        matched_sft_rows([], 10)


def test_token_counter_counts_real_tokens_forward_and_trained(tiny_model_dir):
    from aha.core.rollout import generate
    from aha.core.sampling import SamplingParams
    from aha.infra.model import load_model
    model, tokenizer = load_model(tiny_model_dir)
    counter = TokenCounter(model)
    prompts = [[10, 11, 12], [13, 14, 15, 16, 17]]                       # 8 prompt tokens, left-padded to 5
    rollout = generate(model.eval(), prompts, 2, SamplingParams(6, 1.0, 1.0, 0, (tokenizer.eos_token_id,)),
                       tokenizer.pad_token_id, seed=0)
    # each prompt's prefill once, then every sampled token but each row's last is fed back
    generated = 8 + int((rollout.lengths - 1).sum())
    assert counter.forward_tokens == generated and counter.train_tokens == 0
    # a forward with gradients: the real tokens of a left-padded batch (3 + 5), then a cached step
    # whose mask covers 6 past positions but whose input is 1 token per row (2)
    ids = torch.tensor([[0, 0, 10, 11, 12], [13, 14, 15, 16, 17]])
    model.train()(input_ids=ids, attention_mask=(ids > 0).long())
    counter._count(model, (), {"input_ids": ids[:, :1], "attention_mask": torch.ones(2, 6, dtype=torch.long)})
    assert counter.train_tokens == 8 + 2 and counter.forward_tokens == generated
    counter.close()
    with torch.no_grad():
        model(input_ids=ids)
    assert counter.forward_tokens == generated                            # the hook is gone


def test_mean_std_over_seeds_by_hand():
    assert mean_std([0.5, 0.7, 0.9]) == (0.7, 0.2)
    assert mean_std([0.25]) == (0.25, 0.0)
    per_seed = [{"seed": 0, "teacher": {"pass@1": 0.9, "think_rate": 1.0, "mean_response_tokens": 37.0},
                 "distill@10": {"pass@1": 0.8, "think_rate": 1.0, "mean_response_tokens": 36.0, "student_flops": 100},
                 "rl@10": {"pass@1": 0.4, "think_rate": 0.5, "mean_response_tokens": 20.0, "student_flops": 110}},
                {"seed": 1, "teacher": {"pass@1": 0.9, "think_rate": 1.0, "mean_response_tokens": 37.0},
                 "distill@10": {"pass@1": 0.6, "think_rate": 1.0, "mean_response_tokens": 36.0, "student_flops": 120},
                 "rl@10": {"pass@1": 0.8, "think_rate": 0.9, "mean_response_tokens": 30.0, "student_flops": 90}}]
    summary = aggregate(per_seed)
    assert list(summary) == ["teacher", "distill@10", "rl@10"]
    assert summary["distill@10"]["pass@1"] == pytest.approx([0.7, 0.1414213562], abs=1e-9)    # std: √(2·0.1²/1)
    assert summary["rl@10"]["pass@1"] == pytest.approx([0.6, 0.2828427125], abs=1e-9)
    assert summary["rl@10"]["think_rate"] == pytest.approx([0.7, 0.2828427125], abs=1e-9)
    assert summary["rl@10"]["student_flops"] == pytest.approx([100.0, 14.1421356237], abs=1e-9)
    assert summary["teacher"]["pass@1"] == [0.9, 0.0] and "student_flops" not in summary["teacher"]


def test_experiment_quick_end_to_end(tmp_path, capsys):
    from aha.cli import main
    out = tmp_path / "dvr"
    assert main(["experiment", "distill-vs-rl", "--quick", "--seeds", "1", "--out", str(out),
                 "student_pretrain_steps=10", "student_rl_steps=2,3"]) == 0
    report = json.loads((out / "experiment.json").read_text())
    seed = report["seeds"][0]
    assert list(report["summary"]) == ["teacher", "student_base", "distill@2", "rl@2", "distill@3", "rl@3"]
    for steps in (2, 3):
        rl, distill = seed[f"rl@{steps}"], seed[f"distill@{steps}"]
        assert rl["rl_steps"] == steps and rl["forward_tokens"] > 0
        # equal student compute, to within one SFT example (at most ~60 tokens here)
        assert abs(distill["train_tokens"] - sft_budget_tokens(rl["forward_tokens"], rl["train_tokens"])) <= 60
        assert distill["student_flops"] == 6 * report["student_parameters"] * distill["train_tokens"]
        assert (
            len((out / "seed0" / f"distill_{steps}" / "sft_data.jsonl").read_text().splitlines())
            == distill["sft_examples"]
        )
    assert seed["rl@3"]["student_flops"] > seed["rl@2"]["student_flops"]
    assert report["student_parameters"] < report["teacher_parameters"]
    for arm, metrics in report["summary"].items():
        assert metrics["pass@1"] == [seed[arm]["pass@1"], 0.0] and 0.0 <= seed[arm]["pass@1"] <= 1.0
    table = (out / "experiment.md").read_text()
    assert table.count("\n| ") == 1 + 6 and table in capsys.readouterr().out
    assert main(["experiment", "distill-vs-rl", "--quick", "--out", str(out)]) == 2      # not empty, no --force
    assert "not empty" in capsys.readouterr().err


def test_experiment_keys_are_typed_and_checked():
    from aha.infra.reader import apply_values
    from aha.stages.experiment import ExperimentConfig
    cfg = apply_values(ExperimentConfig(), {"student_rl_steps": "20,60", "sft_lr": "5e-4"}, "command line")
    assert cfg.student_rl_steps == (20, 60) and cfg.sft_lr == 5e-4
    assert apply_values(ExperimentConfig(), {"student_rl_steps": [7]}, "f.yaml").student_rl_steps == (7,)
    with pytest.raises(AhaError, match="student_rl_steps expects int, got 'x'"):
        apply_values(ExperimentConfig(), {"student_rl_steps": "20,x"}, "command line")
    with pytest.raises(AhaError, match=r"unknown config key 'teacher_step'; did you mean 'teacher_steps'\?"):
        apply_values(ExperimentConfig(), {"teacher_step": 3}, "command line")


def test_cold_start_data_from_a_file_or_the_task(tmp_path):
    from aha.stages.pipeline import cold_start_rows
    data = tmp_path / "cold.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "response": f" <think>r{i}</think> <answer>{i}</answer>"}) + "\n"
            for i in range(5)
        )
    )
    countdown = get_task("countdown")
    rows = cold_start_rows(countdown, countdown, PipelineConfig(cold_start_data=str(data), cold_start_examples=3))
    assert [r["prompt"] for r in rows] == ["q0", "q1", "q2"]
    with pytest.raises(AhaError, match="give cold_start_data"):
        cold_start_rows(countdown, countdown, PipelineConfig(task="countdown"))
