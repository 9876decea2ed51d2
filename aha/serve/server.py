"""`aha serve RUN_OR_MODEL_DIR`: an OpenAI-compatible chat API for a trained model.

    aha serve runs/train --port 8000 [--api-key KEY]     # or AHA_API_KEY=KEY aha serve …
    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY").chat.completions.create(…)

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (JSON or SSE stream).
Like DeepSeek's API, the thinking comes back apart from the answer: `message.reasoning_content`
(or `delta.reasoning_content` in a stream) holds the text inside `<think> … </think>`, `content`
the rest with the `<answer>` tags removed (see aha/serve/reasoning.py). All concurrent requests share
one model through the continuous-batching engine (aha/serve/engine.py).

Tools run server-side, when the server is started with them (`aha serve RUN --tools python`): a
model that calls the sandboxed python tool mid-thought (`<tool>CODE</tool>`) gets its result
(`<output>…</output>`) as in training and goes on, all inside one request (aha/serve/live_tools.py). The
calls and their results stay in the text where the model wrote them, so in `reasoning_content`
for calls inside `<think>`. We chose this over returning OpenAI `tool_calls` for the client to run:
an R1-format model calls tools inside its thinking, which a client never gets to continue.

Departs from OpenAI: a request's `tools` / `tool_choice`, logprobs and penalties are ignored; bad
input is a 400 (404 for an unknown model, 401 without the API key) with OpenAI's error JSON, never a 500.
"""

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from aha.infra.model import resolve_model_dir
from aha.serve.engine import Engine, GenerationParams, encode_chat, load_engine
from aha.serve.live_tools import ToolSession
from aha.serve.reasoning import ReasoningSplitter


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")   # e.g. a reasoning_content sent back: not part of the prompt
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=16)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


def create_app(model_dir: str | Path, api_key: str | None = None, device: str | None = None,
               max_batch: int = 64, max_tokens_cap: int = 4096, model_name: str | None = None,
               engine: Engine | None = None, tools=None) -> FastAPI:
    """The app; loads the model now (AhaError on a bad dir); the engine thread runs while the app does.
    `tools`: an aha.serve.live_tools.ToolRunner whose tools the model's calls run (server-side), or None."""
    engine = engine or load_engine(model_dir, device, max_batch)
    resolved = resolve_model_dir(model_dir).resolve()
    model_id = model_name or (resolved.parent.name if resolved.name == "model" else resolved.name)  # the run's name
    cap = min(max_tokens_cap, engine.max_context - 1)
    created = int(time.time())

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="aha", lifespan=lifespan)
    app.state.engine, app.state.model_id = engine, model_id

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(part) for part in first.get("loc", ())][1:]
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", first["msg"])
            return error_response(400, f"request body is not valid JSON: {reason}", code="invalid_json")
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {first['msg']}", param=where or None, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def on_http(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def on_bug(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not secrets.compare_digest(given[7:].strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "aha"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model != model_id:
            raise ApiError(404, f"model {body.model!r} does not exist: this server serves {model_id!r}", "model",
                           "model_not_found")
        prompt_ids, in_reasoning, params = prepare(engine, body, cap, tools.schemas() if tools else None)
        loop = asyncio.get_running_loop()
        handle = ToolSession(engine, tools, prompt_ids, params, loop) if tools else engine.submit(prompt_ids, params,
                                                                                                   loop=loop)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(handle, params.n, in_reasoning, meta, len(prompt_ids), include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await complete(handle, params.n, in_reasoning, meta, len(prompt_ids), request)

    return app


def prepare(
    engine: Engine, body: ChatRequest, cap: int, tools: list[dict] | None = None
) -> tuple[list[int], bool, GenerationParams]:
    """Prompt ids, whether the prompt opened a think block, and the checked sampling parameters."""
    try:
        prompt_ids, in_reasoning = encode_chat(engine.tokenizer, [m.as_dict() for m in body.messages], tools)
    except Exception as exc:               # the model's chat template rejected these messages
        raise ApiError(400, f"messages: the chat template refused them: {str(exc)[:200]}", "messages") from None
    room = engine.max_context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {engine.max_context}",
                       "messages", "context_length_exceeded")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(400, f"max_tokens is {max_tokens}; at most {cap} allowed", "max_tokens", "invalid_value")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed this model's context "
            f"of {engine.max_context}",
            "max_tokens",
            "context_length_exceeded",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop: up to 4 non-empty strings", "stop", "invalid_value")
    n = body.n or 1
    if n > engine.max_batch:
        raise ApiError(400, f"n is {n}; at most {engine.max_batch} allowed", "n", "invalid_value")
    params = GenerationParams(max_tokens=max_tokens or min(cap, room),
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, stop=tuple(stop), n=n, seed=body.seed)
    return prompt_ids, in_reasoning, params


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def complete(handle, n: int, in_reasoning: bool, meta: dict, prompt_tokens: int, request: Request) -> dict:
    texts, finished, tokens = [""] * n, {}, [0] * n
    try:
        while len(finished) < n:
            try:
                event = await asyncio.wait_for(handle.aget(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return {}
                continue
            texts[event.index] += event.text
            if event.finish_reason:
                finished[event.index], tokens[event.index] = event, event.completion_tokens
    finally:
        handle.cancel()                    # no-op when finished; frees the rows of a client that left
    errors = [e.error for e in finished.values() if e.error]
    if errors:
        raise ApiError(500, f"generation failed: {errors[0]}", kind="server_error")
    choices = []
    for i, text in enumerate(texts):
        splitter = ReasoningSplitter(in_reasoning)
        parts = {"reasoning": "", "content": ""}
        for channel, piece in splitter.feed(text) + splitter.finish():
            parts[channel] += piece
        message = {"role": "assistant", "content": parts["content"],
                   "reasoning_content": parts["reasoning"] if splitter.thought else None}
        choices.append({"index": i, "message": message, "finish_reason": finished[i].finish_reason, "logprobs": None})
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(prompt_tokens, sum(tokens))}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(handle, n: int, in_reasoning: bool, meta: dict, prompt_tokens: int, include_usage: bool):
    """SSE chunks: a role chunk per choice, reasoning/content deltas, a finish chunk per choice, [DONE]."""
    chunk = {**meta, "object": "chat.completion.chunk"}
    splitters = [ReasoningSplitter(in_reasoning) for _ in range(n)]
    finished, tokens = 0, 0

    def delta_chunk(index: int, delta: dict, finish_reason=None) -> str:
        return sse(
            {**chunk, "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        )

    def pieces_chunks(index: int, pieces) -> list[str]:
        return [delta_chunk(index, {"reasoning_content" if channel == "reasoning" else "content": text})
                for channel, text in pieces]

    try:
        for i in range(n):
            yield delta_chunk(i, {"role": "assistant", "content": ""})
        while finished < n:
            event = await handle.aget()
            for line in pieces_chunks(event.index, splitters[event.index].feed(event.text)):
                yield line
            if event.finish_reason:
                if event.error:
                    yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                         "param": None, "code": None}})
                    return
                for line in pieces_chunks(event.index, splitters[event.index].finish()):
                    yield line
                yield delta_chunk(event.index, {}, event.finish_reason)
                finished, tokens = finished + 1, tokens + event.completion_tokens
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, tokens)})
        yield sse("[DONE]")
    finally:
        handle.cancel()                    # the client disconnected, or we are done: free the rows
