"""The interaction loop (aha/core/tools/interact.py) against a naive loop, with a scripted fake model.

The fake model's logits depend on its row's whole context — prompt, its own tokens and the tool
output — read back from the KV cache, so the cached, batched, multi-turn engine must feed every row
exactly the context the naive loop (one row at a time, the whole sequence recomputed every token,
tools run in line) feeds it, or the tokens differ.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trl

from aha.core.rollout import generate, stop_strings, stop_token_ids
from aha.core.sampling import SamplingParams, row_uniforms, sample_next
from aha.core.tools.formats import FORMATS, Call, cut_tokens
from aha.core.tools.interact import ToolLoop, tool_metrics, turn_seed
from aha.core.tools.tools import FunctionTool, Observation, Toolbox
from aha.infra.tokenizer import TAGS, TOOL_TAGS, build_char_tokenizer

TOKENIZER = build_char_tokenizer(TAGS + TOOL_TAGS)


def calc(text: str) -> str:
    """A fast, deterministic tool for the loop tests: arithmetic, or an exception."""
    return str(eval(text, {"__builtins__": {}}))


class ScriptedLM(torch.nn.Module):
    """A fake causal LM. Its logits for a row are a hash of the row's whole context (in [0, 1)) plus
    `strength` on the next token of the row's script; the script is indexed by how many tokens the
    row has written itself (tool output, matched by `tool_output`, does not count), so a row that
    strays from it goes on with the script. With a KV cache the token ids are stored as the keys
    of one layer, so the model sees its whole context whichever way it is called."""

    def __init__(self, tokenizer, prompts: list[list[int]], scripts: list[str], strength: float = 9.0,
                 tool_output: str = r"<output>.*?</output>"):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=len(tokenizer), max_position_embeddings=2048)
        self.tokenizer, self.prompts, self.tool_output = tokenizer, prompts, re.compile(tool_output, re.DOTALL)
        self.scripts = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in scripts]
        self.eos, self.strength = tokenizer.eos_token_id, strength

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0,
                past_key_values=None, **kwargs):
        columns = input_ids
        if past_key_values is not None:
            ids = input_ids.float()[:, None, :, None]                     # (B, 1, L, 1)
            columns = past_key_values.update(ids, ids, 0)[0][:, 0, :, 0].round().long()   # (B, T) every column
        mask = attention_mask[:, -columns.shape[1]:] if attention_mask is not None else torch.ones_like(columns)
        contexts = [row[keep.bool()].tolist() for row, keep in zip(columns, mask)]
        return SimpleNamespace(logits=torch.stack([self.next_logits(c) for c in contexts])[:, None])

    def next_logits(self, context: list[int]) -> torch.Tensor:
        which = next(i for i, p in enumerate(self.prompts) if context[:len(p)] == p)
        written = self.tokenizer.decode(context[len(self.prompts[which]):], skip_special_tokens=False)
        own = self.tokenizer(self.tool_output.sub("", written), add_special_tokens=False)["input_ids"]
        script = self.scripts[which]
        intended = script[len(own)] if len(own) < len(script) else self.eos
        h = hash(tuple(context)) % 1_000_003
        vocab = torch.arange(self.config.vocab_size)
        logits = ((h * 7_919 + vocab * 104_729) % 1_000) / 1_000.0
        logits[intended] += self.strength
        return logits.float()


def naive_interaction(model, prompts, group_size, params, seed, tokenizer, toolbox, call_format, max_turns,
                      output_tokens, row_offset=0):
    """One row at a time: the whole sequence through the model for every token, tools called in line."""
    fmt = FORMATS[call_format](toolbox.names)
    rows = []
    for i in range(len(prompts) * group_size):
        prompt, row = prompts[i // group_size], row_offset + i
        episode = toolbox.episode(tokenizer.decode(prompt, skip_special_tokens=True))
        tokens, actions, logprobs, calls, errors, stopped, turn = [], [], [], 0, 0, False, 0
        while len(tokens) < params.max_new_tokens:
            turn_tokens, ended = [], None
            while len(tokens) < params.max_new_tokens and ended is None:
                sequence = torch.tensor([prompt + tokens])
                logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
                token, logprob = sample_next(
                    logits, row_uniforms(turn_seed(seed, turn), len(turn_tokens), torch.tensor([row])), params
                )
                tokens.append(int(token))
                actions.append(1)
                logprobs.append(float(logprob))
                turn_tokens.append(int(token))
                text = tokenizer.decode(turn_tokens, skip_special_tokens=True)
                if int(token) in params.stop_token_ids or any(s in text for s in params.stop_strings):
                    ended = "stop"
                elif calls < max_turns and fmt.call_end and text.endswith(fmt.call_end):
                    ended = "call"
            found = fmt.calls(text, ended == "stop") if ended and calls < max_turns else None
            if not found:
                stopped = ended == "stop"
                break
            if len(tokens) >= params.max_new_tokens:
                break
            observations = []
            for call in found:
                observation = call.error or episode.call(call.name, call.text)
                text, cut = cut_tokens(tokenizer, observation.text, output_tokens)
                observations.append(Observation(text, observation.error or cut))
            shown = fmt.observation_ids(tokenizer, found, observations)[:params.max_new_tokens - len(tokens)]
            tokens += shown
            actions += [0] * len(shown)
            logprobs += [0.0] * len(shown)
            calls += len(found)
            errors += sum(o.error for o in observations)
            turn += 1
        rows.append({"tokens": tokens, "actions": actions, "logprobs": logprobs, "calls": calls, "errors": errors,
                     "truncated": not stopped})
    return rows


def as_rows(rollout):
    rows = []
    for i in range(rollout.completion_ids.shape[0]):
        length = int(rollout.completion_mask[i].sum())
        rows.append(
            {
                "tokens": rollout.completion_ids[i, :length].tolist(),
                "actions": rollout.action_mask[i, :length].tolist(),
                "logprobs": rollout.logprobs[i, :length].tolist(),
                "calls": int(rollout.tools.calls[i]),
                "errors": int(rollout.tools.errors[i]),
                "truncated": bool(rollout.truncated[i]),
            }
        )
    return rows


def assert_same(rows, reference):
    assert len(rows) == len(reference)
    for got, want in zip(rows, reference):
        assert got["tokens"] == want["tokens"]
        assert got["actions"] == want["actions"]
        assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)
        assert (got["calls"], got["errors"], got["truncated"]) == (want["calls"], want["errors"], want["truncated"])


PROMPTS = ["User: 6*7\nAssistant:", "User: 12-5\nAssistant:", "User: 9\nAssistant:"]
SCRIPTS = [" <think><tool>6*7</tool> so <tool>6*7+1</tool></think> <answer>42</answer>",
           " <think><tool>12-</tool><tool>12-5</tool><tool>1/0</tool><tool>2</tool></think> <answer>7</answer>",
           " <answer>9</answer>"]


def setup(max_new_tokens=110, temperature=1.0, top_p=1.0):
    prompts = [TOKENIZER(p)["input_ids"] for p in PROMPTS]
    model = ScriptedLM(TOKENIZER, prompts, SCRIPTS)
    params = SamplingParams(
        max_new_tokens, temperature, top_p, 0, stop_token_ids(model, TOKENIZER), stop_strings(TOKENIZER)
    )
    toolbox = Toolbox("py:tests:calc", {"calc": FunctionTool(calc, "calc")})
    return prompts, model, params, toolbox


@pytest.mark.parametrize(
    "max_turns,output_tokens,max_new_tokens", [(4, 64, 110), (2, 64, 110), (4, 6, 110), (4, 64, 40)]
)
def test_multi_turn_rollout_equals_the_naive_loop(max_turns, output_tokens, max_new_tokens):
    """Tokens, masks, log-probs, calls and errors equal the naive loop's, with the limits biting:
    max_turns (the third call is not run), a tool output cut to `output_tokens`, a budget that ends
    mid-interaction; masks 0 exactly on tool output."""
    prompts, model, params, toolbox = setup(max_new_tokens)
    engine = ToolLoop(toolbox, "r1", max_turns=max_turns, output_tokens=output_tokens)
    rollout = engine(model, prompts, 3, params, TOKENIZER.pad_token_id, seed=5, tokenizer=TOKENIZER)
    reference = naive_interaction(model, prompts, 3, params, 5, TOKENIZER, toolbox, "r1", max_turns, output_tokens)
    assert_same(as_rows(rollout), reference)
    assert sum(r["calls"] for r in reference) >= 6 and any(r["errors"] for r in reference)
    for row, (tokens, actions) in enumerate((r["tokens"], r["actions"]) for r in reference):
        text_of_tool = TOKENIZER.decode([t for t, a in zip(tokens, actions) if a == 0])
        assert text_of_tool.count("<output>") == as_rows(rollout)[row]["calls"]      # the mask covers tool output only
        assert "<tool>" not in text_of_tool and "<answer>" not in text_of_tool
    assert (rollout.logprobs * (1 - rollout.action_mask)).abs().sum() == 0


def test_chunks_and_slices_give_the_same_tokens():
    """max_rows (one group per pass) and a slice of the rows at their global offset sample as the whole batch."""
    prompts, model, params, toolbox = setup()
    engine = ToolLoop(toolbox, "r1")
    whole = as_rows(engine(model, prompts, 2, params, TOKENIZER.pad_token_id, seed=3, tokenizer=TOKENIZER))
    chunked = as_rows(
        engine(model, prompts, 2, params, TOKENIZER.pad_token_id, seed=3, max_rows=2, tokenizer=TOKENIZER)
    )
    sliced = as_rows(engine(model, prompts[1:], 2, params, TOKENIZER.pad_token_id, seed=3, row_offset=2, total_rows=6,
                            tokenizer=TOKENIZER))
    assert_same(chunked, whole)
    assert_same(sliced, whole[2:])


def test_no_tool_call_is_generate_token_for_token():
    """Turn 0 draws generate's uniforms: a rollout in which no row calls equals generate's."""
    prompts, model, params, toolbox = setup()
    prompts = prompts[2:]                                       # the script that answers at once
    rollout = ToolLoop(toolbox, "r1")(model, prompts, 4, params, TOKENIZER.pad_token_id, seed=9, tokenizer=TOKENIZER)
    plain = generate(model, prompts, 4, params, TOKENIZER.pad_token_id, seed=9, tokenizer=TOKENIZER)
    assert int(rollout.tools.calls.sum()) == 0
    assert torch.equal(rollout.completion_ids, plain.completion_ids)
    assert torch.equal(rollout.completion_mask, plain.completion_mask)
    assert torch.equal(rollout.action_mask, plain.completion_mask)
    assert torch.allclose(rollout.logprobs, plain.logprobs, atol=1e-6)


def test_tool_metrics_by_hand():
    prompts, model, params, toolbox = setup()
    rollout = ToolLoop(toolbox, "r1", max_turns=2)(model, prompts, 1, params, TOKENIZER.pad_token_id, seed=1,
                                                    tokenizer=TOKENIZER)
    rows = as_rows(rollout)
    metrics = tool_metrics(rollout)
    calls = [r["calls"] for r in rows]
    assert metrics["tool_calls_per_sample"] == pytest.approx(sum(calls) / 3)
    assert metrics["tool_use_rate"] == pytest.approx(sum(c > 0 for c in calls) / 3)
    assert metrics["tool_error_rate"] == pytest.approx(sum(r["errors"] for r in rows) / max(1, sum(calls)))
    turns = [1 + sum(1 for a, b in zip(r["actions"], r["actions"][1:]) if a == 0 and b == 1) for r in rows]
    assert metrics["turns_per_sample"] == pytest.approx(sum(turns) / 3)


QWEN_TEMPLATE = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
QWEN_TOOL_OUTPUT = r"\n<\|im_start\|>user\n<tool_response>.*?</tool_response><\|im_end\|>\n<\|im_start\|>assistant\n"


def qwen_like_tokenizer():
    """The character tokenizer with Qwen2.5's chat template, turn markers and `<|im_end|>` as its EOS."""
    tokenizer = build_char_tokenizer(TAGS + ["<tool_call>", "</tool_call>"])
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template, tokenizer.model_max_length = QWEN_TEMPLATE, 4096
    return tokenizer


def test_chat_format_equals_the_naive_loop_and_trl_renders_the_same_tool_turn():
    """tool_format=chat: a Qwen2.5-style `<tool_call>` JSON ends the turn at EOS; the result comes back
    as the template's tool message, tokenized as TRL's `_get_tool_suffix_ids` does it."""
    tokenizer = qwen_like_tokenizer()
    box = Toolbox("py:tests:calc", {"calc": FunctionTool(calc, "calc")})
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "6*7?"}], tools=box.schemas(), tokenize=False, add_generation_prompt=True
    )
    prompts = [tokenizer(prompt_text, add_special_tokens=False)["input_ids"]]
    call = '<tool_call>\n{"name": "calc", "arguments": {"input": "6*7"}}\n</tool_call><|im_end|>'
    bad = '<tool_call>\n{"name": "calc", "arguments": 7}\n</tool_call><|im_end|>'
    model = ScriptedLM(tokenizer, prompts, [call + bad + "It is 42."], strength=12.0, tool_output=QWEN_TOOL_OUTPUT)
    params = SamplingParams(260, 1.0, 1.0, 0, stop_token_ids(model, tokenizer), ())
    rollout = ToolLoop(box, "chat")(model, prompts, 3, params, tokenizer.pad_token_id, seed=4, tokenizer=tokenizer)
    assert_same(as_rows(rollout), naive_interaction(model, prompts, 3, params, 4, tokenizer, box, "chat", 4, 64))
    shown = call + "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n" + bad
    scripted = [
        r for r in as_rows(rollout) if tokenizer.decode(r["tokens"], skip_special_tokens=False).startswith(shown)
    ]
    assert scripted, "a row should follow the script"
    row = scripted[0]
    assert row["calls"] == 2 and row["errors"] == 1
    eos = row["tokens"].index(tokenizer.eos_token_id)
    assert row["actions"][eos] == 1 and row["actions"][eos + 1] == 0  # the model's EOS is its own; the rest the tool's
    from trl import GRPOTrainer
    messages = [{"role": "tool", "name": "calc", "content": "42"}]
    trainer = SimpleNamespace(processing_class=tokenizer, chat_template=None, chat_template_kwargs={}, _is_vlm=False,
                              _tokenizer=tokenizer)
    assert FORMATS["chat"](["calc"]).observation_ids(tokenizer, [Call("calc", "6*7")], [Observation("42")]) == \
        GRPOTrainer._get_tool_suffix_ids(trainer, messages)
