"""TRL's side of `aha bench`: a GRPOTrainer set to aha's settings, timed from outside.

TRL 1.16 is driven unchanged through `trainer.train()`. A `TrainerCallback` times each step
(on_step_begin → on_step_end) and, once a TRL step has ended, runs one aha step (`between`), so
the two sides alternate in one process. TRL's time split: its `_generate` (tokenise, sample,
decode) is wrapped with a timer; everything else in the step (reward, advantages, forward,
backward, optimizer) counts as update.

Settings mapped to aha's GRPO preset: loss_type="grpo" (seq_mean), β = 0, ε = 0.2, one update
per generation batch, no gradient checkpointing (TRL's default is on), temperature 1, top-p 1.
"""

import time


class StepTimer:
    """The TrainerCallback; built lazily so `import aha.bench.trl` works without transformers' Trainer."""

    def __new__(cls, *args, **kwargs):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self, warmup, between, watch, record):
                self.warmup, self.between, self.watch, self.record = warmup, between, watch, record
                self.steps, self.t0, self.generate_s = [], 0.0, 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self.watch.label = "trl"
                self.generate_s, self.t0 = 0.0, time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                seconds = time.perf_counter() - self.t0
                self.watch.label = None
                counts = self.record.pop()
                if state.global_step > self.warmup:
                    self.steps.append({"seconds": seconds, "generate_s": self.generate_s,
                                       "update_s": seconds - self.generate_s, **counts})
                self.between(state.global_step - 1)

        return _Timer(*args, **kwargs)


def trl_reward(score, group_size: int, record: list):
    """A TRL reward function around `score(texts, indices) -> list[float]`; it also records the
    step's generated tokens and the tokens of groups with a reward spread (the useful training work)."""
    def reward(prompts, completions, completion_ids, index, **kwargs):
        rewards = score(completions, index)
        lengths = [len(ids) for ids in completion_ids]
        trained = 0
        for start in range(0, len(rewards), group_size):
            if len(set(rewards[start:start + group_size])) > 1:
                trained += sum(lengths[start:start + group_size])
        record.append({"generated_tokens": sum(lengths), "trained_tokens": trained})
        return rewards
    return reward


def build_trainer(model, tokenizer, prompts: list[str], score, *, group_size: int, prompts_per_step: int,
                  max_new_tokens: int, steps: int, lr: float, seed: int, out_dir: str, timer, record: list,
                  use_cpu: bool = True, bf16: bool = False):
    """TRL's GRPOTrainer on `model` in its own dtype (bf16=False: no autocast; on a GPU the weights are
    bf16 already), or with `bf16=True` (autocast); `use_cpu=False` lets it take the GPU (bench/gpu_check.py)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    config = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=group_size * prompts_per_step,
                        num_generations=group_size, max_completion_length=max_new_tokens, beta=0.0,
                        learning_rate=lr, use_cpu=use_cpu, report_to=[], logging_steps=1, bf16=bf16,
                        save_strategy="no", max_steps=steps, loss_type="grpo", gradient_checkpointing=False,
                        temperature=1.0, top_p=1.0, top_k=0, seed=seed, disable_tqdm=True)
    dataset = Dataset.from_dict({"prompt": prompts, "index": list(range(len(prompts)))})
    reward = trl_reward(score, group_size, record)
    reward.__name__ = "bench_reward"
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    from transformers import PrinterCallback
    trainer.remove_callback(PrinterCallback)          # TRL's per-step log dicts: the table says it
    generate = trainer._generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            timer.generate_s += time.perf_counter() - t0
    trainer._generate = timed_generate
    return trainer
