"""The addon run exactly as docs/OPTIONS.md gives it by hand (`mitmdump -s vespa_addon.py --mode
reverse:URL --listen-host 127.0.0.1 -p P --set vespa_endpoint=NAME`, nothing else): as right as
through scripts/run.sh, which adds connection_strategy and vespa_autoscaler_url (issue 12)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import requests

from bench.relay import CountingRelay
from tests.conftest import ADDON, BIN, REPO, demo_config, endpoint_key
from vespa.emulator import Emulator
from vespa.procs import free_port, stop, wait_for_port


@contextlib.contextmanager
def by_hand(target: str, endpoint: str, key: str) -> Iterator[str]:
    port = free_port()
    cmd = [str(BIN / "mitmdump"), "-s", str(ADDON), "--mode", f"reverse:{target}", "--listen-host", "127.0.0.1",
           "-p", str(port), "--set", f"vespa_endpoint={endpoint}"]
    env = {**os.environ, "VAST_API_KEY": key}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)


@contextlib.contextmanager
def relay_to(host: str, port: int) -> Iterator[CountingRelay]:
    """A connection-counting relay in its own loop and thread."""
    loop = asyncio.new_event_loop()
    relay = CountingRelay(host, port)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(relay.__aenter__(), loop).result(10)
    try:
        yield relay
    finally:
        asyncio.run_coroutine_threadsafe(relay.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_one_url_is_enough_and_client_connections_cost_no_autoscaler_connection() -> None:
    with Emulator(demo_config()) as emu:
        host, port = emu.autoscaler_url.removeprefix("http://").split(":")
        with relay_to(host, int(port)) as relay, by_hand(relay.url, "demo", endpoint_key(emu, "demo")) as url:
            for _ in range(20):  # a new client connection each
                r = requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                                  headers={"Connection": "close"}, timeout=30)
                assert r.status_code == 200, r.text
            # the reverse target was the autoscaler (no vespa_autoscaler_url), reached through one
            # pooled connection: eager mode would have opened one per client connection.
            assert relay.accepted <= 2


def test_unreachable_autoscaler_gets_json_not_an_empty_reply() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket closes
    with by_hand(f"http://127.0.0.1:{closed}", "demo", "ep-some-endpoint-key-1234") as url:
        health = requests.get(url + "/_vespa/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        r = requests.post(url + "/v1/chat/completions", json={}, timeout=60)
        assert r.status_code == 502 and r.json()["error"]["type"] == "autoscaler_unreachable"
        assert "Connect call failed" in r.json()["error"]["message"] or "connect" in r.json()["error"]["message"].lower()
