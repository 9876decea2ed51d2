"""`aha eval`: arguments, and the settings each evaluated model gets.

    aha eval runs/chat_run                       # the run's task, data, template, prefill, lengths
    aha eval runs/a runs/b --pass-k 1,2,4        # side by side, each with its own run's settings
    aha eval --model DIR --task gsm8k --data test.jsonl --template chat --think-prefill

A run folder (one with `config.yaml`, written by `aha train` / `aha run`) is evaluated as it was
trained and evaluated: its task and task options (digits, data, eval_data, skip_bad_rows), its
template and think_prefill, max_new_tokens, and the held-out protocol of its own evals
(eval_problems, eval_k, eval_temperature, eval_top_p, seed), so `aha eval RUN` reproduces the
run's `after` pass@1. A flag given on the command line overrides the run's value; naming another
task drops the run's data files. Any other model dir gets the defaults of aha/infra/config.py.

The leakage trap is closed: for a run trained with a separate `eval_data`, the hash split of its
training file holds rows the model trained on, so `--data TRAIN` alone evaluates the run's
held-out file instead (and says so), and `--eval-data TRAIN` is refused.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from aha.infra.config import Config, load_config
from aha.infra.errors import AhaError
from aha.infra.reader import apply_values


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="pass@1, pass@k, cons@k on held-out problems with R1's sampling protocol",
        description="k samples per held-out problem at temperature 0.6, top-p 0.95; pass@1 = share of "
        "correct samples, unbiased pass@j for each --pass-k, cons@k = majority vote of the k "
        "answers, mean_accuracy = mean reward accuracy (partial credit included). A run folder "
        "is evaluated with its own config.yaml (task, data, template, prefill, lengths); flags "
        "override it. Several models: a side-by-side table.",
    )
    p.add_argument("models", nargs="*", metavar="RUN_OR_MODEL_DIR", help="run folder(s) or model dir(s) to evaluate")
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="model dir or run folder (its model/); repeat to compare (default: the built-in base model)")
    p.add_argument("--task", help="task name (default: the run's, else addition)")
    p.add_argument("--task-config", metavar="YAML",
                   help="the task's own options, e.g. '{digits: 4}' (default: the run's)")
    p.add_argument("--data", help="data file for file-backed tasks (gsm8k, math, py:…; default: the run's)")
    p.add_argument("--eval-data", help="a separate held-out file (default: the run's eval_data)")
    p.add_argument(
        "--template", help="prompt template: task, r1_zero, chat, or a file with {question} (default: the run's)"
    )
    p.add_argument("--think-prefill", action="store_true", default=None, help="append <think> to every prompt")
    p.add_argument(
        "--no-think-prefill", dest="think_prefill", action="store_false", help="do not, whatever the run did"
    )
    p.add_argument("--problems", type=int, help="held-out problems (default: the run's eval_problems, else 200)")
    p.add_argument(
        "--k", type=int, help="samples per problem (default: the run's eval_k, else 4; at least the largest --pass-k)"
    )
    p.add_argument(
        "--pass-k", default="", metavar="J,J,…", help="also report unbiased pass@J for these J ≤ k, e.g. 1,2,4"
    )
    p.add_argument(
        "--temperature", type=float, help="sampling temperature (default: the run's eval_temperature, else 0.6)"
    )
    p.add_argument("--top-p", type=float, help="nucleus (default: the run's eval_top_p, else 0.95)")
    p.add_argument("--max-new-tokens", type=int, help="completion budget (default: the run's, else 64)")
    p.add_argument("--prefill", default="", help='force the response to start so, e.g. " <think>"')
    p.add_argument("--seed", type=int, help="sampling seed (default: the run's, else 0)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="score a prompt the model cannot read (too long for its context, or characters its tokenizer "
                        "lacks) as k failures, counted in unreadable_prompts, instead of stopping")
    p.add_argument("--json", help="also write the result to this JSON file (a list when several models)")
    p.add_argument("--markdown", help="also write the comparison table to this markdown file")
    p.set_defaults(handler=cmd_eval)


def parse_pass_k(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AhaError(f"--pass-k {text!r}: give whole numbers separated by commas, e.g. 1,2,4") from None
    if any(v < 1 for v in values):
        raise AhaError(f"--pass-k {text!r}: every k must be at least 1")
    return values


# flag → config key it overrides
FLAG_KEYS = {"task": "task", "task_config": "task_config", "data": "data", "eval_data": "eval_data",
             "template": "template", "think_prefill": "think_prefill", "max_new_tokens": "max_new_tokens",
             "problems": "eval_problems",
             "k": "eval_k", "temperature": "eval_temperature", "top_p": "eval_top_p", "seed": "seed"}


@dataclass(frozen=True)
class EvalPlan:
    cfg: Config             # task, task options, template, prefill and the eval protocol to use
    note: str = ""          # said before evaluating (a redirected data file)


def same_file(a: str, b: str) -> bool:
    return bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()


def eval_plan(path: str | None, args) -> EvalPlan:
    """The settings for one model: its run's config.yaml (if it is a run folder), then the flags."""
    saved = Path(path) / "config.yaml" if path else None
    run = load_config(str(saved)) if saved is not None and saved.is_file() else None
    cfg = replace(run or Config())
    given = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if "task" in given and given["task"] != cfg.task:
        cfg = replace(cfg, data="", eval_data="", skip_bad_rows=False, task_config={})   # another task's options
    if "data" in given and not same_file(given["data"], cfg.data):
        cfg = replace(cfg, eval_data="")            # another file: its own held-out split, unless --eval-data
    cfg = apply_values(cfg, given, "command line")
    note = ""
    if run is not None and run.data and cfg.task == run.task:
        if same_file(cfg.eval_data, run.data):
            raise AhaError(
                f"--eval-data {cfg.eval_data} is the training file of the run in {path}: the model trained on "
                f"its rows; evaluate its held-out set instead "
                f"({'eval_data ' + run.eval_data if run.eval_data else 'drop --eval-data'})"
            )
        if "data" in given and run.eval_data and "eval_data" not in given and same_file(cfg.data, run.data):
            note = (f"evaluating the run's held-out file {run.eval_data}: the hash split of its training file "
                    f"{cfg.data} holds rows the model trained on")
    return EvalPlan(cfg.validate(), note)


def cmd_eval(args, console):
    from aha.core.plan import rollout_rows_for
    from aha.core.tools import eval_sampler, tool_schemas
    from aha.eval.evaluate import EvalSpec, evaluate, markdown_table, rich_table
    from aha.infra.base import ensure_base_model
    from aha.infra.model import detect_device, load_model, resolve_model_dir
    from aha.tasks import get_task
    from aha.tasks.templates import apply_template
    pass_k = parse_pass_k(args.pass_k)
    paths = [*args.models, *args.model] or [None]
    plans = [eval_plan(path, args) for path in paths]          # every bad input found before any model loads
    results = []
    for path, plan in zip(paths, plans):
        cfg = plan.cfg
        if plan.note:
            console.print(f"note: {plan.note}")
        k = max((cfg.eval_k, *pass_k)) if args.k is None else cfg.eval_k     # --k is cfg.eval_k
        model_dir = resolve_model_dir(path) if path else ensure_base_model(console)
        model, tokenizer = load_model(model_dir, detect_device())
        task = apply_template(get_task(cfg.task, **cfg.task_options()), tokenizer, cfg.template, cfg.think_prefill,
                              tool_schemas(cfg))
        rows = rollout_rows_for(model, 256, cfg.max_new_tokens, k, cfg.eval_problems * k)   # the KV-cache budget
        spec = EvalSpec(cfg.eval_problems, k, cfg.eval_temperature, cfg.eval_top_p, cfg.max_new_tokens, cfg.seed,
                        pass_k=pass_k, rows_per_pass=rows, skip_unreadable=args.skip_unreadable)
        result = evaluate(
            model,
            tokenizer,
            task,
            spec,
            prefill=args.prefill,
            console=console,
            label=f"eval {path or 'base'}",
            sampler=eval_sampler(cfg),
        )
        results.append({"model": path or "base", "task": cfg.task, "template": cfg.template,
                        "think_prefill": cfg.think_prefill, "max_new_tokens": cfg.max_new_tokens, **result})
    if len(results) > 1:
        console.print(
            rich_table(results, f"{plans[0].cfg.task}: {results[0]['problems']} problems × {results[0]['k']} samples")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(results))
    for result in results:
        print(json.dumps({key: v for key, v in result.items() if key != "samples"}))
