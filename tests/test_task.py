import itertools
import random

import pytest

from aha.infra.errors import AhaError
from aha.infra.tokenizer import build_char_tokenizer
from aha.stages.pretrain import corpus_batches
from aha.tasks import get_task
from aha.tasks.addition import AdditionTask, is_heldout, sloppy_sum, worked_solution
from aha.tasks.base import extract_answer, is_well_formed, thought


def test_worked_solution_and_sloppy_sum_by_hand():
    assert worked_solution(4821, 3977) == "<think>1+7+0=08, 2+7+0=09, 8+9+0=17, 4+3+1=08</think>"
    assert worked_solution(9999, 1) == "<think>9+1+0=10, 9+0+1=10, 9+0+1=10, 9+0+1=10</think>"
    assert sloppy_sum(4821, 3977) == "7798"    # 4+3, 8+9→7, 2+7, 1+7: carries dropped
    assert sloppy_sum(1234, 4321) == "5555"    # no carry: the direct answer is right
    assert sloppy_sum(512, 598) == "000"


@pytest.mark.parametrize("text, expected", [
    (" <answer>42</answer>", "42"),
    (" <think>x</think> <answer> 42 </answer>", "42"),
    ("<answer>1</answer><answer>2</answer>", None),         # several answers: none counts
    ("<answer><answer>2</answer></answer>", None),           # nested
    ("<answer>\n2\n</answer>", "2"),                         # newlines inside the tags
    ("<think>a\nb</think>\n<answer>\n12\n3\n</answer>\n", "12\n3"),
    ("<answer>42", None),                                    # not closed
    ("42", None),                                            # no tags
    ("junk <answer></answer>", ""),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, ok", [
    (" <answer>42</answer>", True),
    (" <think>1+1=2</think> <answer>2</answer>", True),
    ("<think>a</think><think>b</think><answer>2</answer>", False),   # two thoughts
    ("<answer>1</answer><answer>2</answer>", False),                 # two answers
    ("<answer>2</answer> trailing", False),
    ("prefix <answer>2</answer>", False),
    ("<think>unclosed <answer>2</answer>", False),
    ("<think><think>x</think></think><answer>2</answer>", False),    # nested
    ("", False),
    ("<answer></answer>", False),                                    # an empty answer is no answer
    ("<think>4</think> <answer> \n </answer>", False),
    ("<think>a\nb</think>\n<answer>\n2\n</answer>", True),           # newlines anywhere
])
def test_is_well_formed(text, ok):
    assert is_well_formed(text) is ok


def test_scores_by_hand():
    task = AdditionTask(digits=4)
    problem = task._problem(4821, 3977)
    assert task.score(" <think>…</think> <answer>8798</answer>", problem) == {"accuracy": 1.0, "format": 1.0}
    assert task.score(" <answer>7798</answer>", problem) == {"accuracy": 0.0, "format": 1.0}
    assert task.score(" <answer>08798</answer>", problem) == {"accuracy": 1.0, "format": 1.0}
    assert task.score("8798", problem) == {"accuracy": 0.0, "format": 0.0}
    assert task.score("<answer>8798</answer><answer>1</answer>", problem) == {"accuracy": 0.0, "format": 0.0}
    assert task.score("<answer>" + "9" * 5000 + "</answer>", problem)["accuracy"] == 0.0
    assert task.score("<answer>8798.0</answer>", problem)["accuracy"] == 0.0
    assert task.score("<answer>-8798</answer>", problem)["accuracy"] == 0.0
    assert task.score("<answer>\n8798\n</answer>", problem) == {"accuracy": 1.0, "format": 1.0}
    for digits in ("８７９８", "٨٧٩٨", "⁸⁷⁹⁸"):        # fullwidth, Arabic-Indic, superscript: not ASCII digits
        assert task.score(f"<answer>{digits}</answer>", problem) == {"accuracy": 0.0, "format": 1.0}
    assert task.score("<answer>²</answer>", problem)["accuracy"] == 0.0      # '²'.isdigit(), int('²') raises


def test_thought():
    assert thought(" <think>1+1=2</think> <answer>2</answer>")
    assert not thought(" <think> </think> <answer>2</answer>")
    assert not thought(" <answer>2</answer>")


def test_heldout_is_symmetric_and_about_a_tenth():
    rng = random.Random(0)
    pairs = [(rng.randint(1000, 9999), rng.randint(1000, 9999)) for _ in range(20000)]
    assert all(is_heldout(a, b) == is_heldout(b, a) for a, b in pairs[:2000])
    share = sum(is_heldout(a, b) for a, b in pairs) / len(pairs)
    assert 0.08 < share < 0.12


def test_eval_set_is_disjoint_from_training_stream_and_corpus():
    task = get_task("addition", digits=4)
    held = {frozenset((p.meta["a"], p.meta["b"])) for p in task.eval_problems(400)}
    assert len(held) == 400
    train = {frozenset((p.meta["a"], p.meta["b"])) for p in itertools.islice(task.train_problems(0), 50_000)}
    assert not held & train
    # the pretraining corpus is made from the same stream: decode it and check its questions
    tok = build_char_tokenizer()
    seen = set()
    for _, (ids, _) in zip(range(20), corpus_batches(task, tok, 0.25, 64, seed=0)):
        for row in tok.batch_decode(ids, skip_special_tokens=True):
            a, b = row.split("\n")[0].removeprefix("User: ").split("+")
            seen.add(frozenset((int(a), int(b))))
    assert len(seen) > 1000 and not held & seen


def test_corpus_mixes_worked_and_direct_answers():
    task, tok = get_task("addition"), build_char_tokenizer()
    ids, _ = next(corpus_batches(task, tok, 0.25, 400, seed=3, pool=1))
    rows = tok.batch_decode(ids, skip_special_tokens=True)
    share = sum("<think>" in r for r in rows) / len(rows)
    assert 0.18 < share < 0.32
    for row in rows:
        question, response = row.split("\nAssistant:")
        a, b = map(int, question.removeprefix("User: ").split("+"))
        answer = int(extract_answer(response))
        assert answer == (a + b if "<think>" in response else int(sloppy_sum(a, b)))


def test_bad_task_options():
    from aha.infra.errors import AhaError
    with pytest.raises(AhaError):
        get_task("nope")
    with pytest.raises(AhaError):
        get_task("addition", digits=0)


def test_asking_for_more_held_out_problems_than_exist_is_refused():
    from aha.infra.errors import AhaError
    task = AdditionTask(digits=1)
    available = task.heldout_pairs()
    span = range(10)
    assert available == sum(is_heldout(a, b) for a in span for b in span) and 0 < available < 100
    assert len(task.eval_problems(available)) == available          # all of them, and it ends
    with pytest.raises(AhaError, match=f"only {available} held-out problems"):
        task.eval_problems(available + 1)                         # used to loop for ever


def test_the_task_protocol_declares_its_optional_hooks():
    """A task that defines only the required methods gets every optional hook from `Task` (the loop
    calls them all unconditionally), and a template forwards the task's own."""
    from aha.tasks.base import Problem, Task
    from aha.tasks.templates import TemplatedTask

    class Echo(Task):
        name = "echo"

        def score(self, completion, problem):
            return {"accuracy": float(completion == problem.answer)}

    task, problem = Echo(), Problem("q", "a")
    assert task.score_batch(["a", "b"], [problem, problem]) == [{"accuracy": 1.0}, {"accuracy": 0.0}]
    assert (task.components, task.adds_special_tokens, task.skipped_rows, task.writes_corpus) == ((), True, 0, False)
    with pytest.raises(AhaError, match="writes no worked solutions"):
        task.corpus_document(problem, think=True)
    with pytest.raises(NotImplementedError):
        task.prompt(problem)
    addition = get_task("addition")
    templated = TemplatedTask(addition, "r1_zero", tokenizer=None)
    assert templated.name == "addition" and templated.writes_corpus and templated.components == ()
    assert templated.score_batch(["<answer>5</answer>"], [Problem("2+3", "5")]) == addition.score_batch(
        ["<answer>5</answer>"], [Problem("2+3", "5")])
