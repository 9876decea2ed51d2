"""`aha eval`: R1's evaluation protocol on a task's held-out problems.

k samples per problem at temperature 0.6, top-p 0.95 (greedy decoding is avoided: it repeats and
has high variance); pass@1 = the share of all k samples of all problems that are correct (full
accuracy, `passed`: the same definition as pass@k and cons@k); `mean_accuracy` = the mean reward
accuracy, partial credit included. Also: unbiased
pass@j for each j of `spec.pass_k` (j ≤ k; aha/eval/passk.py), cons@k (majority vote over the k
extracted answers), the share of answers that reasoned in `<think>`, the share that use a
reflection word ("wait", "verify", …), mean response tokens, truncation rate. Under
`think_prefill` the prompt's `<think>` counts as part of the response for these rates.
A sample passes only at accuracy 1: for tasks with partial credit (`code`, `humaneval`: the share
of tests passed) pass@1 is the share of samples that pass every test and `mean_accuracy` the mean
credit. A prompt longer than the model's context (or with characters its tokenizer cannot spell)
stops the eval in one line, or, with `skip_unreadable` (`aha eval --skip-unreadable`, for public
benchmarks a small model cannot read whole), scores k wrong answers and is counted in
`unreadable_prompts`.
`prefill` forces the start of every response (e.g. " <think>" or " <answer>") to measure how
well the model does when it does or does not reason.
"""

from dataclasses import dataclass

from aha.core.rollout import encode_prompt, generate, prompt_limit, stop_strings, stop_token_ids
from aha.core.sampling import SamplingParams
from aha.eval.passk import REFLECTION_WORDS, cons_at_k, mean_pass_at_k, passed, reflection_rate
from aha.infra.errors import AhaError
from aha.infra.model import model_context
from aha.infra.progress import progress_bar
from aha.tasks.base import extract_answer, thought
from aha.tasks.templates import prompt_prefill


@dataclass(frozen=True)
class EvalSpec:
    problems: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0
    rows_per_pass: int = 256                        # rows generated at once (whole problems): the KV-cache budget
    skip_unreadable: bool = False                   # a prompt the model cannot read: score 0 (True) or stop (False)
    pass_k: tuple[int, ...] = ()                    # extra pass@j to report, each ≤ k (1 and k always are)
    reflection_words: tuple[str, ...] = REFLECTION_WORDS

    def __post_init__(self):
        bad = [j for j in self.pass_k if not 1 <= j <= self.k]
        if bad:
            raise AhaError(f"pass@k needs 1 ≤ k ≤ samples per problem ({self.k}); got {bad}: raise --k or drop them")


def sample_metrics(
    correct: list[list[float]], answers: list[list[str | None]], texts: list[str], spec: EvalSpec
) -> dict:
    """pass@1, pass@j, cons@k (all three count a sample as correct when `passed`: full accuracy),
    the mean accuracy (partial credit included) and the reflection rate, from per-problem lists of k
    accuracies / extracted answers and the responses."""
    flat = [a for row in correct for a in row]
    metrics = {"pass@1": sum(map(passed, flat)) / len(flat), "mean_accuracy": sum(flat) / len(flat)}
    metrics |= {f"pass@{j}": mean_pass_at_k(correct, j) for j in sorted({spec.k, *spec.pass_k} - {1})}
    metrics[f"cons@{spec.k}"] = sum(cons_at_k(a, c, spec.k) for a, c in zip(answers, correct)) / len(correct)
    metrics["reflection_rate"] = reflection_rate(texts, spec.reflection_words)
    return metrics


def score_all(task, texts: list[str], problems: list) -> list[dict]:
    """The task's scores of texts[i] on problems[i]; in one batch where the task grades batches
    (the sandbox tasks run them in parallel)."""
    return task.score_batch(texts, problems)


def readable_prompts(tokenizer, task, problems: list, prefill: str, limit: int | None,
                     skip: bool = False, max_new_tokens: int = 0) -> list[list[int] | None]:
    """Each problem's prompt ids; where the model cannot read one (aha/core/rollout.py encode_prompt), an
    AhaError, or None when `skip`."""
    special = task.adds_special_tokens                  # a chat template writes its own BOS
    encoded = []
    for problem in problems:
        try:
            encoded.append(encode_prompt(tokenizer, task.prompt(problem) + prefill, special, limit, max_new_tokens))
        except AhaError as exc:
            if not skip:
                raise AhaError(f"{exc} (or --skip-unreadable to score such prompts as failures)") from None
            encoded.append(None)
    return encoded


def evaluate(model, tokenizer, task, spec: EvalSpec, prefill: str = "", console=None, label: str = "eval",
             sampler=None) -> dict:
    """R1's protocol on the task's first `spec.problems` held-out problems. A problem whose prompt
    the model cannot read (too long for its context, or characters its tokenizer lacks) counts as
    k wrong answers and is counted in `unreadable_prompts`; the length, think, truncation and
    reflection figures are over the samples actually generated. `sampler`: `generate` or
    the tool loop (aha/core/tools/); with tools the result also has the tool-use figures."""
    sampler = sampler or generate                     # looked up at call time (tests swap it)
    problems = task.eval_problems(spec.problems)
    params = SamplingParams(spec.max_new_tokens, spec.temperature, spec.top_p, 0, stop_token_ids(model, tokenizer),
                            stop_strings(tokenizer))
    per_pass = max(1, spec.rows_per_pass // spec.k)                 # problems per pass
    limit = prompt_limit(model, spec.max_new_tokens)
    if limit is not None and limit < 1:          # no prompt fits: a setting to fix, not prompts to skip
        raise AhaError(f"max_new_tokens is {spec.max_new_tokens}: with any prompt, more than this model's context of "
                       f"{model_context(model)}; lower --max-new-tokens, or use a model with a longer context")
    encoded = readable_prompts(tokenizer, task, problems, prefill, limit, spec.skip_unreadable, spec.max_new_tokens)
    correct: list = [None] * len(problems)            # per problem: its k accuracies
    answers: list = [None] * len(problems)
    texts, lengths, thinking, truncated, samples, rollouts, formats = [], [], [], [], [], [], []
    unreadable = 0
    was_training = model.training
    model.eval()
    with progress_bar(console) as bar:
        job = bar.add_task(label, total=len(problems))
        for start in range(0, len(problems), per_pass):
            chunk, chunk_ids = problems[start:start + per_pass], encoded[start:start + per_pass]
            readable = [p for p, ids in zip(chunk, chunk_ids) if ids is not None]
            rows = [i for i, ids in enumerate(chunk_ids) if ids is not None]
            unreadable += len(chunk) - len(readable)
            for i, ids in enumerate(chunk_ids):
                if ids is None:
                    correct[start + i], answers[start + i] = [0.0] * spec.k, [None] * spec.k
            if readable:
                # global rows: sample j of problem i draws the same tokens whatever the pass size
                rollout = sampler(model, [ids for ids in chunk_ids if ids is not None], spec.k, params,
                                 tokenizer.pad_token_id, seed=spec.seed, row_offset=start * spec.k,
                                 total_rows=len(problems) * spec.k, tokenizer=tokenizer)
                rollouts.append(rollout)
                decoded = [
                    prefill + t for t in tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
                ]
                scores = score_all(task, decoded, [p for p in readable for _ in range(spec.k)])
                for i in range(0, len(decoded), spec.k):
                    problem, group = readable[i // spec.k], decoded[i:i + spec.k]
                    responses = [prompt_prefill(task, problem) + text for text in group]   # as a reader sees them
                    correct[start + rows[i // spec.k]] = [s["accuracy"] for s in scores[i:i + spec.k]]
                    answers[start + rows[i // spec.k]] = [extract_answer(text) for text in responses]
                    if len(samples) < 8:
                        samples.append({"prompt": task.prompt(problem), "completion": responses[0],
                                        "answer": problem.answer, "correct": scores[i]["accuracy"]})
                    texts += responses
                    thinking += [float(thought(text)) for text in responses]
                    formats += [s.get("format") for s in scores[i:i + spec.k]]
                lengths += rollout.lengths.tolist()
                truncated += rollout.truncated.float().tolist()
            bar.update(job, advance=len(chunk))
    model.train(was_training)
    generated = max(1, len(texts))
    return {**sample_metrics(correct, answers, texts, spec), "think_rate": sum(thinking) / generated,
            "mean_response_tokens": sum(lengths) / generated, "truncation_rate": sum(truncated) / generated,
            "problems": len(problems), "unreadable_prompts": unreadable, "k": spec.k, "temperature": spec.temperature,
            "top_p": spec.top_p, **format_rate(formats), **eval_tool_metrics(rollouts), "samples": samples}


def format_rate(formats: list) -> dict:
    """{"format_rate": share of samples with full format credit} when the task scores a `format`
    component for every sample (the built-in tasks, rg:, …); {} otherwise.

    >>> format_rate([1.0, 0.0, 1.0, 1.0]), format_rate([1.0, None]), format_rate([])
    ({'format_rate': 0.75}, {}, {})
    """
    if not formats or any(f is None for f in formats):
        return {}
    return {"format_rate": sum(f >= 1.0 for f in formats) / len(formats)}


def eval_tool_metrics(rollouts: list) -> dict:
    """Tool use over the evaluation's rollouts (aha/core/tools/interact.py `tool_metrics`); {} without tools."""
    from aha.core.rollout import concat_rollouts
    from aha.core.tools.interact import tool_metrics
    if not rollouts or rollouts[0].tools is None:
        return {}
    metrics = tool_metrics(concat_rollouts(rollouts, 0))
    return {
        key: metrics[key]
        for key in ("tool_use_rate", "tool_calls_per_sample", "tool_error_rate", "turns_per_sample", "policy_tokens")
    }


def table_columns(results: list[dict]) -> list[str]:
    """The metric columns of a side-by-side comparison, pass@j in order of j."""
    passes = sorted({key for r in results for key in r if key.startswith("pass@")}, key=lambda key: int(key[5:]))
    cons = sorted({key for r in results for key in r if key.startswith("cons@")}, key=lambda key: int(key[5:]))
    formats = ["format_rate"] if any("format_rate" in r for r in results) else []
    return (
        passes
        + cons
        + ["mean_accuracy", *formats, "think_rate", "reflection_rate", "mean_response_tokens", "truncation_rate"]
    )


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(results: list[dict]) -> str:
    """One row per model (`model` key), one column per metric."""
    columns = table_columns(results)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join([str(r["model"])] + [_cell(r.get(c, "")) for c in columns]) + " |" for r in results]
    return "\n".join(lines) + "\n"


def rich_table(results: list[dict], title: str):
    from rich.table import Table
    table = Table(title=title)
    table.add_column("model")
    columns = table_columns(results)
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(str(r["model"]), *[_cell(r.get(c, "")) for c in columns])
    return table


def evaluate_dir(model_dir, cfg, console=None, label: str = "eval", out=None) -> dict:
    """R1's protocol on the model in `model_dir` (a model dir or a run folder), with `cfg`'s task, task
    options, template, prefill and eval settings (an aha.infra.config.Config): prompted as `aha train`
    on that config prompts. Written to out/eval.json when `out` is given."""
    import json
    from pathlib import Path

    from aha.infra.model import detect_device, load_model, resolve_model_dir
    from aha.tasks import get_task
    from aha.tasks.templates import apply_template
    model, tokenizer = load_model(resolve_model_dir(model_dir), detect_device())
    task = apply_template(get_task(cfg.task, **cfg.task_options()), tokenizer, cfg.template, cfg.think_prefill)
    result = evaluate(model, tokenizer, task, cfg.eval_spec(), console=console, label=label)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "eval.json").write_text(json.dumps(result, indent=2))
    return result
