"""Every recipe in recipes/ resolves to a valid Config (no download: model paths are only strings
here), says the hardware it expects, and tells the user the model must be a local dir."""

from pathlib import Path

import pytest
import yaml

from aha.config import Config, load_config

# pipeline_*.yaml are `aha pipeline` configs, loaded in tests/test_pipeline.py
RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml") if not p.name.startswith("pipeline"))


def test_the_four_recipes_are_there():
    assert {p.name for p in RECIPES} >= {"cpu_default.yaml", "qwen2.5-0.5b-instruct-gsm8k.yaml",
                                         "qwen2.5-3b-countdown-r1zero.yaml", "deepseek-r1-distill-qwen-1.5b-math.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_resolves(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    values = yaml.safe_load(path.read_text())
    for key, value in values.items():
        if key != "algo":
            assert getattr(cfg, key) == value, key               # the file wins over the preset
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("# Hardware:")
    if cfg.model:
        assert "LOCAL transformers dir" in header
        cfg.component_weights()                                 # weights parse
