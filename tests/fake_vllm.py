"""A stand-in for the `vllm` package that records every call aha makes to it, for CPU tests of
aha/core/vllm_rollout.py. It mirrors the surface of vLLM 0.22–0.31 that aha (and TRL 1.16's colocated
path) use: `LLM(**kwargs)`, `sleep(level)`, `wake_up(tags)`, `reset_prefix_cache()`, `generate`
with one `SamplingParams` per prompt, the in-process model at
`llm.llm_engine.model_executor.driver_worker.model_runner.model` and its `load_weights`, and
`RequestOutput.outputs[k]` with `token_ids`, `logprobs` ({token: Logprob}) and `finish_reason`.

Sampling: each sample draws its tokens from a torch generator seeded with the request's seed +
the sample's index, as vLLM's `ParentRequest` does; its log-probs are `LOGPROB` (a test may set it).

    fake = install(monkeypatch)        # sys.modules["vllm"], CUDA reported present
    ... run aha code ...
    fake.calls                         # [("LLM", kwargs, env), ("sleep", 2), ("wake_up", ["weights"]), …]
"""

import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import torch

WATCHED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")
SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop_token_ids", "seed", "logprobs",
                 "detokenize", "ignore_eos"}


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []
        self.logprob = -1.0
        self.loaded: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


class SamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - SAMPLING_KEYS
        if unknown:
            raise TypeError(f"fake vLLM SamplingParams: unexpected {sorted(unknown)}")
        self.kwargs = kwargs


def _install_module(recorder: Recorder, process_group: bool) -> types.ModuleType:
    class FakeModel:
        def load_weights(self, weights):
            weights = list(weights)
            recorder.calls.append(("load_weights", [name for name, _ in weights]))
            for name, tensor in weights:
                recorder.loaded[name] = tensor.detach().clone()

    class LLM:
        def __init__(self, **kwargs):
            recorder.calls.append(("LLM", kwargs, {name: os.environ.get(name) for name in WATCHED_ENV}))
            if process_group and not torch.distributed.is_initialized():
                # as vLLM's external_launcher does: the default group from torchrun's variables (env://),
                # whose TCP store holds MASTER_PORT for as long as this process lives
                torch.distributed.init_process_group("gloo", init_method="env://")
            self.vocab = json.loads((Path(kwargs["model"]) / "config.json").read_text())["vocab_size"]
            runner = types.SimpleNamespace(model=FakeModel())
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner)))

        def sleep(self, level=1):
            recorder.calls.append(("sleep", level))

        def wake_up(self, tags=None):
            recorder.calls.append(("wake_up", tags))

        def reset_prefix_cache(self):
            recorder.calls.append(("reset_prefix_cache",))
            return True

        def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
            recorder.calls.append(("generate", [p["prompt_token_ids"] for p in prompts],
                                   [s.kwargs for s in sampling_params]))
            return [types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                          outputs=[self._sample(s.kwargs, j) for j in range(s.kwargs["n"])])
                    for p, s in zip(prompts, sampling_params)]

        def _sample(self, kw: dict, index: int):
            gen = torch.Generator().manual_seed(kw["seed"] + index)
            tokens = torch.randint(0, self.vocab, (kw["max_tokens"],), generator=gen).tolist()
            stops = [i for i, t in enumerate(tokens) if t in kw["stop_token_ids"]]
            if stops:
                tokens = tokens[:stops[0] + 1]
            return types.SimpleNamespace(
                index=index, token_ids=tokens, finish_reason="stop" if stops else "length",
                logprobs=[{t: types.SimpleNamespace(logprob=recorder.logprob, rank=1)} for t in tokens])

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict           # a TypedDict in vLLM
    vllm.inputs = inputs
    return vllm


def install(monkeypatch, process_group: bool = False, clear_env: bool = True) -> Recorder:
    """Put the fake `vllm` in sys.modules, report a CUDA GPU, record `torch.cuda.empty_cache`;
    every change is undone by pytest's monkeypatch at the end of the test (a process group made
    with `process_group=True` is the caller's to destroy). `clear_env`: start without RANK …
    MASTER_PORT (a child process that checks what it inherited keeps them)."""
    recorder = Recorder()
    vllm = _install_module(recorder, process_group)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", vllm.inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: recorder.calls.append(("empty_cache",)))
    for name in WATCHED_ENV if clear_env else ():   # absent now, and put back as they were after the test,
        monkeypatch.setenv(name, "")                 # also if the code under test leaves them set
        monkeypatch.delenv(name)
    return recorder


class Patch:
    """pytest's monkeypatch, for a child process: the same calls, never undone (the process ends)."""

    def setitem(self, mapping, key, value):
        mapping[key] = value

    def setattr(self, target, name, value):
        setattr(target, name, value)
