"""`aha serve` and `aha chat`: the reasoning splitter, the batching engine, and a live server.

A tiny model is trained for a few seconds to say ` <think>abc</think> <answer>7</answer>` to
"hi" and ` <answer>5</answer>` to "yo" (greedy), so the tests can check exact thinking and
answers; every served text is also compared with `aha.core.rollout.generate` on the same prompt (the
reference KV-cache sampler), through the real `openai` client against uvicorn on 127.0.0.1.
"""

import argparse
import http.client
import io
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from aha.core.rollout import generate
from aha.core.sampling import SamplingParams
from aha.serve.engine import Engine, GenerationParams, encode_chat, stop_token_ids
from aha.serve.reasoning import ReasoningSplitter, split_reasoning

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

KEY = "test-key"
RUN = "tinyrun"
DOCS = [("hi", " <think>abc</think> <answer>7</answer>"), ("yo", " <answer>5</answer>"),
        ("why", " <think>because 6*7 = 42</think> <answer>42</answer>")]


# ---------------------------------------------------------------- the splitter, on hand-made text

@pytest.mark.parametrize("text, in_reasoning, expected", [
    (" <think>2+3 is 5</think> <answer>5</answer>", False, ("2+3 is 5", "5")),
    (" <answer>5</answer>", False, (None, "5")),
    ("<think>\nhmm\n</think>\n\nThe answer is 4.", False, ("hmm", "The answer is 4.")),   # Qwen3 style
    ("hmm\n</think>\n\nIt is 4.", True, ("hmm", "It is 4.")),      # the template opened <think>
    (" <think> 6*7 <answer>42</answer>", False, ("6*7", "42")),    # <answer> closes an open think
    (" <think>still thinking", False, ("still thinking", "")),
    ("a < b and a <t", False, (None, "a < b and a <t")),            # tag-like text at the end
    ("", False, (None, "")),
])
def test_split_reasoning(text, in_reasoning, expected):
    assert split_reasoning(text, in_reasoning) == expected


@pytest.mark.parametrize("text", [" <think>2+3 is 5</think> <answer>5</answer>", "<think>\nab</think>\n\nc  d ",
                                  "x </thi nk> <answe", " <think> a <think> b </answer> c"])
def test_splitter_deltas_assemble_to_the_whole_split(text):
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(8, len(text)))))
        splitter, parts = ReasoningSplitter(), {"reasoning": "", "content": ""}
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            for channel, piece in splitter.feed(text[a:b]):
                parts[channel] += piece
        for channel, piece in splitter.finish():
            parts[channel] += piece
        assert ((parts["reasoning"] if splitter.thought else None), parts["content"]) == split_reasoning(text)


def test_splitter_holds_a_tag_split_across_deltas():
    splitter = ReasoningSplitter()
    assert splitter.feed(" <thi") == []
    assert splitter.feed("nk>ab</th") == [("reasoning", "ab")]
    assert splitter.feed("ink> <ans") == []
    assert splitter.feed("wer>7</answer>") == [("content", "7")]
    assert splitter.finish() == []


# ---------------------------------------------------------------- the model and the engine

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread is faster, and leaves a core to the server and its clients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, memorise):
    """A run folder whose model/ memorised DOCS (200 AdamW steps of a 2-layer model)."""
    model, tokenizer = memorise(DOCS, 200)
    out = tmp_path_factory.mktemp("runs") / RUN
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out


def encode_text(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="session")
def loaded(run_dir):
    from aha.infra.model import load_model
    return load_model(run_dir / "model")


def test_run_folder_loads_the_tokenizer_it_was_saved_with(loaded):
    """Every served text depends on it: `AutoTokenizer` picks the model type's tokenizer class
    (Qwen2Tokenizer, byte-level) over the saved char tokenizer, and spaces vanish."""
    from aha.infra.tokenizer import build_char_tokenizer
    text = "User: hi\nAssistant: <think>a b</think>"
    assert loaded[1](text)["input_ids"] == build_char_tokenizer()(text)["input_ids"]


def reference(model, tokenizer, chat: str | list[dict], max_new_tokens: int = 64) -> str:
    """Greedy completion of `aha.core.rollout.generate` (the reference sampler) for a user message or chat."""
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": chat}] if isinstance(chat, str) else chat)
    params = SamplingParams(max_new_tokens, 0.0, 1.0, 0, tuple(stop_token_ids(model, tokenizer)))
    rollout = generate(model, [ids], 1, params, tokenizer.pad_token_id, seed=0)
    return tokenizer.decode(rollout.completion_ids[0, :int(rollout.lengths[0])], skip_special_tokens=True)


def drain(request) -> dict[int, str]:
    texts: dict[int, str] = {}
    finished = 0
    while finished < request.params.n:
        event = request.get(timeout=30)
        texts[event.index] = texts.get(event.index, "") + event.text
        finished += event.finish_reason is not None
    return texts


PROMPTS = ["hi", "yo", "why", "hello there, a longer prompt", "?"]


def test_engine_matches_reference_with_requests_joining_mid_batch(loaded):
    model, tokenizer = loaded
    assert reference(model, tokenizer, "hi") == DOCS[0][1] and reference(model, tokenizer, "yo") == DOCS[1][1]
    engine = Engine(model, tokenizer, max_batch=8)
    requests = []
    for k, user in enumerate(PROMPTS):     # each joins a batch already decoding (cache merge + padding)
        ids, _ = encode_chat(tokenizer, [{"role": "user", "content": user}])
        requests.append(engine.submit(ids, GenerationParams(max_tokens=64, temperature=0, n=2 if k == 3 else 1)))
        for _ in range(3):
            engine.step()
    while engine.step():
        pass
    assert engine.rows == []
    for user, request in zip(PROMPTS, requests):
        assert set(drain(request).values()) == {reference(model, tokenizer, user)}


def test_engine_seeded_sampling_is_independent_of_the_batch(loaded):
    model, tokenizer = loaded
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": "hello"}])
    params = GenerationParams(max_tokens=30, temperature=1.0, seed=123)
    alone = Engine(model, tokenizer)
    request = alone.submit(ids, params)
    while alone.step():
        pass
    crowded = Engine(model, tokenizer)
    other_ids, _ = encode_chat(tokenizer, [{"role": "user", "content": "a different, longer prompt"}])
    for seed in range(3):
        crowded.submit(other_ids, GenerationParams(max_tokens=30, temperature=1.0, seed=seed))
    crowded.step()
    joined = crowded.submit(ids, params)
    while crowded.step():
        pass
    assert drain(joined) == drain(request)


def run_engine(engine, prompts: list[list[int]], params: list[GenerationParams]) -> list[dict[int, str]]:
    """Each prompt joins a batch already decoding (cache merge + left padding); all texts at the end."""
    requests = []
    for ids, p in zip(prompts, params):
        requests.append(engine.submit(ids, p))
        for _ in range(3):
            engine.step()
    while engine.step():
        pass
    return [drain(r) for r in requests]


def test_engine_written_out_step_is_transformers_forward(loaded):
    """The engine's decode step (aha/core/decode_step.py through `PaddedCacheKV`) against transformers'
    forward on the same cache: the same texts, greedy and seeded, with requests joining mid-batch."""
    model, tokenizer = loaded
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": user}])[0] for user in PROMPTS]
    params = [GenerationParams(max_tokens=40, temperature=t, seed=k, n=2 if k == 3 else 1)
              for k, t in enumerate((0.0, 1.0, 0.0, 1.0, 1.0))]
    written = Engine(model, tokenizer, max_batch=8, bf16=False)
    assert written._decoder is not None
    plain = Engine(model, tokenizer, max_batch=8, bf16=False)
    plain._decoder = None
    assert run_engine(written, prompts, params) == run_engine(plain, prompts, params)


def test_engine_bf16_decoding(loaded, monkeypatch):
    """`Engine(bf16=True)`: the decode step's matmuls on bf16 weights, the model's own weights untouched;
    the memorised answers come out the same. `decode_bf16` picks bf16 only for a model of
    ≥ BF16_MIN_PARAMETERS on a fast-bf16 CPU, never under AHA_AUTOCAST=off."""
    import aha.serve.engine as engine_module
    model, tokenizer = loaded
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": user}])[0] for user, _ in DOCS]
    params = [GenerationParams(max_tokens=64, temperature=0)] * len(prompts)
    fp32 = run_engine(Engine(model, tokenizer, bf16=False), prompts, params)
    assert run_engine(Engine(model, tokenizer, bf16=True), prompts, params) == fp32 == [
        {0: answer} for _, answer in DOCS]
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not engine_module.decode_bf16(model)                         # 2 layers: far below the threshold
    monkeypatch.setattr(engine_module, "BF16_MIN_PARAMETERS", 0)
    monkeypatch.setattr("aha.infra.model.cpu_has_fast_bf16", lambda: True)
    assert engine_module.decode_bf16(model)
    monkeypatch.setenv("AHA_AUTOCAST", "off")
    assert not engine_module.decode_bf16(model)


def answer_model():
    """A tokenizer that spells `</answer>` in 9 tokens (one per character) and a 1-layer Llama that
    memorised `<answer>7</answer>` over and over: greedily it writes the tag and goes on past it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    chars = sorted(set("<answer>7</answer> <think>x</think>"))
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["[PAD]", "[EOS]", *chars])}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("[PAD]", "[EOS]")])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor([tok("<think>x</think> " + "<answer>7</answer>" * 4)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


def test_engine_ends_after_an_answer_close_of_several_tokens_and_keeps_it():
    from aha.core.rollout import stop_strings
    model, tok = answer_model()
    assert len(tok.tokenize("</answer>")) == 9 and stop_strings(tok) == ("</answer>",)
    prompt = tok("<think>x</think> <answer>")["input_ids"]
    free = generate(model, [prompt], 1, SamplingParams(30, 0.0), tok.pad_token_id, seed=0)     # no stop strings
    assert tok.decode(free.completion_ids[0, :int(free.lengths[0])]).startswith("7</answer><answer>7")
    engine = Engine(model, tok)
    request = engine.submit(prompt, GenerationParams(max_tokens=30, temperature=0))
    events = []
    while engine.step():
        pass
    while not events or events[-1].finish_reason is None:
        events.append(request.get(timeout=5))
    text = "".join(e.text for e in events)
    assert text == "7</answer>" and events[-1].finish_reason == "stop"      # ends after the tag, which stays
    assert events[-1].completion_tokens == 10
    assert split_reasoning("<think>x</think> <answer>" + text, False) == ("x", "7")
    cut = engine.submit(prompt, GenerationParams(max_tokens=30, temperature=0, stop=("</ans",)))
    while engine.step():
        pass
    assert drain(cut) == {0: "7"}                         # a request's own stop still ends before it


# ---------------------------------------------------------------- the live server

@pytest.fixture(scope="session")
def server(run_dir):
    from aha.serve.server import create_app
    app = create_app(run_dir, api_key=KEY, max_tokens_cap=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))            # a free loopback port, held: no race with other tests
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield {"port": port, "base_url": f"http://127.0.0.1:{port}/v1", "engine": app.state.engine}
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base_url"], api_key=KEY, max_retries=0, timeout=60)


def ask(client, user: str, **kw):
    return client.chat.completions.create(model=RUN, messages=[{"role": "user", "content": user}], **kw)


def stream(client, user: str, **kw) -> tuple[dict[int, dict], object]:
    """Assembled reasoning/content/finish per choice, and the usage of the last chunk."""
    out: dict[int, dict] = {}
    usage = None
    for chunk in ask(client, user, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            acc = out.setdefault(choice.index, {"reasoning": None, "content": "", "finish": None})
            piece = getattr(choice.delta, "reasoning_content", None)
            if piece is not None:
                acc["reasoning"] = (acc["reasoning"] or "") + piece
            acc["content"] += choice.delta.content or ""
            acc["finish"] = choice.finish_reason or acc["finish"]
    return out, usage


def test_non_streaming_returns_thinking_apart(client, loaded):
    model, tokenizer = loaded
    response = ask(client, "hi", temperature=0)
    message = response.choices[0].message
    assert (message.reasoning_content, message.content) == ("abc", "7")
    assert response.choices[0].finish_reason == "stop" and response.model == RUN
    prompt_tokens = len(encode_chat(tokenizer, [{"role": "user", "content": "hi"}])[0])
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
           (prompt_tokens, 10, prompt_tokens + 10)    # ' ' <think> a b c </think> ' ' <answer> 7 </answer>
    no_thought = ask(client, "yo", temperature=0).choices[0].message
    assert (no_thought.reasoning_content, no_thought.content) == (None, "5")


@pytest.mark.parametrize("user", ["why", "hello there", "<think>"])
def test_reasoning_content_is_the_split_of_the_model_text(client, loaded, user):
    message = ask(client, user, temperature=0).choices[0].message
    assert (message.reasoning_content, message.content) == split_reasoning(reference(*loaded, user))


def test_streaming_deltas_assemble_into_the_same_split(client):
    for user, kw in [("hi", {"temperature": 0}), ("why", {"temperature": 0}), ("hello", {"temperature": 1, "seed": 7})]:
        whole = ask(client, user, **kw)
        parts, usage = stream(client, user, **kw)
        message = whole.choices[0].message
        assert (parts[0]["reasoning"], parts[0]["content"]) == (message.reasoning_content, message.content)
        assert parts[0]["finish"] == whole.choices[0].finish_reason
        assert usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_stop(client):
    cut = ask(client, "hi", temperature=0, max_tokens=4)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4
    assert (cut.choices[0].message.reasoning_content, cut.choices[0].message.content) == ("ab", "")
    stopped = ask(client, "hi", temperature=0, stop=["c<"])    # "c" + "</think>" starts with "c<"
    assert stopped.choices[0].finish_reason == "stop"
    assert (stopped.choices[0].message.reasoning_content, stopped.choices[0].message.content) == ("ab", "")


def test_n_sequences(client):
    greedy = ask(client, "hi", temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert {c.message.content for c in greedy.choices} == {"7"} and greedy.usage.completion_tokens == 20
    sampled, _ = stream(client, "hello", temperature=1.0, seed=1, n=2)
    assert sorted(sampled) == [0, 1] and all(p["finish"] in ("stop", "length") for p in sampled.values())
    # sequence i of a request samples from Generator(seed + i): each of the n samples is the
    # single sample of a request seeded seed + i, whatever the samples happen to say
    alone = [stream(client, "hello", temperature=1.0, seed=seed, n=1)[0][0] for seed in (1, 2)]
    assert [sampled[0], sampled[1]] == alone


def test_concurrent_requests_all_succeed(client, loaded):
    expected = {user: split_reasoning(reference(*loaded, user)) for user in PROMPTS}

    def one(k: int):
        user = PROMPTS[k % len(PROMPTS)]
        if k % 2:
            parts, _ = stream(client, user, temperature=0)
            return user, (parts[0]["reasoning"], parts[0]["content"])
        message = ask(client, user, temperature=0).choices[0].message
        return user, (message.reasoning_content, message.content)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(got == expected[user] for user, got in results)


def test_disconnected_stream_frees_its_rows(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    body = {"model": RUN, "messages": [{"role": "user", "content": "hello there"}], "stream": True,
            "max_tokens": 60, "temperature": 1.0, "seed": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while server["engine"].rows and time.time() < deadline:
        time.sleep(0.05)
    assert server["engine"].rows == []


def raw(server, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request(method, path, body, headers)
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def test_auth(server, client):
    assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok", "model": RUN})
    status, payload = raw(server, "GET", "/v1/models", key=None)
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    assert raw(server, "GET", "/v1/models", key="wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base_url"], api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [RUN]


def chat_body(**fields) -> bytes:
    return json.dumps({"model": RUN, "messages": [{"role": "user", "content": "hi"}]} | fields).encode()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, "body"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "model"),
    (chat_body(model="gpt-4"), 404, "model"),
    (chat_body(messages="hi"), 400, "messages"),
    (chat_body(messages=[]), 400, "messages"),
    (chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    (chat_body(temperature="hot"), 400, "temperature"),
    (chat_body(temperature=5), 400, "temperature"),
    (chat_body(n=0), 400, "n"),
    (chat_body(n=1.5), 400, "n"),
    (chat_body(max_tokens=10**6), 400, "max_tokens"),
    (chat_body(max_tokens=0), 400, "max_tokens"),
    (chat_body(stop=5), 400, "stop"),
    (chat_body(stream="maybe"), 400, "stream"),
    (chat_body(messages=[{"role": "user", "content": "x" * 600}]), 400, "messages"),   # context is 512
    (chat_body(max_tokens=505), 400, "max_tokens"),         # ≤ the cap of 511, but the prompt + 505 > 512
])
def test_malformed_requests_get_openai_errors(server, body, status, param):
    got_status, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert got_status == status
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
    assert payload["error"]["param"] == param or (param is not None and payload["error"]["param"].startswith(param))


def test_serve_parser_and_bad_model_dir(tmp_path):
    from aha.infra.errors import AhaError
    from aha.serve.cli import add_serve_parser
    from aha.serve.server import create_app
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(tmp_path)])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    with pytest.raises(AhaError, match="no config.json"):
        create_app(tmp_path)


def test_unknown_route_is_a_json_404(server):
    status, payload = raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in payload


# ---------------------------------------------------------------- aha chat

def test_chat_turn_loop_keeps_answers_and_survives_ctrl_c(loaded):
    from rich.console import Console

    from aha.serve.chat import ChatSettings, chat_loop

    class InterruptOnce(io.StringIO):      # Ctrl-C while the first answer streams
        interrupted = False

        def write(self, text):
            if "thinking:" in self.getvalue() and not self.interrupted:
                InterruptOnce.interrupted = True
                raise KeyboardInterrupt
            return super().write(text)

    engine = Engine(*loaded, max_batch=2).start()
    try:
        screen = InterruptOnce()
        lines = iter(["hi", "hi", "", "yo", "/exit", "never read"])
        history = chat_loop(engine, ChatSettings(temperature=0), lambda: next(lines), Console(file=screen, width=200))
    finally:
        engine.stop()
    first = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "yo"},
    ]
    assert history == first + [{"role": "assistant", "content": split_reasoning(reference(*loaded, first))[1]}]
    assert "stopped" in screen.getvalue() and engine.rows == []


@pytest.mark.parametrize("hide", [False, True])
def test_cmd_chat_with_scripted_stdin(run_dir, monkeypatch, capsys, hide):
    from rich.console import Console

    from aha.serve.chat import add_chat_parser, cmd_chat
    parser = argparse.ArgumentParser()
    add_chat_parser(parser.add_subparsers())
    args = parser.parse_args(["chat", str(run_dir), "--temperature", "0"] + (["--hide-thinking"] if hide else []))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))            # then EOF
    cmd_chat(args, Console(file=io.StringIO()))
    shown = capsys.readouterr().out
    assert "7" in shown and ("abc" in shown) != hide
