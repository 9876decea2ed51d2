"""The `code` task: extraction, exact partial-credit rewards through the real sandbox, hostile
answers scored 0 with nothing harmed, bad rows, the built-in set's split, and a CLI smoke run.

Run: python -m pytest tests/test_code_task.py -q        (about 20 s on 2 cores)
"""

import itertools
import json

import psutil
import pytest

from aha.cli import main
from aha.infra.errors import AhaError
from aha.tasks import code as code_module
from aha.tasks import get_task, sandbox
from aha.tasks.base import Problem
from aha.tasks.code import builtin_problems, extract_code

TESTS = ["assert f(0) == 3", "assert f(1) == 10", "assert f(-2) == -11", "assert f(5) == 38"]
PROBLEM = Problem(question="Write f(x) returning x * 7 + 3.", answer="\n".join(TESTS),
                  meta={"tests": TESTS, "entry_point": "f"})
RIGHT = "def f(x):\n    return x * 7 + 3"
HALF = "def f(x):\n    return x * 7 + 3 if x % 2 == 0 else 0"   # right for 0 and -2, wrong for 1 and 5


@pytest.fixture(scope="module")
def task():
    return get_task("code")


@pytest.mark.parametrize("completion, code", [
    (f"<answer>{RIGHT}</answer>", RIGHT),
    (f"<think>```python\nx = 1\n```</think> <answer>\n```python\n{RIGHT}\n```\n</answer>", RIGHT),
    (f"<answer>\n    {RIGHT.replace(chr(10), chr(10) + '    ')}\n</answer>", RIGHT),       # indented as a block
    (f"<answer>x = 1</answer> then <answer>{RIGHT}</answer>", None),                   # several answers: none
    (f"<answer><answer>{RIGHT}</answer></answer>", None),                              # nested tags
    (f"Here it is:\n```py\n{RIGHT}\n```\nand ```\nprint(1)\n```", "print(1)"),          # no tag: the last fence
    (RIGHT, None),                                                                     # no tag, no fence
    ("<answer>   </answer>", None),
    ("<answer>```python\n```</answer>", None),
])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


@pytest.mark.parametrize("completion, accuracy, well_formed", [
    (f"<think>easy</think> <answer>{RIGHT}</answer>", 1.0, 1.0),
    (f"<answer>```python\n{RIGHT}\n```</answer>", 1.0, 1.0),
    (f"I think:\n```python\n{RIGHT}\n```", 1.0, 0.0),                     # no tag, but a fenced block
    (f"<answer>{HALF}</answer>", 0.5, 1.0),
    ("<answer>def f(x):\n    return 3</answer>", 0.25, 1.0),
    ("<answer>def f(x) return x * 7 + 3</answer>", 0.0, 1.0),            # syntax error
    (RIGHT, 0.0, 0.0),                                                     # no answer tag
    ("<answer>def g(x):\n    return x * 7 + 3</answer>", 0.0, 1.0),        # wrong name
    (f"<answer>{RIGHT}\nraise SystemExit(0)</answer>", 0.0, 1.0),          # exits before the asserts
    (f"<answer>{RIGHT}\nprint('test 0 1')</answer>", 1.0, 1.0),            # printing does not matter
])
def test_scores_are_exact(task, completion, accuracy, well_formed):
    assert task.score(completion, PROBLEM) == {"accuracy": accuracy, "format": well_formed}


def test_score_batch_matches_score_and_runs_each_distinct_program_once(task, monkeypatch):
    completions = [f"<answer>{RIGHT}</answer>", f"<answer>{HALF}</answer>", f"<answer>{RIGHT}</answer>", "no code"]
    assert task.score_batch(completions, [PROBLEM] * 4) == [task.score(c, PROBLEM) for c in completions]
    calls = []
    monkeypatch.setattr(code_module, "run_tests", lambda code, tests, **limits: calls.append((code, limits)) or 1.0)
    scores = task.score_batch(completions, [PROBLEM] * 4)
    assert [s["accuracy"] for s in scores] == [1.0, 1.0, 1.0, 0.0]
    assert sorted(c for c, _ in calls) == sorted([RIGHT, HALF])
    assert calls[0][1] == {"timeout_s": 3.0, "cpu_s": 2}


def test_no_sandbox_for_code_that_cannot_pass(task, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a sandbox was started")
    monkeypatch.setattr(code_module, "run_tests", forbidden)
    for text in ["no answer", "<answer>def f(:</answer>", "<answer>def g(x): return 1</answer>",
                 "<answer>" + "(" * 5000 + "</answer>", "<answer>" + "-" * 15000 + "1</answer>",
                 "<answer>" + "x = 1\n" * 5000 + "</answer>"]:
        assert task.score(text, PROBLEM)["accuracy"] == 0.0


@pytest.mark.skipif(not sandbox.isolation().get("uid"), reason="needs the sandbox's private uid (run as root)")
def test_hostile_answers_score_zero_and_harm_nothing(task, tmp_path):
    canary = tmp_path / "keep" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("alive")
    breach = "def f(x):\n    return x * 7 + 3 if broke else None\n"   # scores 1 only if the attack worked
    hostile = [
        'import os; os.system("rm -rf ~")',
        f'import os, shutil\nos.system("rm -rf ~ {canary.parent}")\nshutil.rmtree("{canary.parent}", '
        f'ignore_errors=True)',
        "while True:\n    pass",
        "def f(x):\n    while True:\n        pass",
        "import time\ntime.sleep(100)",
        "ctypes = __import__('ctypes')\nlibc = ctypes.CDLL(None)\nlibc.setuid(0)\nbroke = libc.geteuid() == 0\n"
        + breach,
        f"import os, signal\ntry:\n    os.kill({psutil.Process().pid}, signal.SIGKILL)\nexcept OSError:\n    pass\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "x = bytearray(1 << 34)",
    ]
    children_before = {child.pid for child in psutil.Process().children(recursive=True)}   # e.g. a grader pool
    scores = task.score_batch([f"<answer>{code}</answer>" for code in hostile], [PROBLEM] * len(hostile))
    assert [s["accuracy"] for s in scores] == [0.0] * len(hostile)
    assert canary.read_text() == "alive"
    assert [c for c in psutil.Process().children(recursive=True) if c.pid not in children_before] == []
    assert not [p for p in psutil.process_iter(["uids", "status"]) if p.info["status"] != psutil.STATUS_ZOMBIE
                and p.info["uids"] and p.info["uids"].real >= sandbox.UID_BASE]


# --- data rows -------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rows(n):
    return [{"prompt": f"Write `add{i}(x)` returning x + {i}.", "tests": [f"assert add{i}(1) == {i + 1}"],
             "entry_point": f"add{i}"} for i in range(n)]


def test_rows_from_a_file(tmp_path):
    task = get_task("code", data=write_jsonl(tmp_path / "c.jsonl", rows(10)), eval_fraction=0.0)
    p = next(q for q in task.train if q.meta["entry_point"] == "add4")
    assert p.meta["tests"] == ["assert add4(1) == 5"]
    assert task.prompt(p) == f"User: {p.question}\nAssistant:"
    assert task.score("<answer>def add4(x):\n    return x + 4</answer>", p) == {"accuracy": 1.0, "format": 1.0}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "no tests"}, "'tests' must be a non-empty list of assert strings, got NoneType"),
    ({"prompt": "p", "tests": "assert f(1) == 2"}, "'tests' must be a non-empty list of assert strings, got str"),
    ({"prompt": "p", "tests": []}, "'tests' must be a non-empty list"),
    ({"prompt": "p", "tests": ["assert f(1) ==", "assert True"]}, "test 1 is not a Python statement"),
    ({"prompt": "p", "tests": ["assert True", 3]}, "test 2 is not a Python statement"),
    ({"prompt": "p", "tests": ["assert True"], "entry_point": "not a name"}, "'entry_point' must be a function name"),
    ({"prompt": "", "tests": ["assert True"]}, "missing field 'prompt'"),
])
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path, bad, message):
    good = rows(6)
    path = write_jsonl(tmp_path / "bad.jsonl", good[:2] + [bad] + good[2:])
    with pytest.raises(AhaError, match=rf"bad\.jsonl:3: {message}.*skip_bad_rows"):
        get_task("code", data=path)
    task = get_task("code", data=path, skip_bad_rows=True, eval_fraction=0.0)
    assert task.skipped_rows == 1 and len(task.train) == 6


def test_builtin_options_are_checked():
    with pytest.raises(AhaError, match="eval_data=PATH needs data=PATH"):
        get_task("code", eval_data="x.jsonl")
    with pytest.raises(AhaError, match="eval_fraction=0.0 must be in"):
        get_task("code", eval_fraction=0.0)
    with pytest.raises(AhaError, match="does not take option.*digits"):
        get_task("code", digits=3)


# --- the built-in set ------------------------------------------------------------------------

def test_builtin_set_is_deterministic_and_its_heldout_disjoint(task):
    problems = builtin_problems()
    assert 40 <= len(problems) <= 60 and len({p.question for p in problems}) == len(problems)
    assert [p.meta for p in problems] == [p.meta for p in builtin_problems()]
    held = {p.question for p in task.eval_problems(100)}
    assert 3 <= len(held) <= 15 and held == {p.question for p in get_task("code").eval_problems(100)}
    stream = list(itertools.islice(task.train_problems(0), 200))
    assert not held & {p.question for p in stream}
    assert {p.question for p in stream} | held == {p.question for p in problems}
    assert stream == list(itertools.islice(get_task("code").train_problems(0), 200))
    assert stream != list(itertools.islice(task.train_problems(1), 200))
    for p in problems:
        assert p.meta["entry_point"] in p.question and len(p.meta["tests"]) == 4
        assert all(t.startswith(f"assert {p.meta['entry_point']}(") for t in p.meta["tests"])


def test_builtin_tests_accept_a_right_answer(task):
    reverse = next(p for p in builtin_problems() if p.meta["entry_point"] == "reverse")
    assert task.score("<answer>def reverse(s):\n    return s[::-1]</answer>", reverse)["accuracy"] == 1.0
    affine = next(p for p in builtin_problems() if p.meta["entry_point"] == "f")
    a, b = (int(t) for t in affine.question.rstrip(".").split("returns x * ")[1].split(" + "))
    assert task.score(f"<answer>def f(x): return x * {a} + {b}</answer>", affine)["accuracy"] == 1.0


# --- the command line ------------------------------------------------------------------------

def test_cli_trains_on_the_code_task(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--task", "code", "--steps", "2", "prompts_per_step=2", "group_size=2", "max_new_tokens=16",
                 "eval_problems=2", "eval_k=1", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 and "reward_format" in r for r in records)
    assert (out / "model" / "config.json").is_file()
