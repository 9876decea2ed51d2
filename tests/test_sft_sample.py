"""SFT with packing (aha/stages/sft.py), rejection sampling (aha/stages/rejection.py), distillation "
"(aha/stages/distill.py)."""

import json

import pytest
import torch

from aha.infra.errors import AhaError
from aha.infra.model import build_model
from aha.infra.tokenizer import build_char_tokenizer
from aha.stages.sft import (
    SFTConfig,
    block_causal_mask,
    pack,
    packed_loss,
    read_examples,
    sft_model,
    tokenize_example,
)
from aha.tasks import get_task


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    task = get_task("addition", digits=2)
    problems = task.train_problems(seed)
    rows = []
    for _ in range(n):
        p = next(problems)
        rows.append({"prompt": task.prompt(p), "response": task.corpus_document(p, think=True)[len(task.prompt(p)):]})
    return rows


def test_loss_mask_covers_the_response_and_eos_only(tokenizer):
    ids, mask = tokenize_example(tokenizer, "1+2=", " <answer>3</answer>")
    prompt_len = len(tokenizer("1+2=")["input_ids"])
    assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == " <answer>3</answer>"
    assert tokenizer.decode(ids[:prompt_len]) == "1+2="


def test_pack_restarts_positions_and_starts_a_new_row_when_full():
    a, b, c = ([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])
    packed = pack([a, b, c], seq_len=6, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert packed.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    assert packed.example_ids.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]]
    blocked = block_causal_mask(packed.example_ids)[0, 0] < 0
    assert blocked[3].tolist() == [True, True, True, False, True, True]   # example 1 sees only itself


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_packed_forward_equals_each_example_alone(tokenizer, arch):
    model = build_model(arch, tokenizer, seed=0, hidden=64, layers=2).eval()
    first = tokenize_example(tokenizer, "12+34=", " <answer>46</answer>")
    second = tokenize_example(tokenizer, "5+6=", " <think>5+6=11</think> <answer>11</answer>")
    packed = pack([first, second], seq_len=64, pad_id=tokenizer.pad_token_id)
    assert len(packed.input_ids) == 1
    with torch.no_grad():
        mask = block_causal_mask(packed.example_ids)
        together = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids).logits[0]
        alone = model(input_ids=torch.tensor([second[0]])).logits[0]
    start = len(first[0])
    torch.testing.assert_close(together[start:start + len(second[0])], alone, atol=1e-4, rtol=1e-4)


def test_sft_lowers_the_response_loss(tokenizer):
    model = build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2)
    rows = addition_rows(24)
    examples = [tokenize_example(tokenizer, r["prompt"], r["response"]) for r in rows]
    data = pack(examples, 256, tokenizer.pad_token_id)
    with torch.no_grad():
        before = packed_loss(model, data).item()
    stats = sft_model(model, tokenizer, rows, SFTConfig(epochs=4, lr=3e-3, seq_len=256, batch_tokens=512, warmup=2))
    with torch.no_grad():
        after = packed_loss(model, data).item()
    assert stats["steps"] >= 4
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("line,words", [("not json", ":2: not JSON"), ('{"prompt": "a"}', ':2: a row needs'),
                                        ('{"prompt": "a", "response": " "}', ":2: empty")])
def test_bad_rows_name_file_and_line(tmp_path, line, words):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2"}\n' + line + "\n")
    with pytest.raises(AhaError, match=words):
        read_examples(path)


def fake_completer():
    """Per prompt, k=6 completions: right, right again (duplicate), wrong, right but badly formed,
    right but truncated, right but repetitive."""
    def complete(prompts, k, seed):
        assert k == 6
        out = []
        for prompt in prompts:
            a, b = _operands(prompt)
            right = f" <think>{a}+{b}={a + b}</think> <answer>{a + b}</answer>"
            out += [(right, 20, False), (right, 20, False), (f" <answer>{a + b + 1}</answer>", 5, False),
                    (f" {a + b} <answer>{a + b}</answer> done", 9, False), (right, 64, True),
                    (" <think>" + "so we add " * 8 + f"</think> <answer>{a + b}</answer>", 40, False)]
        return out
    return complete


def _operands(prompt):
    import re
    a, b = re.findall(r"\d+", prompt.split("User:")[1])[:2]
    return int(a), int(b)


def test_rejection_sampling_keeps_exactly_the_right_ones(tmp_path):
    from aha.stages.rejection import SampleConfig, sample_rows, write_rows
    task = get_task("addition", digits=2)
    cfg = SampleConfig(task="addition", prompts=5, k=6, prompts_per_batch=2, seed=3)
    rows, stats = sample_rows(task, fake_completer(), cfg, "fake")
    problems = task.train_problems(3)
    expected = []
    for _ in range(5):
        p = next(problems)
        a, b = _operands(task.prompt(p))
        assert a + b == int(p.answer)
        expected.append((task.prompt(p), f" <think>{a}+{b}={a + b}</think> <answer>{a + b}</answer>"))
    assert [(r["prompt"], r["response"]) for r in rows] == expected
    assert stats["rejected"] == {"duplicate": 5, "wrong": 5, "format": 5, "length": 5, "repetition": 5}
    assert all(
        r["accuracy"] == 1.0 and r["model"] == "fake" and r["seed"] == 3 and r["task"] == "addition" for r in rows
    )
    write_rows(rows, tmp_path / "kept.jsonl")
    back = read_examples(tmp_path / "kept.jsonl")
    assert [(r["prompt"], r["response"]) for r in back] == expected


def test_length_cap_and_language_filter():
    from aha.stages.rejection import SampleConfig, rejection
    ok = {"accuracy": 1.0, "format": 1.0}
    text = "<think>First add the two numbers, then check the sum carefully.</think> <answer>4</answer>"
    assert rejection(text, 30, False, ok, SampleConfig(max_tokens=40, language="en")) is None
    assert rejection(text, 50, False, ok, SampleConfig(max_tokens=40)) == "length"
    chinese = "<think>我们先把两个数字相加，然后检查结果。</think> <answer>4</answer>"
    assert rejection(chinese, 30, False, ok, SampleConfig(language="en")) == "language"
    assert rejection(chinese, 30, False, ok, SampleConfig()) is None


def response_loss(model_dir, data) -> float:
    from aha.infra.model import load_model
    model, tokenizer = load_model(model_dir)
    rows = read_examples(data)
    packed = pack([tokenize_example(tokenizer, r["prompt"], r["response"]) for r in rows], 256, tokenizer.pad_token_id)
    with torch.no_grad():
        return packed_loss(model.eval(), packed).item()


def test_distill_smoke_teacher_samples_train_the_student(tiny_model_dir, tmp_path, capsys):
    from pathlib import Path

    from aha.cli import main
    teacher = Path(__file__).parent.parent / "aha" / "infra" / "assets" / "base"
    out = tmp_path / "student"
    code = main(
        [
            "distill",
            "--teacher",
            str(teacher),
            "--student",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--prompts",
            "6",
            "--k",
            "4",
            "--epochs",
            "8",
            "--lr",
            "3e-3",
            "--batch-tokens",
            "512",
            "--seq-len",
            "256",
        ]
    )
    assert code == 0
    stats = json.loads((out / "distill.json").read_text())
    kept = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(kept) == stats["sample"]["kept"] > 0
    task = get_task("addition", digits=3)
    from aha.tasks.base import Problem
    for row in kept:
        a, b = _operands(row["prompt"])
        assert task.score(row["response"], Problem(f"{a}+{b}", str(a + b), {"a": a, "b": b}))["accuracy"] == 1.0
    assert response_loss(out, out / "samples.jsonl") < response_loss(tiny_model_dir, out / "samples.jsonl") - 0.3


def test_sft_cli_bad_row_is_one_line(tiny_model_dir, tmp_path, capsys):
    from aha.cli import main
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": 3}\n')
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data}:2:" in err
