"""The phases of bench/gpu_check.py that need an optional package, each skipped in one line where
it is missing:

- `vllm`: the vLLM backend (aha/core/vllm_rollout.py) on the 0.5B model: tokens/s at 64 and 256 rows
  (weight sync, wake/sleep timed apart from generation), the log-prob gap at both settings, and RL
  steps with rollout=vllm;
- `trl`: TRL 1.16's GRPOTrainer, its transformers generation, on the RL phase's work (the 0.5B
  model, 8 prompts × 8 samples × 512 new tokens, the same identical-work reward), timed per step by
  aha/bench/trl.py's callback, where TRL and `datasets` are installed.
"""

import importlib.util
import os
import tempfile
import types

import torch
from gpu_phases import Ctx, Skip, build, measure_sampler, model_facts, random_prompts, rl_steps, version_of


def phase_vllm(ctx: Ctx) -> None:
    """The vLLM backend on the 0.5B model, where vLLM is installed: tokens/s at 64 and 256 rows
    (weight sync, wake/sleep timed apart from generation), the log-prob gap at both settings, and
    the RL phase's steps with rollout=vllm."""
    if importlib.util.find_spec("vllm") is None:
        raise Skip("vLLM is not installed (pip install 'aha[gpu]' on a machine with a network)")
    from aha.core.vllm_rollout import rollout_sampler
    from aha.infra.config import Config
    model = build(ctx, "0.5b")
    folder = ctx.scratch / "vllm_model"
    model.config.save_pretrained(folder)  # load_format="dummy": the config alone, weights come from model
    model.name_or_path = model.config._name_or_path = str(folder)
    ctx.part.put("model", model_facts(model))
    import vllm
    ctx.part.put("versions", {"vllm": getattr(vllm, "__version__", version_of("vllm")),
                              "attention_backend": os.environ.get("VLLM_ATTENTION_BACKEND", "vLLM's default")})
    engine = rollout_sampler(Config(rollout="vllm", vllm_gpu_memory=ctx.sizes.vllm_memory), model)
    ctx.part.put("device_used_bytes_after_init", device_used_bytes(ctx))
    measure_sampler(ctx, model, engine, "vllm")
    rl_steps(ctx, model, engine, "rl_vllm")
    rates = [ctx.part.data[f"vllm_rows_{r}"]["tokens_per_s"] for r in ctx.sizes.engine_rows]
    ctx.part.put(
        "summary",
        "vLLM " + ", ".join(f"{r:.0f}" for r in rates) + " tokens/s; gap T1 "
        f"{ctx.part.data['vllm_logp_gap_t1']['mean']:.2e}, T0.7/p0.9 "
        f"{ctx.part.data['vllm_logp_gap_t0.7_p0.9']['mean']:.2e}",
    )


def device_used_bytes(ctx: Ctx) -> int | None:
    """Memory in use on the device by every allocator (vLLM's own pool is invisible to torch's stats)."""
    if ctx.device != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def word_tokenizer(vocab: int):
    """A tokenizer with one word per id ("t0" … "t{V-1}"), so that TRL can tokenise prompts and
    decode completions of a model whose vocabulary matches no real tokenizer on this machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=f"t{vocab - 2}", eos_token=f"t{vocab - 1}")


def phase_trl(ctx: Ctx) -> None:
    """TRL's GRPOTrainer on the RL phase's work: s/step and its generate / rest split, peak memory."""
    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed: TRL's GRPOTrainer is not measured")
    from aha.bench.bench import spread_rewards
    from aha.bench.trl import StepTimer, build_trainer
    sizes = ctx.sizes
    model = build(ctx, "0.5b")
    ctx.part.put("model", model_facts(model))
    vocab, steps = model.config.vocab_size, min(2, sizes.rl_steps)
    tokenizer = word_tokenizer(vocab)
    prompts = [" ".join(f"t{i}" for i in ids)
               for ids in random_prompts(sizes.rl_prompts * (1 + steps), sizes.prompt_len, vocab, seed=100)]
    record: list = []
    timer = StepTimer(1, lambda step: None, types.SimpleNamespace(label=None), record)    # step 1 warms up
    ctx.part.put("work", {"prompts": sizes.rl_prompts, "group": sizes.rl_group, "new_tokens": sizes.rl_tokens,
                          "steps": steps, "warmup_steps": 1})
    with tempfile.TemporaryDirectory(dir=ctx.scratch) as out_dir:
        trainer = build_trainer(model, tokenizer, prompts, lambda texts, index: spread_rewards(texts, sizes.rl_group),
                                group_size=sizes.rl_group, prompts_per_step=sizes.rl_prompts,
                                max_new_tokens=sizes.rl_tokens, steps=1 + steps, lr=1e-6, seed=0, out_dir=out_dir,
                                timer=timer, record=record, use_cpu=ctx.device == "cpu")
        ctx.reset_peak()
        trainer.train()
    ctx.part.put("trl_steps", timer.steps)
    mean = {key: sum(s[key] for s in timer.steps) / len(timer.steps) for key in ("seconds", "generate_s", "update_s")}
    mean["peak_bytes"] = ctx.peak_bytes()
    ctx.part.put("trl_mean", mean)
    ctx.part.put(
        "summary", f"TRL {mean['seconds']:.2f} s/step (generate {mean['generate_s']:.2f}, rest {mean['update_s']:.2f})"
    )
