"""Bad input through the real CLI: every case ends with exit code 2, one line on stderr that says
what is wrong, where and what to do, no traceback, and for `aha train` nothing in --out.

Run: python -m pytest tests/test_bad_input.py -q        (about 30 s on 2 cores)

The CLI runs in-process (`aha.cli.main`), which is fast; `capfd` reads file descriptor 2, so output
that bypasses `sys.stderr` (transformers' and datasets' loggers and bars) counts too. The models are
tiny random Qwen2 dirs, with one part missing or wrong; the reward functions are a module written
into a temporary folder that is the working directory, as `py:module:function` expects.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from aha.cli import main
from aha.infra.tokenizer import build_char_tokenizer

REWARDS = '''
def boom(prompts, completions, **columns):
    raise KeyError("no such column")
def nan(prompts, completions, **columns):
    return [float("nan")] * len(completions)
def too_many(prompts, completions, **columns):
    return [1.0] * (len(completions) + 1)
def text(prompts, completions, **columns):
    return ["1.0"] * len(completions)
def never(prompts, completions, **columns):
    return [None] * len(completions)
'''
SMALL = ["prompts_per_step=2", "group_size=2", "max_new_tokens=8", "eval_every=0"]   # key=value: last, all together


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def gsm_rows(n):
    return [
        {"question": f"Tom has {i} apples and buys 3 more. How many?", "answer": f"{i}+3\n#### {i + 3}"}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """Every bad file, config and model dir of the suite, made once."""
    root = tmp_path_factory.mktemp("bad_input")
    rows = gsm_rows(12)
    write_jsonl(root / "good.jsonl", rows)
    write_jsonl(root / "no_answer.jsonl", rows[:2] + [{"question": "How many?"}] + rows[2:])
    write_jsonl(root / "wrong_type.jsonl", rows[:4] + [{"question": ["a", "list"], "answer": "#### 1"}] + rows[4:])
    write_jsonl(root / "tests_as_text.jsonl", [{"prompt": "Write f.", "tests": ["assert f(1) == 2"]},
                                               {"prompt": "Write g.", "tests": "assert g(1) == 2"}])
    (root / "junk.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    (root / "empty.jsonl").write_text("")
    (root / "fake.parquet").write_text("this is not parquet")
    (root / "not_a_dataset").mkdir()
    (root / "not_a_dataset" / "notes.txt").write_text("hello")
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(8)])
    (root / "bad_input_rewards.py").write_text(REWARDS)
    (root / "unknown_key.yaml").write_text("steps: 2\ngrup_size: 4\n")
    (root / "wrong_type.yaml").write_text("lr: fast\n")
    (root / "list.yaml").write_text("- steps\n- 2\n")
    (root / "broken.yaml").write_text("steps: [1, 2\n")
    files = {p.name: p for p in tiny_model_dir.iterdir()}
    weights = {"config.json", "generation_config.json", "model.safetensors"}
    for name, keep in [("no_tokenizer", weights), ("no_weights", set(files) - {"model.safetensors"}),
                       ("no_config", set(files) - {"config.json"})]:
        (root / name).mkdir()
        for file in keep & set(files):
            shutil.copy(files[file], root / name / file)
    tokenizer = build_char_tokenizer()
    small = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(small).save_pretrained(root / "small_vocab")
    tokenizer.save_pretrained(root / "small_vocab")
    return root


@pytest.fixture
def in_inputs(inputs, monkeypatch):
    monkeypatch.chdir(inputs)
    monkeypatch.syspath_prepend(str(inputs))
    return inputs


def run_cli(capfd, argv):
    """(exit code, stdout, stderr) of `aha ARGV` run in this process."""
    try:
        code = main(argv)
    except SystemExit as stop:   # argparse errors leave from inside the parser
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def fill(args, root, tiny_model_dir):
    return [a.format(root=root, model=tiny_model_dir) for a in args]


# (command line after `aha train --out OUT` (or the command given), words the one line must hold)
TRAIN_CASES = {
    # data files
    "data_missing": (["--task", "gsm8k", "--data", "{root}/missing.jsonl"], ["missing.jsonl", "does not exist"]),
    "data_not_json": (
        ["--task", "gsm8k", "--data", "{root}/junk.jsonl"],
        ["junk.jsonl", "cannot read it as data", "use JSONL"],
    ),
    "data_row_without_answer": (
        ["--task", "gsm8k", "--data", "{root}/no_answer.jsonl"],
        ["no_answer.jsonl:3", "missing field 'answer'", "skip_bad_rows"],
    ),
    "data_row_wrong_type": (
        ["--task", "gsm8k", "--data", "{root}/wrong_type.jsonl"],
        ["wrong_type.jsonl:5", "field 'question' must be text", "got a list", "skip_bad_rows"],
    ),
    "data_code_tests_as_text": (
        ["--task", "code", "--data", "{root}/tests_as_text.jsonl"],
        ["tests_as_text.jsonl:2", "'tests' must be a non-empty list", "got str"],
    ),
    "data_empty": (["--task", "gsm8k", "--data", "{root}/empty.jsonl"], ["empty.jsonl", "is empty"]),
    "data_fake_parquet": (
        ["--task", "gsm8k", "--data", "{root}/fake.parquet"],
        ["fake.parquet", "cannot read it as data"],
    ),
    "data_dir_not_a_dataset": (
        ["--task", "gsm8k", "--data", "{root}/not_a_dataset"],
        ["not_a_dataset", "neither a `Dataset` directory", "save_to_disk"],
    ),
    "task_unknown": (["--task", "chess"], ["unknown task 'chess'", "countdown"]),
    "task_takes_no_data": (
        ["--task", "addition", "--data", "{root}/good.jsonl"],
        ["'addition'", "does not take option(s) data"],
    ),
    # config
    "config_unknown_key": (["grop_size=4"], ["unknown config key 'grop_size'", "did you mean 'group_size'"]),
    "config_wrong_type": (["group_size=big"], ["group_size expects int", "'big'"]),
    "config_bad_value": (["group_size=1"], ["group_size=1", "at least 2"]),
    "config_yaml_unknown_key": (
        ["--config", "{root}/unknown_key.yaml"],
        ["unknown_key.yaml", "'grup_size'", "did you mean 'group_size'"],
    ),
    "config_yaml_wrong_type": (["--config", "{root}/wrong_type.yaml"], ["lr expects float", "'fast'"]),
    "config_yaml_not_a_mapping": (["--config", "{root}/list.yaml"], ["list.yaml", "must be a mapping"]),
    "config_yaml_broken": (["--config", "{root}/broken.yaml"], ["broken.yaml", "not valid YAML"]),
    "config_file_missing": (["--config", "{root}/nope.yaml"], ["nope.yaml", "does not exist"]),
    # model dirs
    "model_missing": (
        ["--model", "{root}/no_such_model"],
        ["no_such_model", "does not exist", "config.json + weights + tokenizer"],
    ),
    "model_without_tokenizer": (
        ["--model", "{root}/no_tokenizer"],
        ["no_tokenizer", "has no tokenizer", "save_pretrained"],
    ),
    "model_without_weights": (
        ["--model", "{root}/no_weights"],
        ["no_weights", "cannot load the model", "model.safetensors"],
    ),
    "model_without_config": (["--model", "{root}/no_config"], ["no_config", "has no config.json"]),
    "model_tokenizer_mismatch": (["--model", "{root}/small_vocab"], ["small_vocab", "102 tokens", "only 50"]),
    # py:module:function rewards; the first two fail before training, the others at the first step
    "reward_module_missing": (
        ["--task", "py:no_such_module:f", "--data", "{root}/prompts.jsonl"],
        ["cannot import module 'no_such_module'"],
    ),
    "reward_function_missing": (
        ["--task", "py:bad_input_rewards:nope", "--data", "{root}/prompts.jsonl"],
        ["has no function 'nope'"],
    ),
    # task options: typed by the task's own signature, YAML that does not parse named
    "task_option_not_a_number": (["digits=abc"], ["task option digits expects int", "'abc'"]),
    "task_option_in_the_mapping": (["task_config={{digits: abc}}"], ["task option digits expects int"]),
    "task_config_not_yaml": (["digits=4", "task_config={{x:"], ["task_config expects dict", "'{x:'"]),
}
REWARD_CASES = {
    "reward_raises": ("boom", ["bad_input_rewards:boom raised KeyError", "no such column"]),
    "reward_nan": ("nan", ["bad_input_rewards:nan returned nan", "finite float or None"]),
    "reward_wrong_length": ("too_many", ["bad_input_rewards:too_many returned 2 values for 1 completion"]),
    "reward_string": ("text", ["bad_input_rewards:text returned '1.0'", "return a float or None"]),
}


def assert_one_line_error(code, out, err, words):
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and err.endswith("\n"), err      # no bar, no blank line, no warning before it
    assert lines[0].startswith("aha ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in out + err


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_bad_train_input(name, in_inputs, tiny_model_dir, tmp_path, capfd):
    args, words = TRAIN_CASES[name]
    args = fill(args, in_inputs, tiny_model_dir)
    model = [] if "--model" in args else ["--model", str(tiny_model_dir)]
    flags, pairs = [a for a in args if "=" not in a], [a for a in args if "=" in a]   # the case's key=value wins
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--steps", "1", *model, *flags, *SMALL, *pairs]
    assert_one_line_error(*run_cli(capfd, argv), words)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name", REWARD_CASES)
def test_bad_reward_function(name, in_inputs, tiny_model_dir, tmp_path, capfd):
    function, words = REWARD_CASES[name]
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--task", f"py:bad_input_rewards:{function}",
            "--data", str(in_inputs / "prompts.jsonl"), "--out", str(out), "--steps", "1", *SMALL]
    assert_one_line_error(*run_cli(capfd, argv), words)
    assert not out.exists() or not any(out.iterdir())


def test_a_fresh_interpreter_prints_the_same_one_line(in_inputs, tiny_model_dir, tmp_path):
    """Import-time warnings show only in a new process: the deepest failure (model loaded, rollout
    made, reward called) through `python -m aha`."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "aha", "train", "--model", str(tiny_model_dir), "--task",
                             "py:bad_input_rewards:boom", "--data", "prompts.jsonl", "--out", str(out), "--steps", "1",
                             *SMALL], capture_output=True, text=True, cwd=in_inputs, timeout=300)
    assert_one_line_error(result.returncode, result.stdout, result.stderr, ["bad_input_rewards:boom raised KeyError"])


def test_bad_eval_input(in_inputs, capfd):
    code, out, err = run_cli(capfd, ["eval", "--model", str(in_inputs / "no_tokenizer"), "--problems", "2"])
    assert_one_line_error(code, out, err, ["no_tokenizer", "has no tokenizer"])


def test_reward_none_for_every_sample_is_skipped_not_an_error(in_inputs, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--task", "py:bad_input_rewards:never",
            "--data", str(in_inputs / "prompts.jsonl"), "--out", str(out), "--steps", "1", *SMALL]
    code, _, err = run_cli(capfd, argv)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in records] == [4]
    assert records[0]["trained_rows"] == 0 and "Traceback" not in err


def test_skip_bad_rows_skips_them_and_trains(in_inputs, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--task", "gsm8k", "--data", str(in_inputs / "no_answer.jsonl"),
            "--out", str(out), "--steps", "1", "skip_bad_rows=true", *SMALL]
    code, _, err = run_cli(capfd, argv)
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_skip_bad_rows_flag_reports_the_count(in_inputs, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--task", "gsm8k", "--data", str(in_inputs / "wrong_type.jsonl"),
            "--skip-bad-rows", "--out", str(out), "--steps", "1", *SMALL]
    code, _, err = run_cli(capfd, argv)
    assert code == 0, err
    assert "skipped 1 bad row" in err
