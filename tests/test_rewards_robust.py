"""Rewards you can trust: every built-in task's `score` takes any text without raising (hypothesis
over arbitrary Unicode), and `aha check-reward` finds no completion that earns undeserved credit
on any built-in task, while it does find the hacks of rewards that have them.

Run: python -m pytest tests/test_rewards_robust.py -q
"""

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import aha.tasks.base
from aha.cli import main
from aha.infra.config import Config
from aha.tasks import get_task
from aha.tasks.check_reward import check_reward

WEIGHTS = Config().component_weights()          # accuracy 1, format 0.1: the default reward


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    return {
        "gsm8k": write_jsonl(
            root / "gsm.jsonl",
            [{"question": f"What is {i} times 7?", "answer": f"{i} × 7\n#### {7 * i:,}"} for i in range(140, 180)],
        ),
        "math": write_jsonl(
            root / "math.jsonl",
            [
                {"problem": f"Compute {i}/2.", "solution": rf"It is \boxed{{\frac{{{i}}}{{2}}}}."}
                for i in range(1, 40, 2)
            ],
        ),
        "jsonl": write_jsonl(
            root / "rows.jsonl",
            [
                {"prompt": f"Question {i}?", "answer": a}
                for i, a in enumerate(["Paris", "42", "3.5", "1,000", "Oslo"] * 6)
            ],
        ),
    }


def make_task(name, data):
    if name in ("gsm8k", "math"):
        options = {"workers": 1, "timeout": 2.0} if name == "math" else {}
        return get_task(name, data=data[name], eval_fraction=0.5, **options)
    if name == "jsonl":
        return get_task(f"jsonl:{data['jsonl']}", eval_fraction=0.5)
    if name.startswith("rg:"):
        return get_task(name, eval_size=5)
    return get_task(name)


BUILT_IN = ["addition", "countdown", "code", "gsm8k", "math", "jsonl", "rg:leg_counting", "rg:basic_arithmetic"]


# --- score() takes any text ---------------------------------------------------------------------

TEXT = st.text(max_size=40)                      # any Unicode code point but surrogates
COMPLETIONS = st.one_of(
    TEXT,
    st.builds(lambda a, b, c: f"{a}<answer>{b}</answer>{c}", TEXT, TEXT, TEXT),
    st.builds(lambda a, b: f"<think>{a}</think> <answer>{b}</answer>", TEXT, TEXT),
    st.builds(
        lambda b: f"<answer>{b}</answer>",
        st.text(st.characters(categories=["Nd", "No", "Nl", "Zs", "Pd", "Sm"]), max_size=12),
    ),
)
EXAMPLES = [
    "<answer>²</answer>",
    "<answer>١٢٣</answer>",
    "<answer>1e99999</answer>",
    "<answer>9**9**9</answer>",
    "<answer>\x00</answer>",
    "<answer>" + "(" * 300 + "</answer>",
    "<answer>𝟏𝟐</answer>",
    "<answer>\\boxed{</answer>",
]
SLOW = {"math": 12, "code": 15}                  # math-verify and the sandbox run in other processes


@pytest.mark.parametrize("name", BUILT_IN)
def test_score_accepts_any_text(name, data):
    task = make_task(name, data)
    problem = task.eval_problems(1)[0]

    @settings(max_examples=SLOW.get(name, 60), deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(COMPLETIONS)
    def never_raises(text):
        scores = task.score(text, problem)
        assert set(scores) >= {"accuracy", "format"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values()), scores
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["format"] in (0.0, 1.0)

    for text in EXAMPLES:                        # '²'.isdigit() is True, int('²') raised in addition
        never_raises = example(text)(never_raises)
    never_raises()


# --- check-reward --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILT_IN)
def test_no_built_in_task_pays_for_an_adversarial_completion(name, data):
    findings, notes, tried = check_reward(make_task(name, data), WEIGHTS, problems=2)
    assert tried > 60
    assert [(f.probe.name, f.what) for f in findings] == []
    assert notes == [] or name == "code"         # the gold itself scores (code's gold is its hidden tests)


def old_extract_answer(completion):
    """aha's extraction before: the last `<answer>…</answer>`, however many there are."""
    found = aha.tasks.base.ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def test_check_reward_finds_the_last_answer_rule(monkeypatch):
    import aha.tasks.addition
    monkeypatch.setattr(aha.tasks.addition, "extract_answer", old_extract_answer)
    findings, _, _ = check_reward(get_task("addition"), WEIGHTS, problems=1)
    assert {f.probe.name for f in findings} == {"several answers, the gold last", "the gold answer twice",
                                                "an answer closed twice"}
    assert all(f.what == "accuracy 1 > 0" for f in findings)


def test_check_reward_finds_reasoning_gyms_substring_credit():
    task = get_task("rg:leg_counting", eval_size=2)
    task.exact_match = False                     # reasoning-gym's own default scorer
    found = {f.probe.name for f in check_reward(task, WEIGHTS, problems=1)[0]}
    assert {"the wrong and the gold answer in one", "10k characters: a list of candidates",
            "the gold wrapped in other text"} <= found


REWARDS = '''
def substring(prompts, completions, answer, **kw):
    return [float(a in c) for c, a in zip(completions, answer)]

def exact(prompts, completions, answer, **kw):
    from aha.tasks.base import extract_answer
    return [float(extract_answer(c) == a) for c, a in zip(completions, answer)]

def crashes(prompts, completions, answer, **kw):
    return [float(int(c.split("<answer>")[-1].split("</answer>")[0]) == int(a)) for c, a in zip(completions, answer)]
'''


def test_check_reward_cli_exit_codes_on_py_rewards(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "probe_rewards_i15.py").write_text(REWARDS)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"{i}+{i}?", "answer": str(2 * i)} for i in range(10, 30)])
    assert main(["check-reward", "py:probe_rewards_i15:exact", "--data", rows, "--problems", "1"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("(1 problems; checked: accuracy, format)") and ": 0 of " in out
    assert main(["check-reward", "py:probe_rewards_i15:substring", "--data", rows, "--problems", "1"]) == 1
    out = capsys.readouterr().out
    assert "undeserved: problem 0, answer outside the tags: accuracy 1 > 0" in out
    assert "undeserved: problem 0, empty answer, the gold in the thinking: accuracy 1 > 0" in out
    assert main(["check-reward", "py:probe_rewards_i15:crashes", "--data", rows, "--problems", "1"]) == 1
    assert (
        "a huge number: raises AhaError: reward function probe_rewards_i15:crashes raised ValueError"
        in capsys.readouterr().out
    )
    assert main(["check-reward", "addition", "--reward-weights", "nope=1"]) == 2
    assert capsys.readouterr().err.startswith(
        "aha check-reward: error: reward_weights names nope, but task 'addition' gives the components"
    )
    assert main(["check-reward", "py:probe_rewards_i15:exact"]) == 2          # no --data
    assert "needs a data file" in capsys.readouterr().err


def test_check_reward_task_config_finds_chain_sums_own_scorer_and_exact_closes_it(capsys):
    pytest.importorskip("reasoning_gym")
    one_digit = "config: {min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 1}"
    assert main(["check-reward", "rg:chain_sum", "--problems", "1", "--task-config", "{" + one_digit + "}"]) == 1
    assert (
        "the wrong and the gold answer in one: accuracy 0.166667 > 0   '<answer>1 or 0</answer>'"
        in capsys.readouterr().out
    )
    assert (
        main(["check-reward", "rg:chain_sum", "--problems", "1", "--task-config", "{exact: true, " + one_digit + "}"])
        == 0
    )
    assert ": 0 of " in capsys.readouterr().out
    assert main(["check-reward", "rg:chain_sum", "--task-config", "{colour: red}"]) == 2
    assert (
        capsys.readouterr().err.strip() == "aha check-reward: error: task 'rg:chain_sum' does not take option(s) colour"
    )
