"""End to end: real clients -> mitmdump + vespa_addon.py -> the strict emulator.

What a user checks: answers arrive, streams arrive as they are produced, errors are JSON
with a hint; and what crossed the wire, read from the emulator's records.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import requests
from aiohttp import ClientSession, web

from tests.conftest import Proxy, endpoint_key, free_port, run_proxy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="client-secret-not-for-gpus", max_retries=0)


def worker_records_since(emu, t0: float):
    return [r for r in emu.records.worker if r.time >= t0]


def route_records_since(emu, t0: float):
    return [r for r in emu.records.route if r.time >= t0]


@pytest.mark.parametrize("which", ["proxy", "proxy_b"])
def test_openai_chat_and_completions_streamed_and_not(which: str, request: pytest.FixtureRequest, emulator) -> None:
    proxy = request.getfixturevalue(which)
    c = client(proxy)
    t0 = time.monotonic()
    chat = c.chat.completions.create(**CHAT)
    assert chat.choices[0].message.content
    streamed = "".join(
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**CHAT, stream=True) if ch.choices
    )
    assert streamed == chat.choices[0].message.content
    done = c.completions.create(model="m", prompt="p", max_tokens=4)
    parts = [ch.choices[0].text for ch in c.completions.create(model="m", prompt="p", max_tokens=4, stream=True)]
    assert "".join(parts) == done.choices[0].text and len(parts) >= 4
    records = worker_records_since(emulator, t0)
    assert len(records) == 4 and all(r.signature_ok for r in records)
    assert all(r.reached_backend and r.status_code == 200 for r in records)


def test_worker_sees_payload_and_custom_headers_but_no_client_credentials(proxy: Proxy, emulator) -> None:
    t0 = time.monotonic()
    body = {"hello": "world", "n": 1.50}
    r = requests.post(proxy.url + "/echo?x=1", json=body, headers={
        "X-Trace-Id": "trace-77", "Authorization": "Bearer client-secret", "Cookie": "session=s3cret",
        "X-Serverless-Cost": "500",
    })
    assert r.status_code == 200, r.text
    echoed = r.json()
    assert echoed["payload"] == body and echoed["path"] == "/echo"
    (route,) = route_records_since(emulator, t0)
    assert route.cost == 500.0 and route.key_source == "bearer"
    (rec,) = worker_records_since(emulator, t0)
    assert rec.signature_ok and rec.payload == body
    headers = {k.lower(): v for k, v in rec.headers.items()}
    assert headers["x-trace-id"] == "trace-77"
    assert "authorization" not in headers and "cookie" not in headers and "x-serverless-cost" not in headers
    assert rec.auth_data["request_idx"] == route.request_idx_out


def test_default_cost_is_one(proxy: Proxy, emulator) -> None:
    t0 = time.monotonic()
    assert requests.post(proxy.url + "/echo", json={}).status_code == 200
    (route,) = route_records_since(emulator, t0)
    assert route.cost == 1.0


@pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD"])
def test_query_methods_carry_auth_in_query(method: str, proxy_b: Proxy, emulator) -> None:
    t0 = time.monotonic()
    r = requests.request(method, proxy_b.url + "/echo", params={"a": "1", "b": "two"})
    assert r.status_code == 200
    (rec,) = worker_records_since(emulator, t0)
    assert rec.method == method and rec.signature_ok
    assert rec.query.get("a") == "1" and rec.query.get("b") == "two"
    if method != "HEAD":
        assert r.json()["query"] == {"a": "1", "b": "two"}


def test_models_list_through_get(proxy: Proxy) -> None:
    models = client(proxy).models.list()
    assert len(models.data) >= 1


@contextmanager
def token_interval(emu, seconds: float):
    old = (emu.config.ttft_ms, emu.config.tokens_per_s)
    emu.config.ttft_ms, emu.config.tokens_per_s = 50, 1 / seconds
    try:
        yield
    finally:
        emu.config.ttft_ms, emu.config.tokens_per_s = old


def test_sse_is_not_buffered(proxy: Proxy, emulator) -> None:
    with token_interval(emulator, 0.2):
        start = time.monotonic()
        arrivals = []
        with requests.post(proxy.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 6, "stream": True},
                           stream=True) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-accel-buffering"] == "no"
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 6
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # Tokens are produced 200 ms apart; buffering would deliver them together at the end.
    assert arrivals[0] < arrivals[-1] - 0.6
    assert sorted(gaps)[len(gaps) // 2] > 0.1


@pytest.mark.parametrize("path", ["/ndjson", "/chunked"])
def test_ndjson_and_chunked_stream_through(path: str, proxy: Proxy, emulator) -> None:
    with token_interval(emulator, 0.2):
        start = time.monotonic()
        arrivals = []
        with requests.post(proxy.url + path, json={"max_tokens": 5}, stream=True) as r:
            assert r.status_code == 200
            for chunk in r.iter_content(chunk_size=None):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 3 and arrivals[0] < arrivals[-1] - 0.4


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_no_buffer_streams(proxy: Proxy) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--no-buffer", proxy.url + "/v1/completions", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": "m", "prompt": "p", "max_tokens": 3, "stream": True})],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0 and out.stdout.rstrip().endswith("data: [DONE]")


def test_cold_start_waits_then_succeeds(proxy: Proxy, emulator) -> None:
    t0 = time.monotonic()
    emulator.set_cold("demo", 1.5)
    r = requests.post(proxy.url + "/echo", json={"cold": True}, timeout=30)
    assert r.status_code == 200 and r.json()["payload"] == {"cold": True}
    routes = route_records_since(emulator, t0)
    assert len(routes) >= 2 and not routes[0].ready and routes[-1].ready
    # Every re-poll reuses the first request_idx, so the load is counted once.
    assert {r.request_idx_out for r in routes} == {routes[0].request_idx_out}
    assert all(r.request_idx_in == routes[0].request_idx_out for r in routes[1:])
    assert len(routes) <= 8, "polling faster than the backoff allows"


def test_cold_start_past_the_deadline_is_503(emulator) -> None:
    with run_proxy(emulator.autoscaler_url, "demo", endpoint_key(emulator, "demo"),
                   "vespa_route_deadline_s=1") as p:
        emulator.set_cold("demo", 3)
        t0 = time.monotonic()
        r = requests.post(p.url + "/echo", json={})
        assert r.status_code == 503
        err = r.json()["error"]
        emulator.set_cold("demo", 0)
        assert err["type"] == "no_worker_ready" and "Loading" in err["message"]
        assert "cold start" in err["hint"] and r.headers["retry-after"]
        assert not worker_records_since(emulator, t0)


def test_account_key_instead_of_endpoint_key_is_401_with_hint(emulator) -> None:
    account_key = emulator.config.account_key
    with run_proxy(emulator.autoscaler_url, "demo", account_key, env={"VESPA_KEY_SOURCE": "test key"}) as p:
        r = requests.post(p.url + "/v1/chat/completions", json=CHAT)
        assert r.status_code == 401 and r.headers["x-vespa-error"] == "key_rejected"
        err = r.json()["error"]
        assert "account key" in err["hint"] and account_key[-4:] in err["hint"] and "test key" in err["hint"]
        assert account_key not in r.text
        assert account_key not in p.log()


def test_unknown_endpoint_is_404(emulator) -> None:
    with run_proxy(emulator.autoscaler_url, "no-such-endpoint", endpoint_key(emulator, "demo")) as p:
        r = requests.post(p.url + "/echo", json={})
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "endpoint_not_found" and "--list" in r.json()["error"]["hint"]


def test_unreachable_autoscaler_is_502_json(emulator) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with run_proxy(dead, "demo", "some-key-9999") as p:
        r = requests.post(p.url + "/echo", json={})
        assert r.status_code == 502 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["type"] == "autoscaler_unreachable"


def test_worker_401_is_explained(proxy: Proxy, emulator) -> None:
    workers = emulator.workers("demo")
    for w in workers:
        w.faults.status = 401
    try:
        r = requests.post(proxy.url + "/echo", json={})
    finally:
        for w in workers:
            w.faults.status = None
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["type"] == "worker_rejected_signature" and "signature" in err["hint"]


def test_bad_requests_get_400(proxy: Proxy, emulator) -> None:
    t0 = time.monotonic()
    r = requests.post(proxy.url + "/echo", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "bad_body"
    r = requests.post(proxy.url + "/echo", json={}, headers={"X-Serverless-Cost": "NaN"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "bad_cost"
    assert not worker_records_since(emulator, t0)


class SlowRelay:
    """An autoscaler in front of the emulator's that holds /route/ calls with cost 99 for a while."""

    def __init__(self, target: str, delay: float) -> None:
        self.target, self.delay = target, delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if json.loads(body).get("cost") == 99:
            await asyncio.sleep(self.delay)
        async with ClientSession() as s, s.post(self.target + "/route/", data=body, headers={
            "Authorization": request.headers["Authorization"], "Content-Type": "application/json"}) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    def __enter__(self) -> str:
        def run() -> None:
            app = web.Application()
            app.router.add_post("/route/", self.handle)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            self.ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_slow_route_does_not_hold_up_other_requests(emulator) -> None:
    with SlowRelay(emulator.autoscaler_url, delay=2.0) as relay, \
            run_proxy(relay, "demo", endpoint_key(emulator, "demo")) as p:
        finished: dict[str, float] = {}

        def call(name: str, cost: str) -> None:
            r = requests.post(p.url + "/echo", json={"who": name}, headers={"X-Serverless-Cost": cost})
            assert r.status_code == 200
            finished[name] = time.monotonic()

        slow = threading.Thread(target=call, args=("slow", "99"))
        slow.start()
        time.sleep(0.3)
        started_fast = time.monotonic()
        call("fast", "1")
        slow.join(30)
        assert finished["fast"] < finished["slow"]
        assert finished["fast"] - started_fast < finished["slow"] - started_fast - 1.0


def test_a_client_that_gives_up_stops_the_route_polling(proxy: Proxy, emulator) -> None:
    emulator.set_cold("demo", 6)
    t0 = time.monotonic()
    try:
        body = b"{}"
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(1.5)  # the proxy is polling a cold endpoint
        time.sleep(0.5)
        polls_at_disconnect = len(route_records_since(emulator, t0))
        time.sleep(2.5)  # without a stop, about one more poll every second
        assert len(route_records_since(emulator, t0)) == polls_at_disconnect
        assert polls_at_disconnect >= 2
    finally:
        emulator.set_cold("demo", 0)
    assert not worker_records_since(emulator, t0)


def test_flows_saved_when_the_proxy_stops_mid_request_hold_no_signature(emulator, tmp_path) -> None:
    flows = tmp_path / "flows.mitm"
    key = endpoint_key(emulator, "demo")
    workers = emulator.workers("demo")
    t0 = time.monotonic()
    for w in workers:
        w.faults.stall_s = 10.0  # the worker holds the signed request before answering
    try:
        with run_proxy(emulator.autoscaler_url, "demo", key, extra_args=("-w", str(flows))) as p:
            client = threading.Thread(target=lambda: _swallow(
                lambda: requests.post(p.url + "/v1/chat/completions", json=CHAT, timeout=20)), daemon=True)
            client.start()
            deadline = time.monotonic() + 10
            while not worker_records_since(emulator, t0) and time.monotonic() < deadline:
                time.sleep(0.05)
        # Leaving the block stops mitmdump while the request waits for the worker.
        client.join(20)
    finally:
        for w in workers:
            w.faults.stall_s = 0.0
    (rec,) = worker_records_since(emulator, t0)
    data = flows.read_bytes()
    assert b"/v1/chat/completions" in data, "the flow in flight was not saved"
    assert rec.auth_data["signature"].encode() not in data
    assert b"auth_data" not in data and key.encode() not in data


def _swallow(call) -> None:
    try:
        call()
    except requests.RequestException:
        pass


def test_one_log_line_per_request_at_info_level(proxy: Proxy) -> None:
    marker = f"/echo-log-{time.monotonic_ns()}"
    assert requests.post(proxy.url + marker, json={}).status_code == 404  # the backend has no such route
    deadline = time.monotonic() + 5
    while marker not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in proxy.log().splitlines() if marker in line]
    assert len(lines) == 1 and "status=404" in lines[0]
    # mitmproxy's own per-connection lines are left for termlog_verbosity=debug.
    assert "server connect" not in proxy.log() and "client connect" not in proxy.log()


def test_a_malformed_request_head_gets_json_not_html(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"NOT A REQUEST\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"content-type: application/json" in head.lower() and b"<html" not in body.lower()
    assert json.loads(body)["error"]["type"]


def test_client_connections_share_one_warm_connection_per_worker(proxy: Proxy, emulator) -> None:
    """Issue 12: mitmproxy keeps server connections per client connection; the worker leg pools
    them for every client, so 20 fresh client connections reuse the workers' connections."""
    for _ in range(2):  # warm: each worker once
        requests.post(proxy.url + "/echo", json={}, timeout=30)
    t0 = time.monotonic()
    for i in range(20):
        r = requests.post(proxy.url + "/echo", json={"i": i}, headers={"Connection": "close"}, timeout=30)
        assert r.status_code == 200
    recs = [r for r in emulator.records.worker if r.time >= t0]
    assert sorted(r.payload["i"] for r in recs) == list(range(20))
    assert len({r.connection for r in recs}) <= len(emulator.workers("demo"))
