"""pass@k, cons@k, reflection rate (aha/eval/passk.py) and the multi-model `aha eval`."""

import json
import random
from math import comb

import pytest

from aha.cli import main
from aha.eval.evaluate import EvalSpec, markdown_table, sample_metrics
from aha.eval.passk import cons_at_k, majority_answer, mean_pass_at_k, pass_at_k, reflection_rate
from aha.infra.errors import AhaError
from aha.infra.model import resolve_model_dir


@pytest.mark.parametrize("n,c,k,expected", [(4, 1, 2, 0.5), (4, 0, 2, 0.0), (4, 4, 2, 1.0), (4, 4, 4, 1.0),
                                            (5, 2, 1, 0.4), (4, 3, 2, 1.0), (10, 3, 4, 1 - comb(7, 4) / comb(10, 4))])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(2000, 5, 100) == pytest.approx(1 - comb(1995, 100) / comb(2000, 100), rel=1e-9)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_mean_pass_at_k_matches_the_true_probability():
    """Problems solved with probability p: E[pass@k estimate] = 1 − (1−p)^k."""
    rng, p, n, k = random.Random(0), 0.3, 8, 4
    rows = [[float(rng.random() < p) for _ in range(n)] for _ in range(20_000)]
    assert mean_pass_at_k(rows, k) == pytest.approx(1 - (1 - p) ** k, abs=0.01)
    assert mean_pass_at_k(rows, 1) == pytest.approx(p, abs=0.01)


def test_partial_credit_is_not_a_pass():
    assert mean_pass_at_k([[0.5, 0.5], [1.0, 0.0]], 1) == 0.25


def test_majority_vote_and_ties():
    assert majority_answer(["7", "8", "8"]) == "8"
    assert majority_answer(["8", "7", "7", "8"]) == "8"              # tie: first seen
    assert majority_answer([None, "7", None]) == "7"                 # no answer does not vote
    assert cons_at_k(["7", "8", "8", "7"], [1, 0, 0, 1], 4) == 1.0
    assert cons_at_k(["8", "7", "7", "8"], [0, 1, 1, 0], 4) == 0.0
    assert cons_at_k(["8", "7", "7", "8"], [0, 1, 1, 0], 3) == 1.0   # first 3 only
    assert cons_at_k([None, None], [0, 0], 2) == 0.0


def test_reflection_rate_counts_whole_words_case_insensitively():
    texts = ["Wait, that is wrong", "let me VERIFY", "checkered flag", "7"]
    assert reflection_rate(texts) == 0.5
    assert reflection_rate(texts, ("flag",)) == 0.25


def test_sample_metrics_hand_values():
    spec = EvalSpec(k=2, pass_k=(1, 2))
    correct = [[1.0, 0.0], [0.0, 0.0]]
    answers = [["5", "4"], ["3", "3"]]
    metrics = sample_metrics(correct, answers, ["wait 5", "4", "3", "3"], spec)
    assert metrics == {"pass@1": 0.25, "mean_accuracy": 0.25, "pass@2": 0.5, "cons@2": 0.5, "reflection_rate": 0.25}


def test_pass_at_1_pass_at_k_and_cons_share_one_definition_of_correct():
    # partial credit (0.5) is not a pass for any of them, and a py: reward of 3 is one pass, not three;
    # the mean accuracy, partial credit included, is its own figure
    metrics = sample_metrics([[0.5, 0.5], [3.0, 0.0]], [["1", "1"], ["2", "9"]], ["a", "b", "c", "d"], EvalSpec(k=2))
    assert metrics["pass@1"] == 0.25 and metrics["pass@2"] == 0.5 and metrics["cons@2"] == 0.5
    assert metrics["mean_accuracy"] == 1.0
    assert metrics["pass@1"] <= metrics["pass@2"] <= 1.0


def test_pass_k_above_k_is_refused():
    with pytest.raises(AhaError, match="pass@k"):
        EvalSpec(k=2, pass_k=(4,))


def test_markdown_table_has_a_row_per_model():
    table = markdown_table([{"model": "a", "pass@1": 0.5, "pass@2": 0.75}, {"model": "b", "pass@1": 0.25}])
    lines = table.splitlines()
    assert lines[0].startswith("| model | pass@1 | pass@2 |") and len(lines) == 4
    assert lines[2].startswith("| a | 0.500 | 0.750 |") and lines[3].startswith("| b | 0.250 |  |")


def test_run_folder_resolves_to_its_model(tiny_model_dir, tmp_path):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    assert resolve_model_dir(str(tmp_path)) == tmp_path / "model"
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir


def test_eval_compares_several_models(tiny_model_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = main(["eval", "--model", str(tiny_model_dir), "--model", str(tiny_model_dir), "--problems", "3",
                 "--pass-k", "1,2", "--max-new-tokens", "6", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    results = json.loads(out_json.read_text())
    assert len(results) == 2 and results[0]["k"] == 4
    for key in ("pass@1", "pass@2", "pass@4", "cons@4", "reflection_rate", "mean_response_tokens"):
        assert results[0][key] == results[1][key]                      # same model, same seed
    assert 0 <= results[0]["pass@1"] <= results[0]["pass@2"] <= results[0]["pass@4"] <= 1
    assert len(out_md.read_text().splitlines()) == 4
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_eval_bad_pass_k_is_one_line(capsys):
    assert main(["eval", "--pass-k", "1,x"]) == 2
    assert "--pass-k" in capsys.readouterr().err


def test_format_rate_is_the_share_of_well_formed_samples():
    """4 problems × 1 sample: every sample is in `samples`, so the rate can be recounted by hand."""
    from aha.eval.evaluate import evaluate
    from aha.infra.base import ensure_base_model
    from aha.infra.model import load_model
    from aha.tasks import get_task
    from aha.tasks.base import is_well_formed
    model, tokenizer = load_model(ensure_base_model(None), "cpu")
    result = evaluate(model, tokenizer, get_task("addition"), EvalSpec(problems=4, k=1, max_new_tokens=64))
    assert len(result["samples"]) == 4
    assert result["format_rate"] == sum(is_well_formed(s["completion"]) for s in result["samples"]) / 4
