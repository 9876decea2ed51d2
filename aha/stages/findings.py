"""`aha experiment length-bias`, `entropy` and `tools`: findings of the 2025 papers, and the tool
demo, on built-in tasks, each arm × seed an `aha train` run, mean ± sample std over seeds, a plot.

    aha experiment length-bias --seeds 3 --out runs/length_bias
    aha experiment entropy --seeds 3 --out runs/entropy
    aha experiment tools --seeds 3 --out runs/tools
    aha experiment entropy --quick --seeds 1 --out /tmp/ent          # a smoke run of every step

length-bias (Dr. GRPO, "Understanding R1-Zero-Like Training", arXiv 2503.20783): GRPO's 1/|o|
weights each token of a wrong (A < 0) answer less the longer the answer, so long wrong answers
are pushed down less than short ones and wrong answers grow longer; Dr. GRPO's constant
normaliser has no such pull. Arms: the presets grpo and dr_grpo. On the built-in task length is
not free — a direct answer has 6 tokens, a worked one 37–38 whatever its correctness, and the
only length change is the share of answers that reason — so by default (`base=padded`) the arms
start from the built-in base model fine-tuned (aha.stages.sft, cached in DIR/cache) on 2,048 documents
of its own pretraining corpus, each with 0–4 spaces, drawn at random, between the answer's
digits and `</answer>`: the score strips them and the format allows them, so that padding is a
free length that says nothing about correctness, and any drift of it comes from the loss.
`base=builtin` runs the built-in model as it is. Measured at every step: the length of correct
and of wrong completions (all samples), and the padding of each (from rollouts.jsonl: the first
sample of every group).

entropy (DAPO's clip-higher, arXiv 2503.14476; Clip-Cov, "The Entropy Mechanism of RL for
Reasoning LMs", arXiv 2505.22617): symmetric clipping (0.2) lets entropy collapse; a higher
upper clip (0.28) or cutting the gradient of a few high-covariance tokens (Clip-Cov, r = 2e-4,
window (1, 5)) keeps more of it at equal or better accuracy. Arms, everything else GRPO: grpo,
clip_higher, clip_cov. Clipping acts only off-policy: with one update per rollout (μ = 1) aha's
ratio is exactly 1, and grpo and clip_higher would be the same run, so the arms take μ = 4 inner
updates per rollout (`mu`). Measured: the policy's mean token entropy and the training pass rate
at every step, held-out pass@1 every `eval_every` steps and at the end.

tools (aha/core/tools/; TRL's `tools=`, verl's agent loop): can RL discover that a tool pays? The task
is 4 × 3-digit multiplication, whose scratchpad is long and error-prone and whose `<tool>a*b</tool>`
call is short and exact. The base model is pretrained (aha.stages.pretrain, cached in DIR/cache) on a
corpus where `tool_think_frac` of the answers are worked and only `tool_frac` of those call the
tool, so at the start it mostly works by hand, and mostly errs. Arms: `tools` (tools=python: the
call runs in the sandbox, its output is appended and masked out of the loss) and `no_tools` (the
same model and RL, no tool: a call gets no output, the model writes its own). Measured: held-out
pass@1 and tool-use rate before RL and after, through the arm's own loop (`aha eval`'s), the
training pass rate, the share of training samples that call the tool, and the response length.

Each experiment writes DIR/experiment.json (per seed and arm: the curves; summary: mean ± std over
seeds of the first and last `window` steps' means), DIR/experiment.md and DIR/curves.png.
"""

import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aha.infra.config import Config
from aha.infra.errors import AhaError
from aha.stages.findings_report import EVAL_KEYS, markdown, plot, summarise

LENGTH_CURVES = ("response_tokens_correct", "response_tokens_wrong", "pass_rate", "think_rate")
ENTROPY_CURVES = ("entropy", "pass_rate", "clip_frac", "response_tokens")
TOOLS_CURVES = ("pass_rate", "response_tokens", "tool_use_rate")


@dataclass
class FindingConfig:
    out: str = ""
    seeds: int = 3
    steps: int = 100
    window: int = 10                 # steps averaged for the "first" and "last" summary values
    # aha train keys for every arm, e.g. {lr: 2e-4}
    rl: dict = field(default_factory=dict, metadata={"keys_of": Config})
    # length-bias
    base: str = "padded"             # padded: the free-length model below | builtin: the built-in model as it is
    pad_examples: int = 2048         # SFT documents of the padded model
    max_padding: int = 4             # spaces before </answer>, 0..max_padding uniformly
    pad_lr: float = 3e-4
    # entropy
    mu: int = 4
    clip_higher: float = 0.28
    cov_share: float = 0.0002
    eval_every: int = 25
    eval_problems: int = 100
    eval_k: int = 4
    # tools
    tool_digits: int = 4             # digits of the first factor (the second has 3)
    tool_think_frac: float = 0.6     # share of the base corpus's answers that are worked
    tool_frac: float = 0.3           # share of the worked answers that call the tool
    tool_pretrain_steps: int = 2000
    tool_new_tokens: int = 128       # the whole interaction, tool output included


QUICK = {"steps": 3, "window": 2, "pad_examples": 16, "eval_every": 2, "eval_problems": 4, "eval_k": 1, "mu": 2,
         "tool_pretrain_steps": 3, "rl": {"prompts_per_step": 2, "group_size": 4}}
BASES = ("padded", "builtin")


def length_bias_arms(cfg: FindingConfig) -> dict[str, dict]:
    return {"grpo": {"algo": "grpo"}, "dr_grpo": {"algo": "dr_grpo"}}


def entropy_arms(cfg: FindingConfig) -> dict[str, dict]:
    return {"grpo": {"algo": "grpo", "mu": cfg.mu},
            "clip_higher": {"algo": "grpo", "mu": cfg.mu, "clip_high": cfg.clip_higher},
            "clip_cov": {"algo": "grpo", "mu": cfg.mu, "surrogate": "clip_cov", "cov_share": cfg.cov_share}}


def tools_arms(cfg: FindingConfig) -> dict[str, dict]:
    return {"tools": {"tools": "python"}, "no_tools": {}}


def tools_base(cfg: FindingConfig, cache: Path, console=None) -> Path:
    """The multiplication base model of the tools demo (aha pretrain --task multiplication); made once, cached."""
    from aha.stages.pretrain import PretrainConfig, pretrain

    path = (
        cache
        / f"multiplication_d{cfg.tool_digits}_w{cfg.tool_think_frac:g}_t{cfg.tool_frac:g}_s{cfg.tool_pretrain_steps}"
    )
    if not (path / "config.json").is_file():
        pretrain(
            PretrainConfig(
                out=str(path),
                task="multiplication",
                digits=cfg.tool_digits,
                think_frac=cfg.tool_think_frac,
                tool_frac=cfg.tool_frac,
                steps=cfg.tool_pretrain_steps,
            ),
            console,
        )
    return path


def tools_settings(cfg: FindingConfig, cache: Path, console=None) -> dict:
    return {"model": str(tools_base(cfg, cache, console)), "task": "multiplication", "digits": cfg.tool_digits,
            "max_new_tokens": cfg.tool_new_tokens, "eval_every": cfg.eval_every, "eval_problems": cfg.eval_problems,
            "eval_k": cfg.eval_k, "dump_rollouts_every": 1}


def tool_call_curve(folder: Path, steps: int) -> dict[str, list]:
    """Per step, the share of rollouts.jsonl's samples (the first of each group) that write a tool
    call, whether or not a tool answered it: the one tool-use figure both arms have."""
    found = [[] for _ in range(steps)]
    for line in (folder / "rollouts.jsonl").read_text().splitlines():
        row = json.loads(line)
        found[row["step"]].append(float("<tool>" in row["completion"] or "<tool_call>" in row["completion"]))
    return {"tool_call_rate": [sum(v) / len(v) if v else None for v in found]}


def padded_base(cfg: FindingConfig, cache: Path, console=None) -> Path:
    """The free-length model: the built-in base after SFT on its own corpus (30% worked answers, as
    aha.stages.pretrain's) with 0..max_padding spaces before `</answer>`; made once, cached."""
    import random

    from aha.infra.base import ensure_base_model
    from aha.infra.model import load_model
    from aha.stages.sft import SFTConfig, sft_model
    from aha.tasks import get_task
    path = cache / f"padded_n{cfg.pad_examples}_p{cfg.max_padding}_lr{cfg.pad_lr:g}"
    if (path / "config.json").is_file():
        return path
    task, rng = get_task("addition"), random.Random(7)
    rows = []
    for _, problem in zip(range(cfg.pad_examples), task.train_problems(99)):
        document = task.corpus_document(problem, rng.random() < 0.3, rng.randint(0, cfg.max_padding))
        rows.append({"prompt": task.prompt(problem), "response": document[len(task.prompt(problem)):]})
    model, tokenizer = load_model(ensure_base_model(console), "cpu")
    sft_model(
        model, tokenizer, rows, SFTConfig(lr=cfg.pad_lr, epochs=1, batch_tokens=1024, seq_len=256, seed=0), console
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def answer_padding(completion: str) -> int | None:
    """Spaces between the answer and `</answer>`, or None without one.

    >>> answer_padding(" <answer>1458   </answer>"), answer_padding(" <answer>12"), answer_padding("<answer>7</answer>")
    (3, None, 0)
    """
    match = re.search(r"( *)</answer>", completion)
    return len(match.group(1)) if match else None


def padding_curves(folder: Path, steps: int) -> dict[str, list]:
    """Per step, the mean padding of the correct and of the wrong samples in rollouts.jsonl."""
    found = {"padding_correct": [[] for _ in range(steps)], "padding_wrong": [[] for _ in range(steps)]}
    for line in (folder / "rollouts.jsonl").read_text().splitlines():
        row = json.loads(line)
        padding = answer_padding(row["completion"])
        if padding is not None:
            found["padding_correct" if row["accuracy"] >= 1 else "padding_wrong"][row["step"]].append(padding)
    return {key: [sum(v) / len(v) if v else None for v in per_step] for key, per_step in found.items()}


def length_bias_settings(cfg: FindingConfig, cache: Path, console=None) -> dict:
    """aha train keys every length-bias arm shares."""
    from aha.infra.base import ensure_base_model
    model = ensure_base_model(console) if cfg.base == "builtin" else padded_base(cfg, cache, console)
    return {"model": str(model), "eval_every": 0, "dump_rollouts_every": 1}


def entropy_settings(cfg: FindingConfig, cache: Path, console=None) -> dict:
    from aha.infra.base import ensure_base_model
    return {"model": str(ensure_base_model(console)), "eval_every": cfg.eval_every,
            "eval_problems": cfg.eval_problems, "eval_k": cfg.eval_k}


def held_out(run_cfg, model, tokenizer, seed: int, step: int, label: str, console=None) -> dict:
    """Held-out pass@1 (and tool-use rate, with tools) through the run's own sampler, as `aha eval`."""
    from aha.core.tools import eval_sampler
    from aha.eval.evaluate import EvalSpec, evaluate
    from aha.tasks import get_task
    spec = EvalSpec(run_cfg.eval_problems, run_cfg.eval_k, max_new_tokens=run_cfg.max_new_tokens, seed=seed)
    result = evaluate(model, tokenizer, get_task(run_cfg.task, **run_cfg.task_options()), spec, console=console,
                      label=label, sampler=eval_sampler(run_cfg))
    return {"step": step, **{key: result[key] for key in EVAL_KEYS if key in result}}


def run_arm(settings: dict, arm: dict, cfg: FindingConfig, seed: int, folder: Path, curves: tuple[str, ...],
            final_eval: bool, finding_extra=None, console=None, before_eval: bool = False) -> dict:
    """One `aha train` run; its per-step curves, held-out evals, a final held-out pass@1 and, with
    `before_eval`, one of the starting model first."""
    from aha.core.train import train
    from aha.infra.config import load_config
    from aha.infra.model import load_model
    overrides = {**settings, **cfg.rl, **arm, "steps": cfg.steps, "seed": seed, "out": str(folder)}
    run_cfg = load_config(None, overrides)
    folder.mkdir(parents=True)
    start = time.time()
    before = []
    if before_eval:
        model, tokenizer = load_model(run_cfg.model, "cpu")
        before = [held_out(run_cfg, model, tokenizer, seed, 0, f"eval {folder.name} before", console)]
    result = train(run_cfg, console=console, out=folder)
    record = {
        "curves": {key: [r.get(key) for r in result["history"]] for key in curves}
        | (finding_extra(folder, cfg.steps) if finding_extra else {}),
        "evals": before + [{"step": e["step"], **{k: e[k] for k in EVAL_KEYS if k in e}} for e in result["evals"]],
        "seconds": round(time.time() - start, 1),
    }
    if final_eval:
        record["evals"].append(held_out(run_cfg, result["model"], result["tokenizer"], seed, cfg.steps,
                                        f"eval {folder.name}", console))
    return record


@dataclass(frozen=True)
class Finding:
    arms: Callable[[FindingConfig], dict[str, dict]]                  # arm name → aha train keys
    settings: Callable[[FindingConfig, Path, object], dict]          # the keys every arm shares
    curves: tuple[str, ...]                  # keys of metrics.jsonl recorded per step
    extra: Callable[[Path, int], dict[str, list]] | None   # more per-step curves, from the run folder
    final_eval: bool
    panels: tuple[tuple[str, str], ...]      # (curve, title) of the plot
    rows: tuple[tuple[str, str, str], ...]   # (curve, column title, format) of the table
    before_eval: bool = False                # also a held-out eval of the starting model (step 0)


FINDINGS = {
    "length-bias": Finding(
        length_bias_arms,
        length_bias_settings,
        LENGTH_CURVES,
        padding_curves,
        False,
        (
            ("response_tokens_wrong", "length of wrong completions (tokens)"),
            ("response_tokens_correct", "length of correct completions (tokens)"),
            ("padding_wrong", "padding of wrong completions (spaces)"),
            ("padding_correct", "padding of correct completions (spaces)"),
        ),
        (
            ("response_tokens_wrong", "wrong: tokens", ".1f"),
            ("response_tokens_correct", "correct: tokens", ".1f"),
            ("padding_wrong", "wrong: padding", ".2f"),
            ("padding_correct", "correct: padding", ".2f"),
            ("pass_rate", "pass rate", ".3f"),
            ("think_rate", "think rate", ".2f"),
        ),
    ),
    "entropy": Finding(
        entropy_arms,
        entropy_settings,
        ENTROPY_CURVES,
        None,
        True,
        (
            ("entropy", "policy entropy (nats per token)"),
            ("pass_rate", "training pass rate"),
            ("clip_frac", "share of tokens clipped / cut"),
        ),
        (("entropy", "entropy", ".3f"), ("pass_rate", "pass rate", ".3f"), ("clip_frac", "clipped", ".4f")),
    ),
    "tools": Finding(
        tools_arms,
        tools_settings,
        TOOLS_CURVES,
        tool_call_curve,
        True,
        (
            ("pass_rate", "training pass rate"),
            ("tool_call_rate", "share of samples that call the tool"),
            ("response_tokens", "response length (tokens, tool output included)"),
        ),
        (
            ("pass_rate", "pass rate", ".3f"),
            ("tool_call_rate", "tool calls", ".2f"),
            ("response_tokens", "tokens", ".1f"),
        ),
        before_eval=True,
    ),
}


def run_finding(name: str, cfg: FindingConfig, force: bool = False, console=None) -> dict:
    from aha.stages.experiment import prepare

    if (
        min(cfg.seeds, cfg.steps, cfg.window, cfg.mu, cfg.pad_examples, cfg.tool_pretrain_steps, cfg.tool_new_tokens)
        < 1
    ):
        raise AhaError(f"experiment {name}: seeds, steps, window, mu, pad_examples, tool_pretrain_steps and "
                       "tool_new_tokens must be at least 1")
    if cfg.base not in BASES:
        raise AhaError(f"experiment {name}: base={cfg.base!r} is not one of {', '.join(BASES)}")
    finding = FINDINGS[name]
    start = time.time()
    out = prepare(Path(cfg.out), force)
    settings = finding.settings(cfg, out / "cache", console)
    per_seed = []
    for seed in range(cfg.seeds):
        arms = {
            arm: run_arm(
                settings,
                overrides,
                cfg,
                seed,
                out / f"seed{seed}" / arm,
                finding.curves,
                finding.final_eval,
                finding.extra,
                console,
                finding.before_eval,
            )
            for arm, overrides in finding.arms(cfg).items()
        }
        per_seed.append({"seed": seed, "arms": arms})
    report = {"experiment": name, "config": dataclasses.asdict(cfg), "settings": settings, "seeds": per_seed,
              "summary": summarise(per_seed, cfg.window), "wall_seconds": round(time.time() - start, 1)}
    (out / "experiment.json").write_text(json.dumps(report, indent=2))
    (out / "experiment.md").write_text(markdown(report, finding))
    plot(report, finding, out / "curves.png")
    return report


def cmd_finding(args, console) -> None:
    from aha.infra.reader import apply_values, parse_kv
    cfg = FindingConfig(out=args.out or f"runs/{args.name.replace('-', '_')}", seeds=args.seeds)
    if args.quick:
        apply_values(cfg, QUICK, "--quick")
    apply_values(cfg, parse_kv(args.overrides), "command line")
    report = run_finding(args.name, cfg, force=args.force, console=console)
    print(markdown(report, FINDINGS[args.name]), end="")
    console.print(
        f"{report['wall_seconds']:.0f} s; {Path(cfg.out) / 'experiment.json'}, {Path(cfg.out) / 'curves.png'}"
    )
