"""The commands that take aha train's config: `aha train` and `aha plan` (and `aha run`, in
aha/stages/cli.py, through `add_train_args` / `config_from_args`)."""

import argparse
import json

from aha.infra.errors import AhaError

TRAIN_FLAGS = [("--model", str, "transformers model dir (default: the built-in base model)"),
               ("--task", str, "task name (default: addition)"),
               ("--steps", int, "RL steps"), ("--out", str, "run folder"), ("--seed", int, "random seed"),
               ("--lr", float, "learning rate"), ("--algo", str, "preset: grpo, dr_grpo, dapo, r1_zero"),
               ("--data", str, "data file for file-backed tasks (gsm8k, math, jsonl, py:…)"),
               ("--template", str, "prompt template: task (default), r1_zero, chat, or a file with {question}"),
               ("--lora-rank", int, "train LoRA adapters of this rank (merged into model/ on save)"),
               ("--rollout", str, "sampler: torch (default) or vllm (a CUDA GPU + pip install 'aha[gpu]')")]
SWITCHES = ("--gradient-checkpointing", "--skip-bad-rows")      # on/off config keys as flags


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config keys (see aha/infra/config.py)")
    for flag, kind, text in TRAIN_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip (and count) data rows without an answer instead of stopping")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its latest checkpoint (steps=N to extend it)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. group_size=16 beta=0.04")


def flag_values(args) -> dict:
    """The config keys that the flags and key=value pairs give."""
    from aha.infra.reader import parse_kv
    values = parse_kv(args.overrides)
    for flag, _, _ in TRAIN_FLAGS:
        key = flag[2:].replace("-", "_")
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for flag in SWITCHES:
        if getattr(args, flag[2:].replace("-", "_")):
            values[flag[2:].replace("-", "_")] = True
    return values


def config_from_args(args):
    from aha.infra.config import load_config
    return load_config(args.config, flag_values(args))


def train_config(args):
    """A new run's config, or with --resume the saved one (aha/infra/checkpoint.py `resume_config`),
    told which flags and keys the command line would change."""
    if not args.resume:
        return config_from_args(args)
    from aha.infra.checkpoint import resume_config
    from aha.infra.reader import parse_kv
    overrides = parse_kv(args.overrides)
    steps = args.steps if args.steps is not None else overrides.get("steps")
    changed = [flag for flag, _, _ in TRAIN_FLAGS
               if flag != "--steps" and getattr(args, flag[2:].replace("-", "_")) is not None]
    changed += [key for key in overrides if key != "steps"]
    changed += [flag for flag, on in [("--config", args.config), ("--force", args.force),
                                      ("--skip-bad-rows", args.skip_bad_rows),
                                      ("--gradient-checkpointing", args.gradient_checkpointing)] if on]
    return resume_config(args.resume, steps, changed)


def cmd_train(args, console):
    if args.nproc > 1:                       # check the input here, then re-launch through torchrun
        from aha.infra.distributed import relaunch, shard_bounds
        shard_bounds(train_config(args).prompts_per_step, 0, args.nproc)
        if relaunch(args.argv, args.nproc):
            raise AhaError(f"the {args.nproc}-process run failed: see the first error above")
        return
    from aha.core.train import train
    from aha.infra.distributed import torchrun_env
    cfg = train_config(args)
    result = train(cfg, force=args.force, console=console, resume=bool(args.resume))
    if torchrun_env()[0] == 0:
        console.print(f"done: {len(result['history'])} steps; metrics in {result['out'] / 'metrics.jsonl'}, model in "
                      f"{result['out'] / 'model'}")


def cmd_plan(args, console):
    from aha.core.plan_command import format_plan, plan_command
    result = plan_command(config_from_args(args), calibrate=not args.no_time, device=args.device,
                          device_gib=args.device_memory, prompt_tokens=args.prompt_tokens)
    print(format_plan(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="R1-Zero-style RL (GRPO family) on a task",
                       description="RL from verifiable rewards; writes metrics.jsonl, rollouts.jsonl, config.yaml "
                                   "and model/ into --out.")
    add_train_args(p)
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="train on N local processes: re-launches itself through torchrun (docs/distributed.md)")
    p.set_defaults(handler=cmd_train)


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict the peak memory and time per step of an aha train run, before it runs",
                       description="Takes the config and flags of aha train and runs nothing: prints the predicted "
                                   "peak memory (weights, gradients, optimizer, reference model, one micro-batch's "
                                   "activations and logits, the KV cache), whether it fits this machine, the "
                                   "largest micro-batch that does, and the time per step from a ~1 s calibration.")
    add_train_args(p)
    p.add_argument("--json", help="also write the plan to this JSON file")
    p.add_argument("--no-time", action="store_true",
                   help="skip the time calibration (it builds the model with random weights)")
    p.add_argument("--device", help="plan for this device kind (cpu, cuda, mps) instead of this machine's")
    p.add_argument("--device-memory", type=float, metavar="GIB", help="memory of the device planned for, in GiB")
    p.add_argument("--prompt-tokens", type=int, metavar="N",
                   help="the longest prompt in tokens, instead of measuring it (then no data or tokenizer is read)")
    p.set_defaults(handler=cmd_plan)
