"""The vLLM rollout backend (aha/vllm_rollout.py): what can be checked without a GPU — the parameter
mapping, the Rollout assembly, the one-line error — and, where CUDA and vLLM exist, vLLM against the
torch engine on the same weights (skipped here: this machine has neither)."""

import importlib.util

import pytest
import torch

from aha.cli import main
from aha.config import Config
from aha.errors import AhaError
from aha.rollout import SamplingParams
from aha.vllm_rollout import require_vllm, rollout_engine, sampling_kwargs, to_rollout

HAS_GPU_VLLM = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def test_sampling_params_map_one_to_one():
    params = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=0.9, top_k=20, stop_token_ids=(2, 9))
    assert sampling_kwargs(params, group_size=8, seed=1234) == {
        "n": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 48, "stop_token_ids": [2, 9],
        "seed": 1234, "logprobs": 0, "detokenize": False}


def test_outputs_become_the_torch_engines_rollout():
    # 2 prompts × 2 samples; the stop token (9) stays in the completion, as in aha/rollout.py
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
    from aha.rollout import generate
    assert rollout_engine(Config(), model=None) is generate


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
    from aha.model import load_model
    from aha.train import completion_logprobs
    model, tok = load_model(tiny_model_dir, "cuda", torch.bfloat16)
    engine = rollout_engine(Config(rollout="vllm", vllm_gpu_memory=0.2), model)
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
