"""Every recipe in recipes/ resolves to a valid Config (no download: model paths are only strings
here), says the hardware it expects, and tells the user the model must be a local dir."""

import argparse
from pathlib import Path

import pytest
import yaml

from aha.infra.config import Config, load_config
from aha.infra.errors import AhaError
from aha.tasks.templates import NAMED

# pipeline_*.yaml are `aha pipeline` configs, loaded in tests/test_pipeline.py
RECIPES = sorted(
    p for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml") if not p.name.startswith("pipeline")
)


def test_the_four_recipes_are_there():
    assert {p.name for p in RECIPES} >= {"cpu_default.yaml", "qwen2.5-0.5b-instruct-gsm8k.yaml",
                                         "qwen2.5-3b-countdown-r1zero.yaml", "deepseek-r1-distill-qwen-1.5b-math.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_resolves(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    values = yaml.safe_load(path.read_text())
    for key, value in values.items():
        if key == "template" and value not in NAMED:            # a prompt file beside the recipe
            assert Path(cfg.template) == (path.parent / value).resolve() and Path(cfg.template).is_file()
        elif key != "algo":
            assert getattr(cfg, key) == value, key               # the file wins over the preset
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("# Hardware:")
    if cfg.model:
        assert "LOCAL transformers dir" in header
        cfg.component_weights()                                 # weights parse


SMOL = Path(__file__).parent.parent / "recipes" / "smollm2-135m-cpu.yaml"


def test_smollm2_recipe_task_and_prompt(tmp_path, monkeypatch):
    """The real-model recipe from another working directory: its prompt file is found beside it, its
    reasoning-gym task takes the recipe's options, the held-out questions never reach training, and
    the prompt holds the question once, after the one worked turn."""
    pytest.importorskip("reasoning_gym")
    from aha.tasks import get_task
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(SMOL))
    assert Path(cfg.template).is_file() and cfg.task_config["eval_size"] == 100
    task = get_task(cfg.task, **cfg.task_options())
    held_out = task.eval_problems(100)
    assert len({p.question for p in held_out}) == 94          # reasoning-gym draws with replacement: 6 repeats
    stream = task.train_problems(0)
    training = [next(stream) for _ in range(2000)]
    assert not {p.question for p in training} & {p.question for p in held_out}
    for p in training[:50]:            # 1-digit chains of 2-3 terms
        terms = p.question.split(": ")[1].rstrip(" =").replace("-", "+").split("+")
        assert 2 <= len(terms) <= 3 and all(len(t.strip()) == 1 for t in terms), p.question
    text = Path(cfg.template).read_text()
    prompt = text.replace("{question}", held_out[0].question)
    assert prompt.count(held_out[0].question) == 1 and prompt.endswith("<|im_start|>assistant\n")
    demo = task._problem(
        {"question": "State the final answer to the following arithmetic problem: 3 + 6 - 2 =", "answer": "7"}
    )
    assert task.score("<think>3 + 6 = 9, 9 - 2 = 7</think> <answer>7</answer>", demo) == {
        "accuracy": 1.0,
        "format": 1.0,
    }
    for hedge in ("<answer>7 or 6</answer>", "<answer>6, 7</answer>", "<answer>x7x</answer>", "<answer>007</answer>"):
        assert task.score(hedge, demo)["accuracy"] == 0, hedge  # chain_sum's own scorer pays these
    assert (
        get_task(cfg.task, **(cfg.task_options() | {"exact": False})).score("<answer>6, 7</answer>", demo)["accuracy"]
        > 0
    )


def test_task_config_reaches_the_task_and_bad_options_are_one_line():
    from aha.infra.errors import AhaError
    from aha.tasks import get_task
    cfg = load_config(None, {"task": "addition", "task_config": "{digits: 2}"})
    assert cfg.task_options() == {"digits": 2} and get_task(cfg.task, **cfg.task_options()).digits == 2
    cfg = load_config(None, {"task": "addition", "task_config": "{colour: red}"})
    with pytest.raises(AhaError, match="does not take option"):
        get_task(cfg.task, **cfg.task_options())
    with pytest.raises(AhaError, match="task_config expects dict"):
        load_config(None, {"task_config": "3"})


def test_a_relative_template_is_read_beside_its_config(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "p.txt").write_text("Q: {question}\nA:")
    (tmp_path / "r" / "c.yaml").write_text("template: p.txt\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("r/c.yaml").template == str((tmp_path / "r" / "p.txt").resolve())
    assert load_config("r/c.yaml", {"template": "r1_zero"}).template == "r1_zero"    # the command line wins
    (tmp_path / "p.txt").write_text("{question}")                                    # the working dir's file wins
    assert load_config("r/c.yaml").template == "p.txt"


def test_task_options_are_one_mapping_and_loose_ones_move_into_it(tmp_path):
    """Task options live in task_config; a key that is no Config field but an option of the chosen task
    (`aha train digits=4`, or a config.yaml written before task_config held it) moves there, typed as
    YAML; a key that is neither stays an error naming the nearest field."""
    cfg = load_config(None, {"digits": "4"})
    assert cfg.task_config == {"digits": 4} and cfg.task_options() == {"digits": 4}
    old = tmp_path / "config.yaml"
    old.write_text("task: addition\ndigits: 2\ntask_config: {}\n")
    assert load_config(str(old)).task_options() == {"digits": 2}
    assert load_config(None, {"task": "countdown", "task_config": "{min_numbers: 3}"}).task_options() == \
        {"min_numbers": 3}
    with pytest.raises(AhaError, match="unknown config key 'digits'"):
        load_config(None, {"task": "countdown", "digits": "4"})        # not an option of countdown
    with pytest.raises(AhaError, match="did you mean 'lr'"):
        load_config(None, {"learning_rate": "1e-5"})


def test_one_reader_for_every_config():
    """The pipeline's, the experiment's and the sample/SFT/pretrain configs go through the same reader as
    Config: values typed from strings, tuples from "a,b", nested aha train keys checked."""
    from aha.infra.reader import apply_values, from_args
    from aha.stages.pipeline import PipelineConfig
    from aha.stages.pretrain import PretrainConfig
    cfg = apply_values(PipelineConfig(), {"rl_steps": "7", "rl": "{lr: 1e-5, algo: dapo}"}, "command line")
    assert cfg.rl_steps == 7 and cfg.rl == {"lr": 1e-5, "algo": "dapo"}
    with pytest.raises(AhaError, match="rl: unknown config key 'lrr'; did you mean 'lr'"):
        apply_values(PipelineConfig(), {"rl": {"lrr": 1}}, "f.yaml")
    args = argparse.Namespace(out="x", hidden=64, layers=None, steps=5, unrelated="y")
    made = from_args(PretrainConfig, args, seed=3)
    assert (made.out, made.hidden, made.layers, made.steps, made.seed) == ("x", 64, PretrainConfig.layers, 5, 3)
