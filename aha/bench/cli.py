"""`aha bench`: its flags and the choice among its four races (the step race, --learn, --memory,
--model); the tables come from the module of each race."""

import json
import sys

from aha.infra.errors import AhaError


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


def say(line: str) -> None:
    """Progress goes to stderr, the table to stdout."""
    print(line, file=sys.stderr, flush=True)


def cmd_bench(args, console):
    import importlib.util
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("psutil") is None:
        raise AhaError("aha bench needs TRL and psutil: pip install 'aha[bench]'")
    import warnings
    warnings.filterwarnings("ignore")
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


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time aha's GRPO step against TRL's GRPOTrainer on the same work (needs the "
                                     "bench extra)",
                       description="aha and TRL GRPO steps alternating in one process on a random-init 3.2M Qwen2, "
                                   "8 prompts × 8 completions, fp32: s/step, tokens/s, time split, peak RSS, useful "
                                   "FLOP/s vs this machine's matmul peak. Last line: speedup_vs_trl.")
    p.add_argument("--quick", action="store_true",
                   help="1 warm-up + 1 timed step; 32 and 128 new tokens, addition at 32 only")
    p.add_argument("--steps", type=int, help="timed steps per side, after warm-up (default 5; 2 with --model)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--max-new-tokens", type=int, action="append",
                   help="completion length; repeat for several (default 32)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--memory", action="store_true", help="instead: peak RSS of RL steps at a 151,936-token "
                                                          "vocabulary, aha vs TRL, each side in its own process")
    p.add_argument("--completions", default="16,32,64,128",
                   help="--memory: completions per step to measure (multiples of 8)")
    p.add_argument("--learn", action="store_true", help="instead: the learning race, aha vs TRL from the same base "
                                                         "model, RL wall time to TRL's final held-out pass@1")
    p.add_argument("--seeds", default="0,1,2", help="--learn: seeds (the median ratio is reported)")
    p.add_argument("--learn-steps", type=int, default=150, help="--learn: RL steps per side")
    p.add_argument("--model", help="instead: aha vs TRL on this model dir (e.g. from aha import-model), 8 × 8 "
                                   "completions, fp32, each side in its own process: s/step and peak RSS "
                                   "(aha/bench/model.py)")
    p.set_defaults(handler=cmd_bench)
