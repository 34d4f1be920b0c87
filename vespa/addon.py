"""The mitmproxy addon: every request to the proxy becomes a routed, signed Vast.ai call.

Per flow: `requestheaders` starts the route call (it overlaps the body upload), `request`
rewrites the flow to the worker with the signed body, `responseheaders` turns on streaming,
and `response`/`error` put the client's own request back, so mitmweb, `-w` files and replays
see what the user sent and never the route signature.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass

from mitmproxy import command, connection, ctx, exceptions, http

from vespa import errorpage, health, inspection, limits, wire
from vespa.errors import (
    BadBody,
    NotRouted,
    ProxyNotConfigured,
    VespaError,
    WorkerRejectedSignature,
    WorkerUnavailable,
)
from vespa.metrics import Telemetry
from vespa.routing import Routed, Router, RouterSettings
from vespa.watchdog import Watchdog
from vespa.workercheck import WorkerCheck
from vespa.workerca import WorkerTls, explain_tls

log = logging.getLogger("vespa")

# Headers that describe one hop, or carry the client's credentials: a rented GPU must never
# see the client's Authorization or cookies.
DROP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization", "authorization", "cookie",
    "x-serverless-cost", "content-encoding",
})
STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")
OPTIONS = frozenset({
    "vespa_endpoint", "vespa_autoscaler_url", "vespa_default_cost", "vespa_route_deadline_s", "vespa_worker_trust_s",
}) | {
    name for name, _, _ in limits.OPTIONS
}


@dataclass(slots=True)
class Flight:
    """What Vespa holds for one request while it is in flight."""

    flow: http.HTTPFlow
    route: asyncio.Task[Routed]
    original: http.Request | None = None
    tap: inspection.Tap | None = None
    watchdog: Watchdog | None = None


class Vespa:
    def __init__(self, api_key: str | None = None, key_source: str | None = None) -> None:
        # Given by the Python API (vespa.api): the key stays in this object instead of
        # os.environ, where every child process of the caller would inherit it.
        self._api_key = api_key
        self._key_source = key_source
        self.telemetry = Telemetry()
        self.health = health.Health(self.telemetry)
        # A sub-addon: mitmproxy runs its hooks right after ours, for metrics and the request log.
        self.addons = [self.telemetry]
        self.router: Router | None = None
        self.default_cost = 1.0
        self.limits = limits.Limits()
        self.check: WorkerCheck | None = None
        self.capture_bytes = 0
        self.flights: dict[str, Flight] = {}
        self._closing: set[asyncio.Task] = set()
        self.worker_tls = WorkerTls()

    # --- lifecycle (kept synchronous: mitmproxy's script loader needs it) -----------------------
    def load(self, loader) -> None:
        # JSON instead of mitmproxy's HTML error page; undone in done() (see vespa/errorpage.py).
        errorpage.install()
        errorpage.register(explain_tls)
        limits.add_options(loader)
        self.worker_tls.add_options(loader)
        loader.add_option(
            "vespa_endpoint", str, "",
            "Name of the Vast.ai Serverless endpoint to call (default: env VAST_ENDPOINT). "
            "The endpoint key is read from env VAST_API_KEY, never from an option.",
        )
        loader.add_option(
            "vespa_autoscaler_url", str, "https://run.vast.ai",
            "Base URL of the Vast autoscaler that answers /route/.",
        )
        loader.add_option(
            "vespa_default_cost", str, "1.0",
            "Workload units sent to /route/ when a request has no X-Serverless-Cost header.",
        )
        loader.add_option(
            "vespa_route_deadline_s", int, 600,
            "Seconds to wait for a worker (cold starts take minutes) before answering 503.",
        )
        loader.add_option(
            "vespa_worker_trust_s", int, 10,
            "Seconds a worker that answered is used again without first probing it with a TCP "
            "connect (the probe lets Vespa route around a dead worker, at one round trip per "
            "request); 0 probes before every request.",
        )
        loader.add_option(
            "vespa_capture_kb", int, 1024,
            "KiB of each streamed response kept for mitmweb and -w files (the stream itself is "
            "never cut); 0 keeps nothing.",
        )

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # It streams request bodies too: they would leave for the reverse target unsigned.
            raise exceptions.OptionsError("vespa: stream_large_bodies cannot be used with Vespa; unset it.")
        if "proxy_debug" in updated and ctx.options.proxy_debug:
            # Measured on 11.0.2 and 12.3.1: it logs the raw bytes sent to workers. flow_detail
            # and termlog_verbosity=debug do not (the dumper sees the restored client request).
            log.warning("vespa: proxy_debug logs every byte sent to workers, route signatures included; "
                        "keep this log private and turn proxy_debug off again.")
        if "termlog_verbosity" in updated:
            # One line per request (vespa.requests) instead of mitmproxy's four connection lines
            # (client connect, server connect, streaming, disconnect) at info level; they come
            # back with termlog_verbosity=debug (scripts/run.sh --debug).
            quiet = ctx.options.termlog_verbosity != "debug"
            logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING if quiet else logging.NOTSET)
        self.worker_tls.configure(updated)
        if "vespa_capture_kb" in updated:
            if ctx.options.vespa_capture_kb < 0:
                raise exceptions.OptionsError("vespa: vespa_capture_kb must be 0 (keep nothing) or more.")
            self.capture_bytes = ctx.options.vespa_capture_kb * inspection.KIB
        if not updated & OPTIONS and self.router is not None:
            return
        opts = ctx.options
        endpoint = opts.vespa_endpoint or os.environ.get("VAST_ENDPOINT", "")
        if not endpoint:
            raise exceptions.OptionsError(
                "vespa: no endpoint name. Give it with --set vespa_endpoint=NAME (or env VAST_ENDPOINT), "
                "or start through scripts/run.sh."
            )
        api_key = (self._api_key or os.environ.get("VAST_API_KEY", "")).strip()
        if not api_key:
            raise exceptions.OptionsError(
                "vespa: no endpoint key. Put it in the environment as VAST_API_KEY (not on the command "
                "line: ps shows arguments), or start through scripts/run.sh, which fetches it with your account key."
            )
        if not wire.is_http_url(opts.vespa_autoscaler_url):
            raise exceptions.OptionsError(f"vespa: vespa_autoscaler_url must be an http(s) URL, got {opts.vespa_autoscaler_url!r}.")
        if opts.vespa_route_deadline_s <= 0:
            raise exceptions.OptionsError("vespa: vespa_route_deadline_s must be a positive number of seconds.")
        try:
            self.default_cost = wire.parse_cost(opts.vespa_default_cost, 1.0)
        except VespaError as e:
            raise exceptions.OptionsError(f"vespa: vespa_default_cost: {e.message}") from None
        if opts.vespa_worker_trust_s < 0:
            raise exceptions.OptionsError("vespa: vespa_worker_trust_s must be 0 (always probe) or more.")
        self.limits = limits.Limits.from_options(opts)
        self.check = WorkerCheck(self.limits.connect_timeout_s, _listen_addrs, opts.vespa_worker_trust_s)
        self._close_router()
        self.router = Router(RouterSettings(
            autoscaler_url=opts.vespa_autoscaler_url,
            endpoint=endpoint,
            api_key=api_key,
            key_source=self._key_source or os.environ.get("VESPA_KEY_SOURCE", "env VAST_API_KEY"),
            deadline_s=opts.vespa_route_deadline_s,
            call_timeout_s=self.limits.route_timeout_s,
        ))
        self.telemetry.endpoint = endpoint

    def done(self) -> None:
        errorpage.uninstall()
        self.health.close()
        self._close_router()
        # mitmproxy's save addon writes the flows still in flight after this: with the client's
        # request, never the signed one.
        for flight in list(self.flights.values()):
            self._end(flight.flow)

    def _close_router(self) -> None:
        if self.router is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.router.close())
            # Held until done: the loop keeps only a weak reference to its tasks.
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        except RuntimeError:
            pass  # no loop left: the process is exiting and the sockets go with it
        self.router = None

    # --- flow hooks ---------------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or flow.response:
            return
        if health.is_reserved(flow.request.path):
            return await self.health.answer(flow, self.router)
        inspection.start(flow)
        try:
            if self.router is None:
                raise ProxyNotConfigured("Vespa is not configured", hint="See the proxy's start-up log.")
            cost = wire.parse_cost(flow.request.headers.get("x-serverless-cost"), self.default_cost)
            self.limits.check_declared_size(flow.request)
        except VespaError as e:
            return self._answer(flow, e)
        # Started now so the route call overlaps the upload of the body.
        self.flights[flow.id] = Flight(flow, asyncio.ensure_future(self.router.route(cost, self.check)))

    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or flow.response:
            return
        flight = self.flights.get(flow.id)
        if flight is None:
            # Its headers went through another instance of this addon (mitmproxy reloaded the
            # script): fail closed rather than let it reach the reverse target unsigned.
            return self._answer(flow, NotRouted("the request was not routed: Vespa was reloaded while it arrived"))
        try:
            payload = _json_payload(flow.request)
            self.limits.check_size(payload)
            try:
                routed = await flight.route
            except asyncio.CancelledError:
                if not flight.route.cancelled() or asyncio.current_task().cancelling():
                    raise
                # client_disconnected() stopped the route call: nobody is waiting for an answer.
                self._end(flow)
                flow.kill()
                return
            await self.worker_tls.prepare(routed.ready.url)  # HTTPS workers: verified with Vast's CA
            flight.original = flow.request.copy()
            _rewrite(flow.request, routed.ready, payload)
        except VespaError as e:
            self._end(flow)
            return self._answer(flow, e)
        except Exception as e:  # fail closed: never let the flow reach the reverse target unsigned
            log.exception("vespa: internal error")
            self._end(flow)
            return self._answer(flow, VespaError(f"internal error in Vespa: {type(e).__name__}", hint="See the proxy log."))
        ready = routed.ready
        flow.metadata["vespa"] = {
            "sent": inspection.sent(flight.original),
            "endpoint": ready.auth_data.get("endpoint"),
            "worker": ready.url,
            "request_idx": ready.request_idx,
            "cost": ready.auth_data.get("cost"),
            "route_ms": round(routed.route_ms, 1),
            "polls": routed.polls,
            "retries": routed.retries,
        }
        flow.comment = inspection.comment(flow.metadata["vespa"])
        flight.watchdog = Watchdog(
            flow, self.limits.connect_timeout_s, self.limits.first_byte_timeout_s, self.limits.idle_timeout_s
        )
        flight.watchdog.start()

    def client_disconnected(self, client: connection.Client) -> None:
        # mitmproxy tells the flow only once its request hook returns; a cold endpoint could keep
        # the route call polling (and then take a worker) for minutes for a client long gone.
        for flight in self.flights.values():
            if flight.flow.client_conn.id == client.id and not flight.route.done():
                flight.route.cancel()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        flight = self.flights.get(flow.id)
        if flight is None or not flow.live:
            return
        worker = flow.metadata.get("vespa", {}).get("worker")
        if self.check is not None and worker:
            self.check.trust(worker)
        headers = flow.response.headers
        if _is_stream(headers):
            if self.capture_bytes:
                flight.tap = inspection.Tap(self.capture_bytes)
            flow.response.stream = flight.tap or True
            if headers.get("content-type", "").startswith("text/event-stream"):
                headers["cache-control"] = "no-cache"
                headers["x-accel-buffering"] = "no"
            if flight.watchdog is not None:  # idle gaps are timed chunk by chunk from now on
                flow.response.stream = flight.watchdog.streaming(flow.response.stream)
        elif flight.watchdog is not None:
            flight.watchdog.stop()
        # The signed request has been sent, and mitmproxy's http layer reads flow.request after
        # this hook only for a log line and a websocket check (11.0.2 and 12.3.1): showing the
        # client's request now keeps the signature out of mitmweb and of saves taken mid-stream.
        if flight.original is not None:
            flow.request = flight.original

    def response(self, flow: http.HTTPFlow) -> None:
        flight = self.flights.get(flow.id)
        if flight is None:
            return
        if flow.response.status_code == 401 and not flow.response.stream:
            self._answer(flow, WorkerRejectedSignature(
                f"the worker {flow.metadata.get('vespa', {}).get('worker')} rejected the routing signature (401)"
            ))
        elif flow.response.status_code == 429 and not flow.response.stream:
            # Queue full: rejected before any work. Not resent here: see docs/RELIABILITY.md.
            self._answer(flow, WorkerUnavailable(
                f"the worker {flow.metadata.get('vespa', {}).get('worker')} is full (429); "
                "the request was not processed and may be retried"
            ))
        else:
            inspection.finish(flow, flight.tap)
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        flight = self.flights.get(flow.id)
        if flight is None:
            return
        if flow.response is None and self.check is not None and "vespa" in flow.metadata:
            self.check.distrust(flow.metadata["vespa"]["worker"])  # probed again before its next use
        self._end(flow)
        inspection.fail(flow, flight.tap)
        if flow.error:
            self.worker_tls.failed(flow.error.msg)  # a rotated CA is fetched again

    # --- commands (mitmweb's command bar, POST /commands/vespa.status) -----------------------------
    @command.command("vespa.status")
    def status(self) -> str:
        """Endpoint, key source (last 4 only), last autoscaler round trip, requests in flight."""
        return inspection.status(self.router, len(self.flights))

    # --- helpers -----------------------------------------------------------------------------------
    def _end(self, flow: http.HTTPFlow) -> None:
        """Forget the flight and show the client's own request again (no signature kept)."""
        flight = self.flights.pop(flow.id, None)
        if flight is None:
            return
        if flight.route.done() and not flight.route.cancelled():
            flight.route.exception()  # retrieved: asyncio would log an unanswered failure as an error
        flight.route.cancel()
        if flight.watchdog is not None:
            flight.watchdog.stop()
        if flight.original is not None:
            flow.request = flight.original

    @staticmethod
    def _answer(flow: http.HTTPFlow, err: VespaError) -> None:
        flow.response = http.Response.make(err.status, err.body(), err.headers())
        inspection.note(flow, f"{err.status} {err.type}: {err.message}", failed=True)
        log.warning("vespa: %s %s -> %d %s: %s", flow.request.method, _path(flow), err.status, err.type, err.message)


def _json_payload(request: http.Request) -> bytes:
    """The client's body, checked to be JSON where the worker expects a JSON payload."""
    if request.method not in wire.BODY_METHODS:
        return b""
    try:
        payload = request.content or b""
    except ValueError as e:  # undecodable Content-Encoding
        raise BadBody(f"cannot decode the request body: {e}") from None
    if payload.strip():
        try:
            # Strict UTF-8: json.loads(bytes) would also take UTF-16/32 and a BOM, which the
            # worker cannot read once the payload is spliced into its UTF-8 body.
            json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadBody(f"the request body is not valid UTF-8 JSON ({e})") from None
    return payload


def _path(flow: http.HTTPFlow) -> str:
    """The path for logs, without the query: clients put tokens there."""
    return flow.request.path.partition("?")[0]


def _rewrite(request: http.Request, ready: wire.RouteReady, payload: bytes) -> None:
    connection_tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    for name in list(request.headers.keys()):
        lname = name.lower()
        if lname in DROP_HEADERS or lname in connection_tokens:
            del request.headers[name]
    # The URL setter also points Host at the worker.
    request.url = ready.url + request.path
    if request.method in wire.BODY_METHODS:
        request.headers["content-type"] = "application/json"
        request.content = wire.worker_body(ready.auth_data, payload)
    else:
        query = [(k, v) for k, v in request.query.items(multi=True) if not k.startswith(wire.QUERY_PREFIX)]
        request.query = query + wire.auth_query(ready.auth_data)


def _is_stream(headers: http.Headers) -> bool:
    content_type = headers.get("content-type", "").lower()
    if content_type.startswith(STREAM_TYPES) or "stream" in content_type:
        return True
    return "chunked" in headers.get("transfer-encoding", "").lower() and "content-length" not in headers


def _listen_addrs() -> list[tuple]:
    """The proxy's own listening addresses, so a worker URL pointing back at it is refused."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.listen_addrs() if proxyserver is not None else []
