"""`aha bench --learn`: the learning race. From the same base model, with the same hyperparameters,
seed and steps, how much RL wall time do aha and TRL's GRPOTrainer need to reach the same held-out
pass@1 on the built-in task?

Each side trains the built-in base model on 3-digit addition (accuracy + 0.1 × format, G = 8,
8 prompts a step, T 1.0, lr 1e-4, β 0, the GRPO loss) and is evaluated every `eval_every` steps with
the same `aha.eval.evaluate` (R1's protocol). The clock counts RL only: the time of each step, without
the evaluations. The target is TRL's final pass@1; each side's time to it is read off its curve,
linearly between eval points (TRL's is at most its whole run). The ratio is TRL's time over aha's;
the bench reports the median over the seeds, because the step at which a target is first reached
varies a lot from seed to seed.

    aha bench --learn --seeds 0,1,2 --steps 150 --json learn.json
"""

import copy
import statistics
import tempfile
import time

import torch

from aha.eval.evaluate import EvalSpec, evaluate
from aha.infra.base import ensure_base_model
from aha.infra.config import Config
from aha.infra.model import load_model
from aha.tasks import get_task


def curve_time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The RL seconds at which `curve` [(seconds, pass@1), …] first reaches `target`, interpolated
    linearly between points; None if it never does.

    >>> curve_time_to([(0, 0.2), (10, 0.6), (20, 0.9)], 0.75)
    15.0
    """
    previous = None
    for seconds, value in curve:
        if value >= target:
            if previous is None or previous[1] >= value:
                return float(seconds)
            (s0, v0) = previous
            return s0 + (target - v0) / (value - v0) * (seconds - s0)
        previous = (seconds, value)
    return None


def aha_side(cfg: Config, spec: EvalSpec, console=None) -> list[tuple[float, float]]:
    """aha train on `cfg` with held-out evals every `cfg.eval_every` steps: [(RL seconds, pass@1)]."""
    from aha.core.train import train
    model, tokenizer = load_model(ensure_base_model(console))
    task = get_task(cfg.task)
    curve = [(0.0, evaluate(model, tokenizer, task, spec, console=console)["pass@1"])]
    with tempfile.TemporaryDirectory() as out:
        cfg = copy.copy(cfg)
        cfg.out = out
        result = train(cfg, force=True, console=console, model=model, tokenizer=tokenizer)
    history, seconds = result["history"], 0.0
    evals = {e["step"]: e["pass@1"] for e in result["evals"]}
    for record in history:
        seconds += record["time_generate"] + record["time_update"]
        if record["step"] + 1 in evals:
            curve.append((seconds, evals[record["step"] + 1]))
    curve.append((seconds, evaluate(model, tokenizer, task, spec, console=console)["pass@1"]))
    return curve


def trl_side(cfg: Config, spec: EvalSpec, console=None) -> list[tuple[float, float]]:
    """TRL 1.16's GRPOTrainer on the same base, task, reward and hyperparameters: [(RL seconds, pass@1)]."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    model, tokenizer = load_model(ensure_base_model(console))
    task = get_task(cfg.task)
    stream = task.train_problems(cfg.seed)
    problems = [next(stream) for _ in range(cfg.steps * cfg.prompts_per_step)]
    weights = cfg.component_weights()

    def reward(prompts, completions, index, **kwargs):
        return [sum(weights.get(k, 0.0) * v for k, v in task.score(text, problems[i]).items())
                for text, i in zip(completions, index)]

    curve = [(0.0, evaluate(model, tokenizer, task, spec, console=console)["pass@1"])]

    class Clock(TrainerCallback):
        """Counts the seconds of each training step and evaluates, off the clock, every eval_every steps."""
        def __init__(self):
            self.seconds, self.t0 = 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seconds += time.perf_counter() - self.t0
            if state.global_step % cfg.eval_every == 0 or state.global_step == cfg.steps:
                curve.append((self.seconds, evaluate(model, tokenizer, task, spec, console=console)["pass@1"]))

    reward.__name__ = "addition_reward"
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
                            num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens, beta=cfg.beta,
                            learning_rate=cfg.lr, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                            bf16=False, save_strategy="no", max_steps=cfg.steps, loss_type="grpo",
                            gradient_checkpointing=False, temperature=cfg.temperature, top_p=1.0, top_k=0,
                            seed=cfg.seed, disable_tqdm=True, logging_steps=10, max_grad_norm=cfg.max_grad_norm,
                            shuffle_dataset=False)
        dataset = Dataset.from_dict({"prompt": [task.prompt(p) for p in problems], "index": list(range(len(problems)))})
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
        from transformers import PrinterCallback
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return curve


def run_learn_race(seeds: tuple[int, ...], steps: int = 150, eval_every: int = 25, eval_problems: int = 200,
                   say=print, console=None) -> dict:
    """Both sides on each seed; returns the curves, each seed's times to TRL's final pass@1, and the median ratio."""
    rows = []
    for seed in seeds:
        cfg = Config(steps=steps, seed=seed, eval_every=eval_every, eval_problems=eval_problems, checkpoint_every=0)
        spec = EvalSpec(eval_problems, cfg.eval_k, cfg.eval_temperature, cfg.eval_top_p, cfg.max_new_tokens, seed)
        say(f"bench --learn: seed {seed}, aha, {steps} steps")
        torch.manual_seed(seed)
        aha_curve = aha_side(cfg, spec, console)
        say(f"bench --learn: seed {seed}, TRL, {steps} steps")
        torch.manual_seed(seed)
        trl_curve = trl_side(cfg, spec, console)
        target = trl_curve[-1][1]
        aha_time, trl_time = curve_time_to(aha_curve, target), curve_time_to(trl_curve, target)
        rows.append({"seed": seed, "target_pass1": target, "aha_curve": aha_curve, "trl_curve": trl_curve,
                     "aha_seconds_to_target": aha_time, "trl_seconds_to_target": trl_time,
                     "aha_final_pass1": aha_curve[-1][1], "aha_rl_seconds": aha_curve[-1][0],
                     "trl_rl_seconds": trl_curve[-1][0],
                     "ratio": (trl_time / aha_time) if aha_time else None})
    reached = sum(r["ratio"] is not None for r in rows)
    return {"rows": rows, "steps": steps, "median_ratio": median_ratio([r["ratio"] for r in rows]),
            "reached": f"{reached} of {len(rows)}"}


def median_ratio(ratios: list[float | None]) -> float | None:
    """The median over all seeds, a seed on which aha never reached the target counting as the worst
    ratio (0), so that dropping it cannot flatter aha; None when aha reached it on no seed.

    >>> median_ratio([2.03, None, 2.23])
    2.03
    >>> median_ratio([2.0, 3.0]), median_ratio([None]) is None
    (2.5, True)
    """
    if all(r is None for r in ratios):
        return None
    return statistics.median(0.0 if r is None else r for r in ratios)


def format_learn_table(result: dict) -> str:
    lines = [f"{'seed':>4} {'TRL final':>9} {'aha final':>9} {'aha s to it':>11} {'TRL s to it':>11} {'ratio':>6}"]
    for r in result["rows"]:
        aha = f"{r['aha_seconds_to_target']:11.1f}" if r["aha_seconds_to_target"] is not None else f"{'never':>11}"
        ratio = f"{r['ratio']:6.2f}" if r["ratio"] is not None else f"{'-':>6}"
        lines.append(f"{r['seed']:>4} {r['target_pass1']:9.3f} {r['aha_final_pass1']:9.3f} {aha} "
                     f"{r['trl_seconds_to_target']:11.1f} {ratio}")
    median = result["median_ratio"]
    lines.append(
        f"median TRL/aha RL wall time to TRL's final pass@1: "
        f"{median:.2f}× (reached by aha on {result['reached']} seeds; a seed not reached counts as 0)"
        if median
        else f"aha did not reach TRL's final pass@1 on any seed ({result['reached']})"
    )
    return "\n".join(lines)
