"""Shared fixtures: a strict emulator in a background thread, and real mitmdump processes.

Every port is picked free at run time on 127.0.0.1; every process started here is stopped here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig
from vespa.procs import free_port, stop, wait_for_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADDON = REPO / "vespa_addon.py"


@dataclass
class Proxy:
    proc: subprocess.Popen
    port: int
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_proxy(
    autoscaler_url: str,
    endpoint: str,
    api_key: str,
    *options: str,
    tool: str = "mitmdump",
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
    nofile: str | None = None,
) -> Iterator[Proxy]:
    """mitmdump (or mitmweb) with vespa_addon.py, the way the README and the launcher run it.

    nofile: `ulimit` arguments for the proxy's open-file limit, e.g. "-Sn 1024" (the soft limit
    most machines start with) or "-n 100" (soft and hard); `exec` keeps proc.pid mitmdump's."""
    port = free_port()
    args = [
        str(BIN / tool), "-s", str(ADDON), "--mode", f"reverse:{autoscaler_url}",
        "--listen-host", "127.0.0.1", "-p", str(port),
        "--set", f"vespa_endpoint={endpoint}", "--set", f"vespa_autoscaler_url={autoscaler_url}",
        "--set", "connection_strategy=lazy", "--set", "flow_detail=0",
    ]
    for opt in options:
        args += ["--set", opt]
    args += list(extra_args)
    if nofile is not None:
        args = ["bash", "-c", f'ulimit {nofile} && exec "$@"', "bash", *args]
    full_env = {**os.environ, "VAST_API_KEY": api_key, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("VAST_ENDPOINT", None)
    log_file = tempfile.NamedTemporaryFile("wb", prefix="vespa-proxy-", suffix=".log", delete=False)
    proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    proxy = Proxy(proc, port, Path(log_file.name), full_env)
    try:
        if wait:
            try:
                wait_for_port(port, proc)
            except Exception as e:
                raise RuntimeError(f"{e}\n--- proxy log ---\n{proxy.log()}") from None
        yield proxy
    finally:
        stop(proc)
        log_file.close()
        os.unlink(log_file.name)


def wait_started(p: Proxy) -> None:
    """Until mitmproxy says it listens, and a moment more: the port opens before mitmproxy 12 has
    its certificate store, and a TLS client that comes that early kills the start-up."""
    deadline = time.monotonic() + 20
    while "listening at" not in p.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


def since(records: list, t0: float) -> list:
    """The emulator's records from `t0` (time.monotonic()) on."""
    return [r for r in records if r.time >= t0]


@contextlib.contextmanager
def faults(emu: Emulator, endpoint: str = "demo", **knobs) -> Iterator[None]:
    """Set WorkerFaults knobs on every worker of `endpoint`, and restore them after."""
    workers = emu.workers(endpoint)
    saved = [{k: getattr(w.faults, k) for k in knobs} for w in workers]
    try:
        for w in workers:
            for k, v in knobs.items():
                setattr(w.faults, k, v)
        yield
    finally:
        for w, old in zip(workers, saved):
            for k, v in old.items():
                setattr(w.faults, k, v)


def demo_config(**kw) -> EmulatorConfig:
    return EmulatorConfig(
        endpoints=[
            EndpointConfig(name="demo", workers=2, generation="C"),
            EndpointConfig(name="demo-b", workers=2, generation="B"),
        ],
        ttft_ms=10,
        tokens_per_s=500.0,
        **kw,
    )


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with Emulator(demo_config()) as emu:
        yield emu


def endpoint_key(emu: Emulator, name: str) -> str:
    return next(e.api_key for e in emu.config.endpoints if e.name == name)


@pytest.fixture(scope="session")
def proxy(emulator: Emulator) -> Iterator[Proxy]:
    """The proxy for endpoint 'demo' (generation-C workers)."""
    with run_proxy(emulator.autoscaler_url, "demo", endpoint_key(emulator, "demo")) as p:
        yield p


@pytest.fixture(scope="session")
def proxy_b(emulator: Emulator) -> Iterator[Proxy]:
    """The proxy for endpoint 'demo-b' (generation-B workers: reqnum replay checks, cost signed)."""
    with run_proxy(emulator.autoscaler_url, "demo-b", endpoint_key(emulator, "demo-b")) as p:
        yield p
