"""bench/gpu_check.py, the GPU runbook, rehearsed on CPU: every phase's code path with tiny models,
on a Python where only torch and transformers (and what they need) can be imported; a failed or
timed-out phase is recorded and the next one runs; the update's FLOP count by hand; the vLLM
phase against the fake vLLM of tests/fake_vllm.py, the TRL phase against TRL itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_phases  # noqa: E402

# what the offline GPU box lacks: everything aha may use beyond torch, transformers and their own needs
ABSENT = ("trl", "vllm", "psutil", "rich", "matplotlib", "datasets", "peft", "accelerate", "fastapi", "uvicorn",
          "openai", "math_verify", "reasoning_gym", "hypothesis", "py3langid", "pandas", "pyarrow")


def run_check(tmp_path, *args, absent=ABSENT, timeout=600):
    """bench/gpu_check.py in a fresh Python whose sitecustomize makes `absent` unimportable (as
    if not installed: `import` fails and importlib.util.find_spec returns None)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {list(absent)!r}:\n    sys.modules[name] = None\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{site}:{ROOT}"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--scratch",
                           str(tmp_path / "scratch"), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    return done, report


def test_the_cpu_rehearsal_runs_every_phase_with_torch_and_transformers_alone(tmp_path):
    done, report = run_check(tmp_path, "--device", "cpu", "--tiny", "--inline")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    phases = report["phases"]
    assert list(phases) == ["device", "matmul", "engine_0.5b", "rl_0.5b", "engine_1.5b", "rl_1.5b", "vllm", "trl"]
    assert len(lines) == len(phases) + 1                          # one line per phase, one closing line
    assert {name: p["status"] for name, p in phases.items()} == {**dict.fromkeys(phases, "ok"),
                                                                 "vllm": "skipped", "trl": "skipped"}
    assert "vLLM is not installed" in phases["vllm"]["why"] and "trl and datasets not installed" in phases["trl"]["why"]
    assert [line.split()[1] for line in lines if " skipped: " in line] == ["vllm", "trl"]
    facts = phases["device"]["facts"]
    assert (
        facts["optional"]["vllm"] is None and facts["optional"]["rich"] is None and facts["torch"] == torch.__version__
    )
    assert phases["matmul"]["bf16_flops"] > 0 and phases["matmul"]["fp32_flops"] > 0
    for size in ("0.5b", "1.5b"):
        engine = phases[f"engine_{size}"]
        for rows in gpu_phases.TINY_SIZES.engine_rows:
            run = engine[f"torch_engine_rows_{rows}"]
            assert run["all_ran_to_the_limit"] and run["tokens"] == rows * gpu_phases.TINY_SIZES.engine_tokens
        for setting in ("t1", "t0.7_p0.9"):                    # the torch engine's log-probs are the trainer's (fp32)
            gap = engine[f"torch_engine_logp_gap_{setting}"]
            assert gap["tokens"] > 0 and gap["mean"] < 1e-4 and gap["max"] < 1e-3
        rl = phases[f"rl_{size}"]
        steps = rl["rl_steps"]
        assert len(steps) == 1 + gpu_phases.TINY_SIZES.rl_steps
        assert all(s["trained_rows"] == 8 and s["update_mfu"] > 0 and s["update_s"] > 0 for s in steps)
        assert rl["rl_mean"]["step_s"] > 0 and "peak_bytes" in rl["rl_plan"]


def test_a_failed_phase_does_not_stop_the_next_and_a_timeout_is_recorded(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda would not fail")
    done, report = run_check(tmp_path, "--device", "cuda", "--only", "device,matmul", absent=())
    assert done.returncode == 1
    for name in ("device", "matmul"):
        assert report["phases"][name]["status"] == "failed"
        assert "sees no CUDA GPU" in report["phases"][name]["log_tail"]
    assert "2 phases" in done.stdout and "2 failed" in done.stdout
    done, report = run_check(tmp_path, "--device", "cpu", "--only", "device", "--phase-timeout", "0.3", absent=())
    assert report["phases"]["device"]["status"] == "timeout" and done.returncode == 1


def test_update_flops_by_hand():
    # prompt 4 once: 2·100·4 + 4·2·8·(4·5/2); completions 2 and 3 on it: (2·100 + 2·16·50)·c + 4·2·8·(4c + c(c+1)/2)
    prompt = 2 * 100 * 4 + 4 * 2 * 8 * 10
    rows = sum((2 * 100 + 2 * 16 * 50) * c + 4 * 2 * 8 * (4 * c + c * (c + 1) / 2) for c in (2, 3))
    assert gpu_phases.update_flops(100, 2, 8, 16, 50, [(4, [2, 3])]) == 3 * (prompt + rows)


def test_rollout_flops_counts_each_groups_prompt_once():
    from aha.core.rollout import Rollout
    from aha.infra.model import build_model
    from aha.infra.tokenizer import build_char_tokenizer
    model = build_model("qwen2", build_char_tokenizer(), seed=0, hidden=32, layers=2)
    c = model.config
    rollout = Rollout(
        prompt_ids=torch.zeros(4, 3, dtype=torch.long),
        prompt_mask=torch.tensor([[0, 1, 1]] * 2 + [[1, 1, 1]] * 2),
        completion_ids=torch.zeros(4, 2, dtype=torch.long),
        completion_mask=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]),
        logprobs=torch.zeros(4, 2),
        truncated=torch.zeros(4, dtype=torch.bool),
        group_size=2,
    )
    body = sum(
        p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name
    )
    args = (body, c.num_hidden_layers, c.hidden_size, c.hidden_size, c.vocab_size)
    assert gpu_phases.rollout_flops(model, rollout, torch.tensor([0, 1, 3])) == \
        gpu_phases.update_flops(*args, [(2, [2, 1]), (3, [2])])


def tiny_ctx(tmp_path, name):
    return gpu_phases.Ctx(device="cpu", tiny=True, scratch=tmp_path, part=gpu_phases.Part(tmp_path / f"{name}.json"),
                          peak_flops=1e9)


def test_the_vllm_phase_against_the_fake_vllm(tmp_path, monkeypatch):
    import fake_vllm
    import gpu_optional
    fake = fake_vllm.install(monkeypatch)
    ctx = tiny_ctx(tmp_path, "vllm")
    gpu_optional.phase_vllm(ctx)
    data = json.loads(ctx.part.path.read_text())
    for rows in gpu_phases.TINY_SIZES.engine_rows:
        run = data[f"vllm_rows_{rows}"]
        assert run["all_ran_to_the_limit"] and run["generate_tokens_per_s"] > 0
        assert {"vllm_sync_s", "vllm_sleep_s", "sampler_check_s", "sampler_logp_gap_mean"} <= set(run)
    assert data["vllm_logp_gap_t1"]["tokens"] > 0 and data["vllm_logp_gap_t0.7_p0.9"]["mean"] > 0
    steps = data["rl_vllm_steps"]
    assert len(steps) == 1 + gpu_phases.TINY_SIZES.rl_steps and all("sampler_logp_gap_max" in s for s in steps)
    llm = [c for c in fake.calls if c[0] == "LLM"][0][1]
    assert llm["model"] == str(tmp_path / "vllm_model") and (tmp_path / "vllm_model" / "config.json").is_file()
    sampled = [kw for c in fake.calls if c[0] == "generate" for kw in c[2]]
    assert all(kw["ignore_eos"] and kw["stop_token_ids"] == [] for kw in sampled)     # no early stop


def test_the_trl_phase_with_trl(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import gpu_optional
    ctx = tiny_ctx(tmp_path, "trl")
    gpu_optional.phase_trl(ctx)
    data = json.loads(ctx.part.path.read_text())
    assert len(data["trl_steps"]) == 2 and data["trl_mean"]["seconds"] > 0
    assert all(s["generated_tokens"] > 0 for s in data["trl_steps"])


def test_aha_plans_prediction_is_recorded_and_its_budgets_used():
    """The runbook records aha plan's prediction for its RL work and runs the steps with the micro-batch
    budget and rollout rows the plan chose (as `aha train` does)."""
    from transformers import Qwen2Config

    from aha.core.plan import ModelShape, count_parameters_of, memory_plan
    from aha.infra.config import Config
    config = Qwen2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128)
    cfg = Config(group_size=4, prompts_per_step=2, max_new_tokens=16)
    facts, tokens, rows = gpu_phases.plan_prediction(cfg, config, 8, "cpu")
    expected = memory_plan(cfg, ModelShape.of(config, count_parameters_of(config)), 8,
                           process_bytes=facts["process"], device_bytes=facts["device_bytes"], gpu=False)
    assert (
        facts["peak_bytes"] == expected.peak and tokens == expected.micro_batch_tokens and rows == expected.rollout_rows
    )
