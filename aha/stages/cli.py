"""The commands of the recipe's stages besides RL: `aha run`, `aha sft`, `aha sample` (rejection
sampling), `aha distill` and `aha pretrain`. Each parser names its handler (`set_defaults`), as every
command module of aha does; aha/cli.py only lists the modules."""

import argparse
import json
from pathlib import Path

from aha.infra.errors import AhaError
from aha.infra.reader import from_args


def add_sample_args(p: argparse.ArgumentParser) -> None:
    from aha.stages.rejection import SampleConfig
    d = SampleConfig()
    p.add_argument("--task", default=d.task, help="task name (its TRAINING problems are used)")
    p.add_argument("--task-config", metavar="YAML", help="the task's own options, e.g. '{digits: 2}' for addition")
    p.add_argument("--data", help="data file for file-backed tasks (gsm8k, math, py:…)")
    p.add_argument("--prompts", type=int, default=d.prompts, help="training problems to sample")
    p.add_argument("--k", type=int, default=d.k, help="samples per problem")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="a sample that hits this is rejected")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="reject responses longer than this (0: no cap)")
    p.add_argument("--max-repetition", type=float, default=d.max_repetition,
                   help="reject when this share of word 3-grams repeats")
    p.add_argument("--language", default=d.language, help="e.g. en: reject reasoning not in this language")
    p.add_argument("--min-language", type=float, default=d.min_language, help="least language consistency kept")
    p.add_argument("--seed", type=int, default=d.seed)


def add_sft_args(p: argparse.ArgumentParser) -> None:
    from aha.stages.sft import SFTConfig
    d = SFTConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per optimizer step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="packed row length (longer examples are cut)")


def sample_config(args, model: str, out: str):
    """The rejection-sampling config of the flags: the task's options from --task-config and --data."""
    from aha.infra.model import resolve_model_dir
    from aha.infra.reader import coerce
    from aha.stages.rejection import SampleConfig
    options = coerce("--task-config", args.task_config, dict) if args.task_config else {}
    options |= {"data": args.data} if args.data else {}
    return from_args(SampleConfig, args, model=str(resolve_model_dir(model)), out=out, task_options=options)


def sft_config(args, model: str, data: str):
    from aha.infra.model import resolve_model_dir
    from aha.stages.sft import SFTConfig
    return from_args(SFTConfig, args, model=str(resolve_model_dir(model)), data=data)


def cmd_run(args, console):
    from aha.core.cli import config_from_args
    from aha.stages.run import run
    if args.resume:
        raise AhaError(f"aha run does not resume; continue its training with: aha train --resume {args.resume}")
    report = run(config_from_args(args), force=args.force, console=console)
    console.print(f"pass@1 {report['before_pass1']:.3f} → {report['after_pass1']:.3f}, "
                  f"response tokens {report['before_response_tokens']:.1f} → {report['after_response_tokens']:.1f}, "
                  f"{report['wall_seconds']:.0f} s; report in {args.out or 'runs/train'}/report.md")


def cmd_sft(args, console):
    from aha.stages.sft import sft
    print(json.dumps(sft(sft_config(args, args.model, args.data), console=console)))


def cmd_sample(args, console):
    from aha.stages.rejection import rejection_sample
    print(json.dumps(rejection_sample(sample_config(args, args.model, args.out), console=console)))


def cmd_distill(args, console):
    from aha.stages.distill import distill
    result = distill(sample_config(args, args.teacher, ""), sft_config(args, args.student, ""), console=console)
    print(json.dumps(result))


def cmd_pretrain(args, console):
    from aha.stages.pretrain import PretrainConfig, pretrain
    print(json.dumps(pretrain(from_args(PretrainConfig, args), console=console)))


def add_run_parser(sub) -> None:
    from aha.core.cli import add_train_args
    p = sub.add_parser("run", help="the whole demo: base model → eval → GRPO → eval → report",
                       description="Base model (shipped or pretrained once) → held-out eval → GRPO → held-out eval "
                                   "→ report.json/md + plots in --out.")
    add_train_args(p)
    p.set_defaults(handler=cmd_run)


def add_data_parsers(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on prompt/response JSONL (loss on responses, packed)",
                       description="SFT on JSONL rows {prompt, response}: next-token loss on the response tokens "
                                   "only; examples packed into --seq-len rows with per-example positions and a "
                                   "block-diagonal attention mask. Writes a plain transformers dir to --out.")
    p.add_argument("--model", required=True, help="model dir or run folder to start from")
    p.add_argument("--data", required=True, help="JSONL file of {\"prompt\": …, \"response\": …} rows")
    p.add_argument("--out", required=True, help="where to save the fine-tuned model")
    add_sft_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_sft)

    p = sub.add_parser("sample", help="rejection sampling: keep only verified, clean samples as JSONL",
                       description="k samples per training problem; keeps those the task verifies (accuracy 1) "
                                   "that are well-formed, not truncated or too long, not repetitive (and in "
                                   "--language): rows prompt, response, model, task, seed, reward, accuracy.")
    p.add_argument("--model", required=True, help="model dir or run folder")
    p.add_argument("--out", required=True, help="JSONL file to write")
    add_sample_args(p)
    p.set_defaults(handler=cmd_sample)

    p = sub.add_parser("distill", help="sample verified answers from a teacher, then SFT a student on them",
                       description="aha sample with --teacher, then aha sft of --student on the kept samples; --out "
                                   "gets samples.jsonl, the student model and distill.json.")
    p.add_argument("--teacher", required=True, help="teacher model dir or run folder")
    p.add_argument("--student", required=True, help="student model dir or run folder")
    p.add_argument("--out", required=True, help="folder for samples.jsonl and the distilled student")
    add_sample_args(p)
    add_sft_args(p)
    p.set_defaults(handler=cmd_distill)


def add_pretrain_parser(sub) -> None:
    from aha.stages.pretrain import PretrainConfig
    p = sub.add_parser("pretrain", help="train the tiny base model on the synthetic corpus",
                       description="Next-token pretraining of the built-in tiny model on a corpus made by the task "
                                   "generator.")
    d = PretrainConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--arch", default=d.arch, help="qwen2 or deepseek_v3")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--digits", type=int, default=d.digits, help="digits per operand of the corpus's problems")
    p.add_argument("--think-frac", type=float, default=d.think_frac,
                   help="share of corpus documents with worked reasoning")
    p.add_argument("--task", default=d.task, choices=("addition", "multiplication"),
                   help="whose corpus (multiplication: the tool demo)")
    p.add_argument("--tool-frac", type=float, default=d.tool_frac,
                   help="multiplication: share of worked answers that call the tool")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this many seconds (0: no cap)")
    p.set_defaults(handler=cmd_pretrain)


def add_experiment_parser(sub) -> None:
    from aha.stages.experiment import EXPERIMENTS, ExperimentConfig
    p = sub.add_parser(
        "experiment",
        help="papers' findings as experiments: distill-vs-rl, length-bias, entropy, tools",
        description="distill-vs-rl: a small pretrained student distilled from an RL teacher vs the same "
        "student trained by RL alone, at equal student compute. length-bias: GRPO vs Dr. GRPO, "
        "the length of correct and wrong completions. entropy: GRPO vs clip-higher vs Clip-Cov, "
        "policy entropy and pass@1. tools: RL with the python tool vs without, on 4 × 3-digit "
        "multiplication, held-out pass@1 and tool-use rate before and after. Mean ± std over seeds → "
        "--out/experiment.json, experiment.md "
        "(aha/stages/experiment.py, aha/stages/findings.py).",
    )
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--seeds", type=int, default=ExperimentConfig.seeds, help="seeds 0..N-1")
    p.add_argument(
        "--out", default=None, help="default runs/<name> (runs/distill_vs_rl, runs/length_bias, runs/entropy)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every step, meaningless numbers")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (its cache/ of models is kept)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any key of the experiment's config (ExperimentConfig, findings.FindingConfig), e.g. steps=150")
    p.set_defaults(handler=cmd_experiment)


def cmd_distill_vs_rl(args, console) -> None:
    from aha.infra.reader import apply_values, parse_kv
    from aha.stages.experiment import QUICK, ExperimentConfig, distill_vs_rl, markdown
    cfg = ExperimentConfig(out=args.out or ExperimentConfig.out, seeds=args.seeds)
    if args.quick:
        apply_values(cfg, QUICK, "--quick")
    apply_values(cfg, parse_kv(args.overrides), "command line")
    report = distill_vs_rl(cfg, force=args.force, console=console)
    print(markdown(report), end="")
    console.print(
        f"{report['wall_seconds']:.0f} s; {Path(cfg.out) / 'experiment.json'}, {Path(cfg.out) / 'experiment.md'}"
    )


def cmd_experiment(args, console) -> None:
    from aha.stages.findings import cmd_finding
    {"distill-vs-rl": cmd_distill_vs_rl, "length-bias": cmd_finding, "entropy": cmd_finding, "tools": cmd_finding}[
        args.name
    ](args, console)
