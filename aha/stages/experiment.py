"""`aha experiment distill-vs-rl`: R1's distillation finding, at toy scale, with equal student compute.

    aha experiment distill-vs-rl --seeds 3 --out runs/dvr
    aha experiment distill-vs-rl --quick --seeds 2 --out /tmp/dvr      # a minute-long smoke run

R1: a small model fine-tuned on a strong reasoner's verified samples beats the same small model
trained by RL (R1-Distill-Qwen-32B 72.6 vs RL-only Qwen-32B 47.0 on AIME). Here:
  - teacher: the built-in base model (1.55M) trained by GRPO as `aha run` does; trained once
    (seed 0) and cached in DIR/cache, shared by the seeds;
  - student base: a smaller GPT-2 (hidden 128, 2 layers: ~0.38M) pretrained on the same corpus
    (aha.stages.pretrain), once, cached in DIR/cache;
  - arm "rl": the student trained by GRPO alone (aha.core.train, `aha run`'s settings), for each
    budget of `student_rl_steps` (default 25 and 100 steps: short of and at convergence);
  - arm "distill": rejection sampling from the teacher (aha.stages.rejection) + SFT of the student
    (aha.stages.sft), on as many SFT tokens as give it the RL arm's measured student compute.
Per seed s (RL, sampling, SFT and eval seeds): held-out pass@1 of teacher, student base and both
arms at each budget; then mean ± std (sample std, n − 1) over seeds → DIR/experiment.json and
DIR/experiment.md. Departure from R1: the student's corpus already holds the teacher's reasoning
format (both come from aha.stages.pretrain), so RL only has to make the student use it.

Student compute: C = 2·N·F + 6·N·T FLOPs (Kaplan et al.'s estimate), N = the student's parameters
(embeddings included), F = real (non-padding) tokens the student reads in forward-only passes (RL
generation: each prompt's prefill once, then every sampled token fed back), T = real tokens of
forward + backward passes (RL update rows: prompt + completion; SFT: prompt + response + EOS of
each example, each time it is seen). RL tokens are counted by a forward hook on the student
(`TokenCounter`); SFT tokens are known in advance, so the distill arm gets
T_sft ≈ F_rl / 3 + T_rl (to within one example). The teacher's sampling compute is the teacher's
and is reported apart; evaluation is not counted for anyone.
"""

import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aha.eval.evaluate import evaluate_dir
from aha.infra.errors import AhaError

EXPERIMENTS = ("distill-vs-rl", "length-bias", "entropy", "tools")   # the last three: aha/stages/findings.py


@dataclass
class ExperimentConfig:
    out: str = "runs/distill_vs_rl"
    seeds: int = 3
    teacher_steps: int = 150         # aha run's RL of the built-in base model
    student_hidden: int = 128
    student_layers: int = 2
    student_pretrain_steps: int = 1000
    student_rl_steps: tuple[int, ...] = (25, 100)   # the compute budgets: RL steps of the RL arm
    distill_prompts: int = 1024      # teacher samples: training problems × k (more than the budgets need)
    distill_k: int = 1
    sft_lr: float = 1e-3
    sft_batch_tokens: int = 2048
    sft_seq_len: int = 256
    eval_problems: int = 200
    eval_k: int = 4


# --quick: every step of the experiment in about a minute; the numbers mean nothing
QUICK = {"teacher_steps": 3, "student_pretrain_steps": 30, "student_rl_steps": (3,), "distill_prompts": 16,
         "distill_k": 2, "eval_problems": 8, "eval_k": 2}


def sft_budget_tokens(forward_tokens: int, train_tokens: int) -> float:
    """SFT tokens (6·N FLOPs each) that cost what 2·N·forward + 6·N·train FLOPs cost.

    >>> sft_budget_tokens(forward_tokens=300, train_tokens=100)
    200.0
    """
    return forward_tokens / 3 + train_tokens


def matched_sft_rows(row_tokens: list[int], budget_tokens: float) -> list[int]:
    """Indices of SFT rows — cycling through them in order: whole epochs, then part of one — whose
    token total is nearest to `budget_tokens` (at least one row). A row is added while that brings
    the total closer: total + tokens/2 < budget.

    >>> matched_sft_rows([10, 20, 30], 75)
    [0, 1, 2, 0]
    """
    if not row_tokens:
        raise AhaError(
            "distill-vs-rl: the teacher got no sample right: nothing to distill (raise teacher_steps or "
            "distill_prompts)"
        )
    chosen, total = [], 0
    while not chosen or total + row_tokens[len(chosen) % len(row_tokens)] / 2 < budget_tokens:
        tokens = row_tokens[len(chosen) % len(row_tokens)]
        chosen.append(len(chosen) % len(row_tokens))
        total += tokens
    return chosen


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value).

    >>> mean_std([0.5, 0.7, 0.9])
    (0.7, 0.2)
    """
    mean = sum(values) / len(values)
    return round(mean, 12), round(statistics.stdev(values), 12) if len(values) > 1 else 0.0


def aggregate(per_seed: list[dict]) -> dict:
    """{arm: {metric: [mean, std]}} over the seeds, for each arm of the first seed's record."""
    summary = {}
    for arm in (key for key in per_seed[0] if key != "seed"):
        summary[arm] = {}
        for metric in ("pass@1", "think_rate", "mean_response_tokens", "student_flops", "teacher_sampling_flops"):
            values = [seed[arm][metric] for seed in per_seed if metric in seed[arm]]
            if values:
                summary[arm][metric] = list(mean_std(values))
    return summary


class TokenCounter:
    """Counts the real (non-padding) tokens a model reads: in forward-only passes (no grad) and in
    passes that a backward will follow (grad on). A forward pre-hook: nothing in the loop changes.
    Input with a 2D attention mask counts the mask's last L columns (L = input length: prefill,
    cached decoding and the update's padded rows alike); without one, every input token."""

    def __init__(self, model):
        self.forward_tokens = 0
        self.train_tokens = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        length = input_ids.shape[1]
        real = int(mask[:, -length:].sum()) if mask is not None and mask.dim() == 2 else input_ids.numel()
        if torch.is_grad_enabled():
            self.train_tokens += real
        else:
            self.forward_tokens += real

    def close(self):
        self.handle.remove()


def rl_config(cfg: ExperimentConfig, steps: int, seed: int, out: Path | str = "", model: Path | str = ""):
    """`aha run`'s RL settings (aha/infra/config.py defaults) with this experiment's seed and eval size."""
    from aha.infra.config import stage_config
    return stage_config({"seed": seed, "eval_problems": cfg.eval_problems, "eval_k": cfg.eval_k}, steps, out, model)


def cached_models(cfg: ExperimentConfig, cache: Path, console=None) -> tuple[Path, Path]:
    """(teacher model dir, student base dir), made once per configuration and kept in `cache`."""
    from aha.core.train import train
    from aha.infra.base import ensure_base_model
    from aha.stages.pretrain import PretrainConfig, pretrain
    student = cache / f"student_h{cfg.student_hidden}_l{cfg.student_layers}_s{cfg.student_pretrain_steps}"
    if not (student / "config.json").is_file():
        pretrain(PretrainConfig(out=str(student), hidden=cfg.student_hidden, layers=cfg.student_layers,
                                steps=cfg.student_pretrain_steps), console=console)
    teacher = cache / f"teacher_rl{cfg.teacher_steps}"
    if not (teacher / "model" / "config.json").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        teacher.mkdir(parents=True)
        train(rl_config(cfg, cfg.teacher_steps, 0, teacher, ensure_base_model(console)), console=console, out=teacher)
    return teacher / "model", student


def rl_arm(student: Path, cfg: ExperimentConfig, steps: int, seed: int, folder: Path, console=None) -> dict:
    """The student trained by GRPO alone; its compute counted by a forward hook."""
    from aha.core.train import train
    from aha.infra.model import count_parameters, detect_device, detect_dtype, load_model, model_flops
    device = detect_device()
    model, tokenizer = load_model(student, device, detect_dtype(device))
    counter = TokenCounter(model)
    try:
        train(rl_config(cfg, steps, seed, folder), console=console, out=folder, model=model, tokenizer=tokenizer)
    finally:
        counter.close()
    return {"rl_steps": steps, "forward_tokens": counter.forward_tokens, "train_tokens": counter.train_tokens,
            "student_flops": model_flops(count_parameters(model), counter.forward_tokens, counter.train_tokens)}


def teacher_samples(
    teacher: Path, cfg: ExperimentConfig, seed: int, folder: Path, console=None
) -> tuple[list[dict], dict]:
    """Rejection sampling from the teacher (aha.stages.rejection) → folder/samples.jsonl; its compute counted apart."""
    from aha.infra.model import count_parameters, detect_device, load_model, model_flops
    from aha.stages.rejection import SampleConfig, model_completer, sample_rows, write_rows
    from aha.tasks import get_task
    model, tokenizer = load_model(teacher, detect_device())
    counter = TokenCounter(model)
    scfg = SampleConfig(model=str(teacher), prompts=cfg.distill_prompts, k=cfg.distill_k, max_new_tokens=64,
                        seed=seed, prompts_per_batch=64)
    rows, stats = sample_rows(
        get_task("addition"), model_completer(model.eval(), tokenizer, scfg), scfg, str(teacher), console
    )
    counter.close()
    write_rows(rows, folder / "samples.jsonl")
    return rows, {"teacher_samples_kept": stats["kept"], "teacher_samples": stats["samples"],
                  "teacher_sampling_flops": model_flops(count_parameters(model), counter.forward_tokens, 0)}


def distill_arm(rows: list[dict], student: Path, budget_tokens: float, cfg: ExperimentConfig, seed: int,
                folder: Path, console=None) -> dict:
    """SFT of the student on teacher samples, `budget_tokens` SFT tokens of them (aha.stages.sft)."""
    from aha.infra.model import count_parameters, load_model, load_tokenizer, model_flops
    from aha.stages.rejection import write_rows
    from aha.stages.sft import SFTConfig, sft, tokenize_example
    tokenizer = load_tokenizer(student)
    row_tokens = [len(tokenize_example(tokenizer, r["prompt"], r["response"])[0]) for r in rows]
    chosen = matched_sft_rows(row_tokens, budget_tokens)
    write_rows([rows[i] for i in chosen], folder / "sft_data.jsonl")
    trained = sft(SFTConfig(model=str(student), data=str(folder / "sft_data.jsonl"), out=str(folder / "model"),
                            epochs=1, lr=cfg.sft_lr, batch_tokens=cfg.sft_batch_tokens, seq_len=cfg.sft_seq_len,
                            seed=seed), console=console)
    train_tokens = sum(row_tokens[i] for i in chosen)
    params = count_parameters(load_model(folder / "model")[0])
    return {"forward_tokens": 0, "train_tokens": train_tokens, "student_flops": model_flops(params, 0, train_tokens),
            "sft_examples": len(chosen), "distinct_examples": len(set(chosen)),
            "epochs": round(len(chosen) / len(rows), 2), "sft_steps": trained["steps"]}


def run_seed(teacher: Path, student: Path, cfg: ExperimentConfig, seed: int, folder: Path, console=None) -> dict:
    """Per compute budget: the RL arm first (its measured compute is the budget), then the distill
    arm on the same budget; then the evaluations."""
    say = (lambda line: console.print(line, soft_wrap=True, markup=False)) if console else print
    folder.mkdir(parents=True)
    rows, sampling = teacher_samples(teacher, cfg, seed, folder, console)
    models = {"teacher": (teacher, sampling), "student_base": (student, {})}
    for steps in cfg.student_rl_steps:
        (folder / f"rl_{steps}").mkdir()
        (folder / f"distill_{steps}").mkdir()
        t0 = time.time()
        rl = rl_arm(student, cfg, steps, seed, folder / f"rl_{steps}", console)
        t1 = time.time()
        budget = sft_budget_tokens(rl["forward_tokens"], rl["train_tokens"])
        distill = distill_arm(rows, student, budget, cfg, seed, folder / f"distill_{steps}", console)
        models[f"distill@{steps}"] = (
            folder / f"distill_{steps}" / "model",
            {**distill, "seconds": round(time.time() - t1, 1)},
        )
        models[f"rl@{steps}"] = (folder / f"rl_{steps}" / "model", {**rl, "seconds": round(t1 - t0, 1)})
    record = {"seed": seed}
    for arm, (model_dir, extra) in models.items():
        result = evaluate_dir(model_dir, rl_config(cfg, 1, seed), console, label=f"eval {arm} (seed {seed})")
        result.pop("samples")
        record[arm] = {**result, **extra, "model": str(model_dir)}
    say(f"experiment: seed {seed}: pass@1 " + ", ".join(f"{arm} {record[arm]['pass@1']:.3f}" for arm in models))
    return record


def label(arm: str) -> str:
    if arm == "teacher":
        return "teacher: built-in base + RL"
    if arm == "student_base":
        return "student base (pretrained only)"
    kind, steps = arm.split("@")
    return (f"student + distillation, compute of {steps} RL steps" if kind == "distill"
            else f"student + RL alone, {steps} steps")


def markdown(report: dict) -> str:
    cfg, summary = report["config"], report["summary"]
    n = len(report["seeds"])
    cell = lambda pair, fmt: f"{pair[0]:{fmt}} ± {pair[1]:{fmt}}"
    lines = [f"# Distillation vs RL at equal student compute ({n} seed{'s' * (n > 1)})", "",
             f"Held-out pass@1: {cfg['eval_problems']} problems × {cfg['eval_k']} samples, T 0.6, top-p 0.95; "
             f"mean ± sample std over seeds. Student: hidden {cfg['student_hidden']}, {cfg['student_layers']} layers, "
             f"{report['student_parameters']:,} parameters; teacher {report['teacher_parameters']:,}. Student compute: "
             "2·N·(tokens read forward-only) + 6·N·(tokens trained), N = student parameters.", "",
             "| model | pass@1 | think rate | response tokens | student compute (GFLOP) |", "|---|---:|---:|---:|---:|"]
    for arm, metrics in summary.items():
        flops = metrics.get("student_flops")
        lines.append(
            f"| {label(arm)} | {cell(metrics['pass@1'], '.3f')} | {cell(metrics['think_rate'], '.2f')} | "
            f"{cell(metrics['mean_response_tokens'], '.1f')} | "
            f"{cell([f / 1e9 for f in flops], '.1f') if flops else '–'} |"
        )
    teacher = summary["teacher"].get("teacher_sampling_flops")
    if teacher:
        lines += [
            "",
            f"The teacher spent {teacher[0] / 1e9:.1f} GFLOP per seed sampling its answers (not student compute).",
        ]
    return "\n".join(lines) + "\n"


def prepare(out: Path, force: bool) -> Path:
    """A fresh experiment folder; with `force`, everything but its model cache goes."""
    if out.exists() and not out.is_dir():
        raise AhaError(f"--out {out} is a file: choose a directory")
    if out.exists() and any(p.name != "cache" for p in out.iterdir()):
        if not force:
            raise AhaError(f"--out {out} is not empty: choose another directory, or pass --force to replace it "
                           "(its cache/ of pretrained models is kept)")
        for p in out.iterdir():
            if p.name != "cache":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def distill_vs_rl(cfg: ExperimentConfig, force: bool = False, console=None) -> dict:
    from aha.infra.model import count_parameters, load_model
    if cfg.seeds < 1 or min(cfg.student_rl_steps, default=0) < 1:
        raise AhaError("experiment: --seeds and every student_rl_steps must be at least 1")
    start = time.time()
    out = prepare(Path(cfg.out), force)
    teacher, student = cached_models(cfg, out / "cache", console)
    per_seed = [run_seed(teacher, student, cfg, seed, out / f"seed{seed}", console) for seed in range(cfg.seeds)]
    report = {
        "experiment": "distill-vs-rl",
        "config": dataclasses.asdict(cfg),
        "seeds": per_seed,
        "summary": aggregate(per_seed),
        "student_parameters": count_parameters(load_model(student)[0]),
        "teacher_parameters": count_parameters(load_model(teacher)[0]),
        "wall_seconds": round(time.time() - start, 1),
    }
    (out / "experiment.json").write_text(json.dumps(report, indent=2))
    (out / "experiment.md").write_text(markdown(report))
    return report
