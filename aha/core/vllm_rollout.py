"""The vLLM rollout backend, `rollout: vllm`: the same `Rollout` as aha/core/rollout.py, sampled by a
vLLM engine that lives inside the training process (colocated, like TRL's `vllm_mode="colocate"`).

NOT YET RUN ON A GPU (none with vLLM was lent: the project's H200 image has no vLLM and no network).
Checked instead against the source of vLLM 0.22.0–0.31.0 (`VLLM_VERIFIED`, the `gpu` extra's pin: TRL
1.16's tested range) and TRL 1.16's colocated path, which calls the same API; tests/fake_vllm.py
records the calls in the CPU tests. `bench/gpu_check.py` runs it where vLLM is installed.

    pip install 'aha[gpu]'
    aha train --config recipes/qwen2.5-0.5b-instruct-gsm8k.yaml rollout=vllm vllm_gpu_memory=0.3

- One `vllm.LLM` per training process, made with `enable_sleep_mode=True`, `load_format="dummy"`
  (its weights always come from the trainer, never from disk), `skip_tokenizer_init=True` (token ids
  in, token ids out) and `distributed_executor_backend="external_launcher"`, so that under torchrun
  every rank owns one engine in its own process (tensor parallel 1) and the engine core runs
  in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the worker's model is reachable without copies.
  The launcher's variables (RANK … MASTER_PORT) are set only while `LLM()` runs (`launcher_env`),
  so a process this one starts later does not inherit a port that its process group holds.
- Between generations the engine sleeps at level 2 (weights and KV cache freed for training). Each
  generation, as TRL does it: `torch.cuda.empty_cache()`, wake the weight memory, load the trainer's
  parameters into vLLM's model one at a time (`load_weights`, GPU to GPU), reset the prefix cache (its
  blocks hold keys and values of the old weights), wake the KV cache, generate, sleep again.
- SamplingParams map one to one: temperature, top_p, top_k (0 = off), max_tokens = max_new_tokens,
  stop_token_ids (EOS, and `</answer>` where it is one token) with `ignore_eos` (vLLM stops on these
  alone, as the torch engine does; none = no early stop), n = group_size. Seeds: vLLM gives sample j
  of a request `seed + j`, so prompt p of the step gets base + p × group_size (`prompt_seeds`):
  every row of a step has its own seed, whichever rank drew it.
- Log-probs: `logprobs_mode="processed_logprobs"`, after temperature and top-p/top-k. The torch
  engine takes them before top-p/top-k; they agree when top_p = 1 and top_k = 0. They are the
  sampler's side of the sampler/trainer mismatch and of the rollout correction
  (aha/core/rollout_correction.py); the old policy of the clipped ratio is the trainer's own first
  forward, for every μ, so μ > 1 works with a nucleus too.
- The engine also measures the mismatch on every generation, before the update: the trainer's own
  log-probs of the sampled tokens (a no-grad forward), against vLLM's; the step's metrics line gets
  `sampler_logp_gap_mean` / `_max` (|Δ log p| over the tokens) and the engine's timings, next to the
  update's `rollout_logp_diff_*` / `rollout_kl` (the same comparison, in the loss's precision).

Departures from the torch engine: vLLM draws its own random numbers, so a seed gives different
(identically distributed) samples than `rollout: torch`; held-out evaluation stays on the torch
engine; LoRA (its adapter weight names) is not supported yet.
"""

import contextlib
import importlib.util
import os
import socket
import time

import torch

from aha.core.logprobs import completion_logprobs
from aha.core.rollout import Rollout, generate, left_pad
from aha.core.sampling import SamplingParams
from aha.infra.errors import AhaError
from aha.infra.model import autocast

VLLM_VERIFIED = ">=0.22.0,<=0.31.0"      # the API below, checked against these releases' source
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")
CHECK_BYTES = 2 ** 31                    # the log-prob check's logits per forward, at most about this


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
            "max_tokens": params.max_new_tokens, "stop_token_ids": list(params.stop_token_ids), "ignore_eos": True,
            "seed": seed, "logprobs": 0, "detokenize": False}


def prompt_seeds(seed: int, first_prompt: int, prompts: int, group_size: int) -> list[int]:
    """vLLM's request seed for each of `prompts` prompts, the first being prompt `first_prompt` of
    the step. vLLM seeds sample j of a request with seed + j, so prompt p starts at base + p × G and
    the step's rows get the seeds base … base + P·G − 1, one each. `base` spreads the call's seed
    over [0, 2^62) (Fibonacci hashing), so calls whose seeds differ by one (dynamic sampling's
    tries, `step_seed(…) + attempt`) get far-apart ranges instead of overlapping ones.

    >>> prompt_seeds(0, 2, 2, group_size=4)
    [8, 12]
    """
    base = (seed * 0x9E3779B97F4A7C15) % 2 ** 62
    return [base + (first_prompt + i) * group_size for i in range(prompts)]


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


def logprob_gap(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> tuple[int, float, float]:
    """(tokens, Σ |Δ|, max |Δ|) of Δ = log p_trainer − log p_sampler over the completion tokens
    (mask (R, T)); a token the sampler could not score (NaN) is left out, as in TRL.

    >>> logprob_gap(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, float("nan")]]), torch.tensor([[1, 1]]))
    (1, 0.5, 0.5)
    """
    delta = (trainer_logp.float() - sampler_logp.float()).abs()[mask.bool()]
    delta = delta[~torch.isnan(delta)]
    return delta.numel(), float(delta.sum()), float(delta.max()) if delta.numel() else 0.0


def trainer_gap(model, rollout: Rollout, temperature: float, autocast_mode: str) -> tuple[int, float, float]:
    """`logprob_gap` of the trainer's log-probs of `rollout`'s tokens (no-grad forwards of a few rows
    each, about CHECK_BYTES of logits) against the sampler's."""
    rows = rollout.completion_ids.shape[0]
    per_row = max(1, rollout.completion_ids.shape[1]) * model.config.vocab_size * 16    # bf16 + fp32 copies
    tokens, total, largest = 0, 0.0, 0.0
    device = rollout.completion_ids.device
    with torch.no_grad(), autocast(autocast_mode, device.type):
        for chunk in torch.arange(rows, device=device).split(max(1, CHECK_BYTES // per_row)):
            logp, _, mask = completion_logprobs(model, rollout, chunk, temperature)
            n, s, m = logprob_gap(logp, rollout.logprobs[chunk][:, :logp.shape[1]], mask)
            tokens, total, largest = tokens + n, total + s, max(largest, m)
    return tokens, total, largest


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@contextlib.contextmanager
def launcher_env():
    """torchrun's variables, which external_launcher reads while `LLM()` starts its process group:
    torchrun's own where it set them, one process's otherwise; then the environment as it was."""
    saved = {name: os.environ.get(name) for name in LAUNCHER_ENV}
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", _free_port())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class VllmSampler:
    """Called like `aha.core.rollout.generate`; samples with a colocated vLLM engine."""

    def __init__(self, model_dir: str, dtype: torch.dtype, seed: int, gpu_memory: float, autocast_mode: str = "auto"):
        require_vllm()
        from vllm import LLM
        with launcher_env():
            # max_num_batched_tokens: TRL's value (vLLM's memory profiler misjudges its large default)
            self.llm = LLM(model=str(model_dir), dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
                           enable_sleep_mode=True, gpu_memory_utilization=gpu_memory, tensor_parallel_size=1,
                           distributed_executor_backend="external_launcher", seed=seed,
                           logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                           max_num_batched_tokens=4096)
        self.llm.sleep(level=2)
        self.autocast, self.totals = autocast_mode, {}

    def sync_weights(self, model) -> None:
        """TRL's colocated sync: free cached blocks, wake the weights, load one parameter at a time
        into the worker's model (in this process), reset the prefix cache."""
        torch.cuda.empty_cache()
        self.llm.wake_up(tags=["weights"])
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, param in model.named_parameters():
            target.load_weights([(name, param.data)])
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def __call__(self, model, prompts: list[list[int]], group_size: int, params: SamplingParams, pad_id: int,
                 seed: int, row_offset: int = 0, total_rows: int | None = None, max_rows: int | None = None,
                 tokenizer=None) -> Rollout:
        """As `aha.core.rollout.generate`. vLLM batches by itself (`max_rows` is its own business). The engine
        runs without a tokenizer (`skip_tokenizer_init`), so stop strings are applied afterwards: each
        completion is cut at the token that completes one, as aha's engine stops there."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        seeds = prompt_seeds(seed, row_offset // group_size, len(prompts), group_size)
        clock = [time.perf_counter()]
        self.sync_weights(model)
        self.llm.wake_up(tags=["kv_cache"])
        _synchronize()
        clock.append(time.perf_counter())
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False,
                                    sampling_params=[VllmSamplingParams(**sampling_kwargs(params, group_size, s))
                                                     for s in seeds])
        clock.append(time.perf_counter())
        self.llm.sleep(level=2)
        _synchronize()
        clock.append(time.perf_counter())
        completions = [
            (
                list(sample.token_ids),
                [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)],
                sample.finish_reason == "length",
            )
            for output in outputs
            for sample in output.outputs
        ]
        if params.stop_strings and tokenizer is not None:
            completions = [cut_at_stop_string(c, tokenizer, params.stop_strings) for c in completions]
        rollout = to_rollout(prompts, completions, group_size, pad_id)
        device = next(model.parameters()).device
        rollout = Rollout(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                             for name, value in vars(rollout).items()})
        gap = trainer_gap(model, rollout, params.temperature, self.autocast)
        _synchronize()
        clock.append(time.perf_counter())
        self._add(gap, [b - a for a, b in zip(clock, clock[1:])])
        return rollout

    def _add(self, gap: tuple[int, float, float], seconds: list[float]) -> None:
        totals = self.totals
        totals["tokens"] = totals.get("tokens", 0) + gap[0]
        totals["sum"] = totals.get("sum", 0.0) + gap[1]
        totals["max"] = max(totals.get("max", 0.0), gap[2])
        for name, s in zip(("vllm_sync_s", "vllm_generate_s", "vllm_sleep_s", "sampler_check_s"), seconds):
            totals[name] = totals.get(name, 0.0) + s

    def pop_metrics(self) -> dict:
        """This step's sampler numbers (summed over its generations), then start afresh."""
        totals, self.totals = self.totals, {}
        if not totals:
            return {}
        return {
            "sampler_logp_gap_mean": totals["sum"] / max(totals["tokens"], 1),
            "sampler_logp_gap_max": totals["max"],
            "sampler_tokens": totals["tokens"],
            "sampler_is_correction": False,
            **{name: round(value, 4) for name, value in totals.items() if name.endswith("_s")},
        }


def sampler_metrics(engine) -> dict:
    """The sampler's own numbers for the step's metrics line: the vLLM engine's log-prob gap and
    timings since the last call; nothing for the torch engine."""
    pop = getattr(engine, "pop_metrics", None)
    return pop() if pop is not None else {}


def cut_at_stop_string(completion: tuple[list[int], list[float], bool], tokenizer, stops: tuple[str, ...]):
    """(ids, log-probs, truncated) cut after the first token whose decoded prefix contains a stop string
    (then not truncated); unchanged when none does."""
    ids, logprobs, truncated = completion
    tail = 4 * max(len(s) for s in stops) + 16          # tokens that can hold a stop string (aha/core/rollout.py)
    for end in range(1, len(ids) + 1):
        if any(stop in tokenizer.decode(ids[max(0, end - tail):end], skip_special_tokens=True) for stop in stops):
            return ids[:end], logprobs[:end], False
    return ids, logprobs, truncated


def rollout_sampler(cfg, model):
    """The sampler the training loop calls, with `generate`'s signature: the torch engine, or a vLLM
    engine built from `model`'s config (its weights come from `model` at every generation)."""
    if cfg.rollout == "torch":
        return generate
    require_vllm()
    if cfg.lora_rank:
        raise AhaError("rollout=vllm does not support lora_rank > 0 yet: use rollout=torch, or train every weight")
    return VllmSampler(model.name_or_path, next(model.parameters()).dtype, cfg.seed, cfg.vllm_gpu_memory, cfg.autocast)
