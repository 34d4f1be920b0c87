"""A PyWorker: verifies the autoscaler's signature, then streams the backend's answer through.

Follows ../shared/vast-protocol.md section 2: the `{auth_data, payload}` body on POST (PUT and
PATCH too), the `serverless_*` query parameters on GET/DELETE/HEAD, 422/401/429 as the SDK
worker answers them, and chunk-by-chunk streaming.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from vespa.emulator.records import Records, WorkerRecord
from vespa.emulator.serving import MAX_BODY_BYTES, HttpServer
from vespa.emulator.signing import verify
from vespa.wire import AUTH_FIELDS, BODY_METHODS, QUERY_PREFIX, signed_message

if TYPE_CHECKING:
    from vespa.emulator import EndpointConfig

QUERY_METHODS = frozenset({"GET", "DELETE", "HEAD"})
# Auth fields that travel as raw strings in the query; the others are JSON-encoded numbers.
STRING_AUTH_FIELDS = frozenset({"endpoint", "signature", "url"})
# Knobs that change the worker's listening socket, applied as soon as they are set.
LISTENER_KNOBS = frozenset({"refuse", "blackhole"})
# Knobs where the worker itself cuts the connection: not a client disconnect.
OWN_ABORTS = frozenset({"die_after_chunks", "reset_before_headers"})
# Gen B's replay window (SDK backend.py): the last 100 reqnums, nothing older than max-100.
REPLAY_WINDOW = 100
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED_REQUEST = HOP_BY_HOP | {"host", "content-length"}
# aiohttp sets its own framing and identity on the response it writes.
NOT_FORWARDED_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}
# Headers aiohttp's client would add on its own; the backend must see only the client's.
AIOHTTP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


@dataclass
class WorkerFaults:
    """Failure knobs, changeable while the emulator runs. All off by default.

    refuse: connects are refused (port closed). blackhole: connects time out (see
    serving.Blackhole); refuse wins when both are set. reset_before_headers: the request is read
    and verified, then the connection is reset before any response byte (the backend never runs).
    status_framing: how the `status` answer is framed: "plain" (Content-Length, empty body, as
    the SDK worker answers), "chunked" (a small JSON body in chunks) or "sse" (text/event-stream,
    chunked): a proxy must recognise the status whatever the framing.
    """

    refuse: bool = False
    status: int | None = None
    die_after_chunks: int | None = None
    stall_s: float = 0.0
    reset_before_headers: bool = False
    blackhole: bool = False
    status_framing: str = "plain"
    _on_listener_change: Callable[[], None] | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # Changing the listener must happen now, not at the next request, so tests are not racy.
        hook = getattr(self, "_on_listener_change", None)
        if name in LISTENER_KNOBS and hook is not None:
            hook()


class Rejected(Exception):
    def __init__(self, status: int, body: Any = None) -> None:
        super().__init__(status)
        self.status, self.body = status, body

    def response(self) -> web.Response:
        if self.body is None:
            return web.Response(status=self.status)
        return web.json_response(self.body, status=self.status)


@dataclass
class _Call:
    """A verified request, ready to be forwarded."""

    auth_data: dict[str, Any]
    payload: Any
    query: list[tuple[str, str]]


class Worker:
    def __init__(
        self,
        worker_id: int,
        endpoint: EndpointConfig,
        public_key: rsa.RSAPublicKey,
        backend_url: str,
        session: aiohttp.ClientSession,
        records: Records,
        ssl_context: ssl.SSLContext | None = None,
        wan_delay_s: float = 0.0,
    ) -> None:
        self.id = worker_id
        self.generation = endpoint.generation
        self._endpoint = endpoint
        self._public_key = public_key
        self._backend_url = backend_url
        self._session = session
        self._records = records
        # With a WAN, url is the relay's: the autoscaler hands it out and signatures cover it.
        self._server = HttpServer(
            self._app(), cancel_on_disconnect=True, ssl_context=ssl_context, wan_delay_s=wan_delay_s
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._faults = WorkerFaults()
        self._max_reqnum = 0
        self._recent_reqnums: collections.deque[int] = collections.deque(maxlen=REPLAY_WINDOW)
        self._inflight_cost = 0.0
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def faults(self) -> WorkerFaults:
        return self._faults

    @faults.setter
    def faults(self, faults: WorkerFaults) -> None:
        self._faults._on_listener_change = None
        self._faults = faults
        faults._on_listener_change = self._listener_changed
        self._listener_changed()

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.url} gen {self.generation}>"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._server.start()
        self.faults = self._faults

    async def stop(self) -> None:
        self._faults._on_listener_change = None
        await self._server.stop()

    def _listener_changed(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            # The task's first step closes or opens the listener, before any client I/O runs.
            task = loop.create_task(self._apply_listener())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            asyncio.run_coroutine_threadsafe(self._apply_listener(), loop).result(timeout=10)

    async def _apply_listener(self) -> None:
        faults = self._faults
        # The black hole leaves the port before the server takes it back, and the other way round.
        await self._server.set_blackhole(faults.blackhole and not faults.refuse)
        await self._server.set_listening(not faults.refuse and not faults.blackhole)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = WorkerRecord(
            time=time.monotonic(),
            worker_id=self.id,
            method=request.method,
            path=request.path,
            raw_path=request.raw_path,
            query=dict(request.query),
            headers=dict(request.headers),
            connection=str(request.transport.get_extra_info("peername") if request.transport else ""),
        )
        # Published now and completed in place: every field is final before the client can
        # see the end of the response, so a test never races the record.
        self._records.worker.append(rec)
        try:
            call = await self._accept(request, rec)
            return await self._serve(request, rec, call)
        except Rejected as e:
            rec.status_code = e.status
            return e.response()
        except asyncio.CancelledError:
            # Cancelled only by a lost connection, unless a fault knob cut it on purpose.
            rec.client_disconnected = rec.fault not in OWN_ABORTS
            raise

    async def _accept(self, request: web.Request, rec: WorkerRecord) -> _Call:
        """Parse and verify, or raise Rejected with the real worker's answer."""
        if request.method in BODY_METHODS:
            call, bad_signature = await _parse_body(request), Rejected(401)
        elif request.method in QUERY_METHODS:
            call, bad_signature = _parse_query(request), Rejected(401, {"error": "invalid signature"})
        else:
            raise Rejected(405)
        rec.auth_data, rec.payload = call.auth_data, call.payload
        rec.signature_ok = self._verify(call.auth_data)
        if not rec.signature_ok:
            raise bad_signature
        return call

    def _verify(self, auth: dict[str, Any]) -> bool:
        # A valid signature for another worker's URL or endpoint must not open this one.
        if auth["url"] != self.url or auth["endpoint"] != self._endpoint.name:
            return False
        if not verify(self._public_key, signed_message(auth, self.generation), auth["signature"]):
            return False
        return self._take_reqnum(auth["reqnum"])

    def _take_reqnum(self, reqnum: Any) -> bool:
        if not isinstance(reqnum, int) or isinstance(reqnum, bool):
            return False
        if self.generation == "B":
            if reqnum < self._max_reqnum - REPLAY_WINDOW or reqnum in self._recent_reqnums:
                return False
            self._recent_reqnums.append(reqnum)
        self._max_reqnum = max(reqnum, self._max_reqnum)
        return True

    async def _serve(self, request: web.Request, rec: WorkerRecord, call: _Call) -> web.StreamResponse:
        faults = self._faults
        if faults.status is not None:
            rec.fault = "status"
            if faults.status_framing == "plain":
                raise Rejected(faults.status)
            rec.status_code = faults.status
            return await _framed_status(request, faults.status, faults.status_framing)
        if faults.reset_before_headers:
            rec.fault = "reset_before_headers"
            _abort(request, reset=True)
            return web.Response()  # never written: the transport is gone
        if self._inflight_cost / self._endpoint.max_perf > self._endpoint.max_queue_time:
            raise Rejected(429)
        cost = _number(call.auth_data["cost"])
        self._inflight_cost += cost
        try:
            if faults.stall_s > 0:
                rec.fault = "stall"
                await asyncio.sleep(faults.stall_s)
            return await self._forward(request, rec, call)
        finally:
            self._inflight_cost -= cost

    async def _forward(self, request: web.Request, rec: WorkerRecord, call: _Call) -> web.StreamResponse:
        headers = forwarded_request_headers(request.headers)
        data = None
        if request.method in BODY_METHODS:
            headers["Content-Type"] = "application/json"
            data = json.dumps(call.payload).encode()
        try:
            upstream_cm = self._session.request(
                request.method,
                self._backend_url + request.path,
                params=call.query,
                headers=headers,
                data=data,
                allow_redirects=False,
                skip_auto_headers=AIOHTTP_AUTO_HEADERS,
            )
            async with upstream_cm as upstream:
                rec.reached_backend = True
                return await self._relay(request, rec, upstream)
        except aiohttp.ClientError:
            raise Rejected(500) from None  # the backend failed before answering: SDK's empty 500

    async def _relay(
        self, request: web.Request, rec: WorkerRecord, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in NOT_FORWARDED_RESPONSE:
                resp.headers.add(name, value)
        rec.status_code = upstream.status
        await resp.prepare(request)
        if self._dies_now(request, rec):
            return resp
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
                rec.chunks_sent += 1
                if self._dies_now(request, rec):
                    return resp
        except aiohttp.ClientError:
            # The backend broke mid-stream: break the client's connection too, as a proxy must.
            _abort(request)
            return resp
        await resp.write_eof()
        return resp

    def _dies_now(self, request: web.Request, rec: WorkerRecord) -> bool:
        limit = self._faults.die_after_chunks
        if limit is None or rec.chunks_sent < limit:
            return False
        rec.fault = "die_after_chunks"
        _abort(request)
        return True


async def _framed_status(request: web.Request, status: int, framing: str) -> web.StreamResponse:
    """A fault status sent chunked, or as an SSE stream, instead of with a Content-Length."""
    sse = framing == "sse"
    if framing not in ("chunked", "sse"):
        raise ValueError(f"status_framing must be plain, chunked or sse, got {framing!r}")
    content_type = "text/event-stream" if sse else "application/json"
    resp = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    error = json.dumps({"error": f"fault status {status}"}).encode()
    for part in ((b"data: " + error + b"\n\n",) if sse else (error[:5], error[5:])):
        await resp.write(part)
    await resp.write_eof()
    return resp


def _abort(request: web.Request, reset: bool = False) -> None:
    """Drop the connection mid-response, so the client sees a truncated body, not an end.
    With reset, an RST rather than a FIN: what a crashing worker process sends."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if reset and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _parse_body(request: web.Request) -> _Call:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(422, {"error": "invalid JSON"}) from None
    if not isinstance(body, dict):
        body = {}
    missing = {k: "field missing" for k in ("auth_data", "payload") if k not in body}
    if missing:
        raise Rejected(422, missing)
    auth = body["auth_data"] if isinstance(body["auth_data"], dict) else {}
    missing_auth = {k: "missing parameter" for k in AUTH_FIELDS if k not in auth}
    if missing_auth:
        raise Rejected(422, {"auth_data": missing_auth})
    if body.get("session_id") is not None:
        # The emulator has no sessions, so every session id is unknown (SDK: 410).
        raise Rejected(410, {"error": "invalid session"})
    return _Call(auth_data=auth, payload=body["payload"], query=[])


def _parse_query(request: web.Request) -> _Call:
    names = [QUERY_PREFIX + k for k in AUTH_FIELDS]
    if any(name not in request.query for name in names):
        message = f"{request.method} requests require auth_data in query params ({', '.join(names)})"
        raise Rejected(400, {"error": message})
    auth = {k: _query_value(k, request.query[QUERY_PREFIX + k]) for k in AUTH_FIELDS}
    query = [(k, v) for k, v in request.query.items() if not k.startswith(QUERY_PREFIX)]
    return _Call(auth_data=auth, payload=dict(query), query=query)


def _query_value(name: str, raw: str) -> Any:
    """Inverse of wire.auth_query: numbers are JSON, so "256" and "256.0" keep their types."""
    if name in STRING_AUTH_FIELDS:
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw  # cannot match a signature; verification rejects it
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else raw


def _number(value: Any) -> float:
    # Gen C does not sign cost, so it may be anything; only numbers count toward the queue.
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def forwarded_request_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The client's end-to-end headers, so custom ones (X-Trace-Id, ...) reach the backend."""
    listed = {h.strip().lower() for h in headers.get("Connection", "").split(",")}
    drop = NOT_FORWARDED_REQUEST | listed
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
