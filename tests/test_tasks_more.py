import itertools
import json

import pytest

from aha.infra.errors import AhaError
from aha.tasks import get_task
from aha.tasks.countdown import parse_expression, tinyzero_reward
from aha.tasks.math_task import MathGrader, last_boxed


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def gsm_rows(n):
    return [{"question": f"Tom has {i} apples and buys 1,000 more. How many?", "answer": f"{i}+1000\n#### {i + 1000:,}"}
            for i in range(n)]


# --- countdown -------------------------------------------------------------------------------

NUMBERS, TARGET = [1, 2, 19, 44], 51


@pytest.mark.parametrize("answer, reward", [
    ("(44 - 19) * 2 + 1", 1.0),
    ("1 + 2 * (44 - 19)", 1.0),
    ("((44 - 19) × 2) + 1", 1.0),              # unicode operators
    ("44 + 19 - 2 - 1", 0.1),                   # wrong value
    ("(44 - 19) * 2 + 1 + 0", 0.1),             # extra number
    ("(44 - 19) * 2", 0.1),                     # a number left out
    ("(44 - 19) * 2 + 1 = 51", 0.1),            # not a bare expression
    ("102 / 2", 0.1),
    ("44 / (19 - 19) + 2 + 1", 0.1),            # division by zero
    ("__import__('os').system('echo pwned')", 0.1),
    ("9**9**9", 0.1),
    ("2 ** 10", 0.1),
    ("[44, 19, 2, 1]", 0.1),
    ("x + 44", 0.1),
    ("1.0 + 50", 0.1),
    ("(" * 150 + "1" + ")" * 150, 0.1),        # too long
    ("(" * 99 + "1" + ")" * 99, 0.1),          # deep, under the length cap
    ("-" * 199 + "1", 0.1),
    ("9" * 5000, 0.1),                          # huge number, over the length cap
    ("", 0.0),                                 # an empty answer is no answer
    ("ünïcødé ☃ 𝟙+𝟚", 0.1),
])
def test_countdown_reward(answer, reward):
    assert tinyzero_reward(answer, NUMBERS, TARGET) == reward


def test_countdown_exact_fractions():
    assert parse_expression("1 / 3 * 3") == (1, [1, 3, 3])
    assert tinyzero_reward("(2 / 3 + 1 / 3) * 51", [1, 2, 3, 3, 51], 51) == 1.0


def test_countdown_scores_and_generated_problems():
    task = get_task("countdown")
    problems = list(itertools.islice(task.train_problems(7), 200))
    assert problems == list(itertools.islice(task.train_problems(7), 200))      # deterministic
    for p in problems:
        assert 3 <= len(p.meta["numbers"]) <= 4 and 1 <= p.meta["target"] <= 100
        assert task.score(f" <think>ok</think> <answer>{p.answer}</answer>", p) == {
            "accuracy": 1.0,
            "format": 1.0,
            "tinyzero": 1.0,
        }
        assert str(p.meta["target"]) in p.question and task.prompt(p).startswith("User: Using the numbers")
    p = problems[0]
    assert task.score("no tags at all " + p.answer, p) == {"accuracy": 0.0, "format": 0.0, "tinyzero": 0.0}
    assert task.score("<answer>1 + 1</answer>", p)["tinyzero"] == 0.1
    assert task.score(f"<think><think>x</think></think><answer>{p.answer}</answer>", p) == {
        "accuracy": 1.0,
        "format": 0.0,
        "tinyzero": 1.0,
    }


def test_countdown_heldout_disjoint():
    task = get_task("countdown")
    key = lambda p: (tuple(sorted(p.meta["numbers"])), p.meta["target"])
    held = {key(p) for p in task.eval_problems(300)}
    assert len(held) == 300 and held == {key(p) for p in task.eval_problems(300)}
    train = {key(p) for p in itertools.islice(task.train_problems(0), 20_000)}
    assert not held & train


# --- gsm8k and file loading ------------------------------------------------------------------

def test_gsm8k_gold_and_scores(tmp_path):
    task = get_task("gsm8k", data=write_jsonl(tmp_path / "g.jsonl", gsm_rows(50)))
    p = task.train[0]
    assert p.answer == str(int(p.question.split()[2]) + 1000)
    right = int(p.answer)
    for text, accuracy in [(f"<answer>{right}</answer>", 1.0), (f"<answer>${right:,}</answer>", 1.0),
                           (f"<answer>{right}.00</answer>", 1.0), (f"<answer>{right + 1}</answer>", 0.0),
                           (f"<answer>{right} apples</answer>", 0.0), (f"{right}", 0.0),
                           ("<answer>" + "9" * 10_000 + "</answer>", 0.0), ("<answer>１２</answer>", 0.0)]:
        assert task.score(text, p)["accuracy"] == accuracy, text
    assert task.prompt(p) == f"User: {p.question}\nAssistant:"


def test_file_split_is_disjoint_deterministic_and_endless(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", gsm_rows(400))
    task = get_task("gsm8k", data=path, eval_fraction=0.2)
    held = {p.question for p in task.eval_problems(1000)}
    assert 40 < len(held) < 130
    stream = list(itertools.islice(task.train_problems(3), 1000))      # more than one epoch
    assert not held & {p.question for p in stream}
    assert len({p.question for p in stream}) == 400 - len(held)
    assert stream == list(itertools.islice(get_task("gsm8k", data=path, eval_fraction=0.2).train_problems(3), 1000))
    assert stream != list(itertools.islice(task.train_problems(4), 1000))


def test_separate_eval_file(tmp_path):
    rows = gsm_rows(30)
    task = get_task("gsm8k", data=write_jsonl(tmp_path / "train.jsonl", rows),
                    eval_data=write_jsonl(tmp_path / "test.jsonl", rows[:5]))
    assert [p.question for p in task.eval_problems(10)] == [r["question"] for r in rows[:5]]
    assert len(task.train) == 25


def test_parquet_and_dataset_dir(tmp_path):
    import datasets
    rows = gsm_rows(20)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "g.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "g_dir"))
    from_jsonl = get_task("gsm8k", data=write_jsonl(tmp_path / "g.jsonl", rows))
    for path in ("g.parquet", "g_dir"):
        task = get_task("gsm8k", data=tmp_path / path)
        assert task.train == from_jsonl.train and task.heldout == from_jsonl.heldout


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    rows = gsm_rows(6)
    rows[2] = {"question": "no gold", "answer": "it is 4"}
    rows[4] = {"question": "no answer field"}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(AhaError, match=r"bad\.jsonl:3: the answer has no '#### <number>'"):
        get_task("gsm8k", data=path)
    task = get_task("gsm8k", data=path, skip_bad_rows=True, eval_fraction=0.0)
    assert task.skipped_rows == 2 and len(task.train) == 4
    write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "solution": "2"}])
    with pytest.raises(AhaError, match=r"m\.jsonl:1: .*boxed"):
        get_task("math", data=tmp_path / "m.jsonl")
    write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "", "answer": "b"}])
    with pytest.raises(AhaError, match=r"j\.jsonl:2: missing field 'prompt'"):
        get_task(f"jsonl:{tmp_path / 'j.jsonl'}")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(AhaError, match="nope.jsonl does not exist"):
        get_task("gsm8k", data=tmp_path / "nope.jsonl")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(AhaError, match="junk.jsonl: cannot read"):
        get_task("gsm8k", data=tmp_path / "junk.jsonl")
    with pytest.raises(AhaError, match="needs a data file"):
        get_task("gsm8k")


def test_get_task_names_and_options():
    with pytest.raises(AhaError, match="unknown task 'chess'.*countdown"):
        get_task("chess")
    with pytest.raises(AhaError, match="does not take option.*digits"):
        get_task("countdown", digits=3)
    assert get_task("addition", digits=2).digits == 2


# --- jsonl -----------------------------------------------------------------------------------

def test_jsonl_task(tmp_path):
    rows = [{"prompt": f"Capital number {i}?", "answer": f" Paris{i} "} for i in range(20)] + [
        {"prompt": "Half?", "answer": "0.5"}
    ]
    task = get_task(f"jsonl:{write_jsonl(tmp_path / 'p.jsonl', rows)}", eval_fraction=0.0)
    by_question = {p.question: p for p in task.train}
    p, half = by_question["Capital number 3?"], by_question["Half?"]
    assert task.score("<answer> Paris3 </answer>", p)["accuracy"] == 1.0
    assert task.score("<answer>paris3</answer>", p)["accuracy"] == 0.0
    assert task.score("<answer>.50</answer>", half)["accuracy"] == 1.0
    assert task.score("<answer>1/2</answer>", half)["accuracy"] == 0.0
    with pytest.raises(AhaError, match="does not take option.*data"):
        get_task("jsonl:x.jsonl", data="y.jsonl")


# --- math (math-verify in worker processes) --------------------------------------------------

def test_last_boxed():
    assert last_boxed(r"\boxed{a} then \boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{{1}") is None


def test_math_task_grades_and_survives_hostile_answers(tmp_path):
    rows = [{"problem": f"Compute {i}/2.", "solution": rf"It is \boxed{{\frac{{{i}}}{{2}}}}."} for i in range(1, 30, 2)]
    # a worker's first grade imports math-verify: give it time, then the hostile answer a 0.5 s budget
    task = get_task("math", data=write_jsonl(tmp_path / "m.jsonl", rows), eval_fraction=0.0, workers=1, timeout=60)
    p = next(q for q in task.train if q.question == "Compute 1/2.")
    assert p.answer == r"\frac{1}{2}"
    for text, accuracy in [("<answer>0.5</answer>", 1.0), (r"<answer>\frac12</answer>", 1.0),
                           (r"<answer>$\boxed{1/2}$</answer>", 1.0), ("<answer>0.6</answer>", 0.0),
                           ("<answer></answer>", 0.0), ("0.5", 0.0), ("<answer>ünï ☃ \x00</answer>", 0.0)]:
        assert task.score(text, p)["accuracy"] == accuracy, text
    assert task.score("<answer>9**9**9</answer>", p)["accuracy"] == 0.0
    task.grader.timeout = 0.5
    # 9^{9^{9}} keeps SymPy busy past the 0.5 s budget: scored 0, pool replaced, grading goes on
    assert task.score("<answer>9^{9^{9}}</answer>", p)["accuracy"] == 0.0
    assert task.grader.timeouts == 1 and task.grader.pool is None
    task.grader.timeout = 60                                   # a new worker, its imports again
    assert task.score("<answer>1/2</answer>", p)["accuracy"] == 1.0
    task.grader.close()


def test_math_grader_cache():
    grader = MathGrader(workers=1)
    grader.cache[("1", "one")] = True          # a cached answer does not reach the pool
    assert grader.verify("1", "one") and grader.pool is None


# --- reasoning-gym ---------------------------------------------------------------------------

def test_reasoning_gym_task_scores_and_heldout():
    # a tiny question space, so the training seeds do produce evaluation questions to drop
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = get_task("rg:basic_arithmetic", eval_size=100, config=config)
    held = {p.question for p in task.eval_problems(100)}
    stream = list(itertools.islice(task.train_problems(0), 3000))
    assert stream[:50] == list(itertools.islice(task.train_problems(0), 50))
    assert not held & {p.question for p in stream}
    p = task.eval_problems(1)[0]
    assert task.score(f"<think>t</think> <answer>{p.answer}</answer>", p) == {"accuracy": 1.0, "format": 1.0}
    assert task.score("<answer>ünï ☃</answer>", p)["accuracy"] == 0.0
    assert task.score(p.answer, p)["accuracy"] == 0.0
    with pytest.raises(AhaError, match="eval_size"):
        task.eval_problems(101)
    with pytest.raises(AhaError, match="not a reasoning-gym dataset"):
        get_task("rg:no_such_thing")


# --- py:module:function ----------------------------------------------------------------------

REWARDS_MODULE = '''
def exact(prompts, completions, answer, **columns):
    assert len(prompts) == len(completions) == len(answer) == len(columns["level"])
    return [None if c == "skip" else float(a in c) for c, a in zip(completions, answer)]
def too_many(prompts, completions, **columns):
    return [1.0, 0.0]
def nan(prompts, completions, **columns):
    return [float("nan")]
def boom(prompts, completions, **columns):
    raise KeyError("no such column")
def text(prompts, completions, **columns):
    return ["1.0"]
'''


def test_custom_reward_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": f"a{i}", "level": i} for i in range(10)])
    task = get_task("py:my_rewards:exact", data=data, eval_fraction=0.0)
    p = task.train[0]
    assert task.score(f"<answer>{p.answer}</answer>", p) == {"accuracy": 1.0, "format": 1.0, "skip": 0.0}
    assert task.score("wrong", p) == {"accuracy": 0.0, "format": 0.0, "skip": 0.0}
    assert task.score("skip", p)["skip"] == 1.0
    for name, message in [("too_many", "returned 2 values for 1 completion"), ("nan", "returned nan"),
                          ("boom", "raised KeyError"), ("text", "returned .1.0.; return a float or None")]:
        bad = get_task(f"py:my_rewards:{name}", data=data)
        with pytest.raises(AhaError, match=f"my_rewards:{name} {message}"):
            bad.score("x", bad.train[0])
    with pytest.raises(AhaError, match="no function 'missing'"):
        get_task("py:my_rewards:missing", data=data)
    with pytest.raises(AhaError, match="cannot import module 'no_module_here'"):
        get_task("py:no_module_here:f", data=data)
