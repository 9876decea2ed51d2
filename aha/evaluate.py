"""`aha eval`: R1's evaluation protocol on a task's held-out problems.

k samples per problem at temperature 0.6, top-p 0.95 (greedy decoding is avoided: it repeats and
has high variance); pass@1 = the share of all k samples of all problems that are correct (full
accuracy, `passed`: the same definition as pass@k and cons@k); `mean_accuracy` = the mean reward
accuracy, partial credit included. Also: unbiased
pass@j for each j of `spec.pass_k` (j ≤ k; aha/passk.py), cons@k (majority vote over the k
extracted answers), the share of answers that reasoned in `<think>`, the share that use a
reflection word ("wait", "verify", …), mean response tokens, truncation rate. Under
`think_prefill` the prompt's `<think>` counts as part of the response for these rates.
`prefill` forces the start of every response (e.g. " <think>" or " <answer>") to measure how
well the model does when it does or does not reason.
"""

from dataclasses import dataclass

from aha.errors import AhaError
from aha.model import check_context, model_context
from aha.passk import REFLECTION_WORDS, cons_at_k, mean_pass_at_k, passed, reflection_rate
from aha.progress import progress_bar
from aha.rollout import SamplingParams, generate, stop_strings, stop_token_ids
from aha.tasks.base import extract_answer, thought
from aha.templates import prompt_prefill


@dataclass(frozen=True)
class EvalSpec:
    problems: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0
    rows_per_pass: int = 256                        # rows generated at once (whole problems): the KV-cache budget
    pass_k: tuple[int, ...] = ()                    # extra pass@j to report, each ≤ k (1 and k always are)
    reflection_words: tuple[str, ...] = REFLECTION_WORDS

    def __post_init__(self):
        bad = [j for j in self.pass_k if not 1 <= j <= self.k]
        if bad:
            raise AhaError(f"pass@k needs 1 ≤ k ≤ samples per problem ({self.k}); got {bad}: raise --k or drop them")


def sample_metrics(correct: list[list[float]], answers: list[list[str | None]], texts: list[str], spec: EvalSpec) -> dict:
    """pass@1, pass@j, cons@k (all three count a sample as correct when `passed`: full accuracy),
    the mean accuracy (partial credit included) and the reflection rate, from per-problem lists of k
    accuracies / extracted answers and the responses."""
    flat = [a for row in correct for a in row]
    metrics = {"pass@1": sum(map(passed, flat)) / len(flat), "mean_accuracy": sum(flat) / len(flat)}
    metrics |= {f"pass@{j}": mean_pass_at_k(correct, j) for j in sorted({spec.k, *spec.pass_k} - {1})}
    metrics[f"cons@{spec.k}"] = sum(cons_at_k(a, c, spec.k) for a, c in zip(answers, correct)) / len(correct)
    metrics["reflection_rate"] = reflection_rate(texts, spec.reflection_words)
    return metrics


def evaluate(model, tokenizer, task, spec: EvalSpec, prefill: str = "", console=None, label: str = "eval") -> dict:
    problems = task.eval_problems(spec.problems)
    params = SamplingParams(spec.max_new_tokens, spec.temperature, spec.top_p, 0, stop_token_ids(model, tokenizer),
                            stop_strings(tokenizer))
    per_pass = max(1, spec.rows_per_pass // spec.k)                 # problems per pass
    special = getattr(task, "adds_special_tokens", True)   # a chat template writes its own BOS
    prompts = [tokenizer(task.prompt(p) + prefill, add_special_tokens=special)["input_ids"] for p in problems]
    check_context(max(map(len, prompts), default=0), spec.max_new_tokens, model_context(model),
                  "use a shorter template, or lower max_new_tokens (--max-new-tokens)")
    correct, answers, texts, lengths, thinking, truncated, samples = [], [], [], [], [], [], []
    was_training = model.training
    model.eval()
    with progress_bar(console) as bar:
        job = bar.add_task(label, total=len(problems))
        for start in range(0, len(problems), per_pass):
            chunk = problems[start:start + per_pass]
            # global rows: sample j of problem i draws the same tokens whatever the pass size
            rollout = generate(model, prompts[start:start + per_pass], spec.k, params, tokenizer.pad_token_id,
                               seed=spec.seed, row_offset=start * spec.k, total_rows=len(problems) * spec.k,
                               tokenizer=tokenizer)
            decoded = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            for i, text in enumerate(decoded):
                problem = chunk[i // spec.k]
                text = prefill + text                     # what the task scores (it adds its own prefill)
                response = prompt_prefill(task, problem) + text     # the whole response, as a reader sees it
                if i % spec.k == 0:
                    correct.append([])
                    answers.append([])
                correct[-1].append(task.score(text, problem)["accuracy"])
                answers[-1].append(extract_answer(response))
                texts.append(response)
                thinking.append(float(thought(response)))
                if len(samples) < 8 and i % spec.k == 0:
                    samples.append({"prompt": task.prompt(problem), "completion": response, "answer": problem.answer,
                                    "correct": correct[-1][-1]})
            lengths += rollout.lengths.tolist()
            truncated += rollout.truncated.float().tolist()
            bar.update(job, advance=len(chunk))
    model.train(was_training)
    n = len(texts)
    return {**sample_metrics(correct, answers, texts, spec), "think_rate": sum(thinking) / n,
            "mean_response_tokens": sum(lengths) / n, "truncation_rate": sum(truncated) / n,
            "problems": len(problems), "k": spec.k, "temperature": spec.temperature,
            "top_p": spec.top_p, "samples": samples}


def resolve_model_dir(path: str) -> str:
    """A run folder (from `aha run`/`aha train`) stands for the model it saved in `model/`."""
    from pathlib import Path
    run_model = Path(path) / "model"
    return str(run_model) if not (Path(path) / "config.json").is_file() and (run_model / "config.json").is_file() else path


def table_columns(results: list[dict]) -> list[str]:
    """The metric columns of a side-by-side comparison, pass@j in order of j."""
    passes = sorted({key for r in results for key in r if key.startswith("pass@")}, key=lambda key: int(key[5:]))
    cons = sorted({key for r in results for key in r if key.startswith("cons@")}, key=lambda key: int(key[5:]))
    return passes + cons + ["mean_accuracy", "think_rate", "reflection_rate", "mean_response_tokens", "truncation_rate"]


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
