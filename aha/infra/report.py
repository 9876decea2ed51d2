"""The run's report, drawn from the run folder's records: `curves.png` and `report.md`.

    aha report runs/demo          # while the run is still going, or after it finished

Sources, JSON only (markdown is never read back): `metrics.jsonl` (one line per step; a line being
written is skipped), `config.yaml`, `rollouts.jsonl`, and `report.json` when `aha run` finished (its
numbers and the before/after evaluations with sample traces). The held-out points are `report.json`'s
`eval_curve`, else the `eval_pass@1` the training loop logged every `eval_every` steps. Both files
are written to a temporary name and renamed, so a reader never sees half of one.
"""

import json
import os
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from aha.infra.errors import AhaError  # noqa: E402


def smooth(values: list[float], width: int = 10) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a file that may still be being written."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass                       # the line the run is writing right now
    return rows


def eval_points(history: list[dict], report: dict | None) -> list[dict]:
    """[{"step": steps done, "pass@1"}] for the curve: aha run's before/during/after, else the loop's own."""
    if report and report.get("eval_curve"):
        return report["eval_curve"]
    return [{"step": r["step"] + 1, "pass@1": r["eval_pass@1"]} for r in history if "eval_pass@1" in r]


def plot_curves(history: list[dict], evals: list[dict], path: Path) -> None:
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("reward_mean", "reward (mean over samples)"),
        ("pass_rate", "pass@1"),
        ("response_tokens", "response length (tokens)"),
    ]
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] for r in history]
        ax.plot(steps, values, alpha=0.3, color="tab:blue")
        ax.plot(steps, smooth(values), color="tab:blue", label="training samples")
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    if evals:
        axes[1].plot([e["step"] for e in evals], [e["pass@1"] for e in evals], "o-", color="tab:red",
                     label="held-out eval (T 0.6, k samples)")
    axes[1].legend(fontsize=8)
    think = [r["think_rate"] for r in history]
    twin = axes[2].twinx()
    twin.plot(steps, smooth(think), color="tab:green")
    twin.set_ylabel("share of responses that think", color="tab:green")
    twin.set_ylim(0, 1.05)
    fig.tight_layout()
    temp = path.with_name(f".{path.stem}.tmp{path.suffix}")   # savefig picks the format from the suffix
    fig.savefig(temp, dpi=110)
    plt.close(fig)
    os.replace(temp, path)


def run_lines(report: dict) -> list[str]:
    """aha run's before/after table and sample traces."""
    before, after = report["before"], report["after"]
    lines = [f"Seed {report['seed']}, {report['steps']} RL steps, {report['wall_seconds']:.0f} s wall.", "",
             "| held-out (R1 protocol) | before RL | after RL |", "|---|---|---|",
             f"| pass@1 | {before['pass@1']:.3f} | {after['pass@1']:.3f} |",
             f"| share of answers that reason in `<think>` | {before['think_rate']:.2f} | {after['think_rate']:.2f} |",
             f"| mean response tokens | {before['mean_response_tokens']:.1f} | {after['mean_response_tokens']:.1f} |",
             f"| truncation rate | {before['truncation_rate']:.3f} | {after['truncation_rate']:.3f} |", "",
             f"{before['problems']} held-out problems × {before['k']} samples at temperature {before['temperature']}, "
             f"top-p {before['top_p']}.", "", "![curves](curves.png)", "", "## Sample traces", ""]
    for name, result in (("before", before), ("after", after)):
        lines += [f"### {name} RL", ""]
        for s in result["samples"][:4]:
            mark = "right" if s["correct"] else "wrong"
            lines.append(
                f"- `{s['prompt'].replace(chr(10), ' ')}` → `{s['completion'].strip()}` ({mark}, answer {s['answer']})"
            )
        lines.append("")
    return lines


def training_lines(history: list[dict], evals: list[dict], config: dict, rollouts: list[dict]) -> list[str]:
    """A training run's progress: steps done, the last steps' means, the eval points, recent samples."""
    total = config.get("steps", "?")
    lines = [f"{config.get('algo', '?')} on {config.get('task', '?')}, seed {config.get('seed', '?')}: "
             f"{len(history)} of {total} steps logged.", ""]
    if history:
        last = history[-10:]
        lines += ["| last ≤ 10 steps (mean) | value |", "|---|---|"]
        for key in ("reward_mean", "pass_rate", "think_rate", "response_tokens", "truncation_rate", "zero_spread_frac"):
            lines.append(f"| {key} | {sum(r[key] for r in last) / len(last):.3f} |")
        lines.append("")
    if evals:
        lines += [
            "| steps done | held-out pass@1 |",
            "|---|---|",
            *[f"| {e['step']} | {e['pass@1']:.3f} |" for e in evals],
            "",
        ]
    lines += ["![curves](curves.png)", ""]
    if rollouts:
        step = rollouts[-1]["step"]
        lines += [f"## Samples at step {step}", ""]
        for r in [r for r in rollouts if r["step"] == step][:4]:
            lines.append(
                f"- `{r['prompt'].replace(chr(10), ' ')}` → `{r['completion'].strip()}` (reward {r['reward']:.2f})"
            )
        lines.append("")
    return lines


def write_report(out: str | Path) -> Path:
    """Redraw `curves.png` and `report.md` in the run folder `out` from its records."""
    out = Path(out)
    history = read_jsonl(out / "metrics.jsonl")
    if not history:
        raise AhaError(
            f"{out}: no metrics.jsonl with a finished step yet; give the --out folder of an aha train or aha run"
        )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else {}
    evals = eval_points(history, report)
    plot_curves(history, evals, out / "curves.png")
    body = run_lines(report) if report and "before" in report else training_lines(
        history, evals, config or {}, read_jsonl(out / "rollouts.jsonl"))
    title = "# aha run report" if report else "# aha training report"
    temp = out / ".report.md.tmp"
    temp.write_text("\n".join([title, "", *body]))
    os.replace(temp, out / "report.md")
    return out / "report.md"


def cmd_report(args, console) -> None:
    console.print(f"wrote {write_report(args.run_dir)} and curves.png")


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="redraw curves.png and report.md of a run folder, running or finished",
                       description="Reads the run folder's metrics.jsonl, config.yaml, rollouts.jsonl and report.json "
                                   "(aha run) and writes curves.png and report.md there; safe while the run goes on.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of aha train or aha run")
    p.set_defaults(handler=cmd_report)
