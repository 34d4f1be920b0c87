"""The mitmproxy addon: every request to the proxy becomes a routed, signed Vast.ai call.

mitmproxy holds the client side (HTTP/1, HTTP/2, TLS, mitmweb, `-w`, replay); the worker side is
the worker leg (vespa/proxy/leg.py), a process of its own with one shared pool of warm connections
to the workers. Per flow: `requestheaders` checks what can be checked from the head and points
the flow at the leg, `responseheaders` takes the routing facts the leg sends back, streams the
answer through and shows the flow as it went (client's request, worker's address), `response`
and `error` say how it ended. The route signature never exists in this process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from mitmproxy import command, ctx, exceptions, hooks, http

from vespa import keys, wire
from vespa.observe import health, inspection, tokenview
from vespa.proxy import endpoints, errorpage, headtimeout, limits, workerca
from vespa.errors import BadRequest, LoopDetected, NotRouted, ProxyNotConfigured, TooManyHeaders, UriTooLong, VespaError
from vespa.keys import mask
from vespa.proxy.leg import CREDENTIAL_HEADERS, FACTS_HEADER, MAX_LINE, EndpointKey, Leg, LegConfig
from vespa.observe.metrics import Telemetry

log = logging.getLogger("vespa")

DEFAULT_AUTOSCALER = "https://run.vast.ai"
KEYS_ENV = "VESPA_ENDPOINT_KEYS"  # several endpoints' keys: a JSON object, name -> key
STREAM_TYPES = tokenview.SSE_TYPES + tokenview.NDJSON_TYPES
# Options whose change needs a new worker leg (the leg holds keys, URLs and limits).
LEG_OPTIONS = frozenset({
    "vespa_endpoint", "vespa_config", "vespa_autoscaler_url", "vespa_default_cost", "vespa_route_deadline_s",
    "vespa_console_url", "vespa_worker_ca", "vespa_leg", "vespa_pool_idle_s", "vespa_pool_per_worker",
    "ssl_insecure", "ssl_verify_upstream_trusted_ca", "termlog_verbosity", "mode",
}) | {name for name, _, _ in limits.OPTIONS}


@dataclass(slots=True)
class Setup:
    """What the proxy serves, as configured: shown by /_vespa/health and vespa.status."""

    endpoints: tuple[str, ...]
    autoscaler_url: str
    keys: dict[str, str]  # endpoint -> where its key came from and its last 4 characters
    leg: Leg = field(repr=False)
    states: dict[str, dict] = field(default_factory=dict)  # endpoint -> its state, as the leg tells it
    last_route_ms: float | None = None

    @property
    def endpoint(self) -> str:
        return ", ".join(self.endpoints)

    async def probe(self, timeout_s: float) -> int:
        """GET /pubkey/ (no load, no key): is the autoscaler reachable from here."""
        if not self.leg.alive():
            raise OSError(f"Vespa's worker leg exited (code {self.leg.exit_code()}); restart the proxy")
        url = self.autoscaler_url.rstrip("/") + "/pubkey/"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status


@dataclass(slots=True)
class Shown:
    """The client's view of the request, put back on the flow once the leg has it."""

    scheme: str
    host: str
    port: int
    host_header: str | None
    flow: http.HTTPFlow = field(repr=False)
    tap: inspection.Tap | None = None


class Vespa:
    def __init__(self, api_key: str | None = None, key_source: str | None = None,
                 endpoint_keys: dict[str, str] | None = None) -> None:
        # Given by the Python API (vespa.api): the key stays in this object instead of
        # os.environ, where every child process of the caller would inherit it.
        self._api_key = api_key
        self._key_source = key_source
        self._endpoint_keys = dict(endpoint_keys or {})
        self.telemetry = Telemetry()
        self.health = health.Health(self.telemetry)
        # A sub-addon: mitmproxy runs its hooks right after ours, for metrics and the request log.
        self.addons = [self.telemetry, headtimeout.HeadTimeout()]
        self.setup: Setup | None = None
        self.limits = limits.Limits()
        self.capture_bytes = 0
        self.flows: dict[str, Shown] = {}
        self._web = None  # mitmweb's flow view, when there is one
        # This proxy's mark in the Via header of what its leg sends: seeing it come back means
        # a worker URL that points at the proxy itself, which would loop until file descriptors ran out.
        self.via = f"1.1 vespa-{secrets.token_hex(6)}"

    # --- lifecycle (kept synchronous: mitmproxy's script loader needs it) -----------------------
    def load(self, loader) -> None:
        # JSON instead of mitmproxy's HTML error page; undone in done() (see vespa/proxy/errorpage.py).
        errorpage.install()
        tokenview.register()  # mitmweb's "LLM stream" view: a token stream read as its answer
        _raise_open_file_limit()
        limits.add_options(loader)
        loader.add_option(
            "vespa_endpoint", str, "",
            "Name of the Vast.ai Serverless endpoint to call, or several, comma-separated (default: env "
            "VAST_ENDPOINT). Keys come from the environment, never from an option: VAST_API_KEY for one "
            "endpoint, VESPA_ENDPOINT_KEYS (a JSON object of name to key) for several.",
        )
        loader.add_option(
            "vespa_autoscaler_url", str, "",
            f"Base URL of the Vast autoscaler that answers /route/ (default: the --mode reverse:URL "
            f"target, else {DEFAULT_AUTOSCALER}).",
        )
        loader.add_option(
            "vespa_config", str, "",
            "A TOML file of endpoints (names, aliases, cost, fallback, api_key_env): one proxy for "
            "all of them, chosen per request by X-Vast-Endpoint or the body's model. Instead of vespa_endpoint.",
        )
        loader.add_option(
            "vespa_default_cost", str, "1.0",
            "Workload units sent to /route/ when a request has no X-Serverless-Cost header: a number, "
            "or 'auto' (the body's max_tokens and its kin) for the endpoints named in vespa_endpoint.",
        )
        loader.add_option(
            "vespa_route_deadline_s", int, 600,
            "Seconds to wait for a worker (cold starts take minutes) before answering 503.",
        )
        loader.add_option(
            "vespa_capture_kb", int, 1024,
            "KiB of each response kept for mitmweb and -w files (the answer itself is never cut); 0 keeps nothing.",
        )
        loader.add_option(
            "vespa_console_url", str, "https://console.vast.ai",
            "Vast console the worker root CA is downloaded from (/static/jvastai_root.cer), once, then "
            "cached under $XDG_CACHE_HOME/vespa (default ~/.cache/vespa).",
        )
        loader.add_option(
            "vespa_worker_ca", str, "",
            "A file with Vast's worker root CA (PEM or DER) to use instead of downloading it.",
        )
        loader.add_option(
            "vespa_pool_idle_s", int, 30,
            "Seconds an idle pooled connection to a worker is kept open for the next request.",
        )
        loader.add_option(
            "vespa_pool_per_worker", int, 100,
            "Most connections open to one worker at once (requests beyond it wait for a free one).",
        )
        loader.add_option(
            "vespa_leg", str, "process",
            "Where the worker leg runs: 'process' (its own process: the second core works too) or "
            "'thread' (inside the proxy's process).", choices=("process", "thread"),
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "termlog_verbosity" in updated:
            # One line per request (vespa.requests) instead of mitmproxy's four connection lines
            # at info level; they come back with termlog_verbosity=debug (scripts/run.sh --debug).
            quiet = opts.termlog_verbosity != "debug"
            logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING if quiet else logging.NOTSET)
        if "vespa_capture_kb" in updated:
            if opts.vespa_capture_kb < 0:
                raise exceptions.OptionsError("vespa: vespa_capture_kb must be 0 (keep nothing) or more.")
            self.capture_bytes = opts.vespa_capture_kb * inspection.KIB
        if "ssl_insecure" in updated and opts.ssl_insecure:
            log.warning(
                "vespa: ssl_insecure is set: worker certificates are NOT verified, so anyone on the path "
                "to a worker can read and answer your requests. Use it only to debug."
            )
        self._web = ctx.master.addons.get("view") if hasattr(ctx, "master") else None
        if self.setup is None or updated & LEG_OPTIONS:
            self._start_leg(opts)
        # Set last: each update runs configure() again, which must find the leg in place.
        if _option(opts, "connection_strategy") == "eager":
            # Eager connects every client connection to the reverse target first: a wasted
            # connection each, and an unreachable autoscaler would drop every request, health too.
            ctx.options.update(connection_strategy="lazy")
        # mitmproxy refuses a larger body itself, before holding it: at once for a declared
        # Content-Length, as soon as a chunked body passes it (the leg checks decoded sizes).
        body_limit = f"{self.limits.max_body_kb}k"
        if "body_size_limit" in opts and opts.body_size_limit != body_limit:
            ctx.options.update(body_size_limit=body_limit)

    def _start_leg(self, opts) -> None:
        self.limits = limits.Limits.from_options(opts)
        config, setup_args = self._leg_config(opts)
        if self.setup is not None:
            self.setup.leg.stop()
            self.setup = None
        states: dict[str, dict] = {}
        leg = Leg(config, opts.vespa_leg, on_log=_relog(), on_state=_on_loop(states.__setitem__))
        try:
            leg.start()
        except (RuntimeError, OSError) as e:
            raise exceptions.OptionsError(f"vespa: {e}") from None
        self.setup = Setup(leg=leg, states=states, **setup_args)
        # Named in the log line of a request never routed, when there is no doubt which it was for.
        self.telemetry.endpoint = self.setup.endpoint if len(self.setup.endpoints) == 1 else ""

    def _leg_config(self, opts) -> tuple[LegConfig, dict]:
        catalog = self._catalog(opts)
        endpoint_keys = self._keys(catalog)
        autoscaler_url = opts.vespa_autoscaler_url or _reverse_target(_option(opts, "mode")) or DEFAULT_AUTOSCALER
        for name, url in (("vespa_autoscaler_url", autoscaler_url), ("vespa_console_url", opts.vespa_console_url)):
            if not wire.is_http_url(url):
                raise exceptions.OptionsError(f"vespa: {name} must be an http(s) URL, got {url!r}.")
        if opts.vespa_route_deadline_s <= 0:
            raise exceptions.OptionsError("vespa: vespa_route_deadline_s must be a positive number of seconds.")
        if opts.vespa_pool_idle_s <= 0 or opts.vespa_pool_per_worker <= 0:
            raise exceptions.OptionsError("vespa: vespa_pool_idle_s and vespa_pool_per_worker must be positive.")
        worker_ca = None
        if opts.vespa_worker_ca:
            worker_ca = os.path.expanduser(opts.vespa_worker_ca)
            try:
                workerca.to_pem(Path(worker_ca).read_bytes())
            except FileNotFoundError:
                raise exceptions.OptionsError(f"vespa: vespa_worker_ca={opts.vespa_worker_ca!r}: no such file.") from None
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"vespa: vespa_worker_ca={opts.vespa_worker_ca!r}: {e}") from None
        lim = self.limits
        config = LegConfig(
            autoscaler_url=autoscaler_url,
            endpoints=endpoint_keys,
            catalog=catalog.to_json(),
            route_deadline_s=opts.vespa_route_deadline_s,
            route_timeout_s=lim.route_timeout_s,
            connect_timeout_s=lim.connect_timeout_s,
            first_byte_timeout_s=lim.first_byte_timeout_s,
            idle_timeout_s=lim.idle_timeout_s,
            max_body_bytes=lim.max_body_kb * inspection.KIB,
            console_url=opts.vespa_console_url,
            worker_ca=worker_ca,
            trusted_ca=opts.ssl_verify_upstream_trusted_ca or None,
            insecure=opts.ssl_insecure,
            pool_per_worker=opts.vespa_pool_per_worker,
            pool_idle_s=opts.vespa_pool_idle_s,
            log_level=logging.DEBUG if _option(opts, "termlog_verbosity") == "debug" else logging.INFO,
            via=self.via,
        )
        return config, {"endpoints": catalog.names, "autoscaler_url": autoscaler_url,
                        "keys": {k.name: f"{k.key_source}, ending {mask(k.api_key)}" for k in endpoint_keys}}

    def _catalog(self, opts) -> endpoints.Catalog:
        """The endpoints to serve: vespa_config's file, else vespa_endpoint's names."""
        try:
            if opts.vespa_config:
                if opts.vespa_endpoint:
                    raise exceptions.OptionsError("vespa: give vespa_config or vespa_endpoint, not both.")
                return endpoints.load_config(os.path.expanduser(opts.vespa_config))
            names = [n.strip() for n in (opts.vespa_endpoint or os.environ.get("VAST_ENDPOINT", "")).split(",") if n.strip()]
            if not names:
                raise exceptions.OptionsError(
                    "vespa: no endpoint name. Give it with --set vespa_endpoint=NAME (or env VAST_ENDPOINT), "
                    "or a file of endpoints with --set vespa_config=FILE, or start through scripts/run.sh."
                )
            try:
                cost = endpoints.parse_cost_option(opts.vespa_default_cost)
            except VespaError as e:
                raise exceptions.OptionsError(f"vespa: vespa_default_cost: {e.message.removeprefix('--cost: ')}") from None
            return endpoints.from_names(names, cost)
        except VespaError as e:
            raise exceptions.OptionsError(f"vespa: {e.message}. {e.hint}") from None

    def _keys(self, catalog: endpoints.Catalog) -> tuple[EndpointKey, ...]:
        """Each endpoint's key, from the environment (never an option: ps shows arguments)."""
        env = os.environ
        shared: dict = {}
        if raw := env.get(KEYS_ENV):
            try:
                shared = json.loads(raw)
            except ValueError:
                shared = None
            if not isinstance(shared, dict):
                raise exceptions.OptionsError(f"vespa: env {KEYS_ENV} must be a JSON object of endpoint name to key.")
        if self._endpoint_keys:
            shared = {**shared, **self._endpoint_keys}
        single = self._api_key or env.get("VAST_API_KEY")
        found, missing = [], []
        for spec in catalog:
            if spec.api_key_env:
                value, source = env.get(spec.api_key_env), f"env {spec.api_key_env}"
            elif spec.name in shared:
                value = shared[spec.name]
                source = "VastClient(api_key={...})" if spec.name in self._endpoint_keys else f"env {KEYS_ENV}"
            elif len(catalog) == 1 and single:
                value = single
                source = self._key_source or env.get("VESPA_KEY_SOURCE", "env VAST_API_KEY")
            else:
                value, source = None, None
            if not value:
                missing.append(spec.name)
                continue
            try:
                found.append(EndpointKey(spec.name, keys.clean_key(value, source, kind=f"key of endpoint {spec.name}"), source))
            except VespaError as e:
                raise exceptions.OptionsError(f"vespa: {e.message}. {e.hint}") from None
        if missing:
            if len(catalog) == 1:
                raise exceptions.OptionsError(
                    "vespa: no endpoint key. Put it in the environment as VAST_API_KEY (not on the command "
                    "line: ps shows arguments), or start through scripts/run.sh, which fetches it with your account key."
                )
            raise exceptions.OptionsError(
                f"vespa: no key for endpoint(s) {', '.join(missing)}. Name a variable with api_key_env in the "
                f"config file, or put them in env {KEYS_ENV} as a JSON object, or start through scripts/run.sh, "
                "which fetches every endpoint key with your account key."
            )
        return tuple(found)

    def done(self) -> None:
        errorpage.uninstall()
        tokenview.unregister()
        self.health.close()
        if self.setup is not None:
            self.setup.leg.stop()
            self.setup = None
        # mitmproxy's save addon writes the flows still in flight after this: as the client sent them.
        for shown in list(self.flows.values()):
            _show(shown.flow, shown, None)
        self.flows.clear()

    # --- flow hooks ---------------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or flow.response:
            return
        request = flow.request
        if health.is_reserved(request.path):
            return await self.health.answer(flow, self.setup)
        inspection.start(flow)
        _mask_credentials(request.headers)
        try:
            self._check_head(request)
        except VespaError as e:
            return self._answer(flow, e)
        self.flows[flow.id] = Shown(request.scheme, request.host, request.port, request.host_header, flow)
        # To the worker leg: it routes, signs and forwards. Only the address changes; the path
        # goes on exactly as the client sent it.
        assert self.setup is not None
        request.scheme, request.host, request.port = "http", "127.0.0.1", self.setup.leg.port

    def _check_head(self, request: http.Request) -> None:
        if self.setup is None:
            raise ProxyNotConfigured("Vespa is not configured", hint="See the proxy's start-up log.")
        if not self.setup.leg.alive():
            raise ProxyNotConfigured(
                f"Vespa's worker leg exited (code {self.setup.leg.exit_code()}); nothing was sent",
                hint="See the proxy log for why, and restart the proxy.",
            )
        if self.via in request.headers.get("via", ""):
            raise LoopDetected("the request came back to this proxy from its own worker leg: the worker URL "
                               "the autoscaler gave points at the proxy itself")
        if not request.path.startswith("/"):
            # `GET * HTTP/1.1` (OPTIONS *), authority or absolute forms: not a path on the endpoint.
            raise BadRequest(
                f"the request target {request.path[:60]!r} is not a path",
                hint="Send origin-form requests (GET /v1/models), as HTTP clients do for a base URL.",
            )
        if len(request.headers.fields) > self.limits.max_headers:
            raise TooManyHeaders(
                f"the request has {len(request.headers.fields)} header fields, over the limit of {self.limits.max_headers}"
            )
        # The leg's HTTP parser (aiohttp) takes lines up to MAX_LINE; past it the client would get
        # its plain-text 400 instead of Vespa's JSON.
        if len(request.path) > MAX_LINE:
            raise UriTooLong(f"the request target is {len(request.path)} bytes long, over the limit of {MAX_LINE}")
        longest = max((len(name) + len(value) for name, value in request.headers.fields), default=0)
        if longest > MAX_LINE:
            raise TooManyHeaders(f"a header field is {longest} bytes long, over the limit of {MAX_LINE}",
                                 hint="Send shorter header values (cookies and tokens are usually the long ones).")

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or flow.response or health.is_reserved(flow.request.path):
            return
        if flow.id not in self.flows:
            # Its headers went through another instance of this addon (mitmproxy reloaded the
            # script): fail closed rather than let it reach the reverse target.
            self._answer(flow, NotRouted("the request was not routed: Vespa was reloaded while it arrived"))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        shown = self.flows.get(flow.id)
        if shown is None or not flow.live or flow.response is None:
            return
        headers = flow.response.headers
        facts = _pop_facts(headers)
        streamed = _is_stream(headers)
        if self.capture_bytes:
            shown.tap = inspection.Tap(self.capture_bytes)
        # Everything is streamed through: the leg already holds nothing back, and mitmproxy's
        # body_size_limit must not apply to answers (only the client's request is limited).
        flow.response.stream = shown.tap or True
        if streamed and headers.get("content-type", "").startswith("text/event-stream"):
            headers["cache-control"] = "no-cache"
            headers["x-accel-buffering"] = "no"
        facts["streamed"] = streamed
        facts["sent"] = inspection.sent(flow.request)
        flow.metadata["vespa"] = facts
        if self.setup is not None and "route_ms" in facts:
            self.setup.last_route_ms = facts["route_ms"]
        flow.comment = inspection.comment(facts)
        # mitmproxy reads flow.request after this hook only for a log line and a websocket check
        # (11.0.2 and 12.3.1): from here on the flow shows where the request went.
        _show(flow, shown, facts.get("worker"))
        if self._web is not None:  # mitmweb's list: where it went now, not when the stream ends
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    def response(self, flow: http.HTTPFlow) -> None:
        shown = self.flows.pop(flow.id, None)
        if shown is None:
            return
        failure = None
        if flow.response is not None and "x-vespa-error" in flow.response.headers:
            failure = _failure(flow, shown.tap)
            log.warning("vespa: %s %s -> %s", flow.request.method, _path(flow), failure)
        inspection.finish(flow, shown.tap, failure)
        _show(flow, shown, flow.metadata.get("vespa", {}).get("worker"))

    def error(self, flow: http.HTTPFlow) -> None:
        shown = self.flows.pop(flow.id, None)
        if shown is None:
            return
        inspection.fail(flow, shown.tap)
        _show(flow, shown, flow.metadata.get("vespa", {}).get("worker"))

    # --- commands (mitmweb's command bar, POST /commands/vespa.status) -----------------------------
    @command.command("vespa.status")
    def status(self) -> str:
        """Endpoint, key source (last 4 only), last route time, requests in flight."""
        return inspection.status(self.setup, self.telemetry.in_flight)

    # --- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _answer(flow: http.HTTPFlow, err: VespaError) -> None:
        flow.response = http.Response.make(err.status, err.body(), err.headers())
        inspection.note(flow, f"{err.status} {err.type}: {err.message}", failed=True)
        log.warning("vespa: %s %s -> %d %s: %s", flow.request.method, _path(flow), err.status, err.type, err.message)


def _show(flow: http.HTTPFlow, shown: Shown, worker: str | None) -> None:
    """Point the flow at the worker it went to (or back where the client sent it): mitmweb's
    list then says where each request went, and a replay starts from the client's request."""
    request = flow.request
    if worker and wire.is_http_url(worker):
        parts = urlsplit(worker)
        request.scheme, request.host = parts.scheme, parts.hostname or ""
        request.port = parts.port or (443 if parts.scheme == "https" else 80)
    else:
        request.scheme, request.host, request.port = shown.scheme, shown.host, shown.port
    if shown.host_header is not None:
        request.host_header = shown.host_header


def _pop_facts(headers: http.Headers) -> dict:
    raw = headers.pop(FACTS_HEADER, None)
    if not raw:
        return {}
    try:
        facts = json.loads(raw)
    except ValueError:
        return {}
    return facts if isinstance(facts, dict) else {}


def _mask_credentials(headers: http.Headers) -> None:
    # One pass over the fields: a request with thousands of headers stays linear.
    fields = headers.fields
    if any(name.lower() in _CREDENTIAL_BYTES for name, _ in fields):
        headers.fields = tuple(
            (name, _masked(value) if name.lower() in _CREDENTIAL_BYTES else value) for name, value in fields
        )


_CREDENTIAL_BYTES = frozenset(h.encode() for h in CREDENTIAL_HEADERS)


def _masked(value: bytes) -> bytes:
    scheme, _, secret = value.partition(b" ")
    if secret and scheme.isalpha() and len(scheme) < 16:  # "Bearer sk-...": keep the scheme readable
        return scheme + b" " + mask(secret.decode("latin-1")).encode()
    return mask(value.decode("latin-1")).encode()


def _failure(flow: http.HTTPFlow, tap: inspection.Tap | None) -> str:
    """`503 worker_unavailable: <message>` from the leg's JSON error answer."""
    assert flow.response is not None
    text = f"{flow.response.status_code} {flow.response.headers['x-vespa-error']}"
    try:
        return f"{text}: {json.loads(bytes(tap.buf))['error']['message']}" if tap is not None else text
    except (ValueError, KeyError, TypeError):
        return text


def _path(flow: http.HTTPFlow) -> str:
    """The path for logs, without the query: clients put tokens there."""
    return flow.request.path.partition("?")[0]


def _is_stream(headers: http.Headers) -> bool:
    """An event or token stream, by its content type: Vast's workers send every answer chunked,
    a plain JSON one too, so chunked alone says nothing."""
    return headers.get("content-type", "").lower().startswith(STREAM_TYPES)


def _option(opts, name: str):
    """An option another addon declares (absent in tests that load Vespa alone)."""
    return getattr(opts, name) if name in opts else None


def _reverse_target(modes) -> str | None:
    """The URL of the first `--mode reverse:URL`: one URL is enough to name the autoscaler."""
    for spec in modes or ():
        if spec.startswith("reverse:"):
            url = spec.removeprefix("reverse:").split("@", 1)[0]
            return url if wire.is_http_url(url) else None
    return None


def _on_loop(fn):
    """`fn`, called on mitmproxy's loop whatever thread calls it (the leg's reader thread):
    its log handlers and the addon's state are not thread-safe."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def call(*args) -> None:
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)
        else:
            fn(*args)

    return call


def _relog():
    return _on_loop(lambda level, name, msg: logging.getLogger(name).log(level, "%s", msg))


def _raise_open_file_limit() -> None:
    """Each request holds a client socket and one to the worker leg: a default soft limit of
    1024 would fail requests at about 500 at once, though the hard limit allows far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("vespa: raised the open-file limit from %d to %d", soft, target)
        except (ValueError, OSError) as e:
            log.debug("vespa: could not raise the open-file limit from %d: %s", soft, e)
