"""`aha run`: the whole demonstration in one command.

base model (shipped, or pretrained once and cached) → held-out eval before → GRPO training →
held-out eval after → `report.json`, `report.md`, `curves.png` in `--out`; the model card of
`model/` names the pass@1 before and after (aha/infra/card.py); `report_to` dashboards get both evals.
"""

import dataclasses
import json
import time

from aha.core.tools import eval_sampler, tool_schemas
from aha.core.train import check_prompt_lengths, run_plan, train
from aha.eval.evaluate import evaluate
from aha.infra.base import ensure_base_model
from aha.infra.card import rl_card, write_card
from aha.infra.checkpoint import prepare_out_dir
from aha.infra.config import Config
from aha.infra.model import detect_device, load_model
from aha.infra.report import write_report
from aha.infra.trackers import open_trackers
from aha.tasks import get_task
from aha.tasks.templates import apply_template


def run(cfg: Config, force: bool = False, console=None) -> dict:
    start = time.time()
    task = get_task(cfg.task, **cfg.task_options())
    model, tokenizer = load_model(cfg.model or ensure_base_model(console), detect_device())
    eval_task = apply_template(
        task, tokenizer, cfg.template, cfg.think_prefill, tool_schemas(cfg)
    )  # as train() prompts
    check_prompt_lengths(cfg, eval_task, tokenizer, model)                         # before the run folder exists
    plan = run_plan(cfg, model, eval_task, tokenizer)              # refuses a run that cannot fit, before --out
    out = prepare_out_dir(cfg.out, force)
    spec = cfg.eval_spec(plan.eval_rows)
    with open_trackers(cfg.report_to, out, dataclasses.asdict(cfg)) as trackers:
        before = evaluate(
            model, tokenizer, eval_task, spec, console=console, label="eval before RL", sampler=eval_sampler(cfg)
        )
        trackers.log_eval(0, before)
        result = train(cfg, console=console, out=out, model=model, tokenizer=tokenizer, trackers=trackers)
        after = evaluate(
            model, tokenizer, eval_task, spec, console=console, label="eval after RL", sampler=eval_sampler(cfg)
        )
        trackers.log_eval(cfg.steps, after)
    history = result["history"]
    evals = [{"step": 0, **before}] + result["evals"] + [{"step": cfg.steps, **after}]
    write_card(out / "model", rl_card(cfg, cfg.steps, result["evals"], before["pass@1"], after["pass@1"]))
    first, last = history[: max(1, len(history) // 10)], history[-max(1, len(history) // 10):]
    report = {
        "before_pass1": before["pass@1"],
        "after_pass1": after["pass@1"],
        "gain": after["pass@1"] - before["pass@1"],
        "before_think_rate": before["think_rate"],
        "after_think_rate": after["think_rate"],
        **{
            f"{when}_format_rate": ev["format_rate"]
            for when, ev in (("before", before), ("after", after))
            if "format_rate" in ev
        },
        "before_response_tokens": before["mean_response_tokens"],
        "after_response_tokens": after["mean_response_tokens"],
        "mean_response_tokens_first": sum(r["response_tokens"] for r in first) / len(first),
        "mean_response_tokens_last": sum(r["response_tokens"] for r in last) / len(last),
        "steps": cfg.steps,
        "seed": cfg.seed,
        "task": cfg.task,
        "eval_problems": before["problems"],
        "eval_k": before["k"],
        "eval_curve": [{"step": e["step"], "pass@1": e["pass@1"]} for e in evals],
        "time_generate": sum(r["time_generate"] for r in history),
        "time_update": sum(r["time_update"] for r in history),
        "wall_seconds": time.time() - start,
        "before": before,
        "after": after,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_report(out)
    return report
