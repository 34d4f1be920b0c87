"""Time to first byte and idle gaps: cut the worker connection when the worker goes silent.

mitmproxy has no per-request timeout (11 waits 600 s of inactivity, hard-coded; 12.2.1+ has
`tcp_timeout` per connection) and cannot kill a flow in transit (flow.kill is only read after a
hook, mitmproxy #4711). So the watchdog names the cause for vespa/errorpage.py, then aborts the
worker's socket: mitmproxy sees the worker close, and the client gets the JSON error (nothing sent
yet) or the SSE error event and a cut stream (mid-stream). Timers are loop callbacks: no task and
no blocking per flow.

mitmproxy's own connect has no timeout either (the kernel gives up after about two minutes). A
worker that was not probed (vespa/workercheck.py trusts one that answered recently) may have
vanished, so the first timer is the connect timeout: if mitmproxy has not connected by then, its
pending connect is cancelled and the client gets the retryable `worker_connect_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from mitmproxy import ctx, http

from vespa import errorpage
from vespa.errors import VespaError, WorkerConnectTimeout, WorkerFirstByteTimeout, WorkerIdleTimeout

log = logging.getLogger("vespa.watchdog")
Stream = Callable[[bytes], bytes] | bool


@dataclass(slots=True)
class Watchdog:
    flow: http.HTTPFlow
    connect_s: float
    first_byte_s: float
    idle_s: float
    inner: Stream = True
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _started: float = 0.0
    _last_chunk: float = 0.0

    def start(self) -> None:
        """The request is about to leave for the worker: connect, then the first byte, in time."""
        self._started = asyncio.get_running_loop().time()
        self._check_in(min(self.connect_s, self.first_byte_s))

    def _check_in(self, seconds: float) -> None:
        self.stop()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._connect_due)

    def _connect_due(self) -> None:
        self._timer = None
        if not self.flow.live:
            return
        elapsed = asyncio.get_running_loop().time() - self._started
        if _connected(self.flow):
            first_byte = WorkerFirstByteTimeout(
                f"the worker sent no response within {self.first_byte_s:g} s (vespa_first_byte_timeout_s)"
            )
            if elapsed >= self.first_byte_s:
                return self._expire(first_byte)
            return self._arm(self.first_byte_s - elapsed, first_byte)
        if elapsed < self.connect_s:  # the first-byte limit is the shorter one: wait for the connect
            return self._check_in(self.connect_s - elapsed)
        errorpage.note(self.flow, WorkerConnectTimeout(
            f"no connection to the worker {self.flow.request.host}:{self.flow.request.port} within "
            f"{self.connect_s:g} s; the request was not processed and may be retried"
        ))
        if not _cancel_connect(self.flow):
            log.warning("vespa: the connect to %s timed out, but the attempt could not be found to cancel it",
                        self.flow.request.host)

    def streaming(self, inner: Stream) -> Watchdog:
        """Headers came: from now on every chunk must follow the last within idle_s."""
        self.inner = inner
        self._last_chunk = time.monotonic()
        self._arm_idle(self.idle_s)
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __call__(self, chunk: bytes) -> bytes:
        # mitmproxy's stream callable: called per chunk, and with b"" at the end. A chunk only
        # notes the time; the one idle timer checks it when due (no timer churn per token).
        if chunk:
            self._last_chunk = time.monotonic()
        else:
            self.stop()
        return self.inner(chunk) if callable(self.inner) else chunk

    def _arm_idle(self, seconds: float) -> None:
        self.stop()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._idle_due)

    def _idle_due(self) -> None:
        self._timer = None
        silent = time.monotonic() - self._last_chunk
        if silent < self.idle_s:
            return self._arm_idle(self.idle_s - silent)
        self._expire(WorkerIdleTimeout(
            f"the worker's stream was silent for {self.idle_s:g} s (vespa_idle_timeout_s); the answer is incomplete"
        ))

    def _arm(self, seconds: float, err: VespaError) -> None:
        self.stop()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire, err)

    def _expire(self, err: VespaError) -> None:
        self._timer = None
        if not self.flow.live:
            return
        errorpage.note(self.flow, err)
        if not _abort_server(self.flow):
            log.warning("vespa: %s, but the worker connection could not be found to close it", err.message)


def _connected(flow: http.HTTPFlow) -> bool:
    server = flow.server_conn  # mitmproxy sets it to the worker's connection once that is open
    return server.address == (flow.request.host, flow.request.port) and server.timestamp_tcp_setup is not None


def _cancel_connect(flow: http.HTTPFlow) -> bool:
    """Cancel mitmproxy's pending connect to the worker (internals, the same in 11.0.2 and 12.3.1)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    address = (flow.request.host, flow.request.port)
    for conn, io in getattr(handler, "transports", {}).items():
        task = getattr(io, "handler", None)
        if getattr(conn, "address", None) == address and conn.timestamp_tcp_setup is None and task is not None:
            task.cancel()
            return True
    return False


def _abort_server(flow: http.HTTPFlow) -> bool:
    """Abort the socket to the worker (mitmproxy internals, the same in 11.0.2 and 12.3.1)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    io = handler.transports.get(flow.server_conn) if handler is not None else None
    transport = getattr(getattr(io, "writer", None), "transport", None)
    if transport is None:
        return False
    transport.abort()
    return True
