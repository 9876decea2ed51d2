"""The run's report: `report.json` (the source of truth), `report.md` and PNG plots."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values: list[float], width: int = 10) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


def plot_curves(history: list[dict], evals: list[dict], path: Path) -> None:
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("reward_mean", "reward (mean over samples)"), ("pass_rate", "pass@1"), ("response_tokens", "response length (tokens)")]
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] for r in history]
        ax.plot(steps, values, alpha=0.3, color="tab:blue")
        ax.plot(steps, smooth(values), color="tab:blue", label="training samples")
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[1].plot([e["step"] for e in evals], [e["pass@1"] for e in evals], "o-", color="tab:red", label="held-out eval (T 0.6, k samples)")
    axes[1].legend(fontsize=8)
    think = [r["think_rate"] for r in history]
    twin = axes[2].twinx()
    twin.plot(steps, smooth(think), color="tab:green")
    twin.set_ylabel("share of responses that think", color="tab:green")
    twin.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, report: dict, before: dict, after: dict, history: list[dict], evals: list[dict]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_curves(history, evals, out / "curves.png")
    lines = [
        "# aha run report", "",
        f"Seed {report['seed']}, {report['steps']} RL steps, {report['wall_seconds']:.0f} s wall.", "",
        "| held-out (R1 protocol) | before RL | after RL |", "|---|---|---|",
        f"| pass@1 | {before['pass@1']:.3f} | {after['pass@1']:.3f} |",
        f"| share of answers that reason in `<think>` | {before['think_rate']:.2f} | {after['think_rate']:.2f} |",
        f"| mean response tokens | {before['mean_response_tokens']:.1f} | {after['mean_response_tokens']:.1f} |",
        f"| truncation rate | {before['truncation_rate']:.3f} | {after['truncation_rate']:.3f} |",
        "", f"{before['problems']} held-out problems × {before['k']} samples at temperature {before['temperature']}, top-p {before['top_p']}.",
        "", "![curves](curves.png)", "", "## Sample traces", "",
    ]
    for name, result in (("before", before), ("after", after)):
        lines.append(f"### {name} RL")
        lines.append("")
        for s in result["samples"][:4]:
            mark = "right" if s["correct"] else "wrong"
            lines.append(f"- `{s['prompt'].replace(chr(10), ' ')}` → `{s['completion'].strip()}` ({mark}, answer {s['answer']})")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
