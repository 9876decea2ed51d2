"""Compare the algorithm presets: train each for the same steps on the same task and seeds, then
print a markdown table of held-out pass@1 (R1 protocol, aha.eval.evaluate) and mean response length.

    nice -n 19 python bench/presets.py --steps 100 --seeds 0 1 2
    python bench/presets.py --steps 50 --presets grpo dapo eval_problems=100 max_new_tokens=48

Each run is `aha run` (eval before → RL → eval after); its folder, report.json included, is kept
under --out/<preset>-s<seed>.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from aha.core.presets import PRESETS
from aha.infra.config import load_config
from aha.infra.reader import parse_kv
from aha.stages.run import run


def bench(presets: list[str], seeds: list[int], steps: int, out: Path, overrides: dict) -> list[dict]:
    rows = []
    for preset in presets:
        for seed in seeds:
            cfg = load_config(overrides={**overrides, "algo": preset, "steps": steps, "seed": seed,
                                         "out": str(out / f"{preset}-s{seed}")})
            report = run(cfg, force=True)
            rows.append({"preset": preset, "seed": seed, **{k: report[k] for k in (
                "before_pass1", "after_pass1", "after_response_tokens", "wall_seconds")}})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def table(rows: list[dict], steps: int) -> str:
    """Markdown: per preset, the mean ± sample std (n − 1) over its seeds, or the value for one seed."""
    lines = [f"| preset | seeds | pass@1 before | pass@1 after {steps} steps | mean response tokens after | wall s |",
             "|---|---|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]

        def cell(key: str, digits: int) -> str:
            values = [r[key] for r in mine]
            mean = f"{statistics.mean(values):.{digits}f}"
            return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"
        lines.append(f"| {preset} | {', '.join(str(r['seed']) for r in mine)} | {cell('before_pass1', 3)} | "
                     f"{cell('after_pass1', 3)} | {cell('after_response_tokens', 1)} | {cell('wall_seconds', 0)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_presets"))
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config keys for every run, e.g. task=countdown"
    )
    args = parser.parse_args()
    rows = bench(args.presets, args.seeds, args.steps, args.out, parse_kv(args.overrides))
    (args.out / "bench.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, args.steps))


if __name__ == "__main__":
    main()
