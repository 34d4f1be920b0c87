"""A local, strict emulation of Vast.ai Serverless: autoscaler, console API, workers, backend.

Use it as a context manager, synchronously (its own event loop in a daemon thread) or
asynchronously (in the current loop):

    with Emulator(EmulatorConfig(endpoints=[EndpointConfig(name="demo")])) as emu:
        requests.post(emu.autoscaler_url + "/route/", ...)
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Coroutine, Literal, TypeVar

import aiohttp

from vespa.emulator.autoscaler import Autoscaler, EndpointState
from vespa.emulator.backend import Backend
from vespa.emulator.console import Console
from vespa.emulator.records import ConsoleRecord, Records, RouteRecord, WorkerRecord
from vespa.emulator.serving import HOST, HttpServer
from vespa.emulator.signing import SigningKey
from vespa.emulator.tls import CertAuthority
from vespa.emulator.worker import Worker, WorkerFaults

__all__ = [
    "ConsoleRecord",
    "Emulator",
    "EmulatorConfig",
    "EndpointConfig",
    "Records",
    "RouteRecord",
    "Worker",
    "WorkerFaults",
    "WorkerRecord",
]

T = TypeVar("T")
START_TIMEOUT_S = 30.0


def _token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18)


@dataclass
class EndpointConfig:
    name: str
    api_key: str = field(default_factory=lambda: _token("ep-"))
    workers: int = 2
    generation: Literal["B", "C"] = "C"  # the signed message workers check (protocol spec 2.3)
    cold_start_s: float = 0.0  # counted from the endpoint's first route call
    state: str = "active"  # "stopped" answers every route call with the waiting shape
    max_workers: int = 4
    max_queue_time: float = 30.0  # seconds of queued work before a worker answers 429
    max_perf: float = 1000.0  # workload units per second per worker
    # With https: the workers' certificates come from another CA than the console's (an impostor).
    untrusted_cert: bool = False
    # When set, /route/ answers exactly this JSON (200) once the key is accepted: a malformed
    # answer ({} say) as a broken autoscaler might send. Read at every call.
    route_answer: dict | None = None


@dataclass
class EmulatorConfig:
    account_key: str = field(default_factory=lambda: _token("acct-"))
    endpoints: list[EndpointConfig] = field(default_factory=lambda: [EndpointConfig(name="vespa-demo")])
    ttft_ms: float = 20  # read by the backend at every token, so it can change at runtime
    tokens_per_s: float = 200.0
    console_rate_limit: float | None = 3.0  # per key; None turns the limit off
    autoscaler_port: int = 0
    console_port: int = 0
    backend_port: int = 0
    # Workers serve HTTPS with certificates from the emulator's CA ({console}/static/jvastai_root.cer).
    https: bool = False
    # Milliseconds each way between clients and the autoscaler and every worker (the console and
    # the backend stay on loopback), plus one round trip per new TCP connection: see wan.py.
    wan_delay_ms: float = 0.0

    def validate(self) -> None:
        names = [ep.name for ep in self.endpoints]
        keys = [ep.api_key for ep in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError("endpoint names must be unique")
        if len(set(keys)) != len(keys) or self.account_key in keys:
            raise ValueError("endpoint keys must be unique and differ from the account key")
        if not self.wan_delay_ms >= 0:
            raise ValueError("wan_delay_ms must be >= 0")
        for ep in self.endpoints:
            if ep.generation not in ("B", "C"):
                raise ValueError(f"endpoint {ep.name}: generation must be 'B' or 'C'")
            if ep.workers < 0 or ep.max_perf <= 0:
                raise ValueError(f"endpoint {ep.name}: workers must be >= 0 and max_perf > 0")
            if ep.untrusted_cert and not self.https:
                raise ValueError(f"endpoint {ep.name}: untrusted_cert needs https workers")


class Emulator:
    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.config.validate()
        self.records = Records()
        self.signing_key = SigningKey.generate()
        self.ca = CertAuthority.generate()
        self._endpoints: dict[str, EndpointState] = {}
        self._servers: dict[str, HttpServer] = {}
        self._session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- addresses and knobs ----------------------------------------------------------------
    @property
    def autoscaler_url(self) -> str:
        return self._servers["autoscaler"].url

    @property
    def console_url(self) -> str:
        return self._servers["console"].url

    @property
    def backend_url(self) -> str:
        return self._servers["backend"].url

    def workers(self, endpoint: str) -> list[Worker]:
        return list(self._endpoint(endpoint).workers)

    def set_cold(self, endpoint: str, seconds: float) -> None:
        """From now on, hand out no worker of `endpoint` for `seconds`."""
        self._endpoint(endpoint).cold_until = time.monotonic() + seconds

    def counted_load(self, endpoint: str) -> float:
        """Total cost the autoscaler counted: re-polls of a known request_idx add nothing."""
        return self._endpoint(endpoint).counted_load

    def _endpoint(self, name: str) -> EndpointState:
        try:
            return self._endpoints[name]
        except KeyError:
            raise KeyError(f"no endpoint {name!r} in this emulator") from None

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        backend = HttpServer(Backend(cfg).app(), cfg.backend_port, cancel_on_disconnect=True)
        await backend.start()
        self._servers["backend"] = backend
        # No pool limit: a test with many parallel streams must not queue inside the emulator.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        await self._start_workers()
        autoscaler = Autoscaler(self._endpoints, self.signing_key, self.records)
        for name, app, port, wan_delay_ms in (
            ("autoscaler", autoscaler.app(), cfg.autoscaler_port, cfg.wan_delay_ms),
            ("console", Console(cfg, self.records, self.ca.pem()).app(), cfg.console_port, 0.0),
        ):
            self._servers[name] = server = HttpServer(app, port, wan_delay_s=wan_delay_ms / 1000)
            await server.start()

    async def _start_workers(self) -> None:
        assert self._session is not None
        public_key = self.signing_key.private_key.public_key()
        ids = itertools.count(1)
        # A well-formed CA: the impostor's certificates must fail for the right reason only.
        impostor = CertAuthority.generate("Not Vast CA", vast_quirk=False)
        for ep in self.config.endpoints:
            ca = impostor if ep.untrusted_cert else self.ca
            workers = [
                Worker(
                    next(ids), ep, public_key, self.backend_url, self._session, self.records,
                    ssl_context=ca.server_context(HOST) if self.config.https else None,
                    wan_delay_s=self.config.wan_delay_ms / 1000,
                )
                for _ in range(ep.workers)
            ]  # fmt: skip
            self._endpoints[ep.name] = EndpointState(config=ep, workers=workers)
            for worker in workers:
                await worker.start()

    async def stop(self) -> None:
        # Workers first: stopping them cancels their calls into the backend.
        for state in self._endpoints.values():
            for worker in state.workers:
                await worker.stop()
        for server in reversed(list(self._servers.values())):
            await server.stop()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> Emulator:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="vespa-emulator", daemon=True)
        self._thread.start()
        try:
            self._run(self.start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop, thread = self._loop, self._thread
        assert loop is not None and thread is not None
        try:
            self._run(self.stop())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=START_TIMEOUT_S)
            loop.close()
            self._loop = self._thread = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=START_TIMEOUT_S)
