"""Running an aiohttp app on 127.0.0.1 with a listener that can be closed and re-opened.

Workers need that to emulate a refused connection: a closed listening socket is what a
crashed or restarting worker looks like to a client, and the port must stay the same
because the autoscaler keeps handing out the same URL.
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

HOST = "127.0.0.1"
# Stopping must not wait for stalled or long streaming requests of a test.
SHUTDOWN_TIMEOUT_S = 0.5
# Payloads of real workers can carry base64 images; aiohttp's 1 MiB default is too small.
MAX_BODY_BYTES = 64 * 1024 * 1024


class HttpServer:
    def __init__(
        self,
        app: web.Application,
        port: int = 0,
        *,
        cancel_on_disconnect: bool = False,
        ssl_context: ssl.SSLContext | None = None,
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
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{HOST}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        await self._runner.setup()
        await self.set_listening(True)

    async def set_listening(self, listening: bool) -> None:
        async with self._lock:
            if listening and self._server is None:
                self._server = await asyncio.get_running_loop().create_server(
                    self._runner.server, HOST, self.port, reuse_address=True, ssl=self._ssl_context
                )
                self.port = self._server.sockets[0].getsockname()[1]
            elif not listening and self._server is not None:
                self._server.close()
                self._server = None
                # Pooled keep-alive connections would otherwise still be served.
                for connection in list(self._runner.server.connections):
                    connection.close()

    async def stop(self) -> None:
        await self.set_listening(False)
        await self._runner.cleanup()
