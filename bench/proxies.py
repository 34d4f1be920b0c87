"""The mitmdump processes under test, and their memory.

Vespa runs with exactly the command and environment `scripts/run.sh` builds
(`vespa.cli.launcher.mitm_command`/`mitm_env`), so the figures are the ones users get.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from vespa.cli import launcher
from vespa.procs import free_port, stop, wait_for_port

REPO = Path(__file__).resolve().parent.parent
MITMDUMP = Path(sys.executable).parent / "mitmdump"
# Bare mitmproxy gets the same tuning as Vespa, minus the addon.
BARE_OPTIONS = ("connection_strategy=lazy", "flow_detail=0")


@contextlib.contextmanager
def vespa_proxy(
    autoscaler_url: str, console_url: str, endpoint: str, api_key: str, strategy: str = "lazy",
    env: dict[str, str] | None = None, leg: str | None = None,
) -> Iterator[Proc]:
    """`env` adds to the launcher's environment (e.g. XDG_CACHE_HOME, so the worker CA the addon
    downloads for HTTPS workers lands in a throw-away folder)."""
    port = free_port()
    known = {
        "target": launcher.Target(endpoint=endpoint, key=api_key, key_source="bench", direct=True),
        "host": "127.0.0.1", "port": port, "autoscaler_url": autoscaler_url, "console_url": console_url,
        "web": False, "debug": False,
        # `leg` (or env VESPA_BENCH_LEG) = "thread": the worker leg in the proxy's own process.
        "extra": ["--set", f"vespa_leg={mode}"] if (mode := leg or os.environ.get("VESPA_BENCH_LEG")) else [],
    }
    # By field name, so the launcher can grow fields with defaults without breaking the bench.
    proxy = launcher.Proxy(**{f.name: known[f.name] for f in dataclasses.fields(launcher.Proxy) if f.name in known})
    # `strategy` swaps the launcher's choice in place (a second --set of it would be refused),
    # to show what the other choice would cost.
    cmd = [f"connection_strategy={strategy}" if a == "connection_strategy=lazy" else a for a in launcher.mitm_command(proxy)]
    with _run(cmd, launcher.mitm_env(proxy) | (env or {}), port) as p:
        yield p


@contextlib.contextmanager
def bare_proxy(target_url: str, *extra_options: str) -> Iterator[Proc]:
    port = free_port()
    cmd = [str(MITMDUMP), "--mode", f"reverse:{target_url}", "--listen-host", "127.0.0.1", "-p", str(port)]
    for opt in BARE_OPTIONS + extra_options:
        cmd += ["--set", opt]
    with _run(cmd, dict(os.environ), port) as p:
        yield p


class Proc:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)


@contextlib.contextmanager
def _run(cmd: list[str], env: dict[str, str], port: int) -> Iterator[Proc]:
    env = {**env, "PYTHONUNBUFFERED": "1"}
    with tempfile.NamedTemporaryFile("wb", prefix="vespa-bench-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    p = Proc(proc, port, Path(log.name))
    try:
        try:
            wait_for_port(port, proc, timeout=60.0)
        except Exception as e:
            raise RuntimeError(f"{e}\n--- {Path(cmd[0]).name} log ---\n{p.log.read_text(errors='replace')[-3000:]}") from e
        yield p
    finally:
        stop(proc)
        p.log.unlink(missing_ok=True)


def tree(pid: int) -> list[int]:
    """`pid` and its descendants: Vespa is mitmdump plus its worker leg, and both count."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        kids = [child for child, ppid in parents.items() if ppid == parent]
        found += kids
        todo += kids
    return found


def cpu_s(pid: int) -> float:
    """User + system CPU time the process and its children use: less sensitive to a busy machine
    than wall time."""
    total = 0.0
    for one in tree(pid):
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of the process and its children (mitmdump and the worker leg)."""
    total, seen = 0.0, False
    for one in tree(pid):
        try:
            with open(f"/proc/{one}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
                        seen = True
        except OSError:
            continue
    if not seen:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return total


class PeakRss:
    """Samples a process's RSS in a thread (not the event loop: a busy loop would miss peaks)."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))
