"""The emulator in a child process, driven over a pipe.

Its own process so that its event loop (autoscaler, workers, backend) does not share a GIL
with the load client: on 2 cores that sharing would bias every figure. Times it reports
are `time.monotonic()`, which on Linux is one clock for every process.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

ENDPOINT = "bench"


@dataclass(frozen=True)
class EmuInfo:
    autoscaler_url: str
    console_url: str
    backend_url: str
    worker_urls: list[str]
    endpoint: str
    api_key: str
    ca_pem: bytes = b""  # the workers' root CA (they use it only with https)


@dataclass(frozen=True)
class EmuOptions:
    workers: int = 2
    https: bool = False
    wan_delay_ms: float = 0.0


def _serve(conn: Connection, options: EmuOptions) -> None:
    from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig

    # A generous queue: the 200-stream phase must measure the proxy, not the worker's 429s.
    ep = EndpointConfig(name=ENDPOINT, workers=options.workers, generation="C", max_perf=1e6, max_queue_time=1e6)
    config = EmulatorConfig(endpoints=[ep], console_rate_limit=None, https=options.https,
                            wan_delay_ms=options.wan_delay_ms)
    with Emulator(config) as emu:
        conn.send(EmuInfo(emu.autoscaler_url, emu.console_url, emu.backend_url, [w.url for w in emu.workers(ENDPOINT)],
                          ENDPOINT, ep.api_key, emu.ca.pem()))
        while True:
            cmd, args = conn.recv()
            if cmd == "stop":
                break
            if cmd == "config":
                for name, value in args.items():
                    setattr(emu.config, name, value)
                conn.send(None)
            elif cmd == "set_cold":
                emu.set_cold(ENDPOINT, args)
                conn.send(time.monotonic() + args)
            elif cmd == "route_times":
                # Only what the bench needs, so a long run does not pickle every record.
                conn.send([r.time for r in emu.records.route if r.time >= args])
            elif cmd == "clear":
                emu.records.clear()
                conn.send(None)
    conn.send("stopped")


class EmulatorProcess:
    """`with EmulatorProcess() as emu:` starts the emulator in a spawned process."""

    def __init__(self, options: EmuOptions = EmuOptions()) -> None:
        ctx = mp.get_context("spawn")  # fork after threads exist is unsafe
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, options), name="bench-emulator", daemon=True)
        self.info: EmuInfo | None = None

    def __enter__(self) -> EmulatorProcess:
        self._proc.start()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the emulator process did not start within 60 s")
        self.info = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send(("stop", None))
            self._conn.poll(15)
        except (BrokenPipeError, EOFError, OSError):
            pass
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def _call(self, cmd: str, args: Any = None) -> Any:
        self._conn.send((cmd, args))
        return self._conn.recv()

    def configure(self, **values: float) -> None:
        """Backend timing (`ttft_ms`, `tokens_per_s`), read by the backend at every token."""
        self._call("config", values)

    def set_cold(self, seconds: float) -> float:
        """Hand out no worker for `seconds`; returns the monotonic time the worker turns ready."""
        return self._call("set_cold", seconds)

    def route_times(self, since: float) -> list[float]:
        return self._call("route_times", since)

    def clear_records(self) -> None:
        self._call("clear")
