"""The HTTP API (FastAPI): OpenAI-compatible generation, the edits endpoints, state, health, metrics.

Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` as OpenAI sends them; they
never contain a key or a header value. Request bodies are read whole, up to ``max_body_bytes``,
before any handler runs (413 past it); every endpoint needs ``Authorization: Bearer <api key>``
when the server has one, and ``/v1/edits*`` the edit key when it has one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .engine import Engine, ServeError
from .generation import SamplingParams


@dataclass
class Limits:
    api_key: str | None = None
    edit_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens: int = 512  # the most any request may ask for
    default_max_tokens: int = 16  # /v1/completions default, as OpenAI's
    max_prompt_tokens: int = 4096
    max_concurrent: int = 4  # generations running at once; more wait their turn


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(err: ServeError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.kind, err.param), status_code=err.status)


def _route(path: str) -> str:
    """Metric label of a path (edit ids folded, unknown paths one label)."""
    known = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/edits",
             "/v1/edits/revert", "/v1/state")
    if path in known:
        return path
    return "/v1/edits/{id}" if path.startswith("/v1/edits/") else "other"


class Gate:
    """ASGI middleware: bearer keys, the body-size limit (body read whole, then replayed), metrics."""

    def __init__(self, app: Any, limits: Limits, engine: Engine) -> None:
        self.app, self.limits, self.engine = app, limits, engine

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route(scope["path"])
        status_seen = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
            await send(message)

        try:
            denied = self._denied(scope)
            if denied is not None:
                return await _send_json(counting_send, denied, error_body(denied, "missing or invalid bearer token "
                                        "(Authorization: Bearer <key>)", "authentication_error"),
                                        {"www-authenticate": "Bearer"})
            body = await self._read_body(scope, receive)
            if body is None:
                limit = self.limits.max_body_bytes
                return await _send_json(counting_send, 413, error_body(413, f"request body larger than {limit} bytes"))
            await self.app(scope, _replay(body, receive), counting_send)
        finally:
            self.engine.metrics.add("ultraedit_http_requests_total", route=route, code=str(status_seen["code"]))

    def _denied(self, scope: dict) -> int | None:
        path = scope["path"]
        wanted = self.limits.edit_key if path.startswith("/v1/edits") and self.limits.edit_key else self.limits.api_key
        if wanted is None:
            return None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        accepted = [k for k in (wanted, self.limits.edit_key) if k]  # the edit key opens everything
        ok = scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), k.encode()) for k in accepted)
        return None if ok else 401

    async def _read_body(self, scope: dict, receive: Callable) -> bytes | None:
        limit = self.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = {"done": False}

    async def replay() -> dict:
        if not sent["done"]:
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: the client's disconnect

    return replay


async def _send_json(send: Callable, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------
# request parsing


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ServeError(400, f"the body is not valid JSON: {err}") from None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ServeError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        (low < value if low_open else low <= value) and value <= high
    ):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ServeError(400, f"'{key}' must be a number in {bound}", param=key)
    return float(value)


def _int(body: dict, key: str, default: int | None, low: int, high: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ServeError(400, f"'{key}' must be an integer in [{low}, {high if high is not None else 'inf'}]", param=key)
    return value


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ServeError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
    return stops


_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "tools": None, "functions": None}


def sampling_params(body: dict, limits: Limits, default_max: int) -> SamplingParams:
    for key, default in _UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value != default and not (key == "logprobs" and value is False):
            raise ServeError(400, f"'{key}' is not supported by this server (only {key}={default})", param=key)
    key = "max_completion_tokens" if body.get("max_tokens") is None and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, key, min(default_max, limits.max_tokens), 1, limits.max_tokens)
    assert max_tokens is not None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=_stops(body),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        max_tokens_given=body.get(key) is not None,
    )


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ServeError(400, "'stream_options' must be an object", param="stream_options")
    return stream, bool(options.get("include_usage", False))


def _message_text(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ServeError(400, f"messages[{index}] must be an object with a 'role'", param=f"messages[{index}]")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise ServeError(400, f"messages[{index}].content: only text parts are supported", param=f"messages[{index}].content")
        content = "".join(parts)
    if not isinstance(content, str):
        raise ServeError(400, f"messages[{index}].content must be a string", param=f"messages[{index}].content")
    return {"role": message["role"], "content": content}


def chat_prompt(engine: Engine, messages: Any) -> list[int]:
    """Token ids of a conversation: the tokenizer's chat template with the assistant turn opened;
    a tokenizer without one gets the messages' texts joined by newlines (a base model continues it)."""
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "'messages' must be a non-empty list", param="messages")
    msgs = [_message_text(m, i) for i, m in enumerate(messages)]
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - e.g. a template that demands alternating roles
            raise ServeError(400, f"the model's chat template refused these messages: {err}", param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return engine.encode("\n".join(m["content"] for m in msgs))


def _check_prompt(ids: list[int], limits: Limits) -> list[int]:
    if not ids:
        raise ServeError(400, "the prompt tokenizes to no tokens", param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise ServeError(400, f"the prompt has {len(ids)} tokens; at most {limits.max_prompt_tokens}", param="prompt")
    return ids


# ---------------------------------------------------------------------------------------------
# the app


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    gate = asyncio.Semaphore(limits.max_concurrent)
    app = FastAPI(title="ultraedit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, limits=limits, engine=engine)
    model_name = engine.config.model_name

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:  # details go to the log only
        return JSONResponse(error_body(500, "internal error (see the server log)", "server_error"), status_code=500)

    @app.exception_handler(404)
    async def not_found(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(404, "no such endpoint", "not_found_error"), status_code=404)

    @app.exception_handler(405)
    async def bad_method(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(405, "method not allowed on this endpoint"), status_code=405)

    def run_blocking(prompt_ids: list[int], params: SamplingParams) -> tuple[str, str, int, int]:
        with engine.reading() as turn:
            deltas = list(engine.generate(prompt_ids, params))
        return "".join(d.text for d in deltas), deltas[-1].finish_reason or "stop", deltas[-1].completion_tokens, turn

    async def complete(prompt_ids: list[int], params: SamplingParams) -> tuple[str, str, int, int]:
        engine.metrics.add("ultraedit_prompt_tokens_total", len(prompt_ids))
        async with gate:
            return await run_in_threadpool(run_blocking, prompt_ids, params)

    def streamer(prompt_ids: list[int], params: SamplingParams, chunk: Callable[..., dict],
                 include_usage: bool) -> StreamingResponse:
        engine.metrics.add("ultraedit_prompt_tokens_total", len(prompt_ids))

        async def events() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()

            def produce() -> None:
                def put(item: tuple) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, item)

                try:
                    with engine.reading() as turn:
                        put(("turn", turn))
                        for delta in engine.generate(prompt_ids, params, cancel.is_set):
                            put(("delta", delta))
                except Exception as err:  # noqa: BLE001 - reported in the stream
                    put(("error", err))
                finally:
                    put(("end", None))

            async with gate:
                loop.run_in_executor(None, produce)
                turn, tokens = 0, 0
                try:
                    while True:
                        kind, item = await queue.get()
                        if kind == "turn":
                            turn = item
                            yield _sse(chunk(None, None, turn, first=True))
                        elif kind == "delta":
                            tokens = item.completion_tokens
                            yield _sse(chunk(item.text, item.finish_reason, turn))
                        elif kind == "error":
                            status = item.status if isinstance(item, ServeError) else 500
                            yield _sse(error_body(status, getattr(item, "message", "generation failed"), "server_error"))
                        else:
                            break
                    if include_usage:
                        yield _sse({**chunk(None, None, turn, usage_only=True),
                                    "usage": _usage(len(prompt_ids), tokens)})
                    yield b"data: [DONE]\n\n"
                finally:
                    cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.healthy:
            why = f": {engine.failure}" if engine.failure else ""
            return JSONResponse(error_body(503, f"the editing worker is not running{why}", "server_error"), 503)
        return JSONResponse({"status": "ok", "model": model_name, "turn": engine.served_turn,
                             "queued_requests": engine.queued_requests()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(engine.started), "owned_by": "ultraedit"}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _object(await _json_body(request))
        params = sampling_params(body, limits, limits.default_max_tokens)
        stream, include_usage = _stream_flags(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ServeError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        if stream and len(prompts) > 1:
            raise ServeError(400, "streaming takes a single prompt", param="prompt")
        encoded = [_check_prompt(engine.encode(p), limits) for p in prompts]
        for ids in encoded:
            engine.check_length(ids, params)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str | None, finish: str | None, turn: int, *, first: bool = False, usage_only: bool = False) -> dict:
            choices = [] if usage_only else [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "system_fingerprint": _fingerprint(turn), "choices": choices}

        if stream:
            return streamer(encoded[0], params, chunk, include_usage)
        choices, prompt_tokens, completion_tokens, turns = [], 0, 0, []
        for index, ids in enumerate(encoded):
            text, finish, n, turn = await complete(ids, params)
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
            prompt_tokens, completion_tokens = prompt_tokens + len(ids), completion_tokens + n
            turns.append(turn)
        return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": model_name,
                             "system_fingerprint": _fingerprint(turns[0]), "choices": choices,
                             "usage": _usage(prompt_tokens, completion_tokens), "ultraedit": {"turns": turns}})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _object(await _json_body(request))
        params = sampling_params(body, limits, limits.max_tokens)
        stream, include_usage = _stream_flags(body)
        ids = _check_prompt(chat_prompt(engine, body.get("messages")), limits)
        engine.check_length(ids, params)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str | None, finish: str | None, turn: int, *, first: bool = False, usage_only: bool = False) -> dict:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choices = [] if usage_only else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": _fingerprint(turn), "choices": choices}

        if stream:
            return streamer(ids, params, chunk, include_usage)
        text, finish, n, turn = await complete(ids, params)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model_name,
            "system_fingerprint": _fingerprint(turn),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": _usage(len(ids), n), "ultraedit": {"turns": [turn]},
        })

    @app.post("/v1/edits")
    async def post_edits(request: Request) -> JSONResponse:
        body = await _json_body(request)
        records = body.get("requests") if isinstance(body, dict) else body
        if isinstance(body, dict) and set(body) - {"requests"}:
            raise ServeError(400, f"unknown fields {sorted(set(body) - {'requests'})}; expected {{\"requests\": [...]}}")
        sub = await run_in_threadpool(engine.submit, records)
        return JSONResponse(engine.status(sub.id), status_code=202)

    @app.get("/v1/edits/{edit_id}")
    async def get_edit(edit_id: str) -> JSONResponse:
        return JSONResponse(engine.status(edit_id))

    @app.post("/v1/edits/revert")
    async def revert(request: Request) -> JSONResponse:
        body = _object(await _json_body(request))
        turns = _int(body, "turns", 1, 1, None)
        assert turns is not None
        result = await asyncio.wrap_future(engine.revert(turns))
        return JSONResponse(result)

    @app.get("/v1/state")
    async def state() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(engine.state_info))

    return app


def _fingerprint(turn: int) -> str:
    """``system_fingerprint``: which weights answered (the saved turn they hold)."""
    return f"ultraedit-turn-{turn}"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"
