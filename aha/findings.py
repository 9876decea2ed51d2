"""`aha experiment length-bias` and `aha experiment entropy`: two findings of the 2025 papers on
the built-in task, each arm × seed an `aha train` run, mean ± sample std over seeds, and a plot.

    aha experiment length-bias --seeds 3 --out runs/length_bias
    aha experiment entropy --seeds 3 --out runs/entropy
    aha experiment entropy --quick --seeds 1 --out /tmp/ent          # a smoke run of every step

length-bias (Dr. GRPO, "Understanding R1-Zero-Like Training", arXiv 2503.20783): GRPO's 1/|o|
weights each token of a wrong (A < 0) answer less the longer the answer, so long wrong answers
are pushed down less than short ones and wrong answers grow longer; Dr. GRPO's constant
normaliser has no such pull. Arms: the presets grpo and dr_grpo. On the built-in task length is
not free — a direct answer has 6 tokens, a worked one 37–38 whatever its correctness, and the
only length change is the share of answers that reason — so by default (`base=filler`) the arms
train a small model pretrained (aha.pretrain, cached in DIR/cache) on the built-in corpus's
direct answers, each preceded by 0–4 hesitations " hmm" drawn at random: length is free and says
nothing about correctness, so any drift of it comes from the loss. The reward is accuracy alone
(the format reward would count the hesitations as ill-formed). `base=builtin` runs the built-in
model and task instead. Measured: the length of correct and of wrong completions at every step.

entropy (DAPO's clip-higher, arXiv 2503.14476; Clip-Cov, "The Entropy Mechanism of RL for
Reasoning LMs", arXiv 2505.22617): symmetric clipping (0.2) lets entropy collapse; a higher
upper clip (0.28) or cutting the gradient of a few high-covariance tokens (Clip-Cov, r = 2e-4,
window (1, 5)) keeps more of it at equal or better accuracy. Arms, everything else GRPO: grpo,
clip_higher, clip_cov. Clipping acts only off-policy: with one update per rollout (μ = 1) aha's
ratio is exactly 1, and grpo and clip_higher would be the same run, so the arms take μ = 4 inner
updates per rollout (`mu`). Measured: the policy's mean token entropy and the training pass rate
at every step, held-out pass@1 every `eval_every` steps and at the end.

Each experiment writes DIR/experiment.json (per seed and arm: the curves; summary: mean ± std over
seeds of the first and last `window` steps' means), DIR/experiment.md and DIR/curves.png.
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aha.errors import AhaError

LENGTH_CURVES = ("response_tokens_correct", "response_tokens_wrong", "pass_rate", "response_tokens")
ENTROPY_CURVES = ("entropy", "pass_rate", "clip_frac", "response_tokens")


@dataclass
class FindingConfig:
    out: str = ""
    seeds: int = 3
    steps: int = 100
    window: int = 10                 # steps averaged for the "first" and "last" summary values
    rl: dict = field(default_factory=dict)   # aha train keys for every arm, e.g. {lr: 2e-4}
    # length-bias
    base: str = "filler"             # filler: the free-length model below | builtin: the built-in model and task
    base_hidden: int = 128
    base_layers: int = 2
    base_steps: int = 1000
    max_filler: int = 4
    max_new_tokens: int = 48         # filler: room for 8 hesitations beyond the longest the corpus shows
    # entropy
    mu: int = 4
    clip_higher: float = 0.28
    cov_share: float = 0.0002
    eval_every: int = 25
    eval_problems: int = 100
    eval_k: int = 4


QUICK = {"steps": 3, "window": 2, "base_steps": 20, "eval_every": 2, "eval_problems": 4, "eval_k": 1, "mu": 2,
         "rl": {"prompts_per_step": 2, "group_size": 4}}


def length_bias_arms(cfg: FindingConfig) -> dict[str, dict]:
    return {"grpo": {"algo": "grpo"}, "dr_grpo": {"algo": "dr_grpo"}}


def entropy_arms(cfg: FindingConfig) -> dict[str, dict]:
    return {"grpo": {"algo": "grpo", "mu": cfg.mu},
            "clip_higher": {"algo": "grpo", "mu": cfg.mu, "clip_high": cfg.clip_higher},
            "clip_cov": {"algo": "grpo", "mu": cfg.mu, "surrogate": "clip_cov", "cov_share": cfg.cov_share}}


def filler_base(cfg: FindingConfig, cache: Path, console=None) -> Path:
    """The free-length base model: direct answers only, each after 0..max_filler " hmm", cached."""
    from aha.pretrain import PretrainConfig, pretrain
    path = cache / f"filler_h{cfg.base_hidden}_l{cfg.base_layers}_s{cfg.base_steps}_f{cfg.max_filler}"
    if not (path / "config.json").is_file():
        pretrain(PretrainConfig(out=str(path), hidden=cfg.base_hidden, layers=cfg.base_layers, steps=cfg.base_steps,
                                think_frac=0.0, max_filler=cfg.max_filler), console=console)
    return path


def length_bias_settings(cfg: FindingConfig, cache: Path, console=None) -> dict:
    """aha train keys every length-bias arm shares."""
    from aha.base import ensure_base_model
    if cfg.base == "builtin":
        return {"model": str(ensure_base_model(console)), "eval_every": 0}
    if cfg.base != "filler":
        raise AhaError(f"length-bias: base={cfg.base!r} is not one of filler, builtin")
    return {"model": str(filler_base(cfg, cache, console)), "eval_every": 0, "accuracy_weight": 1.0,
            "format_weight": 0.0, "max_new_tokens": cfg.max_new_tokens}


def entropy_settings(cfg: FindingConfig, cache: Path, console=None) -> dict:
    from aha.base import ensure_base_model
    return {"model": str(ensure_base_model(console)), "eval_every": cfg.eval_every,
            "eval_problems": cfg.eval_problems, "eval_k": cfg.eval_k}


def run_arm(settings: dict, arm: dict, cfg: FindingConfig, seed: int, folder: Path, curves: tuple[str, ...],
            final_eval: bool, console=None) -> dict:
    """One `aha train` run; its per-step curves, held-out evals, and a final held-out pass@1."""
    from aha.config import load_config
    from aha.evaluate import EvalSpec, evaluate
    from aha.tasks import get_task
    from aha.train import train
    overrides = {**settings, **cfg.rl, **arm, "steps": cfg.steps, "seed": seed, "out": str(folder)}
    run_cfg = load_config(None, overrides)
    folder.mkdir(parents=True)
    start = time.time()
    result = train(run_cfg, console=console, out=folder)
    record = {"curves": {key: [r.get(key) for r in result["history"]] for key in curves},
              "evals": [{"step": e["step"], "pass@1": e["pass@1"]} for e in result["evals"]],
              "seconds": round(time.time() - start, 1)}
    if final_eval:
        spec = EvalSpec(run_cfg.eval_problems, run_cfg.eval_k, max_new_tokens=run_cfg.max_new_tokens, seed=seed)
        final = evaluate(result["model"], result["tokenizer"], get_task(run_cfg.task, **run_cfg.task_options()), spec,
                         console=console, label=f"eval {folder.name}")
        record["evals"].append({"step": cfg.steps, "pass@1": final["pass@1"]})
    return record


def window_mean(values: list, window: int, last: bool) -> float | None:
    """Mean of the first (or last) `window` non-missing values.

    >>> window_mean([None, 1.0, 2.0, 3.0, None, 5.0], 2, last=False), window_mean([None, 1.0, 2.0, 3.0, None, 5.0], 2, last=True)
    (1.5, 4.0)
    """
    present = [v for v in values if v is not None]
    chosen = present[-window:] if last else present[:window]
    return sum(chosen) / len(chosen) if chosen else None


def summarise(per_seed: list[dict], window: int) -> dict:
    """{arm: {curve: {first: [mean, std], last: [mean, std]}, final_pass@1: [mean, std]}} over seeds."""
    from aha.experiment import mean_std
    summary = {}
    for arm in per_seed[0]["arms"]:
        runs = [seed["arms"][arm] for seed in per_seed]
        summary[arm] = {}
        for curve in runs[0]["curves"]:
            summary[arm][curve] = {}
            for end in ("first", "last"):
                values = [window_mean(run["curves"][curve], window, end == "last") for run in runs]
                if all(v is not None for v in values):
                    summary[arm][curve][end] = list(mean_std(values))
        if runs[0]["evals"]:
            summary[arm]["final_pass@1"] = list(mean_std([run["evals"][-1]["pass@1"] for run in runs]))
    return summary


@dataclass(frozen=True)
class Finding:
    arms: Callable[[FindingConfig], dict[str, dict]]                  # arm name → aha train keys
    settings: Callable[[FindingConfig, Path, object], dict]          # the keys every arm shares
    curves: tuple[str, ...]
    final_eval: bool
    panels: tuple[tuple[str, str], ...]      # (curve, title) of the plot
    rows: tuple[tuple[str, str, str], ...]   # (curve, column title, format) of the table


FINDINGS = {
    "length-bias": Finding(length_bias_arms, length_bias_settings, LENGTH_CURVES, False,
                           (("response_tokens_wrong", "length of wrong completions (tokens)"),
                            ("response_tokens_correct", "length of correct completions (tokens)"),
                            ("pass_rate", "training pass rate")),
                           (("response_tokens_wrong", "wrong: tokens", ".1f"), ("response_tokens_correct", "correct: tokens", ".1f"),
                            ("pass_rate", "pass rate", ".3f"))),
    "entropy": Finding(entropy_arms, entropy_settings, ENTROPY_CURVES, True,
                       (("entropy", "policy entropy (nats per token)"), ("pass_rate", "training pass rate"),
                        ("clip_frac", "share of tokens clipped / cut")),
                       (("entropy", "entropy", ".3f"), ("pass_rate", "pass rate", ".3f"), ("clip_frac", "clipped", ".4f"))),
}


def plot(report: dict, finding: Finding, path: Path) -> None:
    """Each panel: per arm the seed-mean curve (smoothed over 10 steps) and a ± std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from aha.report import smooth
    fig, axes = plt.subplots(1, len(finding.panels), figsize=(4.4 * len(finding.panels), 3.6))
    for ax, (curve, title) in zip(axes, finding.panels):
        for arm in report["seeds"][0]["arms"]:
            runs = [smooth([np.nan if v is None else v for v in seed["arms"][arm]["curves"][curve]])
                    for seed in report["seeds"]]
            values = np.array(runs, dtype=float)                                # (seeds, steps)
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            steps = np.arange(values.shape[1])
            ax.plot(steps, mean, label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"aha experiment {report['experiment']}: mean ± std over {len(report['seeds'])} seeds "
                 "(10-step moving average)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict, finding: Finding) -> str:
    n, window = len(report["seeds"]), report["config"]["window"]
    cell = lambda pair, fmt: "–" if pair is None else f"{pair[0]:{fmt}} ± {pair[1]:{fmt}}"
    head = " | ".join(f"{title} first → last {window} steps" for _, title, _ in finding.rows)
    lines = [f"# aha experiment {report['experiment']} ({n} seed{'s' * (n > 1)}, {report['config']['steps']} steps)", "",
             f"| arm | {head} |" + (" final held-out pass@1 |" if finding.final_eval else ""),
             "|---|" + "---:|" * (len(finding.rows) + finding.final_eval)]
    for arm, metrics in report["summary"].items():
        cells = [f"{cell(metrics[c].get('first'), fmt)} → {cell(metrics[c].get('last'), fmt)}" for c, _, fmt in finding.rows]
        if finding.final_eval:
            cells.append(cell(metrics.get("final_pass@1"), ".3f"))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_finding(name: str, cfg: FindingConfig, force: bool = False, console=None) -> dict:
    from aha.experiment import prepare
    if cfg.seeds < 1 or cfg.steps < 1 or cfg.window < 1:
        raise AhaError(f"experiment {name}: seeds, steps and window must be at least 1")
    finding = FINDINGS[name]
    start = time.time()
    out = prepare(Path(cfg.out), force)
    settings = finding.settings(cfg, out / "cache", console)
    per_seed = []
    for seed in range(cfg.seeds):
        arms = {arm: run_arm(settings, overrides, cfg, seed, out / f"seed{seed}" / arm, finding.curves, finding.final_eval,
                             console) for arm, overrides in finding.arms(cfg).items()}
        per_seed.append({"seed": seed, "arms": arms})
    report = {"experiment": name, "config": dataclasses.asdict(cfg), "settings": settings, "seeds": per_seed,
              "summary": summarise(per_seed, cfg.window), "wall_seconds": round(time.time() - start, 1)}
    (out / "experiment.json").write_text(json.dumps(report, indent=2))
    (out / "experiment.md").write_text(markdown(report, finding))
    plot(report, finding, out / "curves.png")
    return report


def cmd_finding(args, console) -> None:
    from aha.config import parse_kv
    from aha.pipeline import apply_typed
    cfg = FindingConfig(out=args.out or f"runs/{args.name.replace('-', '_')}", seeds=args.seeds)
    if args.quick:
        apply_typed(cfg, QUICK, "--quick")
    apply_typed(cfg, parse_kv(args.overrides), "command line")
    report = run_finding(args.name, cfg, force=args.force, console=console)
    print(markdown(report, FINDINGS[args.name]), end="")
    console.print(f"{report['wall_seconds']:.0f} s; {Path(cfg.out) / 'experiment.json'}, {Path(cfg.out) / 'curves.png'}")
