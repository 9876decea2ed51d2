"""The findings' record: each arm's curves summarised over seeds (first and last windows, the final
held-out evals), the plot of their curves, and the markdown table (aha/stages/findings.py runs them)."""

import warnings
from pathlib import Path

from aha.stages.experiment import mean_std

# of a held-out eval, kept when present (tool_use_rate: with tools)
EVAL_KEYS = ("pass@1", "tool_use_rate")


def window_mean(values: list, window: int, last: bool) -> float | None:
    """Mean of the first (or last) `window` non-missing values.

    >>> values = [None, 1.0, 2.0, 3.0, None, 5.0]
    >>> window_mean(values, 2, last=False), window_mean(values, 2, last=True)
    (1.5, 4.0)
    """
    present = [v for v in values if v is not None]
    chosen = present[-window:] if last else present[:window]
    return sum(chosen) / len(chosen) if chosen else None


def summarise(per_seed: list[dict], window: int) -> dict:
    """{arm: {curve: {first: [mean, std], last: [mean, std]}, final_pass@1: [mean, std]}} over seeds."""
    summary = {}
    for arm in per_seed[0]["arms"]:
        runs = [seed["arms"][arm] for seed in per_seed]
        summary[arm] = {}
        for curve in runs[0]["curves"]:
            summary[arm][curve] = {}
            for end in ("first", "last"):
                values = [window_mean(run["curves"][curve], window, end == "last") for run in runs]
                if all(v is not None for v in values):
                    summary[arm][curve][end] = list(mean_std(values))
        for key in EVAL_KEYS:
            if all(run["evals"] and key in run["evals"][-1] for run in runs):
                summary[arm][f"final_{key}"] = list(mean_std([run["evals"][-1][key] for run in runs]))
            if all(run["evals"] and run["evals"][0]["step"] == 0 and key in run["evals"][0] for run in runs):
                summary[arm][f"before_{key}"] = list(mean_std([run["evals"][0][key] for run in runs]))
    return summary


def plot(report: dict, finding, path: Path) -> None:
    """Each panel: per arm the seed-mean curve (smoothed over 10 steps) and a ± std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from aha.infra.report import smooth
    fig, axes = plt.subplots(1, len(finding.panels), figsize=(4.4 * len(finding.panels), 3.6))
    for ax, (curve, title) in zip(axes, finding.panels):
        for arm in report["seeds"][0]["arms"]:
            runs = [smooth([np.nan if v is None else v for v in seed["arms"][arm]["curves"][curve]])
                    for seed in report["seeds"]]
            values = np.array(runs, dtype=float)                                # (seeds, steps)
            with warnings.catch_warnings():                                     # a step no seed has a value for: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            steps = np.arange(values.shape[1])
            ax.plot(steps, mean, label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"aha experiment {report['experiment']}: mean ± std over {len(report['seeds'])} seeds "
                 "(10-step moving average)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict, finding) -> str:
    n, window = len(report["seeds"]), report["config"]["window"]
    cell = lambda pair, fmt: "–" if pair is None else f"{pair[0]:{fmt}} ± {pair[1]:{fmt}}"
    head = " | ".join(f"{title} first → last {window} steps" for _, title, _ in finding.rows)
    evals = [("pass@1", "held-out pass@1")] if finding.final_eval else []
    evals += [("tool_use_rate", "held-out tool-use rate")] if finding.before_eval else []
    change = " before → after" if finding.before_eval else ""
    lines = [
        f"# aha experiment {report['experiment']} ({n} seed{'s' * (n > 1)}, {report['config']['steps']} steps)",
        "",
        f"| arm | {head} |" + "".join(f" {title}{change} |" if change else f" final {title} |" for _, title in evals),
        "|---|" + "---:|" * (len(finding.rows) + len(evals)),
    ]
    for arm, metrics in report["summary"].items():
        cells = [
            f"{cell(metrics.get(c, {}).get('first'), fmt)} → {cell(metrics.get(c, {}).get('last'), fmt)}"
            for c, _, fmt in finding.rows
        ]
        for key, _ in evals:
            final = cell(metrics.get(f"final_{key}"), ".3f")
            cells.append(f"{cell(metrics.get(f'before_{key}'), '.3f')} → {final}" if change else final)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
