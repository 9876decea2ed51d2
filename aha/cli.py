"""The `aha` command line: run, train, eval, sft, sample, distill, report, chat, serve, pipeline,
experiment, check-reward, import-model, bench, plan, pretrain.

Each command lives with the stage that owns it and registers itself the same way: an `add_*_parser(sub)`
that adds its parser and names its handler (`set_defaults(handler=...)`). This file lists them and
turns errors into one line: bad input ends in one line on stderr — what is wrong, where, what to do —
and exit code 2.
"""

import argparse
import importlib
import sys

from aha.infra.errors import AhaError, Stopped


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# (module, function adding its commands), in the order `aha --help` lists them
COMMANDS = [
    ("aha.stages.cli", "add_run_parser"),              # run
    ("aha.core.cli", "add_train_parser"),              # train
    ("aha.eval.cli", "add_eval_parser"),               # eval
    ("aha.stages.cli", "add_data_parsers"),            # sft, sample, distill
    ("aha.infra.report", "add_report_parser"),         # report
    ("aha.serve.chat", "add_chat_parser"),             # chat
    ("aha.serve.cli", "add_serve_parser"),             # serve
    ("aha.stages.pipeline", "add_pipeline_parser"),    # pipeline
    ("aha.stages.cli", "add_experiment_parser"),      # experiment
    ("aha.tasks.check_reward", "add_check_reward_parser"),  # check-reward
    ("aha.infra.import_model", "add_import_parser"),   # import-model
    ("aha.bench.cli", "add_bench_parser"),             # bench
    ("aha.core.cli", "add_plan_parser"),               # plan
    ("aha.stages.cli", "add_pretrain_parser"),         # pretrain
]


def build_parser() -> Parser:
    parser = Parser(prog="aha", description="Teach a language model to reason by itself with RL from verifiable "
                                            "rewards.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module, adder in COMMANDS:
        getattr(importlib.import_module(module), adder)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from aha.infra.model import bound_onednn_caches, return_freed_memory_to_the_os
    bound_onednn_caches()
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
        code = args.handler(args, console)      # None, or an exit code of its own (check-reward)
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
