"""The vLLM rollout backend, `rollout: vllm`: the same `Rollout` as aha/rollout.py, sampled by a
vLLM engine that lives inside the training process (colocated, like TRL's `vllm_mode="colocate"`).

NOT YET VERIFIED ON GPU. Written against vLLM's documented API (≥ 0.10) but never run: no GPU
was lent while it was written. `bench/gpu_check.py` is the prepared check (tokens/s against the
torch engine, then RL steps end to end). On CPU the tests cover the parameter mapping, the
Rollout assembly and the clear error when vLLM or CUDA is missing.

    pip install 'aha[gpu]'
    aha train --config recipes/qwen2.5-0.5b-instruct-gsm8k.yaml rollout=vllm vllm_gpu_memory=0.3

- One `vllm.LLM` per training process, made with `enable_sleep_mode=True`, `load_format="dummy"`
  (its weights always come from the trainer, never from disk), `skip_tokenizer_init=True` (token ids
  in, token ids out) and `distributed_executor_backend="external_launcher"`, so that under torchrun
  every rank owns one engine in its own process (tensor parallel 1) and the engine core runs
  in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the worker's model is reachable without copies.
- Between generations the engine sleeps at level 2 (weights and KV cache freed for training). Each
  generation: wake the weight memory, load the trainer's current state dict into vLLM's model
  (`load_weights` via `collective_rpc`, GPU to GPU), wake the KV cache, generate, sleep again.
- SamplingParams map one to one: temperature, top_p, top_k (0 = off), max_tokens = max_new_tokens,
  stop_token_ids (EOS, and `</answer>` where it is one token), n = group_size, and one seed per prompt
  (the step's seed + the prompt's index in the step), so a prompt's samples do not depend on which
  rank drew it.
- Log-probs: `logprobs_mode="processed_logprobs"`, after temperature. The torch engine takes them
  before top-p/top-k, vLLM after; they agree when top_p = 1 and top_k = 0. They are the sampler's
  side of the sampler/trainer mismatch and of the rollout correction (aha/rollout_correction.py);
  the old policy of the clipped ratio is the trainer's own first forward, for every μ.

Departures from the torch engine: vLLM draws its own random numbers, so a seed gives different
(identically distributed) samples than `rollout: torch`; held-out evaluation stays on the torch
engine; LoRA (its adapter weight names) is not supported yet.
"""

import importlib.util
import os
import socket

import torch

from aha.errors import AhaError
from aha.rollout import Rollout, SamplingParams, generate, left_pad


def require_vllm() -> None:
    """One clear error when this machine cannot run the vLLM backend."""
    missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("vLLM", importlib.util.find_spec("vllm") is not None)) if not ok]
    if missing:
        raise AhaError(f"rollout=vllm needs a CUDA GPU and vLLM (pip install 'aha[gpu]'); this machine has no "
                       f"{' and no '.join(missing)}: use rollout=torch (the default)")


def sampling_kwargs(params: SamplingParams, group_size: int, seed: int) -> dict:
    """vLLM `SamplingParams` keyword arguments equal to aha's `params`, for one prompt's group."""
    return {"n": group_size, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_new_tokens, "stop_token_ids": list(params.stop_token_ids), "seed": seed,
            "logprobs": 0, "detokenize": False}


def to_rollout(prompts: list[list[int]], completions: list[tuple[list[int], list[float], bool]], group_size: int,
               pad_id: int) -> Rollout:
    """A `Rollout` from `group_size` completions per prompt, grouped contiguously; each completion is
    (token ids with the stop token, the sampled tokens' log-probs, hit max_tokens)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(len(ids) for ids, _, _ in completions)
    completion_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.long)
    logprobs = torch.zeros((len(completions), width))
    for row, (ids, logps, _) in enumerate(completions):
        completion_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[row, :len(ids)] = 1
        logprobs[row, :len(ids)] = torch.tensor(logps, dtype=torch.float32)
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
                   prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
                   completion_ids=completion_ids, completion_mask=completion_mask, logprobs=logprobs,
                   truncated=torch.tensor([truncated for _, _, truncated in completions]), group_size=group_size)


def _load_weights(worker, weights) -> None:
    """Runs inside vLLM's worker (collective_rpc): copy the trainer's tensors into its model."""
    worker.model_runner.model.load_weights(weights=weights)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class VllmEngine:
    """Called like `aha.rollout.generate`; samples with a colocated vLLM engine."""

    def __init__(self, model_dir: str, dtype: torch.dtype, seed: int, gpu_memory: float):
        require_vllm()
        # external_launcher reads torchrun's variables; give one process its own
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", _free_port())
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        self.llm = LLM(model=str(model_dir), dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
                       enable_sleep_mode=True, gpu_memory_utilization=gpu_memory, tensor_parallel_size=1,
                       distributed_executor_backend="external_launcher", seed=seed,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        self.llm.sleep(level=2)

    @torch.no_grad()
    def __call__(self, model, prompts: list[list[int]], group_size: int, params: SamplingParams, pad_id: int,
                 seed: int, row_offset: int = 0, total_rows: int | None = None) -> Rollout:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        first_prompt = row_offset // group_size          # this slice's first prompt in the step
        self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_load_weights, args=(list(model.state_dict().items()),))
        self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            sampling_params=[VllmSamplingParams(**sampling_kwargs(params, group_size, seed + first_prompt + i))
                             for i in range(len(prompts))], use_tqdm=False)
        self.llm.sleep(level=2)
        completions = [(list(sample.token_ids), [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)],
                        sample.finish_reason == "length") for output in outputs for sample in output.outputs]
        rollout = to_rollout(prompts, completions, group_size, pad_id)
        device = next(model.parameters()).device
        return Rollout(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                          for name, value in vars(rollout).items()})


def rollout_engine(cfg, model):
    """The sampler the training loop calls, with `generate`'s signature: the torch engine, or a vLLM
    engine built from `model`'s config (its weights come from `model` at every generation)."""
    if cfg.rollout == "torch":
        return generate
    require_vllm()
    if cfg.lora_rank:
        raise AhaError("rollout=vllm does not support lora_rank > 0 yet: use rollout=torch, or train every weight")
    return VllmEngine(model.name_or_path, next(model.parameters()).dtype, cfg.seed, cfg.vllm_gpu_memory)
