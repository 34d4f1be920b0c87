"""Running an aiohttp app on 127.0.0.1 with a listener that can be closed and re-opened.

With a WAN delay, the public port is a wan.WanRelay in front of the app, which itself listens
on a private port: faults (refused, black hole) then act on the public port, as they would on
a real host across the network.

Workers need that to emulate a refused connection: a closed listening socket is what a
crashed or restarting worker looks like to a client, and the port must stay the same
because the autoscaler keeps handing out the same URL. A black hole (connects that time out)
takes the same port too: see Blackhole.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from aiohttp import web

from vespa.emulator.wan import WanRelay

HOST = "127.0.0.1"
# Stopping must not wait for stalled or long streaming requests of a test.
SHUTDOWN_TIMEOUT_S = 0.5
# Payloads of real workers can carry base64 images; aiohttp's 1 MiB default is too small.
MAX_BODY_BYTES = 64 * 1024 * 1024
ABORT_ON_OVERFLOW = Path("/proc/sys/net/ipv4/tcp_abort_on_overflow")


class Blackhole:
    """A port where connects time out, on loopback: a listener with a one-slot accept queue,
    filled by our own connection and never accepted. Linux then drops every further SYN (the
    client retries until its own timeout), which is what an unreachable host looks like.
    With tcp_abort_on_overflow=1 the kernel would reset instead, so that is refused loudly."""

    def __init__(self, listener: socket.socket, filler: socket.socket) -> None:
        self._listener, self._filler = listener, filler

    @classmethod
    async def open(cls, port: int) -> Blackhole:
        if ABORT_ON_OVERFLOW.exists() and ABORT_ON_OVERFLOW.read_text().strip() != "0":
            raise RuntimeError(f"{ABORT_ON_OVERFLOW} is not 0: a full accept queue resets, connects would not time out")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(0)  # Linux keeps backlog + 1 = one connection waiting
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(filler, (HOST, port))
        except BaseException:
            listener.close()
            filler.close()
            raise
        return cls(listener, filler)

    def close(self) -> None:
        self._listener.close()
        self._filler.close()


class HttpServer:
    def __init__(
        self,
        app: web.Application,
        port: int = 0,
        *,
        cancel_on_disconnect: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        wan_delay_s: float = 0.0,
    ) -> None:
        # handler_cancellation makes a client disconnect cancel the handler at once, which
        # is how a worker notices it within a second even while waiting on the backend.
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            handler_cancellation=cancel_on_disconnect,
        )
        self.port = port
        self._ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._blackhole: Blackhole | None = None
        self._lock = asyncio.Lock()
        self._wan_delay_s = wan_delay_s
        self._relay: WanRelay | None = None
        self._private: asyncio.Server | None = None  # the app's own listener, behind the relay

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{HOST}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        await self._runner.setup()
        if self._wan_delay_s > 0:
            self._private = await asyncio.get_running_loop().create_server(
                self._runner.server, HOST, 0, ssl=self._ssl_context
            )
            private_port = self._private.sockets[0].getsockname()[1]
            self._relay = WanRelay((HOST, private_port), self._wan_delay_s)
        await self.set_listening(True)

    async def set_listening(self, listening: bool) -> None:
        async with self._lock:
            if listening and self._server is None and self._relay is not None:
                self.port = await self._relay.listen(HOST, self.port)
                self._server = self._relay.server
            elif listening and self._server is None:
                self._server = await asyncio.get_running_loop().create_server(
                    self._runner.server, HOST, self.port, reuse_address=True, ssl=self._ssl_context
                )
                self.port = self._server.sockets[0].getsockname()[1]
            elif not listening:
                self._close_server()

    async def set_blackhole(self, on: bool) -> None:
        """On: the port stops serving and its connects time out. Off: the port is closed
        (set_listening(True) serves it again)."""
        async with self._lock:
            if on and self._blackhole is None:
                self._close_server()
                self._blackhole = await Blackhole.open(self.port)
            elif not on and self._blackhole is not None:
                self._blackhole.close()
                self._blackhole = None

    def _close_server(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        if self._relay is not None:
            self._relay.close_listener()
            self._relay.abort_connections()
        # Pooled keep-alive connections would otherwise still be served (a dead worker's kernel
        # resets them); close() alone only stops the handler loop and leaves the socket open.
        for connection in list(self._runner.server.connections):
            connection.close()
            if connection.transport is not None:
                connection.transport.abort()

    async def stop(self) -> None:
        await self.set_blackhole(False)
        await self.set_listening(False)
        if self._relay is not None:
            await self._relay.close()
        if self._private is not None:
            self._private.close()
        await self._runner.cleanup()
