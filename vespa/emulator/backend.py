"""An OpenAI-style model server: what a worker's backend (vLLM, TGI, ...) answers.

Tokens are deterministic ("tok0 tok1 ...") so tests can compare bodies, and paced by the
emulator config read at each token, so timing can be changed while a stream runs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from aiohttp import web

from vespa.emulator.serving import MAX_BODY_BYTES

if TYPE_CHECKING:
    from vespa.emulator import EmulatorConfig

MODEL_ID = "vespa-emulator/tiny-model"
DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_LIMIT = 100_000
LARGE_CHUNK = 64 * 1024
LARGE_PATTERN = b"0123456789abcdef"


def token_text(i: int) -> str:
    """The i-th generated token; joined they read "tok0 tok1 tok2"."""
    return f"tok{i}" if i == 0 else f" tok{i}"


def completion_text(n: int) -> str:
    return "".join(token_text(i) for i in range(n))


def large_body(size: int) -> bytes:
    """The body of `GET /large?size=N`, so tests can check every byte arrived in order."""
    return (LARGE_PATTERN * (size // len(LARGE_PATTERN) + 1))[:size]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def response(self) -> web.Response:
        error = {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}
        return web.json_response({"error": error}, status=400)


class Backend:
    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/ndjson", self._ndjson)
        app.router.add_post("/chunked", self._chunked)
        app.router.add_get("/large", self._large)
        app.router.add_route("*", "/echo{tail:(/.*)?}", self._echo)
        return app

    async def _tokens(self, n: int) -> AsyncIterator[int]:
        await asyncio.sleep(self._config.ttft_ms / 1000)
        for i in range(n):
            if i:
                rate = self._config.tokens_per_s
                await asyncio.sleep(1 / rate if rate > 0 else 0)
            yield i

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "vespa-emulator"}
        return web.json_response({"object": "list", "data": [model]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            prompt_tokens = _prompt_tokens(body, chat)
            n = _max_tokens(body)
        except BadRequest as e:
            return e.response()
        gen = _Generation(chat, str(body.get("model") or MODEL_ID), n, prompt_tokens)
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream_sse(request, gen, include_usage)
        async for _ in self._tokens(n):
            pass
        return web.json_response(gen.whole())

    async def _stream_sse(
        self, request: web.Request, gen: _Generation, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async for i in self._tokens(gen.n):
            if i == 0 and gen.chat:
                await resp.write(_sse(gen.chunk(delta={"role": "assistant", "content": ""})))
            await resp.write(_sse(gen.token_chunk(i)))
        await resp.write(_sse(gen.final_chunk()))
        if include_usage:
            await resp.write(_sse(gen.usage_chunk()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _ndjson(self, request: web.Request) -> web.StreamResponse:
        try:
            n = _max_tokens(await _json_body(request))
        except BadRequest as e:
            return e.response()
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async for i in self._tokens(n):
            await resp.write(json.dumps({"index": i, "text": token_text(i)}).encode() + b"\n")
        await resp.write(b'{"done": true}\n')
        await resp.write_eof()
        return resp

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        try:
            n = _max_tokens(await _json_body(request))
        except BadRequest as e:
            return e.response()
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for i in self._tokens(n):
            await resp.write(token_text(i).encode())
        await resp.write_eof()
        return resp

    async def _large(self, request: web.Request) -> web.StreamResponse:
        try:
            size = int(request.query["size"])
        except (KeyError, ValueError):
            return BadRequest("size must be given as an integer number of bytes", "size").response()
        if size < 0:
            return BadRequest("size must not be negative", "size").response()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        body = large_body(size)
        for start in range(0, size, LARGE_CHUNK):
            await resp.write(body[start : start + LARGE_CHUNK])
        await resp.write_eof()
        return resp

    async def _echo(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            payload: Any = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            payload = raw.decode("utf-8", "replace")
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "query_string": request.query_string,
                "headers": dict(request.headers),
                "payload": payload,
            }
        )


class _Generation:
    """One completion's identity and the OpenAI objects describing it."""

    def __init__(self, chat: bool, model: str, n: int, prompt_tokens: int) -> None:
        self.chat, self.model, self.n, self.prompt_tokens = chat, model, n, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.n,
            "total_tokens": self.prompt_tokens + self.n,
        }

    def whole(self) -> dict[str, Any]:
        text = completion_text(self.n)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "length",
            }
            obj = self._envelope("chat.completion", [choice])
        else:
            obj = self._envelope(
                "text_completion", [{"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}]
            )
        return obj | {"usage": self.usage()}

    def chunk(
        self, delta: dict[str, Any] | None = None, text: str = "", finish_reason: str | None = None
    ) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def token_chunk(self, i: int) -> dict[str, Any]:
        return self.chunk(delta={"content": token_text(i)}, text=token_text(i))

    def final_chunk(self) -> dict[str, Any]:
        return self.chunk(finish_reason="length")

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, []) | {"usage": self.usage()}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _max_tokens(body: dict[str, Any]) -> int:
    n = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if n is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"max_tokens must be an integer from 0 to {MAX_TOKENS_LIMIT}", "max_tokens")
    return n


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    """Whitespace-separated words: a stand-in for a tokenizer, good enough for `usage`."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a non-empty list of message objects", "messages")
        return sum(len(str(m.get("content") or "").split()) for m in messages)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and prompt:
        return sum(len(str(p).split()) for p in prompt)
    raise BadRequest("prompt must be a string or a non-empty list", "prompt")
