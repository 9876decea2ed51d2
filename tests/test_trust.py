"""Numbers you can trust: measurement bugs of the training loop and of `aha eval`, each with a test
that fails on the code before the fix.

- think rates see the prompt's `<think>` under think_prefill (train metrics and eval);
- `aha eval RUN_DIR` uses the run's config (template=chat → the chat template), and refuses or
  redirects an evaluation on the rows a run trained on;
- DAPO's dynamic sampling filters on accuracy unless told otherwise;
- dropout is off in the policy by default (KL 0 at step 0);
- a step without an optimizer step advances the lr schedule with no torch warning;
- a prompt longer than the model's context stops in one line, exit 2, in train, run, eval, sample;
- the loop passes the whole batch's normaliser to the loss; resume restores the RNG (dropout on).

Run: python -m pytest tests/test_trust.py -q
"""

import json
import os
import signal
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import aha.core.step
import aha.core.train
from aha.cli import main
from aha.core.rollout import Rollout, left_pad
from aha.core.train import train
from aha.eval.evaluate import EvalSpec, evaluate
from aha.infra.base import SHIPPED
from aha.infra.config import Config, save_config
from aha.infra.errors import Stopped
from aha.infra.model import load_model
from aha.infra.tokenizer import build_char_tokenizer
from aha.tasks import get_task
from aha.tasks.templates import apply_template


class Scripted:
    """A real task whose scores follow a fixed script, one dict per scored completion."""
    components = ("accuracy", "format")

    def __init__(self, task, script):
        self.task, self.script, self.calls = task, script, 0

    def score(self, text, problem):
        value = self.script[self.calls % len(self.script)]
        self.calls += 1
        return dict(value)

    def score_batch(self, texts, problems):
        return [self.score(t, p) for t, p in zip(texts, problems)]

    def __getattr__(self, name):
        return getattr(self.task, name)


def scripted(monkeypatch, script):
    monkeypatch.setattr(aha.core.train, "get_task", lambda name, **kw: Scripted(get_task(name, **kw), script))


def fixed_engine(tokenizer, text):
    """A rollout engine whose every completion is `text` (then EOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def engine(model, prompts, group_size, params, pad_id, seed, row_offset=0, total_rows=None, **kwargs):
        prompt_ids, prompt_mask = left_pad(prompts, pad_id)
        n = len(prompts) * group_size
        completion = torch.tensor([ids] * n)
        return Rollout(prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0),
                       completion, torch.ones_like(completion), torch.zeros(completion.shape),
                       torch.zeros(n, dtype=torch.bool), group_size)
    return engine


def small(out, **overrides) -> Config:
    settings = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8, eval_every=0, eval_problems=4,
                    eval_k=1, lr=1e-2, out=str(out), checkpoint_every=0)
    return Config(**{**settings, **overrides}).validate()


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    """A tiny GPT-2 with dropout 0.1 everywhere, as external GPT-2 checkpoints have."""
    path = tmp_path_factory.mktemp("dropout_gpt2")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- think rates under think_prefill ---------------------------------------------------------------

REASONED = "1+1=2</think> <answer>2</answer>"          # the prompt opened the <think>


def test_think_rate_counts_the_prefilled_think_in_training(tiny_model_dir, tmp_path, monkeypatch):
    model, tokenizer = load_model(tiny_model_dir)
    monkeypatch.setattr(aha.core.train, "rollout_sampler", lambda cfg, model: fixed_engine(tokenizer, REASONED))
    result = train(small(tmp_path / "t", think_prefill=True), out=tmp_path, model=model, tokenizer=tokenizer)
    assert [r["think_rate"] for r in result["history"]] == [1.0, 1.0]
    assert [r["reward_format"] for r in result["history"]] == [1.0, 1.0]       # the reward saw the tag already


def test_think_rate_counts_the_prefilled_think_in_eval(tiny_model_dir, monkeypatch):
    model, tokenizer = load_model(tiny_model_dir)
    monkeypatch.setattr(aha.eval.evaluate, "generate", fixed_engine(tokenizer, REASONED))
    task = apply_template(get_task("addition"), tokenizer, "task", think_prefill=True)
    result = evaluate(model, tokenizer, task, EvalSpec(problems=3, k=2, max_new_tokens=8))
    assert result["think_rate"] == 1.0
    assert result["samples"][0]["completion"].startswith("<think>1+1=2</think>")


# --- aha eval RUN_DIR ----------------------------------------------------------------------------

def make_run(root, model_dir, **config) -> str:
    """A run folder as aha train leaves it: config.yaml and model/."""
    root.mkdir(parents=True)
    (root / "model").symlink_to(model_dir)
    save_config(Config(eval_problems=2, eval_k=1, max_new_tokens=4, **config), root / "config.yaml")
    return str(root)


def test_eval_of_a_run_folder_uses_its_chat_template(tiny_model_dir, tmp_path, capsys):
    model, tokenizer = load_model(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}[user] {{ m['content'] }}\n{% endfor %}[assistant]"
    model.save_pretrained(tmp_path / "chat_model")
    tokenizer.save_pretrained(tmp_path / "chat_model")
    run = make_run(tmp_path / "chat_run", tmp_path / "chat_model", template="chat", seed=3)
    assert main(["eval", run, "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    question = get_task("addition").eval_problems(1)[0].question
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert result["samples"][0]["prompt"] == chat == f"[user] {question}\n[assistant]"
    assert (result["template"], result["problems"], result["k"], result["max_new_tokens"]) == ("chat", 2, 1, 4)
    # a flag overrides the run's value
    assert main(["eval", run, "--template", "task", "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["samples"][0]["prompt"] == f"User: {question}\nAssistant:"


def gsm_file(path, name):
    path.write_text(
        "".join(
            json.dumps({"question": f"{name} {i}: what is {i} plus 1?", "answer": f"#### {i + 1}"}) + "\n"
            for i in range(20)
        )
    )
    return str(path)


def test_eval_never_scores_the_rows_a_run_trained_on(tiny_model_dir, tmp_path, capsys):
    train_file, test_file = gsm_file(tmp_path / "train.jsonl", "Train"), gsm_file(tmp_path / "test.jsonl", "Test")
    run = make_run(tmp_path / "gsm_run", tiny_model_dir, task="gsm8k", data=train_file, eval_data=test_file)
    # --data TRAIN alone would be the hash split of TRAIN: rows the model trained on. The run's held-out file is used
    assert main(["eval", run, "--data", train_file, "--json", str(tmp_path / "r.json")]) == 0
    assert f"evaluating the run's held-out file {test_file}" in "".join(capsys.readouterr().err.split("\n"))
    prompts = [s["prompt"] for s in json.loads((tmp_path / "r.json").read_text())["samples"]]
    assert prompts and all(p.startswith("User: Test ") for p in prompts)
    assert main(["eval", run, "--eval-data", train_file]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aha eval: error: --eval-data {train_file} is the training file of the run in {run}")
    assert len(err.splitlines()) == 1


# --- DAPO's filter metric --------------------------------------------------------------------------

# group 1: all wrong, the format differs (a reward spread, no accuracy spread); group 2: one right
FORMAT_ONLY = [{"accuracy": 0.0, "format": f} for f in (1.0, 0.0, 1.0, 0.0)]
ONE_RIGHT = [{"accuracy": a, "format": 1.0} for a in (1.0, 0.0, 0.0, 0.0)]


@pytest.mark.parametrize("metric, tries, kept_rows", [("accuracy", 2, 8), ("reward", 1, 8)])
def test_dynamic_sampling_filters_on_accuracy_by_default(
    tiny_model_dir, tmp_path, monkeypatch, metric, tries, kept_rows
):
    scripted(monkeypatch, FORMAT_ONLY + ONE_RIGHT)
    model, tokenizer = load_model(tiny_model_dir)
    overrides = {} if metric == "accuracy" else {"dynamic_sampling_metric": metric}
    history = train(small(tmp_path / "d", steps=1, dynamic_sampling=True, max_sampling_tries=2, **overrides),
                    out=tmp_path, model=model, tokenizer=tokenizer)["history"]
    assert (history[0]["sampling_tries"], history[0]["groups_kept"], history[0]["trained_rows"]) == (
        tries,
        2,
        kept_rows,
    )


def test_dynamic_sampling_metric_must_name_a_component(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "dynamic_sampling=true",
                 "dynamic_sampling_metric=acc"]) == 2
    assert "dynamic_sampling_metric='acc' is neither 'reward' nor a component" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- dropout, the lr schedule, resume ----------------------------------------------------------------

@pytest.mark.parametrize("disable, kl_is_zero", [(True, True), (False, False)])
def test_dropout_is_off_in_the_policy_by_default(dropout_model_dir, tmp_path, disable, kl_is_zero):
    model, tokenizer = load_model(dropout_model_dir)
    history = train(small(tmp_path / "k", steps=1, beta=0.04, disable_dropout=disable), out=tmp_path, model=model,
                    tokenizer=tokenizer)["history"]
    # the reference model runs in eval mode: with dropout on in the policy the KL is not 0 at step 0
    assert (history[0]["kl"] < 1e-7) is kl_is_zero
    assert kl_is_zero or history[0]["kl"] > 1e-4


def test_a_step_without_an_optimizer_step_advances_the_schedule_silently(tiny_model_dir, tmp_path, monkeypatch):
    scripted(monkeypatch, [{"accuracy": 0.0, "format": 0.0}])      # every group tied: nothing to update
    model, tokenizer = load_model(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train(small(tmp_path / "s", steps=3, lr_schedule="cosine", warmup_steps=1), out=tmp_path, model=model,
                        tokenizer=tokenizer)["history"]
    assert [r["trained_rows"] for r in history] == [0, 0, 0]
    assert [r["lr"] for r in history] == pytest.approx([0.005, 0.01, 0.0])
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


def stop_after(step_to_stop: int):
    def maybe_kill(point, step):
        if point == "after_step" and step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)       # the loop checkpoints at the end of this step and stops
    return maybe_kill


def test_resume_restores_the_rng_a_dropout_model_draws_from(dropout_model_dir, tmp_path, monkeypatch):
    scripted(monkeypatch, [{"accuracy": float(a), "format": 0.0} for a in (1, 0, 1, 0)])    # every row trains
    cfg = dict(steps=4, disable_dropout=False, model=str(dropout_model_dir), lr_schedule="cosine", warmup_steps=1,
               lr=3e-3)
    whole = train(small(tmp_path / "whole", **cfg))["history"]
    with monkeypatch.context() as patch:
        patch.setattr(aha.core.train, "maybe_kill", stop_after(2))
        with pytest.raises(Stopped):
            train(small(tmp_path / "cut", **cfg))
    resumed = train(small(tmp_path / "cut", **cfg), resume=True)["history"]
    keys = ("loss", "grad_norm", "entropy", "reward_mean", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
    assert all(r["grad_norm"] > 0 for r in whole)    # the resumed steps did train, through dropout


# --- the whole batch's normaliser reaches the loss ------------------------------------------------------

def test_the_loop_passes_the_whole_batchs_normaliser(tiny_model_dir, tmp_path, monkeypatch):
    # groups of 4: a tie, then a spread; the tied rows are skipped but still count in the normaliser
    scripted(
        monkeypatch,
        [{"accuracy": 1.0, "format": 0.0}] * 4 + [{"accuracy": float(a), "format": 0.0} for a in (1, 0, 1, 0)],
    )
    calls, real = [], aha.core.step.policy_loss

    def recording(logp, old_logp, advantages, mask, spec, ref_logp=None, norm=None, **kwargs):
        calls.append((logp.shape[0], norm))
        return real(logp, old_logp, advantages, mask, spec, ref_logp, norm, **kwargs)
    monkeypatch.setattr(aha.core.step, "policy_loss", recording)
    model, tokenizer = load_model(tiny_model_dir)
    history = train(small(tmp_path / "n", steps=1, format_weight=0.0), out=tmp_path, model=model, tokenizer=tokenizer)[
        "history"
    ]
    assert history[0]["trained_rows"] == 4
    assert sum(rows for rows, _ in calls) == 4 and all(norm is not None and norm.rows == 8 for _, norm in calls)


# --- prompts longer than the model's context ----------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["train", "--template", "r1_zero", "--steps", "1"],
    ["run", "--template", "r1_zero", "--steps", "1"],
    ["eval", "--max-new-tokens", "300", "--problems", "2"],
    ["sample", "--model", str(SHIPPED), "--max-new-tokens", "300", "--prompts", "2"],
])
def test_a_prompt_past_the_models_context_is_one_line_and_exit_2(args, tmp_path, capsys):
    out = tmp_path / ("samples.jsonl" if args[0] == "sample" else "o")
    assert main([*args, "--out", str(out)] if args[0] != "eval" else args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "more than this model's context of 256" in err, err
    assert not out.exists()
