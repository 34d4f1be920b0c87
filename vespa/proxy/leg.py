"""The worker leg: routes, signs and forwards each request over one shared pool of warm worker
connections, in a process of its own.

mitmproxy keeps its server connections per client connection (`HttpLayer.connections`), so a
new client connection paid a TCP and a TLS handshake to the worker every time, and nothing was
shared between clients. Here, one aiohttp session holds keep-alive connections to every worker
for every client, TLS-verified with Vast's root CA. The addon points each flow at this leg on
loopback (plain HTTP); the leg answers with ordinary HTTP responses, its own JSON errors
included, so mitmproxy never needs to know a worker, a timeout or a signature. The signed
request exists only here, never on a flow that mitmweb or `-w` could show.

Per request: the endpoint (header set by the addon), the cost (X-Serverless-Cost), the body
checked (size, decoding, strict UTF-8 JSON), `/route/` until a worker is ready, then the signed
request to that worker. A worker that cannot be connected to (nothing was sent) is routed
around with the same `request_idx`; after the first byte went out nothing is resent.

Started by `Leg.start()` (vespa/proxy/addon.py) as `python -m vespa.proxy.leg`: the config, keys included,
arrives as one JSON line on stdin (never in arguments or the environment), the leg answers
with its port on stdout, then sends its log records there as JSON lines. It exits when stdin
closes, so it never outlives the proxy that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from vespa import wire
from vespa.errors import (
    VespaError,
    WorkerBroke,
    WorkerConnectTimeout,
    WorkerFirstByteTimeout,
    WorkerIdleTimeout,
    WorkerRejectedSignature,
    WorkerTlsFailed,
    WorkerUnavailable,
)
from vespa.proxy import endpoints, fallback
from vespa.proxy.body import check_json, decode, read_bounded
from vespa.proxy.routing import Router, RouterSettings
from vespa.proxy.workerca import WorkerTrust, is_verify_failure

log = logging.getLogger("vespa.proxy.leg")

FACTS_HEADER = "X-Vespa-Facts"  # routing facts for the addon (log, metrics, mitmweb); stripped there
HEALTH_PATH = "/_vespa/health"
START_TIMEOUT_S = 20.0

# The client's own credentials (for its OpenAI SDK, say): a rented GPU never sees them, and the
# addon masks them on the flow so mitmweb and -w files never hold them either.
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token",
    "openai-api-key", "anthropic-api-key",
})
# One hop only, or Vespa's own: never forwarded.
DROP_REQUEST = CREDENTIAL_HEADERS | {
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "host", "content-length", "x-serverless-cost", "content-encoding", "expect",
    endpoints.HEADER.lower(),
}
DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length",
})
# Longest request line or header field the addon lets through (it answers 414/431 past it): Vast's
# PyWorker and the leg parse HTTP with aiohttp, which refuses lines over 8190 bytes with a
# plain-text 400. The leg's parser takes a little more, so that 400 never comes from the leg.
MAX_LINE = 8000
LEG_MAX_HEADERS = 1 << 16  # from the addon only, which refuses more than vespa_max_headers itself


@dataclass(frozen=True, slots=True)
class EndpointKey:
    name: str
    api_key: str = field(repr=False)
    key_source: str = "env VAST_API_KEY"


@dataclass(frozen=True, slots=True)
class LegConfig:
    """Everything the leg needs, sent as one JSON line on its stdin."""

    autoscaler_url: str
    endpoints: tuple[EndpointKey, ...]  # a key for every endpoint of the catalog
    catalog: dict[str, Any] = field(default_factory=dict)  # endpoints.Catalog.to_json(); empty: the keys' names
    route_deadline_s: float = 600.0
    route_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 300.0
    idle_timeout_s: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    console_url: str = "https://console.vast.ai"
    worker_ca: str | None = None  # a CA file the user chose instead of the download
    trusted_ca: str | None = None  # ssl_verify_upstream_trusted_ca: the user's bundle, used alone
    insecure: bool = False  # ssl_insecure: worker certificates not verified
    pool_per_worker: int = 100
    pool_idle_s: float = 30.0
    log_level: int = logging.INFO
    via: str = "1.1 vespa"  # added to every worker request; the addon spots its own coming back


    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> LegConfig:
        raw = json.loads(line)
        raw["endpoints"] = tuple(EndpointKey(**e) for e in raw["endpoints"])
        return cls(**raw)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A worker's response headers, and the routing facts that got them."""

    response: aiohttp.ClientResponse
    facts: dict[str, Any]


class WorkerLeg:
    """The aiohttp server the addon sends flows to, and the worker pool behind it."""

    def __init__(self, config: LegConfig) -> None:
        self.config = config
        self.routers = {
            ep.name: Router(RouterSettings(
                autoscaler_url=config.autoscaler_url, endpoint=ep.name, api_key=ep.api_key,
                key_source=ep.key_source, deadline_s=config.route_deadline_s,
                call_timeout_s=config.route_timeout_s,
            ))
            for ep in config.endpoints
        }
        self.catalog = (endpoints.from_json(config.catalog) if config.catalog
                        else endpoints.from_names(ep.name for ep in config.endpoints))
        missing = [name for name in self.catalog.names if name not in self.routers]
        if missing:
            raise ValueError(f"no key for endpoint(s) {', '.join(missing)}")
        self.cold = fallback.ColdStarts(self)
        self.on_state: Callable[[str, dict[str, Any]], None] = lambda name, state: None
        self.states: dict[str, str] = {}
        self.started = int(time.time())
        self.trust = WorkerTrust(config.console_url, Path(config.worker_ca) if config.worker_ca else None)
        self._ssl: dict[Path | None, ssl.SSLContext] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.in_flight = 0

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=self.config.pool_per_worker,
                keepalive_timeout=self.config.pool_idle_s,
                # Workers are few and their addresses fixed for their life; skip a lookup per connect.
                ttl_dns_cache=300,
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            auto_decompress=False,  # the worker's bytes pass through as they came
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        # auto_decompress off: the body's Content-Encoding is undone in body.decode, bounded (a gzip
        # bomb), and once only (aiohttp's own decoding made every gzip body fail there).
        # max_headers: aiohttp's default (128) answered plain-text 400s below vespa_max_headers (256),
        # which the addon enforces, with Vespa's 431, before a request gets here.
        server = web.Server(self.handle, handler_cancellation=True, access_log=None, auto_decompress=False,
                            max_headers=LEG_MAX_HEADERS, max_line_size=MAX_LINE + 1024, max_field_size=MAX_LINE + 1024)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        await self.cold.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for router in self.routers.values():
            await router.close()
        if self._session is not None:
            await self._session.close()

    # --- one request ------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == HEALTH_PATH:
            return await self.health()
        self.in_flight += 1
        try:
            return await self._handle(request)
        except VespaError as e:
            return _error_response(e)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        payload, body = await self._payload(request) if request.method in wire.BODY_METHODS else (b"", None)
        if len(self.catalog) > 1 and request.method in ("GET", "HEAD") and request.path.rstrip("/") == "/v1/models":
            # Answered here: no route call, no worker woken, every endpoint's models listed.
            return web.json_response(endpoints.models_list(self.catalog, self.started))
        model = body.get("model") if isinstance(body, dict) else None
        spec = endpoints.choose(self.catalog, request.headers.get(endpoints.HEADER),
                                model if isinstance(model, str) else None)
        try:
            forwarded = await self.cold.forward(spec, fallback.Outgoing(request, payload, body))
        except VespaError as e:
            return _error_response(e, {"endpoint": spec.name})
        return await self._relay(request, forwarded)

    async def _payload(self, request: web.BaseRequest) -> tuple[bytes, Any]:
        """The body as the worker will get it, and parsed (None when empty): parsed once."""
        limit = self.config.max_body_bytes
        raw = await read_bounded(request.content, limit)
        payload = decode(raw, request.headers.get("content-encoding", ""), limit)
        return payload, check_json(payload) if payload.strip() else None

    async def forward(self, spec: endpoints.EndpointSpec, out: fallback.Outgoing,
                      claim: fallback.Claim | None = None) -> Forwarded | None:
        """Route, then send the signed request; a worker that refuses the connection (or is full)
        is routed around. With a `claim` that was withdrawn (the request went to a fallback),
        the route call only keeps the endpoint's demand visible and nothing is sent: None."""
        request = out.request
        cost = endpoints.workload(request.headers.get("x-serverless-cost"),
                                  out.body if isinstance(out.body, dict) else None, spec.cost)
        headers = _worker_headers(request.headers)
        headers.add("Via", self.config.via)

        async def send(ready: wire.RouteReady) -> aiohttp.ClientResponse | None:
            if claim is not None and not claim.take():
                return None
            url = URL(ready.url + request.raw_path, encoded=True)
            if request.method in wire.BODY_METHODS:
                headers["Content-Type"] = "application/json"
                body: bytes | None = wire.worker_body(ready.auth_data, out.payload)
            else:
                url = url.with_query(
                    [(k, v) for k, v in url.query.items() if not k.startswith(wire.QUERY_PREFIX)]
                    + wire.auth_query(ready.auth_data)
                )
                body = None
            response = await self._send(request.method, url, headers, body)
            if response.status == 429:  # queue full: refused before any work, so another worker may take it
                await _drain(response)
                response.release()
                raise WorkerUnavailable(
                    f"the worker {ready.url} is full (429); the request was not processed and may be retried"
                )
            return response

        routed, response = await self.routers[spec.name].route(cost, send)
        self.set_state(spec.name, "ready")
        if response is None:
            return None
        ready = routed.ready
        return Forwarded(response, {
            "endpoint": spec.name,
            "worker": ready.url,
            "request_idx": ready.request_idx,
            "cost": ready.auth_data.get("cost", cost),
            "route_ms": round(routed.route_ms, 1),
            "polls": routed.polls,
            "retries": routed.retries,
        })

    def set_state(self, name: str, state: str, detail: str = "") -> None:
        """Each endpoint's state for /_vespa/health and vespa.status; told to the addon on change."""
        if self.states.get(name) != state:
            self.states[name] = state
            self.on_state(name, {"state": state, "detail": detail, "since": time.time()})

    async def _send(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes | None) -> aiohttp.ClientResponse:
        assert self._session is not None
        worker = f"{url.scheme}://{url.host}:{url.port}"
        ssl_context = await self._ssl_for(url)
        try:
            async with asyncio.timeout(self.config.first_byte_timeout_s):
                return await self._session.request(
                    method, url, headers=headers, data=body, ssl=ssl_context, allow_redirects=False,
                )
        except aiohttp.ConnectionTimeoutError:  # before TimeoutError: it is one
            raise WorkerConnectTimeout(
                f"no connection to the worker {worker} within {self.config.connect_timeout_s:g} s; "
                "the request was not processed and may be retried"
            ) from None
        except TimeoutError:
            raise WorkerFirstByteTimeout(
                f"the worker {worker} sent no response within {self.config.first_byte_timeout_s:g} s "
                "(vespa_first_byte_timeout_s)"
            ) from None
        except aiohttp.ClientConnectorCertificateError as e:
            self._refresh_ca()
            raise WorkerTlsFailed(f"the worker's TLS certificate was refused ({e.certificate_error}); nothing was sent to {worker}") from None
        except aiohttp.ClientConnectorError as e:
            if is_verify_failure(str(e)):
                self._refresh_ca()
                raise WorkerTlsFailed(f"the worker's TLS certificate was refused ({e}); nothing was sent to {worker}") from None
            if e.os_error.errno == 24:
                raise WorkerUnavailable(
                    f"the proxy has no file descriptor left to connect to {worker} (Too many open files); "
                    "the request was not processed and may be retried",
                    hint="Too many requests at once for this process's open-file limit (ulimit -n); retry shortly.",
                ) from None
            raise WorkerUnavailable(
                f"could not connect to the worker {worker} ({e.os_error.strerror or e}); "
                "the request was not processed and may be retried"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise WorkerBroke(f"the connection to the worker {worker} failed ({type(e).__name__}: {e})") from None

    async def _ssl_for(self, url: URL) -> ssl.SSLContext | bool:
        if url.scheme != "https":
            return True
        if self.config.insecure:
            return False
        bundle = Path(self.config.trusted_ca) if self.config.trusted_ca else await self.trust.ensure()
        if (context := self._ssl.get(bundle)) is None:
            context = ssl.create_default_context(cafile=str(bundle))
            # Python 3.13 turns on X509 strict mode, which refuses Vast's root CA (no keyUsage);
            # OpenSSL's default checks (what mitmproxy applied before) accept it.
            context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
            self._ssl = {bundle: context}
        return context

    def _refresh_ca(self) -> None:
        if not self.config.trusted_ca:
            self.trust.refresh_soon()  # a rotated CA is picked up by the next request

    async def _relay(self, request: web.BaseRequest, forwarded: Forwarded) -> web.StreamResponse:
        """The worker's answer to the addon, chunk by chunk as it comes (never buffered)."""
        upstream, facts = forwarded.response, forwarded.facts
        try:
            if upstream.status == 401:
                await _drain(upstream)  # whatever its framing: chunked, SSE, or a plain body
                raise WorkerRejectedSignature(f"the worker {facts['worker']} rejected the routing signature (401)")
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in DROP_RESPONSE:
                    response.headers.add(name, value)
            if upstream.content_length is not None and upstream.content_length <= self.config.max_body_bytes:
                response.content_length = upstream.content_length
            response.headers[FACTS_HEADER] = json.dumps({**facts, "status": upstream.status})
            sse = response.headers.get("content-type", "").startswith("text/event-stream")
            await response.prepare(request)
            try:
                await self._pipe(upstream, response, facts["worker"])
            except VespaError as e:
                # Headers are out: no clean end, so no client mistakes the cut answer for a whole one.
                log.warning("vespa: %s %s -> %s: %s", request.method, request.path, e.type, e.message)
                if sse:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await response.write(sse_error_event(e))
                if request.transport is not None:
                    request.transport.abort()
            return response
        finally:
            upstream.release()

    async def _pipe(self, upstream: aiohttp.ClientResponse, response: web.StreamResponse, worker: str) -> None:
        idle = self.config.idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await upstream.content.readany()
            except TimeoutError:
                raise WorkerIdleTimeout(
                    f"the worker's stream was silent for {idle:g} s (vespa_idle_timeout_s); the answer is incomplete"
                ) from None
            except (aiohttp.ClientError, OSError) as e:
                raise WorkerBroke(
                    f"the worker {worker}'s stream broke before its end ({type(e).__name__}: {e}); the answer is incomplete",
                    hint="Do not use the partial answer as if it were complete; send the request again.",
                ) from None
            if not chunk:
                break
            await response.write(chunk)
        await response.write_eof()

    async def health(self) -> web.Response:
        """The autoscaler as each endpoint's router sees it (one shared probe per few seconds)."""
        report: dict[str, Any] = {"status": "ok", "endpoints": {}}
        status = 200
        for name, router in self.routers.items():
            start = time.monotonic()
            try:
                code = await router.probe(3.0)
                entry: dict[str, Any] = {"reachable": code < 500, "latency_ms": round((time.monotonic() - start) * 1000, 1)}
                if code >= 500:
                    entry["error"] = f"GET /pubkey/ answered {code}"
            except (aiohttp.ClientError, TimeoutError, OSError, VespaError) as e:
                entry = {"reachable": False, "error": f"{type(e).__name__} {e}".strip()}
            entry["state"] = self.states.get(name, "unknown")
            report["endpoints"][name] = entry
            if not entry["reachable"]:
                status = 503
                report["status"] = "unavailable"
                report["reason"] = f"cannot reach the autoscaler at {self.config.autoscaler_url}: {entry['error']}"
        report["autoscaler"] = self.config.autoscaler_url
        report["in_flight"] = self.in_flight
        return web.json_response(report, status=status)


# --- pure helpers ---------------------------------------------------------------------------
def _error_response(err: VespaError, facts: dict[str, Any] | None = None) -> web.Response:
    headers = err.headers()
    if facts:
        headers[FACTS_HEADER] = json.dumps(facts)
    return web.Response(status=err.status, body=err.body(), headers=headers)


def sse_error_event(err: VespaError) -> bytes:
    return b"event: error\ndata: " + json.dumps(err.to_json()).encode() + b"\n\n"


def _worker_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and credentials: one pass, duplicates kept."""
    connection_tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname not in DROP_REQUEST and lname not in connection_tokens:
            out.add(name, value)
    return out


async def _drain(upstream: aiohttp.ClientResponse, limit: int = 64 * 1024) -> None:
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        async with asyncio.timeout(5):
            await upstream.content.read(limit)


# --- running it ----------------------------------------------------------------------------
class Leg:
    """The addon's handle on its worker leg: a child process (default), or a thread of the
    proxy's own process (`vespa_leg=thread`, for measuring the two against each other)."""

    def __init__(
        self,
        config: LegConfig,
        mode: str = "process",
        on_log: Callable[[int, str, str], None] | None = None,
        on_state: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.mode = mode
        self.on_log = on_log or _default_log
        self.on_state = on_state or (lambda name, state: None)
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.mode == "thread":
            return self._start_thread()
        vespa_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [vespa_root, os.environ.get("PYTHONPATH")]))}
        # The keys arrive on stdin, and only the endpoint keys: none stays in the environment.
        key_vars = {"VAST_API_KEY", "VAST_ACCOUNT_KEY", "VESPA_ENDPOINT_KEYS"}
        key_vars |= {spec["api_key_env"] for spec in self.config.catalog.get("endpoints", ()) if spec.get("api_key_env")}
        for name in key_vars:
            env.pop(name, None)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vespa.proxy.leg"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, close_fds=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(self.config.to_json().encode() + b"\n")
        self._proc.stdin.flush()
        ports: queue.Queue[int | str] = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc, ports), name="vespa-leg-log", daemon=True).start()
        try:
            port = ports.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            port = f"nothing within {START_TIMEOUT_S:g} s"
        if not isinstance(port, int):
            self.stop()
            raise RuntimeError(f"the worker leg did not start ({port})")
        self.port = port

    def _start_thread(self) -> None:
        ready: "asyncio.Future[int] | None" = None
        started = threading.Event()
        holder: dict[str, Any] = {}

        def main() -> None:
            loop = asyncio.new_event_loop()
            holder["loop"] = loop
            leg = WorkerLeg(self.config)
            leg.on_state = self.on_state
            try:
                holder["port"] = loop.run_until_complete(leg.start())
            except BaseException as e:  # reported to start()
                holder["error"] = e
                started.set()
                return
            started.set()
            stop = holder["stop_event"] = asyncio.Event()
            loop.run_until_complete(stop.wait())
            loop.run_until_complete(leg.close())
            loop.close()

        del ready
        self._thread = threading.Thread(target=main, name="vespa-leg", daemon=True)
        self._thread.start()
        started.wait(START_TIMEOUT_S)
        if "error" in holder or "port" not in holder:
            raise RuntimeError(f"the worker leg did not start: {holder.get('error')!r}")
        self.port = holder["port"]
        self._stop = lambda: holder["loop"].call_soon_threadsafe(holder["stop_event"].set)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]  # the leg exits when its stdin closes
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _pump(self, proc: subprocess.Popen, ports: queue.Queue[int | str]) -> None:
        """The leg's stdout: first its port, then its log records, logged here."""
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                rec = json.loads(line)
                if "port" in rec:
                    ports.put(int(rec["port"]))
                elif "endpoint_state" in rec:
                    self.on_state(str(rec["endpoint_state"]), dict(rec["state"]))
                else:
                    self.on_log(int(rec["level"]), str(rec["name"]), str(rec["msg"]))
            except (ValueError, KeyError, TypeError):
                self.on_log(logging.WARNING, "vespa.proxy.leg", line.decode(errors="replace").rstrip())
        ports.put(f"it exited with code {proc.wait()}")


def _default_log(level: int, name: str, msg: str) -> None:
    logging.getLogger(name).log(level, "%s", msg)


class _JsonLines(logging.Handler):
    """Log records to the parent, one JSON line each: it logs them through mitmproxy."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _tell_parent({"level": record.levelno, "name": record.name, "msg": record.getMessage()})
        except Exception:
            self.handleError(record)


def _tell_parent(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """At the open-file limit, asyncio's accept loop logs "socket.accept() out of system
    resource" once per pending connection and retries each a second later (no `return` after
    EMFILE in `_accept_connection`, CPython 3.11-3.13): measured 155,706 lines in 20 s, each
    a JSON line to the proxy. One warning per 10 s says it as well."""
    last = [0.0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            now = time.monotonic()
            if now - last[0] >= 10:
                last[0] = now
                log.warning("vespa: the worker leg is at its open-file limit (%s); new connections wait",
                            context.get("exception"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _serve(config: LegConfig) -> None:
    leg = WorkerLeg(config)
    leg.on_state = lambda name, state: _tell_parent({"endpoint_state": name, "state": state})
    loop = asyncio.get_running_loop()
    _quiet_accept_errors(loop)
    port = await leg.start()
    _tell_parent({"port": port})
    try:
        # The parent holds our stdin: EOF means it is gone (or stopped us), so we go too.
        await loop.run_in_executor(None, sys.stdin.buffer.read)
    finally:
        await leg.close()


def main() -> None:
    config = LegConfig.from_json(sys.stdin.buffer.readline().decode())
    handler = _JsonLines()
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.log_level)
    # aiohttp's own access and server logs are noise here; errors still reach the parent.
    logging.getLogger("aiohttp").setLevel(max(config.log_level, logging.WARNING))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
