"""The vLLM rollout backend (aha/core/vllm_rollout.py): what can be checked without a GPU — the parameter
mapping, the Rollout assembly, the one-line error — and, where CUDA and vLLM exist, vLLM against the
torch engine on the same weights (skipped here: this machine has neither)."""

import importlib.util
import os
import subprocess
import sys

import fake_vllm
import pytest
import torch

from aha.cli import main
from aha.core.sampling import SamplingParams
from aha.core.step import step_seed
from aha.core.vllm_rollout import require_vllm, rollout_sampler, sampling_kwargs, to_rollout
from aha.infra.config import Config
from aha.infra.errors import AhaError

HAS_GPU_VLLM = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def test_sampling_params_map_one_to_one():
    params = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=0.9, top_k=20, stop_token_ids=(2, 9))
    assert sampling_kwargs(params, group_size=8, seed=1234) == {
        "n": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 48, "stop_token_ids": [2, 9],
        "ignore_eos": True, "seed": 1234, "logprobs": 0, "detokenize": False}


def test_outputs_become_the_torch_engines_rollout():
    # 2 prompts × 2 samples; the stop token (9) stays in the completion, as in aha/core/rollout.py
    prompts = [[5, 6, 7], [8]]
    completions = [([1, 9], [-0.5, -0.25], False), ([3, 3, 3], [-1.0, -2.0, -3.0], True),
                   ([9], [-0.125], False), ([4, 9], [-0.75, -0.5], False)]
    rollout = to_rollout(prompts, completions, group_size=2, pad_id=0)
    assert rollout.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert rollout.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert rollout.completion_ids.tolist() == [[1, 9, 0], [3, 3, 3], [9, 0, 0], [4, 9, 0]]
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert rollout.logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0], [-0.125, 0.0, 0.0], [-0.75, -0.5, 0.0]]
    assert rollout.truncated.tolist() == [False, True, False, False]
    assert rollout.lengths.tolist() == [2, 3, 1, 2] and rollout.group_size == 2


def test_the_torch_engine_is_the_default():
    from aha.core.rollout import generate
    assert rollout_sampler(Config(), model=None) is generate


@pytest.mark.skipif(HAS_GPU_VLLM, reason="this machine can run vLLM")
def test_without_gpu_or_vllm_the_backend_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(AhaError, match=r"pip install 'aha\[gpu\]'"):
        require_vllm()
    out = tmp_path / "o"
    assert main(["train", "--rollout", "vllm", "--steps", "1", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aha train: error: rollout=vllm needs a CUDA GPU and vLLM"), lines
    assert "use rollout=torch" in lines[0] and not out.exists()


@pytest.mark.skipif(not HAS_GPU_VLLM, reason="needs a CUDA GPU and vLLM (pip install 'aha[gpu]')")
def test_vllm_samples_the_trainers_current_weights(tiny_model_dir):
    """vLLM's log-probs of its own samples equal the trainer's forward pass on them (bf16 rounding),
    also after the trainer's weights moved in place: the weight sync works."""
    from aha.core.logprobs import completion_logprobs
    from aha.infra.model import load_model
    model, tok = load_model(tiny_model_dir, "cuda", torch.bfloat16)
    engine = rollout_sampler(Config(rollout="vllm", vllm_gpu_memory=0.2), model)
    prompts = [tok("12+345=")["input_ids"], tok("7+8=")["input_ids"]]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    for _ in range(2):
        rollout = engine(model, prompts, 4, params, tok.pad_token_id, seed=0)
        assert rollout.completion_ids.shape[0] == 8 and rollout.prompt_ids.shape[0] == 8
        rows = torch.arange(8, device="cuda")
        with torch.no_grad():
            logp, _, mask = completion_logprobs(model, rollout, rows, 1.0)
        gap = ((logp - rollout.logprobs[:, :logp.shape[1]]).abs() * mask).sum() / mask.sum()
        assert gap < 0.05
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))      # the trainer moved: vLLM must follow


# ---- the colocated engine against a fake `vllm` that records its calls (tests/fake_vllm.py) ----



@pytest.fixture
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


@pytest.fixture
def tiny(tiny_model_dir):
    from aha.infra.model import load_model
    return load_model(tiny_model_dir, "cpu", torch.float32)


def engine_for(model, **overrides):
    return rollout_sampler(Config(rollout="vllm", **overrides), model)


def test_llm_gets_rendezvous_variables_and_the_environment_is_put_back(fake, tiny):
    """Item 1: external_launcher needs RANK … MASTER_PORT while LLM() runs; left set, a child
    `aha train rollout=vllm` would inherit this process's MASTER_PORT (held by its process group)."""
    engine_for(tiny[0])
    (name, kwargs, env), = [call for call in fake.calls if call[0] == "LLM"]
    assert env["RANK"] == "0" and env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert kwargs["distributed_executor_backend"] == "external_launcher" and kwargs["load_format"] == "dummy"
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["enable_sleep_mode"] is True
    assert not any(name in os.environ for name in fake_vllm.WATCHED_ENV)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MASTER_PORT'))"],
                           capture_output=True, text=True)
    assert child.stdout.strip() == "None"


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import fake_vllm
from aha.infra.config import Config
from aha.infra.model import load_model
from aha.core.vllm_rollout import rollout_sampler
fake_vllm.install(fake_vllm.Patch(), process_group=True, clear_env=False)
rollout_sampler(Config(rollout="vllm"), load_model({model!r})[0])
print("child engine up")
"""


@pytest.fixture
def group_fake(monkeypatch):
    fake = fake_vllm.install(monkeypatch, process_group=True)
    yield fake
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_a_child_rollout_vllm_run_starts_while_this_one_holds_its_port(group_fake, tiny, tiny_model_dir):
    """Item 1, end to end: this process's engine made its process group on MASTER_PORT (env://, as
    vLLM does); a child that started another engine with the inherited MASTER_PORT would fail with
    "address already in use"."""
    from pathlib import Path
    engine_for(tiny[0])
    assert torch.distributed.is_initialized()
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0 and "child engine up" in child.stdout, child.stderr[-2000:]


def test_prompt_sharing_stays_on_after_vllm_made_its_one_process_group(group_fake, tiny):
    """Item 4: vLLM's engine leaves a 1-process default group; that is not a distributed wrapper."""
    from aha.core.logprobs import can_share_prompts
    engine_for(tiny[0])
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    assert can_share_prompts(tiny[0])


def test_torchruns_own_variables_are_used_and_kept(fake, tiny, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29533")
    monkeypatch.setenv("RANK", "0")
    engine_for(tiny[0])
    env = [call for call in fake.calls if call[0] == "LLM"][0][2]
    assert env["MASTER_PORT"] == "29533"
    assert os.environ["MASTER_PORT"] == "29533" and os.environ["RANK"] == "0" and "WORLD_SIZE" not in os.environ


def row_seeds(fake) -> list[int]:
    """The seed of every sample vLLM drew: request seed + sample index (vLLM's ParentRequest)."""
    return [kw["seed"] + j for call in fake.calls if call[0] == "generate" for kw in call[2] for j in range(kw["n"])]


def test_no_two_rows_share_a_seed(fake, tiny):
    """Item 2: over two ranks' slices, two dynamic-sampling tries and two steps, every row has its own seed."""
    model, tok = tiny
    engine = engine_for(model)
    params = SamplingParams(max_new_tokens=3, stop_token_ids=(tok.eos_token_id,))
    prompts = [tok(f"{i}+{i}=")["input_ids"] for i in range(4)]
    group = 4
    for step in range(2):
        for attempt in range(2):
            for rank in range(2):            # two processes, two prompts each
                engine(model, prompts[2 * rank:2 * rank + 2], group, params, tok.pad_token_id,
                       step_seed(0, step) + attempt, row_offset=2 * rank * group, total_rows=4 * group)
    seeds = row_seeds(fake)
    assert len(seeds) == 2 * 2 * 2 * 2 * group
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_the_gpu_extra_pins_trls_tested_vllm_range():
    """Item 3: pyproject's [gpu] pin allows a vLLM version exactly when TRL 1.16 supports it
    (TRL's own check, trl.import_utils.is_vllm_available, warns outside its range)."""
    import tomllib
    import warnings
    from pathlib import Path

    from packaging.requirements import Requirement
    import_utils = pytest.importorskip("trl.import_utils")
    from aha.core.vllm_rollout import VLLM_VERIFIED
    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pin = Requirement(next(r for r in extra if r.startswith("vllm")))
    assert str(pin.specifier) == str(Requirement(f"vllm{VLLM_VERIFIED}").specifier)
    assert f"vllm{VLLM_VERIFIED}" in (root / "README.md").read_text()
    for version in ("0.10.2", "0.21.0", "0.22.0", "0.26.1", "0.31.0", "0.31.1", "0.33.0"):
        original = import_utils._is_package_available
        import_utils._is_package_available = lambda name, return_version=False: (True, version)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                import_utils.is_vllm_available()
        finally:
            import_utils._is_package_available = original
        trl_supports = not any("supports vLLM versions" in str(w.message) for w in caught)
        assert pin.specifier.contains(version) == trl_supports, version


def test_weights_move_one_parameter_at_a_time_as_trls_colocated_path(fake, tiny):
    """Item 5: empty_cache → wake weights → load_weights per parameter → reset prefix cache →
    wake KV cache → generate → sleep; vLLM ends up holding the trainer's current tensors."""
    model, tok = tiny
    engine = engine_for(model)
    assert fake.names() == ["LLM", "sleep"] and fake.calls[1] == ("sleep", 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)                                  # the trainer moved
    engine(model, [tok("1+2=")["input_ids"]], 2, SamplingParams(max_new_tokens=2), tok.pad_token_id, seed=0)
    calls = fake.calls[2:]
    names = [name for name, _ in model.named_parameters()]
    loads = [c for c in calls if c[0] == "load_weights"]
    assert [c[1] for c in loads] == [[name] for name in names]
    first, last = calls.index(loads[0]), calls.index(loads[-1])
    assert calls[:first] == [("empty_cache",), ("wake_up", ["weights"])]
    assert [c[0] for c in calls[last + 1:]] == ["reset_prefix_cache", ("wake_up"), "generate", "sleep"]
    assert calls[last + 2] == ("wake_up", ["kv_cache"]) and calls[-1] == ("sleep", 2)
    for name, p in model.named_parameters():
        assert torch.equal(fake.loaded[name], p)


def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log p of each completion token: one unpadded forward of prompt + completion, log-softmax at T."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_the_sampler_trainer_gap_is_measured_on_every_generation(fake, tiny):
    """Item 6: mean and max |log p_vLLM − log p_trainer| over the sampled tokens, by hand: the
    fake vLLM reports log p = 0, so the gap is −log p of an unpadded reference forward."""
    from aha.core.vllm_rollout import sampler_metrics
    model, tok = tiny
    model.eval()
    engine = engine_for(model, autocast="off")       # the reference is fp32 (auto: bf16 on AMX/AVX512-BF16 CPUs)
    fake.logprob = 0.0
    prompts = [tok("12+345=")["input_ids"], tok("7+8=")["input_ids"]]
    params = SamplingParams(max_new_tokens=5, temperature=0.7, stop_token_ids=(tok.eos_token_id,))
    rollout = engine(model, prompts, 3, params, tok.pad_token_id, seed=1)
    gaps = torch.cat([-reference_logprobs(model, prompts[row // 3], ids[:n].tolist(), 0.7)
                      for row, (ids, n) in enumerate(zip(rollout.completion_ids, rollout.lengths))])
    metrics = sampler_metrics(engine)
    assert metrics["sampler_logp_gap_mean"] == pytest.approx(float(gaps.mean()), rel=1e-5)
    assert metrics["sampler_logp_gap_max"] == pytest.approx(float(gaps.max()), rel=1e-5)
    assert metrics["sampler_is_correction"] is False
    assert metrics["sampler_tokens"] == int(rollout.lengths.sum())
    assert {"vllm_sync_s", "vllm_generate_s", "vllm_sleep_s"} <= set(metrics)
    assert sampler_metrics(engine) == {}                  # popped: the next step starts afresh
    from aha.core.rollout import generate
    assert sampler_metrics(generate) == {}                # the torch engine reports nothing extra


def test_every_vllm_run_logs_the_gap_in_metrics_jsonl(fake, tiny_model_dir, tmp_path, monkeypatch):
    import json

    import aha.core.train
    monkeypatch.setattr(aha.core.train, "detect_device", lambda: "cpu")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--rollout", "vllm", "--steps", "2", "--out", str(out),
                 "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "eval_every=0"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for record in lines:
        assert record["sampler_logp_gap_mean"] > 0 and record["sampler_logp_gap_max"] >= record["sampler_logp_gap_mean"]
        assert record["sampler_is_correction"] is False
