"""The TRL phase of bench/gpu_check.py: TRL 1.16's GRPOTrainer, its transformers generation, on the
RL phase's work (the 0.5B model, 8 prompts × 8 samples × 512 new tokens, the same identical-work
reward), timed per step by aha/bench_trl.py's callback, where TRL and `datasets` are installed."""

import importlib.util
import tempfile
import types

from gpu_phases import Ctx, Skip, build, model_facts, random_prompts


def word_tokenizer(vocab: int):
    """A tokenizer with one word per id ("t0" … "t{V-1}"), so that TRL can tokenise prompts and
    decode completions of a model whose vocabulary matches no real tokenizer on this machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=f"t{vocab - 2}", eos_token=f"t{vocab - 1}")


def phase_trl(ctx: Ctx) -> None:
    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed: TRL's GRPOTrainer is not measured")
    from aha.bench import spread_rewards
    from aha.bench_trl import StepTimer, build_trainer
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
    ctx.part.put("summary", f"TRL {mean['seconds']:.2f} s/step (generate {mean['generate_s']:.2f}, rest {mean['update_s']:.2f})")
