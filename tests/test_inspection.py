"""Inspection and replay: what `-w` files and mitmweb show of Vespa flows, and that replaying them
routes and signs afresh.

What a user checks: a saved file holds the request they sent, the routing facts and the streamed
answer, and no key or signature (grep); `mitmdump -n -C` replays it against the strict worker;
`-r` only reads; mitmweb's REST API shows the same facts and runs `vespa.status`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests
from mitmproxy import io, version

from tests.conftest import REPO, Proxy, endpoint_key, free_port, run_proxy, stop, wait_for_port
from vespa.observe.inspection import Tap

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
LARGE = 200_000  # bytes of /large, against a 4 KiB capture


# The start of the comment, which is what mitmweb's Comment column has room for.
LEAD = re.compile(r"(?P<endpoint>\S+) @ (?P<worker>\S+) (?P<status>\d{3}) route=\d+ms (?P<outcome>[^|]*?) \| ")


def lead(comment: str) -> dict[str, str]:
    m = LEAD.match(comment)
    assert m, f"the comment does not lead with endpoint, worker, status, route time and outcome: {comment!r}"
    return m.groupdict()


def read_flows(path: Path) -> list:
    with path.open("rb") as f:
        return list(io.FlowReader(f).stream())


def secrets_in(data: bytes, emulator, since: float, endpoint: str) -> list[str]:
    """Every key or signature of this test found in a file's bytes."""
    found = [name for name in (endpoint,) if endpoint_key(emulator, name).encode() in data]
    for rec in emulator.records.worker:
        if rec.time >= since and rec.auth_data and rec.auth_data.get("signature"):
            if rec.auth_data["signature"].encode() in data:
                found.append(f"signature of worker request {rec.path}")
    if b"auth_data" in data or b"serverless_signature" in data:
        found.append("a signed body or query")
    return found


def wait_exit(proxy: Proxy, timeout: float = 60) -> None:
    """mitmdump -n with -C or -r exits once it has replayed or read everything."""
    try:
        proxy.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mitmdump did not exit\n{proxy.log()}")
    assert proxy.proc.returncode == 0, proxy.log()


# --- the tap -------------------------------------------------------------------------------------
def test_tap_passes_every_chunk_through_and_keeps_a_bounded_copy() -> None:
    tap = Tap(limit=10)
    chunks = [b"abcd", b"efgh", b"ijkl", b"", b"mnop"]
    assert [tap(c) for c in chunks] == chunks
    assert bytes(tap.buf) == b"abcdefghij" and tap.seen == 16 and tap.truncated
    small = Tap(limit=100)
    for c in chunks:
        small(c)
    assert bytes(small.buf) == b"".join(chunks) and not small.truncated


# --- saved flows (-w) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(emulator, tmp_path_factory) -> Iterator[tuple[Path, float, dict]]:
    """A -w file of a generation-B endpoint (reqnum replay checks: an old signature is refused):
    a streamed chat, a plain JSON answer, a large stream past the capture, a bad body and a broken stream."""
    path = tmp_path_factory.mktemp("flows") / "flows.mitm"
    t0 = time.monotonic()
    seen: dict = {}
    with run_proxy(emulator.autoscaler_url, "demo-b", endpoint_key(emulator, "demo-b"), "vespa_capture_kb=4",
                   extra_args=("-w", str(path))) as p:
        with requests.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": True}, stream=True) as r:
            assert r.status_code == 200
            seen["sse"] = r.raw.read()
        r = requests.post(p.url + "/echo", json={"hello": "world"})
        assert r.status_code == 200
        seen["echo"] = r.content
        r = requests.get(p.url + f"/large?size={LARGE}")
        assert r.status_code == 200 and len(r.content) == LARGE, "the capture must never cut the stream"
        seen["large"] = r.content
        r = requests.post(p.url + "/echo", data=b"{oops", headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        workers = emulator.workers("demo-b")
        for w in workers:
            w.faults.die_after_chunks = 2
        try:
            with pytest.raises(requests.RequestException):
                requests.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": True}).raise_for_status()
        finally:
            for w in workers:
                w.faults.die_after_chunks = None
    yield path, t0, seen


def by_path(flows: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in flows:
        out.setdefault(f.request.path.split("?")[0], []).append(f)
    return out


def test_saved_flows_hold_no_key_and_no_signature(saved, emulator) -> None:
    path, t0, _ = saved
    data = path.read_bytes()
    assert len(read_flows(path)) == 5
    assert secrets_in(data, emulator, t0, "demo-b") == []


def test_saved_flows_show_the_request_as_sent_and_what_vespa_did(saved, emulator) -> None:
    path, t0, seen = saved
    flows = by_path(read_flows(path))
    sse, broken = flows["/v1/chat/completions"]
    (echo, bad) = flows["/echo"]
    (large,) = flows["/large"]
    assert json.loads(sse.request.content) == {**CHAT, "stream": True}
    assert json.loads(echo.request.content) == {"hello": "world"}
    assert bad.request.content == b"{oops"
    assert large.request.query.get("size") == str(LARGE) and not any(k.startswith("serverless_") for k in large.request.query)

    routes = [r for r in emulator.records.route if r.time >= t0 and r.ready]
    for f in (sse, echo, large):
        facts = f.metadata["vespa"]
        assert facts["endpoint"] == "demo-b" and facts["request_idx"] in {r.request_idx_out for r in routes}
        assert facts["worker"] in {w.url for w in emulator.workers("demo-b")}
        for shown in (f"demo-b @ {facts['worker']}", f"idx={facts['request_idx']}", "cost=1.0", "route=", "polls=0", "retries=0",
                      f"{f.request.method} {f.request.path.split('?')[0]}"):
            assert shown in f.comment, (shown, f.comment)
        assert not f.marked
    # The streamed SSE body is kept whole; the plain answer as it was; /large only up to the capture.
    assert sse.response.raw_content == seen["sse"]
    assert lead(sse.comment) == {"endpoint": "demo-b", "worker": sse.metadata["vespa"]["worker"], "status": "200",
                                 "outcome": f"streamed {len(seen['sse']) / 1024:.1f} KiB"}, sse.comment
    assert echo.response.content == seen["echo"]
    # A plain JSON answer is not called streamed.
    assert lead(echo.comment)["status"] == "200" and lead(echo.comment)["outcome"] == f"{len(seen['echo'])} B", echo.comment
    assert large.response.raw_content == seen["large"][:4096]
    assert "kept the first 4.0 KiB" in large.comment and "195.3 KiB" in large.comment
    # Failures are marked and say why.
    assert bad.marked == ":warning:" and bad.comment.startswith("400 bad_body: "), bad.comment
    assert broken.marked == ":warning:" and lead(broken.comment)["outcome"].startswith("error after "), broken.comment


def test_replay_routes_and_signs_afresh(saved, emulator, tmp_path) -> None:
    """`mitmdump -n -C`: every flow is routed again and the strict generation-B worker (which
    refuses a signature it has seen) accepts the new signatures."""
    path, _, seen = saved
    out = tmp_path / "replayed.mitm"
    t1 = time.monotonic()
    with run_proxy(emulator.autoscaler_url, "demo-b", endpoint_key(emulator, "demo-b"),
                   extra_args=("-n", "-C", str(path), "-w", str(out)), wait=False) as p:
        wait_exit(p)
    routes = [r for r in emulator.records.route if r.time >= t1]
    workers = [r for r in emulator.records.worker if r.time >= t1]
    # The four good ones are routed; the bad body is refused before any route call or worker.
    assert len([r for r in routes if r.ready]) == 4
    assert sorted(r.path for r in workers) == ["/echo", "/large", "/v1/chat/completions", "/v1/chat/completions"]
    assert all(r.signature_ok and r.status_code == 200 for r in workers)
    assert {r.auth_data["request_idx"] for r in workers} <= {r.request_idx_out for r in routes}

    replayed = by_path(read_flows(out))
    sse = replayed["/v1/chat/completions"][0]
    assert sse.is_replay == "request" and json.loads(sse.request.content) == {**CHAT, "stream": True}
    assert sse.metadata["vespa"]["request_idx"] in {r.request_idx_out for r in routes}
    # Same tokens as the first time (the backend is deterministic), freshly streamed and kept.
    assert [line for line in sse.response.raw_content.splitlines() if b"tok" in line][:1] != []
    assert sse.response.raw_content.count(b"data:") == seen["sse"].count(b"data:")
    echo = replayed["/echo"][0]
    assert echo.response.status_code == 200 and not echo.marked
    # The stream that broke the first time works now: its old warning and facts are gone.
    assert all(f.response.status_code == 200 and not f.marked and "error" not in f.comment
               for f in replayed["/v1/chat/completions"])
    assert secrets_in(out.read_bytes(), emulator, t1, "demo-b") == []


def test_reading_a_file_sends_nothing_and_changes_nothing(saved, emulator, tmp_path) -> None:
    path, _, _ = saved
    out = tmp_path / "reread.mitm"
    t1 = time.monotonic()
    with run_proxy(emulator.autoscaler_url, "demo-b", endpoint_key(emulator, "demo-b"),
                   extra_args=("-n", "-r", str(path), "-w", str(out)), wait=False) as p:
        wait_exit(p)
    assert [r for r in emulator.records.route if r.time >= t1] == []
    assert [r for r in emulator.records.worker if r.time >= t1] == []
    # The save addon writes a flow that has both a response and an error twice: compare by id.
    def shown(path: Path) -> dict:
        return {f.id: (f.comment, f.marked, f.metadata, f.response and f.response.raw_content) for f in read_flows(path)}

    assert shown(out) == shown(path)


# --- mitmweb -----------------------------------------------------------------------------------------
MITM12 = int(version.VERSION.split(".")[0]) >= 12


class Web:
    """mitmweb's REST API, the way its own UI calls it."""

    def __init__(self, port: int, token: str | None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.s = requests.Session()
        if token:  # 11.0.2 has no token (CVE-2025-23217 was fixed in 11.1.2)
            self.s.headers["Authorization"] = f"Bearer {token}"
        xsrf = secrets.token_hex(8)  # tornado checks that cookie and header match; 11 and 12 name it differently
        for cookie in ("_xsrf", "_mitmproxy_xsrf"):
            self.s.cookies.set(cookie, xsrf)
        self.s.headers["X-XSRFToken"] = xsrf

    def get(self, path: str) -> requests.Response:
        r = self.s.get(self.base + path, timeout=10)
        r.raise_for_status()
        return r

    def post(self, path: str, body: dict | None = None) -> requests.Response:
        r = self.s.post(self.base + path, json=body or {}, timeout=10)
        r.raise_for_status()
        return r

    def command(self, name: str) -> dict:
        answer = self.post(f"/commands/{name}", {"arguments": []}).json()
        assert "error" not in answer, answer
        return json.loads(answer["value"])

    def flows(self) -> list[dict]:
        return self.get("/flows").json()


@pytest.fixture
def web(emulator) -> Iterator[tuple[Proxy, Web]]:
    token, web_port = secrets.token_hex(16), free_port()
    opts = [f"web_port={web_port}", "web_open_browser=false", "web_host=127.0.0.1"]
    if MITM12:
        opts.append(f"web_password={token}")
    with run_proxy(emulator.autoscaler_url, "demo", endpoint_key(emulator, "demo"), *opts, tool="mitmweb") as p:
        wait_for_port(web_port, p.proc)
        yield p, Web(web_port, token if MITM12 else None)


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_mitmweb_shows_routing_facts_and_streamed_body_and_replays(web, emulator) -> None:
    proxy, api = web
    key = endpoint_key(emulator, "demo")
    t0 = time.monotonic()
    rate = emulator.config.tokens_per_s
    emulator.config.tokens_per_s = 20.0  # a stream slow enough to look at while it runs
    try:
        with requests.post(proxy.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 10, "stream": True},
                           stream=True) as r:
            chunks = r.iter_content(chunk_size=None)
            first = next(chunks)
            # Mid-stream: the flow already shows the client's request, and a save holds no signature.
            status = api.command("vespa.status")
            assert status["in_flight"] == 1
            (live,) = api.flows()
            assert live["request"]["path"] == "/v1/chat/completions" and lead(live["comment"])["outcome"] == "streaming"
            dump = api.get("/flows/dump").content
            assert dump and secrets_in(dump, emulator, t0, "demo") == []
            body = first + b"".join(chunks)
    finally:
        emulator.config.tokens_per_s = rate
    assert b"[DONE]" in body

    (flow,) = wait_for(lambda: [f for f in api.flows() if f.get("response") and "streamed" in f["comment"]],
                       "the finished flow")
    (rec,) = [w for w in emulator.records.worker if w.time >= t0]
    assert rec.signature_ok
    for shown in ("POST /v1/chat/completions", f"demo @ {rec.auth_data['url']}",
                  f"idx={rec.auth_data['request_idx']}", "cost=1.0", "route=", "polls=0", "retries=0"):
        assert shown in flow["comment"], (shown, flow["comment"])
    assert lead(flow["comment"]) == {"endpoint": "demo", "worker": rec.auth_data["url"], "status": "200",
                                     "outcome": f"streamed {len(body) / 1024:.1f} KiB"}, flow["comment"]
    assert flow["marked"] == ""
    # The list says where the request went: the worker, not the autoscaler (nor Vespa's worker leg).
    worker = urlsplit(rec.auth_data["url"])
    assert (flow["request"]["host"], flow["request"]["port"]) == (worker.hostname, worker.port)
    assert flow["request"]["path"] == "/v1/chat/completions"
    sent = api.get(f"/flows/{flow['id']}/request/content.data").content
    assert json.loads(sent) == {**CHAT, "max_tokens": 10, "stream": True}
    kept = api.get(f"/flows/{flow['id']}/response/content.data").content
    assert kept == body

    status = api.command("vespa.status")
    assert status["endpoint"] == "demo" and status["in_flight"] == 0
    assert status["key"].endswith(key[-4:]) and key not in json.dumps(status)
    assert isinstance(status["last_route_ms"], float)

    # The Replay button: a new route call, a new signature the worker verifies, the same flow updated.
    t1 = time.monotonic()
    api.post(f"/flows/{flow['id']}/replay")
    (again,) = wait_for(lambda: [w for w in emulator.records.worker if w.time >= t1 and w.status_code], "the replay")
    assert again.signature_ok and again.status_code == 200
    assert [r for r in emulator.records.route if r.time >= t1 and r.ready]
    replayed = wait_for(lambda: [f for f in api.flows()
                                 if f["id"] == flow["id"] and f"idx={again.auth_data['request_idx']}" in f["comment"]
                                 and lead(f["comment"])["status"] == "200"], "the replayed flow's comment")
    assert replayed[0]["request"]["path"] == "/v1/chat/completions"

    # A failure is marked in the list, and nothing the UI serves holds the key or a signature.
    r = requests.post(proxy.url + "/echo", data=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    bad = wait_for(lambda: [f for f in api.flows() if "bad_body" in f["comment"]], "the failed flow")
    assert bad[0]["marked"] in (":warning:", "\u26a0")  # 12 sends the emoji itself
    for path in ("/flows/dump", "/flows", "/options", "/state"):
        assert secrets_in(api.get(path).content, emulator, t0, "demo") == [], path


def test_run_sh_web_starts_mitmweb_showing_vespa_comments(tmp_path: Path) -> None:
    """`scripts/run.sh --demo --web`, as a user starts it: the token comes from mitmweb's own
    start-up line, and the flow list has the comment column."""
    port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "XDG_CACHE"))}
    env["HOME"] = str(tmp_path)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(REPO / "scripts" / "run.sh"), "--demo", "--web", "--port", str(port), "--",
                                 "--set", f"web_port={web_port}", "--set", "web_open_browser=false"],
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=60)
        wait_for_port(web_port, proc)
        started = wait_for(lambda: re.search(rf"listening at http://127.0.0.1:{web_port}/(\?token=(\w+))?", log.read_text()),
                           "mitmweb's start-up line")
        api = Web(web_port, started.group(2))
        with requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", stream=True,
                           json={**CHAT, "model": "vespa-demo", "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and b"[DONE]" in r.raw.read()
        wait_for(lambda: [f for f in api.flows() if f["comment"].startswith("vespa-demo @ ")
                           and lead(f["comment"])["outcome"].startswith("streamed ")],
                 "the demo flow in mitmweb")
        assert "comment" in api.get("/options").json()["web_columns"]["value"]
    finally:
        stop(proc, timeout=15)
    assert proc.returncode == 0, log.read_text()
