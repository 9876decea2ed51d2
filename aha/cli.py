"""The `aha` command line: pretrain, train, eval, run.

Bad input ends in one line on stderr — what is wrong, where, what to do — and exit code 2.
"""

import argparse
import json
import sys

from aha.errors import AhaError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


TRAIN_FLAGS = [("--model", str, "transformers model dir (default: the built-in base model)"),
               ("--task", str, "task name (default: addition)"),
               ("--steps", int, "RL steps"), ("--out", str, "run folder"), ("--seed", int, "random seed"),
               ("--lr", float, "learning rate"), ("--algo", str, "preset: grpo, dr_grpo, dapo, r1_zero")]


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config keys (see aha/config.py)")
    for flag, kind, text in TRAIN_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. group_size=16 beta=0.04")


def config_from_args(args):
    from aha.config import load_config, parse_kv
    overrides = parse_kv(args.overrides)
    for flag, _, _ in TRAIN_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[flag[2:]] = value
    return load_config(args.config, overrides)


def build_parser() -> Parser:
    parser = Parser(prog="aha", description="Teach a language model to reason by itself with RL from verifiable rewards.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("run", help="the whole demo: base model → eval → GRPO → eval → report",
                       description="Base model (shipped or pretrained once) → held-out eval → GRPO → held-out eval → report.json/md + plots in --out.")
    add_train_args(p)

    p = sub.add_parser("train", help="R1-Zero-style RL (GRPO family) on a task",
                       description="RL from verifiable rewards; writes metrics.jsonl, rollouts.jsonl, config.yaml and model/ into --out.")
    add_train_args(p)

    p = sub.add_parser("eval", help="pass@1 on held-out problems with R1's sampling protocol",
                       description="k samples per held-out problem at temperature 0.6, top-p 0.95; pass@1 = mean correctness.")
    p.add_argument("--model", help="model dir (default: the built-in base model)")
    p.add_argument("--task", default="addition")
    p.add_argument("--digits", type=int, default=3, help="addition: digits per operand")
    p.add_argument("--data", help="data file for file-backed tasks (gsm8k, math, py:…)")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prefill", default="", help='force the response to start so, e.g. " <think>"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result to this JSON file")

    from aha.chat import add_chat_parser
    from aha.serve_cli import add_serve_parser
    add_chat_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("pretrain", help="train the tiny base model on the synthetic corpus",
                       description="Next-token pretraining of the built-in tiny model on a corpus made by the task generator.")
    from aha.pretrain import PretrainConfig
    d = PretrainConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--arch", default=d.arch, help="qwen2 or deepseek_v3")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--digits", type=int, default=d.digits, help="addition: digits per operand")
    p.add_argument("--think-frac", type=float, default=d.think_frac, help="share of corpus documents with worked reasoning")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this many seconds (0: no cap)")
    return parser


def cmd_run(args, console):
    from aha.run import run
    report = run(config_from_args(args), force=args.force, console=console)
    console.print(f"pass@1 {report['before_pass1']:.3f} → {report['after_pass1']:.3f}, "
                  f"response tokens {report['before_response_tokens']:.1f} → {report['after_response_tokens']:.1f}, "
                  f"{report['wall_seconds']:.0f} s; report in {args.out or 'runs/train'}/report.md")


def cmd_train(args, console):
    from aha.train import train
    cfg = config_from_args(args)
    result = train(cfg, force=args.force, console=console)
    console.print(f"done: {len(result['history'])} steps; metrics in {result['out'] / 'metrics.jsonl'}, model in {result['out'] / 'model'}")


def cmd_eval(args, console):
    from aha.base import ensure_base_model
    from aha.evaluate import EvalSpec, evaluate
    from aha.model import detect_device, load_model
    from aha.tasks import get_task
    model, tokenizer = load_model(args.model or ensure_base_model(console), detect_device())
    task = get_task(args.task, **({"digits": args.digits} if args.task == "addition" else {}),
                    **({"data": args.data} if args.data else {}))
    spec = EvalSpec(args.problems, args.k, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    result = evaluate(model, tokenizer, task, spec, prefill=args.prefill, console=console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))


def cmd_pretrain(args, console):
    from aha.pretrain import PretrainConfig, pretrain
    cfg = PretrainConfig(out=args.out, arch=args.arch, hidden=args.hidden, layers=args.layers, steps=args.steps,
                         think_frac=args.think_frac, seed=args.seed, digits=args.digits, max_seconds=args.max_seconds)
    print(json.dumps(pretrain(cfg, console=console)))


def cmd_chat(args, console):
    from aha.chat import cmd_chat as chat
    chat(args, console)


def cmd_serve(args, console):
    from aha.serve_cli import cmd_serve as serve
    serve(args, console)


COMMANDS = {"run": cmd_run, "train": cmd_train, "eval": cmd_eval, "pretrain": cmd_pretrain, "chat": cmd_chat, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aha.progress import console
    try:
        COMMANDS[args.command](args, console)
    except AhaError as exc:
        sys.stderr.write(f"aha {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"aha {args.command}: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
