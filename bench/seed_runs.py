"""Several seeds of one `aha run` recipe side by side: a markdown table of each run's report.json
(held-out pass@1, format rate, think rate and response length, before → after; wall; peak RSS when
a `/usr/bin/time -v` log sits beside the folder as FOLDER.log) and one plot of the training curves
(pass rate, format reward, response tokens per step), each seed a line, their mean bold.

    python bench/seed_runs.py runs/smol_s0 runs/smol_s1 runs/smol_s2 --png docs/smollm2_curves.png

The README's SmolLM2 table and plot come from this script.
"""

import argparse
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from aha.infra.report import read_jsonl, smooth  # noqa: E402

PANELS = (("pass_rate", "training pass rate"), ("reward_format", "format reward (share well-formed)"),
          ("response_tokens", "response tokens"))


def peak_rss_gib(folder: Path) -> float | None:
    log = folder.with_name(folder.name + ".log")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text()) if log.is_file() else None
    return int(found.group(1)) / 2**20 if found else None


def table(folders: list[Path]) -> str:
    lines = ["| seed | pass@1 before → after | gain | format rate before → after | think rate before → after "
             "| response tokens before → after | wall | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    gains = []
    for folder in folders:
        r = json.loads((folder / "report.json").read_text())
        fmt = lambda key: f"{r['before'][key]:.3f} → {r['after'][key]:.3f}" if key in r["before"] else "–"
        rss = peak_rss_gib(folder)
        gains.append(r["gain"])
        lines.append(f"| {r['seed']} | {r['before_pass1']:.3f} → {r['after_pass1']:.3f} | {r['gain']:+.3f} | "
                     f"{fmt('format_rate')} | {fmt('think_rate')} | {r['before_response_tokens']:.1f} → "
                     f"{r['after_response_tokens']:.1f} | {r['wall_seconds']:.0f} s | "
                     f"{'–' if rss is None else f'{rss:.2f} GiB'} |")
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return "\n".join(lines) + f"\n\nmean gain {statistics.mean(gains):+.3f} ± {spread:.3f} over {len(gains)} seed(s)\n"


def plot(folders: list[Path], path: Path) -> None:
    histories = [read_jsonl(folder / "metrics.jsonl") for folder in folders]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        curves = [[row[key] for row in history] for history in histories]
        for folder, curve in zip(folders, curves):
            seed = json.loads((folder / "report.json").read_text())["seed"]
            ax.plot(curve, alpha=0.35, linewidth=1, label=f"seed {seed}")
        steps = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(steps)]
        ax.plot(smooth(mean, 3), color="black", linewidth=2, label="mean (smoothed)")
        ax.set_title(title)
        ax.set_xlabel("RL step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders of `aha run`")
    parser.add_argument("--png", type=Path, help="also draw the training curves here")
    args = parser.parse_args()
    print(table(args.folders))
    if args.png:
        plot(args.folders, args.png)
        print(f"curves: {args.png}")


if __name__ == "__main__":
    main()
