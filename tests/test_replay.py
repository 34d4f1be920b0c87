"""`scripts/run.sh --replay FILE`: every saved request routed and signed afresh, one line per flow,
exit 0 only when a worker answered each; and a saved file never decides where the key goes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
from mitmproxy import http, io
from mitmproxy.test import tflow

from tests.conftest import REPO, endpoint_key, run_proxy
from tests.test_inspection import CHAT, read_flows

ENDPOINT = "demo-b"  # generation B: the worker refuses a signature it has seen, so each replay must be signed anew


def replay(emulator, path: str, *mitm_args: str, key: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAST_")}
    env["VAST_API_KEY"] = key or endpoint_key(emulator, ENDPOINT)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "vespa.cli.launcher", "--replay", path, "--endpoint", ENDPOINT,
         "--autoscaler-url", emulator.autoscaler_url, "--console-url", emulator.console_url,
         *(("--", *mitm_args) if mitm_args else ())],
        env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def saved(emulator, tmp_path_factory) -> Path:
    """Three requests as a user saves them with -w: a stream, a JSON POST, a GET with a query."""
    path = tmp_path_factory.mktemp("replay") / "flows.mitm"
    with run_proxy(emulator.autoscaler_url, ENDPOINT, endpoint_key(emulator, ENDPOINT), extra_args=("-w", str(path))) as p:
        with requests.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": True}, stream=True) as r:
            assert r.status_code == 200 and b"[DONE]" in r.raw.read()
        assert requests.post(p.url + "/echo", json={"hello": "world"}).status_code == 200
        assert requests.get(p.url + "/v1/models?token=q").status_code == 200
    return path


def test_replay_prints_one_line_per_flow_and_exits_0(saved, emulator) -> None:
    t0 = time.monotonic()
    done = replay(emulator, str(saved))
    assert done.returncode == 0, done.stdout + done.stderr
    workers = {w.url for w in emulator.workers(ENDPOINT)}
    lines = done.stdout.splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["POST /v1/chat/completions", "POST /echo", "GET /v1/models"]
    for line in lines:
        worker, status = line.split(" -> ")[1].split(" ")
        assert worker in workers and status == "200", line
    # Routed and signed afresh: the strict generation-B worker accepted three new signatures.
    sent = [w for w in emulator.records.worker if w.time >= t0]
    assert sorted(w.path for w in sent) == ["/echo", "/v1/chat/completions", "/v1/models"]
    assert all(w.signature_ok and w.status_code == 200 for w in sent)
    assert "3 of 3 flow(s) answered by a worker" in done.stderr
    assert endpoint_key(emulator, ENDPOINT) not in done.stdout + done.stderr


def test_replay_writes_the_replayed_flows_where_asked(saved, emulator, tmp_path) -> None:
    out = tmp_path / "replayed.mitm"
    done = replay(emulator, str(saved), "-w", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    flows = read_flows(out)
    assert [f.request.path.split("?")[0] for f in flows] == ["/v1/chat/completions", "/echo", "/v1/models"]
    assert all(f.is_replay == "request" and f.response.status_code == 200 for f in flows)


def test_a_flow_without_a_worker_answer_makes_the_exit_status_non_zero(emulator, tmp_path) -> None:
    path = tmp_path / "bad.mitm"
    with run_proxy(emulator.autoscaler_url, ENDPOINT, endpoint_key(emulator, ENDPOINT), extra_args=("-w", str(path))) as p:
        assert requests.post(p.url + "/echo", json={"ok": 1}).status_code == 200
        assert requests.post(p.url + "/echo", data=b"{oops", headers={"Content-Type": "application/json"}).status_code == 400
    done = replay(emulator, str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    good, bad = done.stdout.splitlines()
    assert good.startswith("POST /echo -> http") and good.endswith(" 200")
    assert bad == "POST /echo -> - 400 bad_body", bad
    assert "1 of 2 flow(s) answered by a worker" in done.stderr


def test_a_missing_file_is_a_usage_error(emulator, tmp_path) -> None:
    done = replay(emulator, str(tmp_path / "nope.mitm"))
    assert done.returncode == 2 and "cannot read" in done.stderr and done.stdout == ""


class Hostile:
    """A local server that records every connection and byte it gets: it must get nothing."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while chunk := conn.recv(65536):
                        data += chunk
                        if b"\r\n\r\n" in data:
                            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            break
                except OSError:
                    pass
                self.received.append(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    h = Hostile()
    yield h
    h.close()


def hostile_file(path: Path, port: int) -> None:
    """Flows as a file from someone else could hold them: pointed at their server, over HTTP and
    HTTPS, with their own Host and Vespa endpoint headers."""
    body = json.dumps({"hello": "world"}).encode()
    flows = []
    for scheme, path_ in (("http", "/echo"), ("https", "/echo"), ("http", "/v1/models")):
        method = "GET" if path_ == "/v1/models" else "POST"
        req = http.Request.make(method, f"{scheme}://127.0.0.1:{port}{path_}", b"" if method == "GET" else body,
                                {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
                                 "X-Vespa-Endpoint": "their-endpoint"})
        f = tflow.tflow(req=req, resp=True)
        f.server_conn.address = ("127.0.0.1", port)
        flows.append(f)
    with path.open("wb") as out:
        writer = io.FlowWriter(out)
        for f in flows:
            writer.add(f)


def test_a_saved_file_never_decides_where_the_key_goes(emulator, hostile, tmp_path) -> None:
    path = tmp_path / "theirs.mitm"
    hostile_file(path, hostile.port)
    t0 = time.monotonic()
    done = replay(emulator, str(path))
    assert hostile.received == [], "the file's server got a connection"
    # The requests went to the endpoint of the command line instead, signed with its key.
    assert done.returncode == 0, done.stdout + done.stderr
    sent = [w for w in emulator.records.worker if w.time >= t0]
    assert sorted(w.path for w in sent) == ["/echo", "/echo", "/v1/models"]
    assert all(w.signature_ok for w in sent)
    assert {r.endpoint for r in emulator.records.route if r.time >= t0} == {ENDPOINT}
