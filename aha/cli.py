"""The `aha` command line: pretrain, train, plan, eval, run, report, chat, serve, sft, sample, distill, bench,
pipeline, experiment, check-reward, import-model.

Bad input ends in one line on stderr — what is wrong, where, what to do — and exit code 2.
"""

import argparse
import json
import sys

from aha.infra.errors import AhaError, Stopped


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


TRAIN_FLAGS = [("--model", str, "transformers model dir (default: the built-in base model)"),
               ("--task", str, "task name (default: addition)"),
               ("--steps", int, "RL steps"), ("--out", str, "run folder"), ("--seed", int, "random seed"),
               ("--lr", float, "learning rate"), ("--algo", str, "preset: grpo, dr_grpo, dapo, r1_zero"),
               ("--data", str, "data file for file-backed tasks (gsm8k, math, jsonl, py:…)"),
               ("--template", str, "prompt template: task (default), r1_zero, chat, or a file with {question}"),
               ("--lora-rank", int, "train LoRA adapters of this rank (merged into model/ on save)"),
               ("--rollout", str, "sampler: torch (default) or vllm (a CUDA GPU + pip install 'aha[gpu]')")]


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config keys (see aha/infra/config.py)")
    for flag, kind, text in TRAIN_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="skip (and count) data rows without an answer instead of stopping"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint (steps=N to extend it)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. group_size=16 beta=0.04")


def resume_config(args):
    """The saved config of the run in --resume DIR; only `steps` may change (to extend the run)."""
    from pathlib import Path

    from aha.infra.config import load_config, parse_kv
    overrides = parse_kv(args.overrides)
    if args.steps is not None:
        overrides["steps"] = args.steps
    given = [
        flag
        for flag, _, _ in TRAIN_FLAGS
        if flag != "--steps" and getattr(args, flag[2:].replace("-", "_")) is not None
    ]
    given += [k for k in overrides if k != "steps"]
    given += [
        flag
        for flag, on in [
            ("--config", args.config),
            ("--force", args.force),
            ("--skip-bad-rows", args.skip_bad_rows),
            ("--gradient-checkpointing", args.gradient_checkpointing),
        ]
        if on
    ]
    if given:
        raise AhaError(f"--resume continues the run with its saved config; {', '.join(given)} cannot change "
                       f"(only steps=N can, to extend the run): start a new run to change them")
    saved = Path(args.resume) / "config.yaml"
    if not saved.is_file():
        raise AhaError(f"--resume {args.resume}: no config.yaml there; give the --out folder of an aha train run")
    cfg = load_config(str(saved), overrides)
    cfg.out = args.resume
    return cfg


def config_from_args(args):
    from aha.infra.config import load_config, parse_kv
    overrides = parse_kv(args.overrides)
    for flag, _, _ in TRAIN_FLAGS:
        key = flag[2:].replace("-", "_")
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.gradient_checkpointing:
        overrides["gradient_checkpointing"] = True
    if args.skip_bad_rows:
        overrides["skip_bad_rows"] = True
    return load_config(args.config, overrides)


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
    p.add_argument(
        "--max-repetition", type=float, default=d.max_repetition, help="reject when this share of word 3-grams repeats"
    )
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


def add_data_parsers(sub) -> None:
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on prompt/response JSONL (loss on responses, packed)",
        description="SFT on JSONL rows {prompt, response}: next-token loss on the response tokens only; "
        "examples packed into --seq-len rows with per-example positions and a block-diagonal "
        "attention mask. Writes a plain transformers dir to --out.",
    )
    p.add_argument("--model", required=True, help="model dir or run folder to start from")
    p.add_argument("--data", required=True, help="JSONL file of {\"prompt\": …, \"response\": …} rows")
    p.add_argument("--out", required=True, help="where to save the fine-tuned model")
    add_sft_args(p)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "sample",
        help="rejection sampling: keep only verified, clean samples as JSONL",
        description="k samples per training problem; keeps those the task verifies (accuracy 1) that are "
        "well-formed, not truncated or too long, not repetitive (and in --language): rows "
        "prompt, response, model, task, seed, reward, accuracy.",
    )
    p.add_argument("--model", required=True, help="model dir or run folder")
    p.add_argument("--out", required=True, help="JSONL file to write")
    add_sample_args(p)

    p = sub.add_parser(
        "distill",
        help="sample verified answers from a teacher, then SFT a student on them",
        description="aha sample with --teacher, then aha sft of --student on the kept samples; --out gets "
        "samples.jsonl, the student model and distill.json.",
    )
    p.add_argument("--teacher", required=True, help="teacher model dir or run folder")
    p.add_argument("--student", required=True, help="student model dir or run folder")
    p.add_argument("--out", required=True, help="folder for samples.jsonl and the distilled student")
    add_sample_args(p)
    add_sft_args(p)


def build_parser() -> Parser:
    parser = Parser(
        prog="aha", description="Teach a language model to reason by itself with RL from verifiable rewards."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser(
        "run",
        help="the whole demo: base model → eval → GRPO → eval → report",
        description="Base model (shipped or pretrained once) → held-out eval → GRPO → held-out eval → report.json/md "
                    "+ plots in --out.",
    )
    add_train_args(p)

    p = sub.add_parser(
        "train",
        help="R1-Zero-style RL (GRPO family) on a task",
        description="RL from verifiable rewards; writes metrics.jsonl, rollouts.jsonl, config.yaml and model/ into "
                    "--out.",
    )
    add_train_args(p)
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="train on N local processes: re-launches itself through torchrun (docs/distributed.md)")

    from aha.eval.cli import add_eval_parser
    add_eval_parser(sub)

    add_data_parsers(sub)

    p = sub.add_parser("report", help="redraw curves.png and report.md of a run folder, running or finished",
                       description="Reads the run folder's metrics.jsonl, config.yaml, rollouts.jsonl and report.json "
                                   "(aha run) and writes curves.png and report.md there; safe while the run goes on.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of aha train or aha run")

    from aha.serve.chat import add_chat_parser
    from aha.serve.cli import add_serve_parser
    add_chat_parser(sub)
    add_serve_parser(sub)
    from aha.stages.experiment import add_experiment_parser
    from aha.stages.pipeline import add_pipeline_parser
    add_pipeline_parser(sub)
    add_experiment_parser(sub)
    from aha.tasks.check_reward import add_check_reward_parser
    add_check_reward_parser(sub)
    from aha.infra.import_model import add_import_parser
    add_import_parser(sub)

    p = sub.add_parser(
        "bench",
        help="time aha's GRPO step against TRL's GRPOTrainer on the same work (needs the bench extra)",
        description="aha and TRL GRPO steps alternating in one process on a random-init 3.2M Qwen2, "
        "8 prompts × 8 completions, fp32: s/step, tokens/s, time split, peak RSS, useful "
        "FLOP/s vs this machine's matmul peak. Last line: speedup_vs_trl.",
    )
    p.add_argument(
        "--quick", action="store_true", help="1 warm-up + 1 timed step; 32 and 128 new tokens, addition at 32 only"
    )
    p.add_argument("--steps", type=int, help="timed steps per side, after warm-up (default 5; 2 with --model)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument(
        "--max-new-tokens", type=int, action="append", help="completion length; repeat for several (default 32)"
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--memory", action="store_true", help="instead: peak RSS of RL steps at a 151,936-token vocabulary, "
                                                          "aha vs TRL, each side in its own process")
    p.add_argument(
        "--completions", default="16,32,64,128", help="--memory: completions per step to measure (multiples of 8)"
    )
    p.add_argument(
        "--learn",
        action="store_true",
        help="instead: the learning race, aha vs TRL from the same base model, "
        "RL wall time to TRL's final held-out pass@1",
    )
    p.add_argument("--seeds", default="0,1,2", help="--learn: seeds (the median ratio is reported)")
    p.add_argument("--learn-steps", type=int, default=150, help="--learn: RL steps per side")
    p.add_argument(
        "--model",
        help="instead: aha vs TRL on this model dir (e.g. from aha import-model), 8 × 8 completions, "
        "fp32, each side in its own process: s/step and peak RSS (aha/bench/model.py)",
    )

    p = sub.add_parser(
        "plan",
        help="predict the peak memory and time per step of an aha train run, before it runs",
        description="Takes the config and flags of aha train and runs nothing: prints the predicted peak "
        "memory (weights, gradients, optimizer, reference model, one micro-batch's activations "
        "and logits, the KV cache), whether it fits this machine, the largest micro-batch "
        "that does, and the time per step from a ~1 s calibration.",
    )
    add_train_args(p)
    p.add_argument("--json", help="also write the plan to this JSON file")
    p.add_argument(
        "--no-time", action="store_true", help="skip the time calibration (it builds the model with random weights)"
    )
    p.add_argument("--device", help="plan for this device kind (cpu, cuda, mps) instead of this machine's")
    p.add_argument("--device-memory", type=float, metavar="GIB", help="memory of the device planned for, in GiB")
    p.add_argument("--prompt-tokens", type=int, metavar="N",
                   help="the longest prompt in tokens, instead of measuring it (then no data or tokenizer is read)")

    p = sub.add_parser(
        "pretrain",
        help="train the tiny base model on the synthetic corpus",
        description="Next-token pretraining of the built-in tiny model on a corpus made by the task generator.",
    )
    from aha.stages.pretrain import PretrainConfig
    d = PretrainConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--arch", default=d.arch, help="qwen2 or deepseek_v3")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--digits", type=int, default=d.digits, help="addition: digits per operand")
    p.add_argument(
        "--think-frac", type=float, default=d.think_frac, help="share of corpus documents with worked reasoning"
    )
    p.add_argument(
        "--task",
        default=d.task,
        choices=("addition", "multiplication"),
        help="whose corpus (multiplication: the tool demo)",
    )
    p.add_argument(
        "--tool-frac",
        type=float,
        default=d.tool_frac,
        help="multiplication: share of worked answers that call the tool",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this many seconds (0: no cap)")
    return parser


def cmd_run(args, console):
    from aha.stages.run import run
    if args.resume:
        raise AhaError(f"aha run does not resume; continue its training with: aha train --resume {args.resume}")
    report = run(config_from_args(args), force=args.force, console=console)
    console.print(f"pass@1 {report['before_pass1']:.3f} → {report['after_pass1']:.3f}, "
                  f"response tokens {report['before_response_tokens']:.1f} → {report['after_response_tokens']:.1f}, "
                  f"{report['wall_seconds']:.0f} s; report in {args.out or 'runs/train'}/report.md")


def cmd_train(args, console):
    if args.nproc > 1:                       # check the input here, then re-launch through torchrun
        from aha.infra.distributed import relaunch, shard_bounds
        shard_bounds((resume_config(args) if args.resume else config_from_args(args)).prompts_per_step, 0, args.nproc)
        if relaunch(args.argv, args.nproc):
            raise AhaError(f"the {args.nproc}-process run failed: see the first error above")
        return
    from aha.core.train import train
    from aha.infra.distributed import torchrun_env
    if args.resume:
        result = train(resume_config(args), console=console, resume=True)
    else:
        result = train(config_from_args(args), force=args.force, console=console)
    if torchrun_env()[0] == 0:
        console.print(
            f"done: {len(result['history'])} steps; metrics in {result['out'] / 'metrics.jsonl'}, model in "
            f"{result['out'] / 'model'}"
        )


def cmd_eval(args, console):
    from aha.eval.cli import cmd_eval as evaluate
    evaluate(args, console)


def task_options(args) -> dict:
    return {
        **({"digits": args.digits} if args.task == "addition" else {}),
        **({"data": args.data} if args.data else {}),
    }


def sample_config(args, model: str, out: str):
    from aha.eval.evaluate import resolve_model_dir
    from aha.stages.rejection import SampleConfig
    return SampleConfig(
        model=resolve_model_dir(model),
        task=args.task,
        task_options=task_options(args),
        out=out,
        prompts=args.prompts,
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_tokens=args.max_tokens,
        max_repetition=args.max_repetition,
        language=args.language,
        min_language=args.min_language,
        seed=args.seed,
    )


def sft_config(args, model: str, data: str):
    from aha.eval.evaluate import resolve_model_dir
    from aha.stages.sft import SFTConfig
    return SFTConfig(model=resolve_model_dir(model), data=data, out=args.out, epochs=args.epochs, lr=args.lr,
                     batch_tokens=args.batch_tokens, seq_len=args.seq_len, seed=args.seed)


def cmd_sft(args, console):
    from aha.stages.sft import sft
    print(json.dumps(sft(sft_config(args, args.model, args.data), console=console)))


def cmd_sample(args, console):
    from aha.stages.rejection import sample
    print(json.dumps(sample(sample_config(args, args.model, args.out), console=console)))


def cmd_distill(args, console):
    from aha.stages.distill import distill

    print(
        json.dumps(distill(sample_config(args, args.teacher, ""), sft_config(args, args.student, ""), console=console))
    )


def cmd_pretrain(args, console):
    from aha.stages.pretrain import PretrainConfig, pretrain
    cfg = PretrainConfig(out=args.out, arch=args.arch, hidden=args.hidden, layers=args.layers, steps=args.steps,
                         think_frac=args.think_frac, seed=args.seed, digits=args.digits, max_seconds=args.max_seconds,
                         task=args.task, tool_frac=args.tool_frac)
    print(json.dumps(pretrain(cfg, console=console)))


def comma_ints(text: str, flag: str, example: str) -> tuple[int, ...]:
    """`16,64` → (16, 64); anything else is one line naming the flag."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise AhaError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. {example}") from None


def show(table: str, out: dict, json_path: str | None) -> None:
    """Print a bench's table; write its figures to `json_path` when given."""
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)


def cmd_bench(args, console):
    import importlib.util
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("psutil") is None:
        raise AhaError("aha bench needs TRL and psutil: pip install 'aha[bench]'")
    import warnings
    warnings.filterwarnings("ignore")
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  progress to stderr, the table to stdout
    if args.learn:
        from aha.bench.learn import format_learn_table, run_learn_race
        out = run_learn_race(comma_ints(args.seeds, "--seeds", "0,1,2"), args.learn_steps, say=say)
        return show(format_learn_table(out), out, args.json)
    if args.memory:
        from aha.bench.memory import format_memory_table, run_memory_bench
        counts = comma_ints(args.completions, "--completions", "16,64")
        if any(c < 8 or c % 8 for c in counts):
            raise AhaError(f"--completions {args.completions!r}: each must be a multiple of 8 (groups of 8)")
        out = run_memory_bench(counts, (args.max_new_tokens or [128])[0], say=say)
        return show(format_memory_table(out), out, args.json)
    if args.model:
        from aha.bench.model import cmd_bench_model
        return cmd_bench_model(args)
    from aha.bench.bench import format_table, run_bench
    lengths = tuple(args.max_new_tokens or ((32, 128) if args.quick else (32,)))
    steps = 1 if args.quick else (args.steps or 5)
    out = run_bench(lengths, args.warmup, steps, addition_at=lengths[:1] if args.quick else None, say=say)
    show(format_table(out["results"], out["peak"], out["cpu"]), out, args.json)
    print(f"speedup_vs_trl: {out['speedup_vs_trl']:.2f}")


def cmd_plan(args, console):
    from aha.infra.plan import format_plan, plan_command
    result = plan_command(config_from_args(args), calibrate=not args.no_time, device=args.device,
                          device_gib=args.device_memory, prompt_tokens=args.prompt_tokens)
    print(format_plan(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def cmd_report(args, console):
    from aha.infra.report import write_report
    console.print(f"wrote {write_report(args.run_dir)} and curves.png")


def cmd_chat(args, console):
    from aha.serve.chat import cmd_chat as chat
    chat(args, console)


def cmd_serve(args, console):
    from aha.serve.cli import cmd_serve as serve
    serve(args, console)


def cmd_pipeline(args, console):
    from aha.stages.pipeline import cmd_pipeline as pipeline
    pipeline(args, console)


def cmd_experiment(args, console):
    from aha.stages.experiment import cmd_experiment as experiment
    experiment(args, console)


def cmd_import_model(args, console):
    from aha.infra.import_model import cmd_import_model as convert
    convert(args, console)


def cmd_check_reward(args, console) -> int:
    from aha.tasks.check_reward import cmd_check_reward as check
    return check(args, console)


COMMANDS = {
    "run": cmd_run,
    "train": cmd_train,
    "eval": cmd_eval,
    "pretrain": cmd_pretrain,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "sft": cmd_sft,
    "sample": cmd_sample,
    "distill": cmd_distill,
    "bench": cmd_bench,
    "pipeline": cmd_pipeline,
    "experiment": cmd_experiment,
    "plan": cmd_plan,
    "check-reward": cmd_check_reward,
    "import-model": cmd_import_model,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    from aha.infra.model import return_freed_memory_to_the_os
    return_freed_memory_to_the_os()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]       # key=value pairs on both sides of a flag
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)      # for `train --nproc` to re-launch itself
    from aha.infra.card import record_command
    record_command(args.argv)                                      # the model cards name the command
    from aha.infra.progress import console
    try:
        code = COMMANDS[args.command](args, console)      # None, or an exit code of its own (check-reward)
    except AhaError as exc:
        sys.stderr.write(f"aha {args.command}: error: {exc}\n")
        return 2
    except Stopped as exc:
        sys.stderr.write(f"aha {args.command}: {exc}\n")
        return 128 + exc.signum
    except KeyboardInterrupt:
        sys.stderr.write(f"aha {args.command}: interrupted\n")
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
