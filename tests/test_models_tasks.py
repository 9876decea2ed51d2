"""`aha train` on real architectures × real tasks: a random tiny Qwen2, Llama, Qwen3 and DeepSeek-V3
dir (the char tokenizer, saved with `save_pretrained`) trains for 2 steps on each task and leaves a
checkpoint that plain transformers loads, with the same architecture and the same weights names."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from aha.cli import main
from aha.infra.model import tiny_config
from aha.infra.tokenizer import build_char_tokenizer
from aha.tasks.rewards import Reward

SMALL = ["prompts_per_step=2", "group_size=2", "max_new_tokens=16", "eval_every=0", "dump_rollouts_every=1"]


def tiny(arch: str, tokenizer):
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    return tiny_config(
        "deepseek_v3", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, hidden=64, layers=2
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for arch in ("qwen2", "llama", "qwen3", "deepseek_v3"):
        path = tmp_path_factory.mktemp(arch)
        tokenizer = build_char_tokenizer()
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny(arch, tokenizer), dtype=torch.float32).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    gsm = [{"question": f"Tom has {i} apples and buys 3 more. How many?", "answer": f"{i}+3\n#### {i + 3}"}
           for i in range(20)]
    math = [{"problem": f"What is ${i} + 2$?", "solution": f"It is $\\boxed{{{i + 2}}}$."} for i in range(20)]
    for name, rows in (("gsm8k", gsm), ("math", math)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


CASES = [("qwen2", "rg:basic_arithmetic", []), ("llama", "rg:basic_arithmetic", []),
         ("qwen2", "countdown", []), ("llama", "countdown", []),
         ("qwen2", "gsm8k", ["data"]), ("llama", "gsm8k", ["data"]),
         ("qwen2", "math", ["data"]), ("llama", "math", ["data"]),
         ("qwen3", "countdown", []), ("deepseek_v3", "gsm8k", ["data"])]


@pytest.mark.parametrize("arch,task,needs", CASES, ids=[f"{a}-{t}" for a, t, _ in CASES])
def test_train_each_architecture_on_each_task(model_dirs, data_files, tmp_path, arch, task, needs):
    out = tmp_path / "run"
    extra = [f"data={data_files / (task + '.jsonl')}"] if "data" in needs else []
    code = main(["train", "--model", str(model_dirs[arch]), "--task", task, "--steps", "2", "--out", str(out),
                 *SMALL, *extra])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(0.0 <= r["pass_rate"] <= 1.0 and r["response_tokens"] <= 16 for r in records)
    prompts = [json.loads(line)["prompt"] for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert prompts and all(p.endswith("Assistant:") for p in prompts)
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    assert loaded.config.model_type == original.config.model_type
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()
    }


# --- reward weights by component name, and skipped samples -------------------------------------

def test_reward_weights_parse_validate_and_extend():
    from aha.infra.config import load_config
    from aha.infra.errors import AhaError
    cfg = load_config(overrides={"reward_weights": "format=0, tinyzero = 0.5"})
    assert cfg.component_weights() == {"accuracy": 1.0, "format": 0.0, "overlong": 1.0, "env": 1.0, "tinyzero": 0.5}
    for bad in ["accuracy", "accuracy=x", "a b=1", "skip=1", "format=1,format=2", "accuracy=nan"]:
        with pytest.raises(AhaError, match="reward_weights"):
            load_config(overrides={"reward_weights": bad})


def test_reward_weights_reach_the_reward():
    from aha.infra.config import Config
    from aha.tasks import get_task
    task = get_task("countdown")
    problem = next(task.train_problems(0))
    texts = ["<answer>1+2</answer>", "no answer"]
    cfg = Config(group_size=2, reward_weights="accuracy=2,format=0,tinyzero=10").validate()
    scores, rewards = Reward.build(cfg, task).score(texts, [problem] * len(texts))
    expected = [2 * s["accuracy"] + 10 * s["tinyzero"] for s in scores]
    assert rewards.tolist() == pytest.approx(expected)
    assert scores[0]["tinyzero"] > 0 and rewards[0] != scores[0]["accuracy"] + 0.1 * scores[0]["format"]


def test_unknown_component_name_stops_the_run(model_dirs, tmp_path, capsys):
    code = main(["train", "--model", str(model_dirs["qwen2"]), "--task", "countdown", "--steps", "1",
                 "--out", str(tmp_path / "run"), *SMALL, "reward_weights=tinyzer=1"])
    assert (
        code == 2
        and "reward_weights names tinyzer, but task 'countdown' gives the components" in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()                    # stopped before anything was written


def test_shaping_components_by_name_are_computed_weighted_and_logged():
    from types import SimpleNamespace

    from aha.infra.config import Config
    from aha.tasks import get_task
    from aha.tasks.rewards import cosine_length, repetition_penalty
    task = get_task("addition")
    problem = next(task.train_problems(0))
    right = f"<think>the sum is the sum is the sum is</think> <answer>{problem.answer}</answer>"
    wrong = "<answer>0</answer> <answer>1</answer>"
    rollout = SimpleNamespace(lengths=torch.tensor([30, 64]))
    cfg = Config(group_size=2, max_new_tokens=64,
                 reward_weights="accuracy=1,format=0,tag_count=0.5,repetition=2,cosine=1,format_strict=3").validate()
    scores, rewards = Reward.build(cfg, task).score([right, wrong], [problem] * 2, rollout.lengths.tolist())
    assert [s["tag_count"] for s in scores] == [1.0, 0.0]                  # second: <answer> twice, no think
    assert [s["format_strict"] for s in scores] == [1.0, 0.0]
    assert scores[0]["repetition"] == pytest.approx(repetition_penalty(right)) and scores[0]["repetition"] < 0
    assert scores[0]["cosine"] == pytest.approx(cosine_length(30, True, 64))
    assert scores[1]["cosine"] == pytest.approx(-0.5)                       # wrong at the budget: −0.5
    assert "overlong" not in scores[0] and "language" not in scores[0]      # only what is weighted (overlong=none)
    expected = [1 + 0.5 * 1 + 2 * scores[0]["repetition"] + scores[0]["cosine"] + 3, 0 + 0 + 0 - 0.5 + 0]
    assert rewards.tolist() == pytest.approx(expected)


def test_language_component_follows_lang():
    from types import SimpleNamespace

    from aha.infra.config import Config
    from aha.tasks import get_task
    task = get_task("addition")
    problem = next(task.train_problems(0))
    english = "<think>First I add the units and carry the one, then I add the tens.</think> <answer>1</answer>"
    indonesian = ("<think>Pertama saya menjumlahkan satuan dan menyimpan satu, lalu saya menjumlahkan "
                  "puluhan.</think> <answer>1</answer>")
    rollout = SimpleNamespace(lengths=torch.tensor([40, 40]))
    for lang, expected in [("en", [1.0, 0.0]), ("id", [0.0, 1.0])]:
        cfg = Config(group_size=2, lang=lang, reward_weights="language=1").validate()
        scores, _ = Reward.build(cfg, task).score([english, indonesian], [problem] * 2, rollout.lengths.tolist())
        assert [s["language"] for s in scores] == expected, lang


SKIPPING = '''
def half(prompts, completions, **columns):
    """None (skip) for completions of odd length, else a reward with spread."""
    return [None if len(c) % 2 else float(len(c) % 3) for c in completions]
'''


def test_skipped_samples_leave_the_loss(model_dirs, tmp_path, monkeypatch):
    (tmp_path / "skipping_rewards.py").write_text(SKIPPING)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    import aha.core.step
    skipped_per_step, trained_per_step = [], []
    real_score, real_logprobs = Reward.score, aha.core.step.completion_logprobs

    def recording_score(*args, **kwargs):
        scores, rewards = real_score(*args, **kwargs)
        skipped_per_step.append({i for i, s in enumerate(scores) if s["skip"]})
        return scores, rewards

    def recording_logprobs(model, rollout, rows, temperature):
        trained_per_step.append((len(skipped_per_step) - 1, set(rows.tolist())))
        return real_logprobs(model, rollout, rows, temperature)

    monkeypatch.setattr(Reward, "score", recording_score)
    monkeypatch.setattr(aha.core.step, "completion_logprobs", recording_logprobs)
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dirs["qwen2"]), "--task", "py:skipping_rewards:half", "--steps", "3",
                 "--out", str(out), f"data={data}", "prompts_per_step=2", "group_size=4", "max_new_tokens=16",
                 "eval_every=0", "temperature=1.5", "beta=0.04"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_samples"] for r in records) > 0
    for r in records:
        assert r["skipped_samples"] == round(r["reward_skip"] * 8)
        assert r["trained_rows"] <= 8 - r["skipped_samples"]
    assert trained_per_step, "no step trained: the test would prove nothing"
    for step, rows in trained_per_step:
        assert rows and not rows & skipped_per_step[step]


# --- prompt templates ---------------------------------------------------------------------------

def test_templates_render_and_prefill(tmp_path):
    from aha.infra.config import load_config
    from aha.infra.errors import AhaError
    from aha.tasks import get_task
    from aha.tasks.base import Problem
    from aha.tasks.templates import R1_ZERO, apply_template
    tokenizer = build_char_tokenizer()
    task = get_task("gsm8k", data=write_gsm(tmp_path))
    problem = Problem("What is {x} + 1?", "2")
    assert apply_template(task, tokenizer) is task                      # the default changes nothing
    r1 = apply_template(task, tokenizer, "r1_zero")
    assert r1.prompt(problem) == R1_ZERO.replace("{question}", "What is {x} + 1?")
    assert r1.prompt(problem).startswith("A conversation between User and Assistant.")
    assert r1.prompt(problem).endswith("User: What is {x} + 1?. Assistant:")
    chat = apply_template(task, tokenizer, "chat", think_prefill=True)
    assert chat.prompt(problem) == "User: What is {x} + 1?\nAssistant: <think>"
    assert not chat.adds_special_tokens and r1.adds_special_tokens
    assert chat.score("two</think> <answer>2</answer>", problem) == {"accuracy": 1.0, "format": 1.0}
    assert task.score("two</think> <answer>2</answer>", problem)["format"] == 0.0
    (tmp_path / "t.txt").write_text("Q: {question}\nA:")
    assert apply_template(task, tokenizer, str(tmp_path / "t.txt")).prompt(problem) == "Q: What is {x} + 1?\nA:"
    assert load_config(overrides={"template": str(tmp_path / "t.txt")}).template.endswith("t.txt")
    (tmp_path / "bad.txt").write_text("no placeholder")
    for bad, message in [(str(tmp_path / "bad.txt"), "no {question}"), ("chatml", "neither one of")]:
        with pytest.raises(AhaError, match=message):
            load_config(overrides={"template": bad})
    tokenizer.chat_template = None
    with pytest.raises(AhaError, match="no chat template"):
        apply_template(task, tokenizer, "chat")


def write_gsm(root):
    path = root / "g.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(10)))
    return path


def test_train_with_r1_zero_template_and_think_prefill(model_dirs, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dirs["llama"]), "--task", "gsm8k", "--steps", "1", "--out", str(out),
                 *SMALL, f"data={write_gsm(tmp_path)}", "template=r1_zero", "think_prefill=true"])
    assert code == 0
    prompts = [json.loads(line)["prompt"] for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert prompts and all(p.startswith("A conversation between") and p.endswith("Assistant: <think>") for p in prompts)


def test_stop_tokens_include_the_models_end_of_turn(model_dirs):
    from aha.core.rollout import stop_token_ids
    from aha.infra.model import load_model
    model, tokenizer = load_model(model_dirs["qwen2"])
    answer_close = tokenizer.convert_tokens_to_ids("</answer>")
    assert stop_token_ids(model, tokenizer) == tuple(sorted({tokenizer.eos_token_id, answer_close}))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert 7 in stop_token_ids(model, tokenizer)


# --- LoRA, gradient checkpointing ---------------------------------------------------------------

LENGTH_REWARD = '''
def length(prompts, completions, **columns):
    """A reward with spread in every group, so every step updates."""
    return [float(len(c) % 5) for c in completions]
'''


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lora_trains_adapters_only_and_saves_a_merged_plain_model(model_dirs, tmp_path, monkeypatch, arch):
    pytest.importorskip("peft")
    (tmp_path / "length_rewards.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dirs[arch]), "--task", "py:length_rewards:length", "--steps", "2",
                 "--out", str(out), f"data={data}", "prompts_per_step=2", "group_size=4", "max_new_tokens=16",
                 "eval_every=0", "lora_rank=8", "lr=0.05", "gradient_checkpointing=true"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["trained_rows"] > 0 for r in records)
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    original = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).state_dict()
    assert trained.keys() == original.keys()                                    # no lora_A/B: a plain model
    changed = {k for k in original if not torch.equal(trained[k], original[k])}
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("embed" in k or "norm" in k for k in changed)               # frozen outside the adapters


def test_lora_merge_keeps_the_function_and_targets_per_architecture(model_dirs):
    pytest.importorskip("peft")
    from aha.infra.lora import add_lora, merged, target_modules
    assert target_modules("gpt2") == ["c_attn", "c_proj", "c_fc"] and target_modules("deepseek_v3") == "all-linear"
    for arch in ("qwen2", "deepseek_v3"):
        model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
        peft_model, inner = add_lora(model, rank=4, alpha=8)
        assert all(("lora_" in n) == p.requires_grad for n, p in inner.named_parameters())
        for name, p in inner.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)                                          # B = 0 at init: make it matter
        ids = torch.tensor([[5, 9, 14, 20, 7]])
        with torch.no_grad():
            with_adapters = inner(input_ids=ids).logits
            plain = merged(peft_model)
            assert not any("lora_" in n for n, _ in plain.named_parameters())
            assert torch.allclose(plain(input_ids=ids).logits, with_adapters, atol=1e-4)


def test_training_dtype_follows_the_hardware():
    from aha.infra.model import detect_dtype
    assert detect_dtype("cpu") == torch.float32 and detect_dtype("mps") == torch.float32
    if torch.cuda.is_available():
        assert detect_dtype("cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
