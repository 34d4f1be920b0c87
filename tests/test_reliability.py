"""Reliability, end to end: the fault matrix of docs/RELIABILITY.md, row by row.

Each test turns one emulator fault knob, sends real requests through mitmdump + vespa_addon.py,
and checks both what the client received and what the emulator recorded (route calls, worker
requests, whether the backend ran). The module has its own emulator so its faults never leak
into other tests; every knob is restored in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from typing import Iterator

import pytest
import requests

from tests.conftest import Proxy, demo_config, endpoint_key, faults, run_proxy, since, wait_started
from vespa.emulator import Emulator

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(demo_config()) as e:
        yield e


@pytest.fixture(scope="module")
def rproxy(emu: Emulator) -> Iterator[Proxy]:
    with run_proxy(emu.autoscaler_url, "demo", endpoint_key(emu, "demo")) as p:
        wait_started(p)
        yield p


def assert_vespa_json(status: int, headers, body: bytes, err_type: str, retry: bool) -> dict:
    """The shape every Vespa error has, and never mitmproxy's HTML page."""
    assert b"<html" not in body.lower() and b"mitmproxy" not in body.lower(), body
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["content-type"].startswith("application/json")
    assert lower["x-vespa-error"] == err_type
    error = json.loads(body)["error"]
    assert error["type"] == err_type and error["message"] and error["hint"]
    if retry:
        assert int(lower["retry-after"]) > 0
        assert "not processed" in error["message"] + error["hint"]
    else:
        assert "retry-after" not in lower
    return error


def curl_h2(url: str, body: dict) -> tuple[str, dict[str, str], bytes]:
    """POST over HTTP/2 (TLS, ALPN h2) with curl: (status line, headers, body)."""
    out = subprocess.run(
        ["curl", "-sk", "--http2", "-i", "-H", "content-type: application/json", "-d", json.dumps(body), url],
        capture_output=True, timeout=30, check=True,
    ).stdout
    head, _, payload = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, payload


# --- mitmproxy's own error reply becomes Vespa's JSON ---------------------------------------------
def test_worker_refuses_http1_client_gets_json_not_html(rproxy: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    with faults(emu, refuse=True):
        r = requests.post(rproxy.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 503
    assert_vespa_json(r.status_code, r.headers, r.content, "worker_unavailable", retry=True)
    assert since(emu.records.worker, t0) == []  # no worker ever saw it
    assert len(since(emu.records.route, t0)) >= 1


def test_mitmproxy_error_reply_is_json_over_http2(tight: Proxy, emu: Emulator) -> None:
    """The first-byte watchdog cuts the worker, so mitmproxy itself answers the HTTP/2 stream:
    errorpage must turn that reply into Vespa's JSON (the HTTP/1 case: test_first_byte_timeout)."""
    t0 = time.monotonic()
    with faults(emu, stall_s=4.0):
        status, headers, body = curl_h2(f"https://127.0.0.1:{tight.port}/v1/chat/completions", CHAT)
    assert status.startswith("HTTP/2 504"), status
    assert_vespa_json(504, headers, body, "worker_first_byte_timeout", retry=False)
    assert len(since(emu.records.worker, t0)) == 1
    # The same proxy still serves HTTP/2.
    status, _, body = curl_h2(f"https://127.0.0.1:{tight.port}/v1/chat/completions", CHAT)
    assert status.startswith("HTTP/2 200") and json.loads(body)["choices"]


def test_explain_maps_mitmproxy_connect_errors_to_not_processed() -> None:
    from vespa.proxy import errorpage

    # Messages as measured from mitmproxy 11.0.2 and 12.3.1 when the worker leg refuses, or when
    # the process has no file descriptor left (nothing was sent either way).
    for message in ("[Errno 111] Connect call failed ('127.0.0.1', 41649)", "[Errno 24] Too many open files"):
        err = errorpage.explain(message, 502)
        assert err.type == "worker_leg_unreachable" and err.retry_after and "not processed" in err.message
    err = errorpage.explain("peer closed connection without sending complete message body", 502)
    assert err.type == "worker_failed" and err.retry_after is None
    assert errorpage.explain("Request body exceeds mitmproxy's body_size_limit.", 413).status == 413


def _raw_sse(proxy: Proxy, body: dict) -> bytes:
    """Everything the proxy sends back on one HTTP/1.1 connection, until it closes."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_stream_breaks_midway_sse_error_event_and_no_clean_end(rproxy: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    with faults(emu, die_after_chunks=3):
        raw = _raw_sse(rproxy, {**CHAT, "stream": True, "max_tokens": 20})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head.lower()
    assert b"data: [DONE]" not in body
    assert b"event: error" in body and b'"worker_failed"' in body
    # The error event comes after the tokens that did arrive, and the chunked body never ends
    # with the zero-length chunk: a client that reads the framing knows it was cut.
    assert body.index(b"chat.completion.chunk") < body.index(b"event: error")
    assert not body.endswith(b"0\r\n\r\n")
    (rec,) = since(emu.records.worker, t0)
    assert rec.fault == "die_after_chunks" and rec.reached_backend
    assert len(since(emu.records.route, t0)) == 1  # never resent once bytes went out


@pytest.fixture(scope="module")
def tight(emu: Emulator) -> Iterator[Proxy]:
    """A proxy with short limits, so timeouts and the body limit trip within a test."""
    with run_proxy(
        emu.autoscaler_url, "demo", endpoint_key(emu, "demo"),
        "vespa_first_byte_timeout_s=1", "vespa_idle_timeout_s=1", "vespa_max_body_kb=1",
    ) as p:
        wait_started(p)
        yield p


# --- a worker that never took the request ----------------------------------------------------------
def test_one_worker_refuses_request_is_routed_again_and_served_once(rproxy: Proxy, emu: Emulator) -> None:
    bad, good = emu.workers("demo")
    saved = bad.faults.refuse
    t0 = time.monotonic()
    try:
        bad.faults.refuse = True
        for _ in range(3):  # round robin: at least one of these is first sent to the bad worker
            r = requests.post(rproxy.url + "/v1/chat/completions", json=CHAT, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        bad.faults.refuse = saved
    routes = since(emu.records.route, t0)
    workers = since(emu.records.worker, t0)
    assert len(workers) == 3 and all(w.worker_id == good.id and w.reached_backend for w in workers)
    rerouted = [r for r in routes if r.request_idx_in]
    assert rerouted, "no request was routed again"
    # The second route call names the first one's request_idx: the load is counted once.
    outs = {r.request_idx_out for r in routes if not r.request_idx_in}
    assert all(r.request_idx_in in outs and r.request_idx_out == r.request_idx_in for r in rerouted)
    assert len(routes) == 3 + len(rerouted)


def test_all_workers_refuse_bounded_reroutes_then_json_503(rproxy: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    with faults(emu, refuse=True):
        r = requests.post(rproxy.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert_vespa_json(r.status_code, r.headers, r.content, "worker_unavailable", retry=True)
    assert r.status_code == 503
    routes = since(emu.records.route, t0)
    assert len(routes) == 4  # RouterSettings.max_attempts
    assert len({r.request_idx_out for r in routes}) == 1
    assert since(emu.records.worker, t0) == []


def test_a_pooled_worker_that_dies_is_routed_around_without_a_failed_request(emu: Emulator) -> None:
    """Both workers answered, so the worker leg holds warm connections to each. One dies (its
    sockets reset, its port closed): the stale pooled connection is dropped, the connect is
    refused before anything is sent, and the request is routed to the other. Nothing fails,
    nothing runs twice."""
    bad, good = emu.workers("demo")
    with run_proxy(emu.autoscaler_url, "demo", endpoint_key(emu, "demo")) as p:
        for _ in range(2):  # round robin: both workers answer once, both connections pooled
            assert requests.post(p.url + "/echo", json={}, timeout=30).status_code == 200
        t0 = time.monotonic()
        bad.faults.refuse = True
        try:
            answers = [requests.post(p.url + "/echo", json={"i": i}, timeout=30) for i in range(6)]
        finally:
            bad.faults.refuse = False
    assert [r.status_code for r in answers] == [200] * 6
    workers = since(emu.records.worker, t0)
    assert all(w.worker_id == good.id for w in workers)
    assert sorted(w.payload["i"] for w in workers) == list(range(6))


def test_worker_queue_full_429_is_routed_again_then_json_503_not_processed(rproxy: Proxy, emu: Emulator) -> None:
    """A 429 means the worker refused before any work: the leg routes the request again (same
    request_idx), bounded; when every worker stays full the client gets a retryable 503."""
    t0 = time.monotonic()
    with faults(emu, status=429):
        r = requests.post(rproxy.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 503
    assert_vespa_json(r.status_code, r.headers, r.content, "worker_unavailable", retry=True)
    recs = since(emu.records.worker, t0)
    assert len(recs) == 4  # RouterSettings.max_attempts
    assert all(rec.status_code == 429 and not rec.reached_backend for rec in recs)
    assert len({r.request_idx_out for r in since(emu.records.route, t0)}) == 1


def test_worker_queue_full_once_then_served_by_another(rproxy: Proxy, emu: Emulator) -> None:
    full, free = emu.workers("demo")
    t0 = time.monotonic()
    full.faults.status = 429
    try:
        answers = [requests.post(rproxy.url + "/echo", json={"i": i}, timeout=60) for i in range(4)]
    finally:
        full.faults.status = None
    assert [r.status_code for r in answers] == [200] * 4
    served = [w for w in since(emu.records.worker, t0) if w.reached_backend]
    assert sorted(w.payload["i"] for w in served) == [0, 1, 2, 3] and all(w.worker_id == free.id for w in served)


@pytest.mark.parametrize("stream", [False, True])
def test_worker_resets_before_headers_json_502_not_resent(rproxy: Proxy, emu: Emulator, stream: bool) -> None:
    """The request bytes reached the worker, which may have started it: no resend, no Retry-After."""
    t0 = time.monotonic()
    with faults(emu, reset_before_headers=True):
        r = requests.post(rproxy.url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=60)
    assert r.status_code == 502
    assert_vespa_json(r.status_code, r.headers, r.content, "worker_failed", retry=False)
    (rec,) = since(emu.records.worker, t0)  # exactly one worker request: never resent
    assert rec.fault == "reset_before_headers" and rec.signature_ok and not rec.reached_backend
    assert len(since(emu.records.route, t0)) == 1


# --- a worker whose connect times out (WorkerFaults.blackhole) ---------------------------------------
CONNECT_TIMEOUT_S = 1
ROUTE_DEADLINE_S = 2


@pytest.fixture(scope="module")
def quick_connect(emu: Emulator) -> Iterator[Proxy]:
    """Connects give up after 1 s and re-routes after 2 s, so a black-holed worker costs little."""
    with run_proxy(
        emu.autoscaler_url, "demo", endpoint_key(emu, "demo"),
        f"vespa_connect_timeout_s={CONNECT_TIMEOUT_S}", f"vespa_route_deadline_s={ROUTE_DEADLINE_S}",
    ) as p:
        wait_started(p)
        yield p


def test_one_worker_connect_times_out_request_routed_again_and_served_once(
    quick_connect: Proxy, emu: Emulator
) -> None:
    bad, good = emu.workers("demo")
    t0 = time.monotonic()
    with contextlib.ExitStack() as undo:
        bad.faults.blackhole = True
        undo.callback(setattr, bad.faults, "blackhole", False)
        for _ in range(2):  # strict round robin: one of these is first routed to the bad worker
            r = requests.post(quick_connect.url + "/v1/chat/completions", json=CHAT, timeout=60)
            assert r.status_code == 200, r.text
    routes = since(emu.records.route, t0)
    workers = since(emu.records.worker, t0)
    assert len(workers) == 2 and all(w.worker_id == good.id and w.reached_backend for w in workers)
    firsts = [r for r in routes if not r.request_idx_in]
    rerouted = [r for r in routes if r.request_idx_in]
    assert len(firsts) == 2 and rerouted, "no request was routed again"
    assert len(routes) == 2 + len(rerouted)
    for again in rerouted:
        (first,) = [r for r in firsts if r.request_idx_out == again.request_idx_in]
        assert first.worker_url == bad.url and again.worker_url == good.url
        assert again.request_idx_out == first.request_idx_out  # the load is counted once
        # Skipped only after the connect timeout ran out (a refusal is skipped at once).
        assert again.time - first.time >= CONNECT_TIMEOUT_S * 0.9


def test_all_workers_connect_time_out_json_503_with_retry_after_bounded(
    quick_connect: Proxy, emu: Emulator
) -> None:
    t0 = time.monotonic()
    with faults(emu, blackhole=True):
        r = requests.post(quick_connect.url + "/v1/chat/completions", json=CHAT, timeout=60)
        elapsed = time.monotonic() - t0
    assert r.status_code == 503
    error = assert_vespa_json(r.status_code, r.headers, r.content, "worker_connect_timeout", retry=True)
    assert f"within {CONNECT_TIMEOUT_S} s" in error["message"]
    assert since(emu.records.worker, t0) == []  # the request was never sent
    routes = since(emu.records.route, t0)
    assert 1 <= len(routes) <= 4 and len({r.request_idx_out for r in routes}) == 1
    # Each connect waited its timeout, and the re-routes stopped at the route deadline: bounded,
    # where the kernel alone would keep retrying the SYN for about two minutes.
    assert elapsed >= CONNECT_TIMEOUT_S * 0.9
    assert elapsed < ROUTE_DEADLINE_S + CONNECT_TIMEOUT_S + 5


# --- timeouts ---------------------------------------------------------------------------------------
def test_first_byte_timeout_json_504(tight: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    with faults(emu, stall_s=4.0):
        r = requests.post(tight.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 504
    assert_vespa_json(r.status_code, r.headers, r.content, "worker_first_byte_timeout", retry=False)
    (rec,) = since(emu.records.worker, t0)
    assert rec.fault == "stall"
    assert len(since(emu.records.route, t0)) == 1  # the worker had it: never resent
    _until(lambda: rec.client_disconnected)  # the proxy hung up on the silent worker


def test_idle_gap_in_stream_sse_error_event_and_cut(tight: Proxy, emu: Emulator) -> None:
    saved = emu.config.tokens_per_s
    t0 = time.monotonic()
    try:
        emu.config.tokens_per_s = 0.4  # 2.5 s between tokens, over the 1 s idle limit
        raw = _raw_sse(tight, {**CHAT, "stream": True, "max_tokens": 5})
    finally:
        emu.config.tokens_per_s = saved
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"event: error" in body and b'"worker_idle_timeout"' in body
    assert b"data: [DONE]" not in body and not body.endswith(b"0\r\n\r\n")
    (rec,) = since(emu.records.worker, t0)
    assert rec.reached_backend
    _until(lambda: rec.client_disconnected)


# --- the client goes away ---------------------------------------------------------------------------
def test_client_leaves_mid_stream_worker_connection_closed(rproxy: Proxy, emu: Emulator) -> None:
    saved = emu.config.tokens_per_s
    t0 = time.monotonic()
    try:
        emu.config.tokens_per_s = 5.0
        payload = json.dumps({**CHAT, "stream": True, "max_tokens": 200}).encode()
        with socket.create_connection(("127.0.0.1", rproxy.port), timeout=30) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            assert b"chat.completion.chunk" in s.recv(65536) + s.recv(65536)
        left = time.monotonic()
        (rec,) = since(emu.records.worker, t0)
        _until(lambda: rec.client_disconnected)
        print(f"worker saw the client leave {time.monotonic() - left:.2f} s after it closed")
        assert rec.chunks_sent < 200
    finally:
        emu.config.tokens_per_s = saved


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "headers", "status", "err_type"),
    [
        (b"not json", {"Content-Type": "application/json"}, 400, "bad_body"),
        (json.dumps({"x": "y" * 2000}).encode(), {"Content-Type": "application/json"}, 413, "body_too_large"),
        (b"{}", {"X-Serverless-Cost": "-1"}, 400, "bad_cost"),
        (b"{}", {"X-Serverless-Cost": "NaN"}, 400, "bad_cost"),
        (b"{}", {"X-Serverless-Cost": "lots"}, 400, "bad_cost"),
    ],
)
def test_bad_input_clear_4xx_and_nothing_sent(
    tight: Proxy, emu: Emulator, body: bytes, headers: dict, status: int, err_type: str
) -> None:
    t0 = time.monotonic()
    r = requests.post(tight.url + "/v1/chat/completions", data=body, headers=headers, timeout=60)
    assert r.status_code == status
    assert_vespa_json(r.status_code, r.headers, r.content, err_type, retry=False)
    assert since(emu.records.worker, t0) == []
    # Other flows are not disturbed.
    assert requests.post(tight.url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.02)


# --- worker URLs the proxy must refuse ------------------------------------------------------------------
def test_a_route_url_that_is_not_http_is_refused() -> None:
    from vespa import wire
    from vespa.errors import BadRouteAnswer

    answer = {"url": "file:///etc/passwd", "cost": 1, "endpoint": "e", "reqnum": 1, "request_idx": 1, "signature": "s"}
    with pytest.raises(BadRouteAnswer, match="not http"):
        wire.parse_route_answer(json.dumps(answer).encode())
    with pytest.raises(BadRouteAnswer, match="neither a worker url nor a status"):
        wire.parse_route_answer(b"{}")


def test_route_call_timeout_has_its_own_type() -> None:
    import asyncio

    from aiohttp import web

    from vespa.errors import RouteTimeout
    from vespa.proxy.routing import Router, RouterSettings

    async def run() -> None:
        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(5)
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/route/", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        router = Router(RouterSettings(f"http://127.0.0.1:{port}", "e", "k", deadline_s=30, call_timeout_s=0.2, max_attempts=2))
        try:
            with pytest.raises(RouteTimeout):
                await router.route(1.0, lambda ready: asyncio.sleep(0))
        finally:
            await router.close()
            await runner.cleanup()

    asyncio.run(run())


# The load test (1,000 concurrent, half streamed, under `ulimit -Sn 1024`) is in tests/test_hardening.py.
