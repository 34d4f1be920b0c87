"""The local Vast emulator must answer like the real service (../shared/vast-protocol.md).

Every other test of Vespa runs against it, so these tests pin its strictness: wrong keys,
tampered signatures, replays and malformed bodies get the real status and body.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig, WorkerFaults
from vespa.emulator.backend import completion_text, large_body
from vespa.emulator.signing import SigningKey, load_public_key
from vespa.wire import auth_query, signed_message

REPO = Path(__file__).resolve().parent.parent
ACCOUNT_KEY = "acct-test"
KEY_C = "ep-c-key"
KEY_B = "ep-b-key"
CHAT = {"model": "my-model", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


def make_config(**overrides: Any) -> EmulatorConfig:
    endpoints = [
        EndpointConfig(name="demo", api_key=KEY_C, workers=2, generation="C"),
        EndpointConfig(name="demo-b", api_key=KEY_B, workers=1, generation="B"),
    ]
    defaults: dict[str, Any] = dict(
        account_key=ACCOUNT_KEY, endpoints=endpoints, ttft_ms=5, tokens_per_s=400.0
    )
    return EmulatorConfig(**(defaults | overrides))


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(make_config()) as emulator:
        yield emulator


def route(
    emu: Emulator, endpoint: str = "demo", cost: Any = 100, key: str | None = KEY_C, **body: Any
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(
        f"{emu.autoscaler_url}/route/",
        json={"endpoint": endpoint, "cost": cost} | body,
        headers=headers,
        timeout=5,
    )


def ready(emu: Emulator, endpoint: str = "demo", cost: Any = 100) -> dict[str, Any]:
    key = KEY_B if endpoint == "demo-b" else KEY_C
    answer = route(emu, endpoint, cost, key)
    assert answer.status_code == 200 and "url" in answer.json(), answer.text
    return answer.json()


def call(
    auth: dict[str, Any], path: str = "/v1/chat/completions", payload: Any = None, **kwargs: Any
) -> requests.Response:
    body = {"auth_data": auth, "payload": CHAT if payload is None else payload}
    return requests.post(auth["url"] + path, json=body, timeout=5, **kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> float:
    """Seconds until `predicate` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


# --- valid flows ----------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["demo", "demo-b"])
def test_streamed_flow_arrives_in_chunks_spaced_in_time(emu: Emulator, endpoint: str) -> None:
    emu.config.tokens_per_s = 50.0
    auth = ready(emu, endpoint)
    arrivals: list[float] = []
    body = b""
    with call(auth, payload=CHAT | {"stream": True, "max_tokens": 6}, stream=True) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        for chunk in resp.iter_content(None):
            arrivals.append(time.monotonic())
            body += chunk
    assert len(arrivals) >= 4
    assert arrivals[-1] - arrivals[0] >= 0.08  # 5 gaps of 20 ms: not buffered into one write
    events = [line[len("data: ") :] for line in body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == completion_text(6)
    [worker_rec] = emu.records.worker
    assert worker_rec.signature_ok is True and worker_rec.reached_backend and worker_rec.status_code == 200
    assert worker_rec.chunks_sent >= 4 and not worker_rec.client_disconnected
    assert worker_rec.auth_data == auth and worker_rec.payload["stream"] is True


def test_json_completion_echoes_model_and_counts_usage(emu: Emulator) -> None:
    resp = call(ready(emu, "demo-b"))
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "my-model"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4"}
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_openai_package_parses_the_backend(emu: Emulator) -> None:
    client = openai.OpenAI(base_url=emu.backend_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == completion_text(4)
    stream = client.completions.create(model="m", prompt="hi", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in stream) == completion_text(3)
    assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices[0].text == completion_text(
        2
    )
    assert [m.id for m in client.models.list()]


def test_runtime_timing_knobs_apply_to_the_next_request(emu: Emulator) -> None:
    emu.config.ttft_ms = 250
    start = time.monotonic()
    with call(ready(emu), payload=CHAT | {"stream": True}, stream=True) as resp:
        next(resp.iter_content(None))
    assert time.monotonic() - start >= 0.25


def test_backend_stream_routes_pass_through_the_worker(emu: Emulator) -> None:
    ndjson = call(ready(emu), "/ndjson", {"max_tokens": 3})
    assert ndjson.headers["Content-Type"] == "application/x-ndjson"
    assert [json.loads(line) for line in ndjson.text.splitlines()][-1] == {"done": True}
    chunked = call(ready(emu), "/chunked", {"max_tokens": 3})
    assert chunked.text == completion_text(3) and "Content-Length" not in chunked.headers
    size = 300_000
    auth = ready(emu)  # the GET form: `size` stays in the forwarded query
    large = requests.get(auth["url"] + "/large", params=auth_query(auth) + [("size", str(size))], timeout=5)
    assert large.status_code == 200 and large.content == large_body(size)
    assert emu.records.worker[-1].chunks_sent >= 2


def test_post_forwards_payload_and_custom_headers_only(emu: Emulator) -> None:
    headers = {"X-Trace-Id": "trace-1", "Connection": "keep-alive, X-Hop", "X-Hop": "drop me"}
    echo = call(ready(emu), "/echo/a/b", {"hello": "world"}, headers=headers).json()
    assert echo["method"] == "POST" and echo["path"] == "/echo/a/b"
    assert echo["payload"] == {"hello": "world"}  # unwrapped: no auth_data reaches the backend
    assert echo["headers"]["X-Trace-Id"] == "trace-1"
    assert "X-Hop" not in echo["headers"] and echo["headers"]["Content-Type"] == "application/json"


# --- /route/ --------------------------------------------------------------------------------
def test_ready_answer_shape_and_signature_over_pubkey(emu: Emulator) -> None:
    for endpoint, generation in (("demo", "C"), ("demo-b", "B")):
        answer = ready(emu, endpoint)
        assert list(answer) == [
            "endpoint",
            "url",
            "cost",
            "reqnum",
            "request_idx",
            "signature",
            "__request_id",
        ]
        assert answer["endpoint"] == endpoint and answer["request_idx"] > 0
        pem = requests.get(emu.autoscaler_url + "/pubkey/", timeout=5).text
        load_public_key(pem).verify(
            base64.b64decode(answer["signature"]),
            signed_message(answer, generation),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )


def test_cost_keeps_its_json_number_type(emu: Emulator) -> None:
    assert '"cost": 256,' in route(emu, cost=256).text
    assert '"cost": 256.0,' in route(emu, cost=256.0).text
    assert route(emu, cost=0).status_code == 200
    auth = ready(emu, "demo-b", 256.0)
    assert call(auth).status_code == 200
    assert [r.cost for r in emu.records.route] == [256, 256.0, 0, 256.0]
    assert isinstance(emu.records.route[0].cost, int)


def test_keys_accepted_from_bearer_body_and_query(emu: Emulator) -> None:
    url = emu.autoscaler_url + "/route/"
    assert (
        requests.post(url, json={"endpoint": "demo", "cost": 1, "api_key": KEY_C}, timeout=5).status_code
        == 200
    )
    assert (
        requests.post(
            url, params={"api_key": KEY_C}, json={"endpoint": "demo", "cost": 1}, timeout=5
        ).status_code
        == 200
    )
    assert route(emu).status_code == 200
    assert [r.key_source for r in emu.records.route] == ["body", "query", "bearer"]


@pytest.mark.parametrize(
    "key, endpoint, status",
    [
        (ACCOUNT_KEY, "demo", 401),  # an account key is not an endpoint key
        (None, "demo", 401),
        ("ep-wrong", "demo", 401),
        (KEY_B, "demo", 401),  # another endpoint's key
        (KEY_C, "nope", 400),
    ],
)
def test_route_rejects_keys_and_endpoints(emu: Emulator, key: str | None, endpoint: str, status: int) -> None:
    resp = route(emu, endpoint, key=key)
    assert resp.status_code == status
    assert set(resp.json()) == {"error", "error_msg"}


@pytest.mark.parametrize(
    "body",
    [
        {"cost": 1},
        {"endpoint": "demo"},
        {"endpoint": "demo", "cost": -1},
        {"endpoint": "demo", "cost": "256"},
        {"endpoint": "demo", "cost": True},
        {"endpoint": "demo", "cost": 1, "request_idx": "7"},
    ],
)
def test_route_rejects_bad_bodies(emu: Emulator, body: dict[str, Any]) -> None:
    resp = requests.post(
        emu.autoscaler_url + "/route/", json=body, headers={"Authorization": f"Bearer {KEY_C}"}, timeout=5
    )
    assert resp.status_code == 400 and set(resp.json()) == {"error", "error_msg"}
    bad_json = requests.post(
        emu.autoscaler_url + "/route/", data=b"{", headers={"Authorization": f"Bearer {KEY_C}"}, timeout=5
    )
    assert bad_json.status_code == 400


def test_reqnum_grows_per_worker_and_workers_take_turns(emu: Emulator) -> None:
    answers = [ready(emu) for _ in range(4)]
    urls = [w.url for w in emu.workers("demo")]
    assert [a["url"] for a in answers] == urls + urls
    assert [a["reqnum"] for a in answers] == [1, 1, 2, 2]
    assert len({a["request_idx"] for a in answers}) == 4


def test_cold_start_waits_then_turns_ready_with_the_same_request_idx() -> None:
    cfg = make_config(endpoints=[EndpointConfig(name="demo", api_key=KEY_C, cold_start_s=0.4)])
    with Emulator(cfg) as emu:
        first = route(emu, cost=50)
        waiting = first.json()
        assert first.status_code == 200
        assert set(waiting) == {"endpoint", "status", "request_idx", "__request_id"}
        assert waiting["status"] == "Loading"
        again = route(emu, cost=50, request_idx=waiting["request_idx"]).json()
        assert again["request_idx"] == waiting["request_idx"] and "url" not in again
        assert emu.counted_load("demo") == 50  # the re-poll added no load
        time.sleep(0.4)
        answer = route(emu, cost=50, request_idx=waiting["request_idx"]).json()
        assert answer["request_idx"] == waiting["request_idx"] and "url" in answer
        assert emu.counted_load("demo") == 50
        assert [r.ready for r in emu.records.route] == [False, False, True]
        assert route(emu, cost=50).json()["request_idx"] != waiting["request_idx"]


def test_set_cold_and_stopped_endpoint_answer_the_waiting_shape() -> None:
    cfg = make_config(
        endpoints=[
            EndpointConfig(name="demo", api_key=KEY_C),
            EndpointConfig(name="off", api_key="k2", state="stopped"),
        ]
    )
    with Emulator(cfg) as emu:
        emu.set_cold("demo", 0.3)
        assert route(emu).json()["status"] == "Loading"
        time.sleep(0.3)
        assert "url" in route(emu).json()
        assert route(emu, "off", key="k2").json()["status"] == "endpoint stopped"


# --- worker: shape and signature ------------------------------------------------------------
def test_worker_shape_errors(emu: Emulator) -> None:
    auth = ready(emu)
    url = auth["url"] + "/v1/chat/completions"
    assert requests.post(url, data=b"{nope", timeout=5).json() == {"error": "invalid JSON"}
    missing_both = requests.post(url, json={"x": 1}, timeout=5)
    assert missing_both.status_code == 422
    assert missing_both.json() == {"auth_data": "field missing", "payload": "field missing"}
    assert requests.post(url, json={"auth_data": auth}, timeout=5).json() == {"payload": "field missing"}
    partial = {k: v for k, v in auth.items() if k not in ("request_idx", "signature")}
    resp = requests.post(url, json={"auth_data": partial, "payload": {}}, timeout=5)
    assert resp.status_code == 422
    assert resp.json() == {
        "auth_data": {"request_idx": "missing parameter", "signature": "missing parameter"}
    }
    session = requests.post(url, json={"auth_data": auth, "payload": CHAT, "session_id": "abc"}, timeout=5)
    assert session.status_code == 410 and session.json() == {"error": "invalid session"}
    assert not any(r.reached_backend for r in emu.records.worker)


def _tampered(auth: dict[str, Any], field: str) -> dict[str, Any]:
    changes = {
        "cost": float(auth["cost"]) if isinstance(auth["cost"], int) else auth["cost"] + 1,
        "endpoint": "demo",
        "reqnum": auth["reqnum"] + 1,
        "request_idx": auth["request_idx"] + 1,
        "url": auth["url"] + "/",
        "signature": ("A" if auth["signature"][0] != "A" else "B") + auth["signature"][1:],
    }
    return auth | {field: changes[field]}


@pytest.mark.parametrize("field", ["cost", "endpoint", "reqnum", "request_idx", "url", "signature"])
def test_gen_b_rejects_each_tampered_field_with_an_empty_401(emu: Emulator, field: str) -> None:
    auth = ready(emu, "demo-b", 256)
    resp = requests.post(
        auth["url"] + "/v1/chat/completions",
        json={"auth_data": _tampered(auth, field), "payload": CHAT},
        timeout=5,
    )
    assert resp.status_code == 401 and resp.content == b""
    assert emu.records.worker[-1].signature_ok is False and not emu.records.worker[-1].reached_backend
    assert call(auth).status_code == 200  # the untampered original still works


@pytest.mark.parametrize("field", ["url", "signature", "endpoint"])
def test_gen_c_rejects_tampered_url_signature_and_endpoint(emu: Emulator, field: str) -> None:
    auth = ready(emu)
    bad = _tampered(auth, field) if field != "endpoint" else auth | {"endpoint": "demo-b"}
    resp = requests.post(
        auth["url"] + "/v1/chat/completions", json={"auth_data": bad, "payload": CHAT}, timeout=5
    )
    assert resp.status_code == 401 and resp.content == b""


def test_gen_c_signs_only_the_url(emu: Emulator) -> None:
    auth = ready(emu)
    assert call(auth | {"cost": 99999, "reqnum": 5, "request_idx": 1}).status_code == 200


def test_signature_for_another_worker_or_key_is_rejected(emu: Emulator) -> None:
    first, second = ready(emu), ready(emu)
    stolen = first | {"url": second["url"]}  # the signature covers first's URL only
    assert (
        requests.post(second["url"] + "/x", json={"auth_data": stolen, "payload": {}}, timeout=5).status_code
        == 401
    )
    replayed_elsewhere = requests.post(
        second["url"] + "/echo", json={"auth_data": first, "payload": {}}, timeout=5
    )
    assert replayed_elsewhere.status_code == 401
    forged = first | {"signature": SigningKey.generate(1024).sign(signed_message(first, "C"))}
    assert call(forged).status_code == 401
    assert call(first | {"signature": "not base64!!"}).status_code == 401


def test_gen_b_rejects_a_replayed_reqnum_but_gen_c_does_not(emu: Emulator) -> None:
    auth_b = ready(emu, "demo-b")
    assert call(auth_b).status_code == 200
    replay = call(auth_b)
    assert replay.status_code == 401 and replay.content == b""
    auth_c = ready(emu)
    assert call(auth_c).status_code == 200 and call(auth_c).status_code == 200


def test_gen_b_rejects_a_too_old_reqnum(emu: Emulator) -> None:
    oldest = ready(emu, "demo-b")
    answers = [ready(emu, "demo-b") for _ in range(101)]
    assert call(answers[-1]).status_code == 200  # the worker now knows reqnum 102
    assert oldest["reqnum"] < answers[-1]["reqnum"] - 100
    assert call(oldest).status_code == 401
    assert call(answers[0]).status_code == 200  # reqnum 2 is still inside the window


def test_worker_answers_429_when_the_queue_is_full() -> None:
    cfg = make_config(
        endpoints=[EndpointConfig(name="demo", api_key=KEY_C, workers=1, max_perf=10.0, max_queue_time=1.0)]
    )
    with Emulator(cfg) as emu:
        [worker] = emu.workers("demo")
        worker.faults.stall_s = 0.5
        slow = threading.Thread(target=lambda: call(ready(emu, cost=50)))
        slow.start()
        time.sleep(0.2)
        full = call(ready(emu, cost=1))
        slow.join()
        assert full.status_code == 429 and full.content == b""
        worker.faults.stall_s = 0
        assert call(ready(emu, cost=1)).status_code == 200


# --- worker: GET/DELETE/HEAD with serverless_* ----------------------------------------------
def test_query_auth_on_get_delete_and_head(emu: Emulator) -> None:
    auth = ready(emu, "demo-b", 1.0)
    echo = requests.get(
        auth["url"] + "/echo/q", params=auth_query(auth) + [("a", "1"), ("b", "x y")], timeout=5
    )
    assert echo.status_code == 200, echo.text
    body = echo.json()
    assert body["method"] == "GET" and body["path"] == "/echo/q" and body["query"] == {"a": "1", "b": "x y"}
    record = emu.records.worker[-1]
    assert record.payload == {"a": "1", "b": "x y"} and record.auth_data["cost"] == 1.0
    deleted = requests.delete(auth["url"] + "/echo", params=auth_query(ready(emu, "demo-b")), timeout=5)
    assert deleted.json()["method"] == "DELETE"
    head = requests.head(auth["url"] + "/v1/models", params=auth_query(ready(emu, "demo-b")), timeout=5)
    assert head.status_code == 200 and head.content == b""


def test_query_auth_errors(emu: Emulator) -> None:
    auth = ready(emu, "demo-b")
    missing = requests.get(auth["url"] + "/echo", params=auth_query(auth)[:-1], timeout=5)
    assert missing.status_code == 400
    assert "require auth_data in query params" in missing.json()["error"]
    bad = requests.get(auth["url"] + "/echo", params=auth_query(_tampered(auth, "reqnum")), timeout=5)
    assert bad.status_code == 401 and bad.json() == {"error": "invalid signature"}
    as_float = requests.get(auth["url"] + "/echo", params=auth_query(auth | {"cost": 100.0}), timeout=5)
    assert as_float.status_code == 401  # the route said 100; 100.0 signs differently


# --- worker faults ----------------------------------------------------------------------------
def test_refuse_closes_the_port_and_reopens_it_on_the_same_url(emu: Emulator) -> None:
    worker = emu.workers("demo")[0]
    worker.faults.refuse = True
    with pytest.raises(requests.ConnectionError):
        requests.get(worker.url + "/", timeout=2)
    worker.faults.refuse = False
    auth = ready(emu)
    assert auth["url"] == worker.url and call(auth).status_code == 200


def test_blackhole_connects_time_out_then_clearing_serves_the_same_url(emu: Emulator) -> None:
    worker = emu.workers("demo")[0]
    port = urlsplit(worker.url).port
    worker.faults.blackhole = True
    for _ in range(2):  # the port stays a black hole, not just for its first caller
        with pytest.raises(TimeoutError):  # not refused: the SYN gets no answer at all
            socket.create_connection(("127.0.0.1", port), timeout=0.5)
    with pytest.raises(requests.ConnectTimeout):
        requests.get(worker.url + "/", timeout=(0.5, 5))
    worker.faults.refuse = True  # refuse wins over blackhole
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)
    worker.faults.refuse = False
    worker.faults.blackhole = False
    auth = ready(emu)
    assert auth["url"] == worker.url and call(auth).status_code == 200
    assert [r.worker_id for r in emu.records.worker] == [worker.id]  # nothing reached it before


def test_reset_before_headers_reads_the_request_then_resets(emu: Emulator) -> None:
    worker = emu.workers("demo")[0]
    worker.faults.reset_before_headers = True
    with pytest.raises(requests.ConnectionError, match="reset"):
        call(ready(emu))
    (record,) = emu.records.worker
    assert record.fault == "reset_before_headers" and record.signature_ok and record.payload == CHAT
    assert not record.reached_backend and record.status_code is None and not record.client_disconnected
    worker.faults.reset_before_headers = False
    auth = ready(emu)
    auth = ready(emu) if auth["url"] != worker.url else auth
    assert auth["url"] == worker.url and call(auth).status_code == 200


@pytest.mark.parametrize("status", [429, 500])
def test_status_fault_answers_empty_before_the_backend(emu: Emulator, status: int) -> None:
    worker = emu.workers("demo")[0]
    worker.faults = WorkerFaults(status=status)
    resp = call(ready(emu))
    assert resp.status_code == status and resp.content == b""
    record = emu.records.worker[-1]
    assert record.fault == "status" and record.signature_ok and not record.reached_backend


def test_die_after_chunks_truncates_the_stream(emu: Emulator) -> None:
    emu.config.tokens_per_s = 50.0
    emu.workers("demo")[0].faults.die_after_chunks = 2
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        with call(ready(emu), payload=CHAT | {"stream": True, "max_tokens": 20}, stream=True) as resp:
            for chunk in resp.iter_content(None):
                received += chunk
    assert b"[DONE]" not in received and received.startswith(b"data: ")
    wait_for(lambda: bool(emu.records.worker))
    record = emu.records.worker[-1]
    assert record.fault == "die_after_chunks" and record.chunks_sent == 2 and not record.client_disconnected


def test_stall_delays_the_answer(emu: Emulator) -> None:
    emu.workers("demo")[0].faults.stall_s = 0.3
    start = time.monotonic()
    assert call(ready(emu)).status_code == 200
    assert time.monotonic() - start >= 0.3
    assert emu.records.worker[-1].fault == "stall"


def test_client_disconnect_mid_stream_is_recorded_within_a_second(emu: Emulator) -> None:
    emu.config.tokens_per_s = 2.0  # the worker sits waiting on the backend when the client leaves
    auth = ready(emu)
    body = json.dumps({"auth_data": auth, "payload": CHAT | {"stream": True, "max_tokens": 50}}).encode()
    url = urlsplit(auth["url"])
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(65536)
    wait_for(lambda: emu.records.worker[-1].client_disconnected, timeout=1.0)
    assert emu.records.worker[-1].status_code == 200


async def test_async_mode_and_faults_set_from_the_loop_thread() -> None:
    async with Emulator(make_config()) as emu:
        worker = emu.workers("demo")[0]
        async with aiohttp.ClientSession() as session:
            worker.faults.refuse = True
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(worker.url + "/")
            worker.faults.refuse = False
            async with session.post(
                f"{emu.autoscaler_url}/route/",
                json={"endpoint": "demo", "cost": 1},
                headers={"Authorization": f"Bearer {KEY_C}"},
            ) as r:
                auth = await r.json()
            assert auth["url"] == worker.url
            async with session.post(
                auth["url"] + "/echo", json={"auth_data": auth, "payload": {"k": 1}}
            ) as r:
                assert r.status == 200 and (await r.json())["payload"] == {"k": 1}


# --- console ----------------------------------------------------------------------------------
CONSOLE_FIELDS = {
    "id",
    "endpoint_name",
    "api_key",
    "user_id",
    "created_at",
    "endpoint_state",
    "min_load",
    "min_cold_load",
    "target_util",
    "cold_mult",
    "cold_workers",
    "max_workers",
    "max_queue_time",
    "target_queue_time",
    "inactivity_timeout",
    "auto_delete_in_seconds",
    "auto_delete_due_24h",
}


def test_console_lists_endpoints_with_their_keys(emu: Emulator) -> None:
    url = emu.console_url + "/api/v0/endptjobs/"
    by_bearer = requests.get(
        url, headers={"Authorization": f"Bearer {ACCOUNT_KEY}"}, params={"client_id": "me"}, timeout=5
    )
    assert by_bearer.status_code == 200 and by_bearer.json()["success"] is True
    results = by_bearer.json()["results"]
    assert all(set(r) == CONSOLE_FIELDS for r in results)
    assert {r["endpoint_name"]: r["api_key"] for r in results} == {"demo": KEY_C, "demo-b": KEY_B}
    assert requests.get(url, params={"api_key": ACCOUNT_KEY}, timeout=5).status_code == 200
    assert requests.get(url, json={"client_id": "me", "api_key": ACCOUNT_KEY}, timeout=5).status_code == 200
    assert [r.key_source for r in emu.records.console] == ["bearer", "query", "body"]


@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {KEY_C}"}, {"Authorization": "Bearer nope"}, {}]
)
def test_console_rejects_other_keys(emu: Emulator, headers: dict[str, str]) -> None:
    resp = requests.get(emu.console_url + "/api/v0/endptjobs/", headers=headers, timeout=5)
    assert resp.status_code == 401
    body = resp.json()
    assert body["success"] is False and set(body) == {"success", "error", "msg"}


def test_console_with_no_endpoints() -> None:
    with Emulator(make_config(endpoints=[])) as emu:
        resp = requests.get(
            emu.console_url + "/api/v0/endptjobs/",
            headers={"Authorization": f"Bearer {ACCOUNT_KEY}"},
            timeout=5,
        )
        assert resp.status_code == 400
        assert resp.json() == {
            "success": False,
            "error": "invalid_args",
            "msg": "No endpoints for user found",
        }


def test_console_rate_limit(emu: Emulator) -> None:
    url, headers = emu.console_url + "/api/v0/endptjobs/", {"Authorization": f"Bearer {ACCOUNT_KEY}"}
    statuses = [requests.get(url, headers=headers, timeout=5).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    over = requests.get(url, headers=headers, timeout=5)
    assert over.json() == {"detail": "API requests too frequent endpoint threshold=3.0"}
    time.sleep(0.4)
    assert requests.get(url, headers=headers, timeout=5).status_code == 200
    # The root CA is a static file: neither keyed nor rate limited.
    ca = requests.get(emu.console_url + "/static/jvastai_root.cer", timeout=5)
    assert ca.status_code == 200 and ca.content.startswith(b"-----BEGIN CERTIFICATE-----")
    assert emu.records.console[-1].path == "/static/jvastai_root.cer"


# --- CLI --------------------------------------------------------------------------------------
def test_cli_prints_its_json_line_and_exits_0_on_sigterm() -> None:
    env = os.environ | {"PYTHONPATH": str(REPO), "VESPA_EMU_ENDPOINT_KEY": "from-env"}
    with subprocess.Popen(
        [sys.executable, "-m", "vespa.emulator", "--demo-keys", "--workers", "1", "--generation", "B"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            assert info["account_key"] == "demo-account-key"
            [endpoint] = info["endpoints"]
            assert (
                endpoint["name"] == "vespa-demo"
                and endpoint["api_key"] == "from-env"
                and len(endpoint["workers"]) == 1
            )
            headers = {"Authorization": "Bearer from-env"}
            answer = requests.post(
                info["autoscaler_url"] + "/route/",
                json={"endpoint": "vespa-demo", "cost": 1},
                headers=headers,
                timeout=5,
            )
            assert answer.json()["url"] == endpoint["workers"][0]
            listing = requests.get(
                info["console_url"] + "/api/v0/endptjobs/",
                headers={"Authorization": "Bearer demo-account-key"},
                timeout=5,
            )
            assert listing.json()["results"][0]["api_key"] == "from-env"
            proc.send_signal(signal.SIGTERM)
            rest, err = proc.communicate(timeout=10)
            assert proc.returncode == 0 and rest == ""
            assert "Vast emulator ready" in err
        finally:
            if proc.poll() is None:
                proc.kill()
