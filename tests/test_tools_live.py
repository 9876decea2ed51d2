"""The tool loop of `aha chat` and `aha serve` (aha/serve/live_tools.py), on a real engine and a real sandbox.

A tiny model memorises, for the prompt "calc", a transcript that calls the python tool mid-thought:
` <think><tool>print(6*7)</tool><output>42</output> so</think> <answer>42</answer>`. Greedy, with
tools, the engine must pause after `</tool>`, run the code in the sandbox, append the tool's own
output, and let the model go on; a `py:` tool that answers something else shows that the result in
the context is the tool's, not the model's memory.
"""

import socket
import sys
import threading
import time

import pytest
import torch
from rich.console import Console

from aha.core.tools.tools import get_toolbox
from aha.infra.errors import AhaError
from aha.serve.chat import ChatSettings, run_turn
from aha.serve.engine import Engine, GenerationParams
from aha.serve.live_tools import ToolRunner, ToolSession, tool_runner
from aha.serve.reasoning import split_reasoning

CALL = "<tool>print(6*7)</tool>"
DOCS = [("calc", f" <think>{CALL}<output>42</output> so</think> <answer>42</answer>"), ("hi", " <answer>7</answer>")]
TOOL_MODULE = '''
def fortyone(code: str) -> str:
    return "41"

def broken(code: str) -> str:
    raise RuntimeError("the tool fell over")
'''


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, memorise):
    """A run folder: model/ memorised DOCS; config.yaml says it trained with tools=python."""
    from aha.infra.config import Config, save_config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = memorise(DOCS, 250)
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("runs") / "toolrun"
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    save_config(Config(tools="python"), out / "config.yaml")
    module = tmp_path_factory.mktemp("toolmod")
    (module / "aha_live_tools.py").write_text(TOOL_MODULE)
    sys.path.insert(0, str(module))
    yield out
    sys.path.remove(str(module))


def prompt_text(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="module")
def engine(tool_run):
    from aha.infra.model import load_model
    model, tokenizer = load_model(tool_run / "model")
    engine = Engine(model, tokenizer).start()
    yield engine
    engine.stop()


def prompt_ids(engine, user: str) -> list[int]:
    return engine.tokenizer(prompt_text(engine.tokenizer, user), add_special_tokens=False)["input_ids"]


def collect(handle, n: int = 1) -> dict[int, list]:
    events: dict[int, list] = {i: [] for i in range(n)}
    while any(not e or e[-1].finish_reason is None for e in events.values()):
        event = handle.get(timeout=30)
        events[event.index].append(event)
    return events


def test_engine_end_strings_end_after_them_and_return_the_tokens(engine):
    request = engine.submit(
        prompt_ids(engine, "calc"), GenerationParams(max_tokens=60, temperature=0, end=("</tool>",))
    )
    events = collect(request)[0]
    text = "".join(e.text for e in events)
    assert text == f" <think>{CALL}" and events[-1].finish_reason == "stop"
    assert engine.tokenizer.decode(events[-1].token_ids, skip_special_tokens=True) == text
    assert events[-1].completion_tokens == len(events[-1].token_ids)


def test_session_runs_the_call_in_the_sandbox_and_the_model_goes_on(engine):
    runner = ToolRunner(get_toolbox("python"))
    events = collect(
        ToolSession(engine, runner, prompt_ids(engine, "calc"), GenerationParams(max_tokens=80, temperature=0))
    )[0]
    tool = [e for e in events if e.kind == "tool"]
    assert [e.text for e in tool] == ["<output>42</output>"]               # the sandbox printed 42
    text = "".join(e.text for e in events)
    assert text == DOCS[0][1] and events[-1].finish_reason == "stop"
    model_text = text.replace("<output>42</output>", "")
    assert events[-1].completion_tokens == len(
        engine.tokenizer(model_text, add_special_tokens=False)["input_ids"]
    )  # tool output not counted


def test_the_context_holds_the_tools_output_not_the_models_guess(engine):
    runner = ToolRunner(get_toolbox("py:aha_live_tools:fortyone"))
    events = collect(
        ToolSession(engine, runner, prompt_ids(engine, "calc"), GenerationParams(max_tokens=80, temperature=0))
    )[0]
    assert [e.text for e in events if e.kind == "tool"] == ["<output>41</output>"]
    assert "".join(e.text for e in events).startswith(f" <think>{CALL}<output>41</output>")


def test_a_tool_that_raises_is_an_observation_and_the_answer_goes_on(engine):
    runner = ToolRunner(get_toolbox("py:aha_live_tools:broken"))
    events = collect(
        ToolSession(engine, runner, prompt_ids(engine, "calc"), GenerationParams(max_tokens=150, temperature=0))
    )[0]
    assert [e.text for e in events if e.kind == "tool"] == ["<output>error: RuntimeError: the tool fell over</output>"]
    assert events[-1].finish_reason in ("stop", "length") and events[-1].error is None


def test_max_turns_and_the_token_budget_bound_the_interaction(engine):
    no_more = ToolRunner(get_toolbox("python"), max_turns=1)
    ids = prompt_ids(engine, "calc")
    one = collect(ToolSession(engine, no_more, ids, GenerationParams(max_tokens=80, temperature=0)))[0]
    assert sum(e.kind == "tool" for e in one) == 1
    short = collect(
        ToolSession(engine, no_more, ids, GenerationParams(max_tokens=len(f" <think>{CALL}") + 3, temperature=0))
    )[0]
    assert short[-1].finish_reason == "length"
    assert "".join(e.text for e in short) == f" <think>{CALL}<output>42</output>"[:len("".join(e.text for e in short))]


def test_seeded_sequences_repeat_and_n_sequences_each_call(engine):
    runner = ToolRunner(get_toolbox("python"))
    params = GenerationParams(max_tokens=80, temperature=1.0, n=2, seed=3)
    first = collect(ToolSession(engine, runner, prompt_ids(engine, "calc"), params), 2)
    again = collect(ToolSession(engine, runner, prompt_ids(engine, "calc"), params), 2)
    text = lambda events: "".join(e.text for e in events)
    assert [text(first[i]) for i in range(2)] == [text(again[i]) for i in range(2)]


def test_cancel_stops_every_sequence(engine):
    session = ToolSession(engine, ToolRunner(get_toolbox("python")), prompt_ids(engine, "calc"),
                          GenerationParams(max_tokens=80, temperature=0, n=2))
    session.cancel()
    for thread in session._threads:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_tool_runner_reads_the_runs_tools(tool_run, tmp_path):
    assert tool_runner(tool_run).toolbox.spec == "python"
    assert tool_runner(tool_run / "model").toolbox.spec == "python"
    assert tool_runner(tool_run, "none") is None
    assert tool_runner(tmp_path) is None                                    # a plain model dir: no tools
    assert tool_runner(tmp_path, "python").toolbox.spec == "python"
    with pytest.raises(AhaError, match="is not a tool"):
        tool_runner(tool_run, "shell")


@pytest.mark.parametrize("hide", [False, True])
def test_chat_shows_the_tools_output_even_with_thinking_hidden(engine, hide):
    out = Console(file=__import__("io").StringIO(), width=200, color_system=None)
    reply = run_turn(engine, [{"role": "user", "content": "calc"}], ChatSettings(temperature=0, show_thinking=not hide),
                     out, ToolRunner(get_toolbox("python")))
    shown = out.file.getvalue()
    assert "tool → <output>42</output>" in shown
    assert (CALL in shown) is not hide
    assert reply.content == "42" and reply.reasoning == f"{CALL}<output>42</output> so"


def test_serve_runs_tools_server_side(tool_run):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    from aha.serve.server import create_app
    app = create_app(tool_run, max_tokens_cap=80, tools=tool_runner(tool_run, "python"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="x", max_retries=0, timeout=60
        )
        reply = client.chat.completions.create(
            model="toolrun", messages=[{"role": "user", "content": "calc"}], temperature=0
        )
        message = reply.choices[0].message
        assert (message.reasoning_content, message.content) == split_reasoning(DOCS[0][1], False)
        assert message.reasoning_content == f"{CALL}<output>42</output> so" and reply.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(model="toolrun", messages=[{"role": "user", "content": "calc"}],
                                                temperature=0, stream=True)
        streamed = {"reasoning": "", "content": ""}
        for chunk in chunks:
            for choice in chunk.choices:
                streamed["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
                streamed["content"] += choice.delta.content or ""
        assert streamed == {"reasoning": message.reasoning_content, "content": "42"}
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
