"""No client credential and no route signature anywhere Vespa shows or saves flows, in flight included.

What a user (or an attacker with the mitmweb token, or a `-w` file someone shared) could read:
mitmweb's REST API (`/flows`, each flow's request and response content, `/flows/dump`), its
websocket updates, the `-w` file and `vespa.status`. All are read again and again while slow
requests wait for their worker or stream, and once more at the end, then grepped for the client's
own keys, the endpoint key and every signature the autoscaler issued in this test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest
import requests

from tests.conftest import Proxy, endpoint_key, free_port, run_proxy, wait_for_port
from tests.test_inspection import MITM12, Web, lead, read_flows, wait_for

# What an OpenAI SDK or a browser sends by itself: Vespa never forwards it, and must keep only its last 4.
CLIENT_HEADERS = {
    "Authorization": "Bearer sk-SECRETCLIENTKEY-abcd",
    "X-Api-Key": "xk-SECRETAPIKEY-wxyz",
    "Cookie": "session=SECRETCOOKIE-1234",
    "Proxy-Authorization": "Basic U0VDUkVUUFJPWFktc2VjcmV0",
}
CLIENT_SECRETS = ("SECRETCLIENTKEY", "SECRETAPIKEY", "SECRETCOOKIE", "U0VDUkVUUFJPWFk")
SLOW_TOKENS_PER_S = 10.0  # 25 tokens: 2.5 s to wait for, or to watch stream by
STALL_S = 2.0  # a GET waits this long for its worker's answer


def leaks(data: bytes, emulator, since: float) -> list[str]:
    """Every client secret, endpoint key or route signature of this test found in `data`."""
    found = [s for s in CLIENT_SECRETS if s.encode() in data]
    found += [f"endpoint key of {ep.name}" for ep in emulator.config.endpoints if ep.api_key.encode() in data]
    issued = {r.signature for r in emulator.records.route if r.time >= since and r.signature}
    issued |= {w.auth_data["signature"] for w in emulator.records.worker
               if w.time >= since and w.auth_data and w.auth_data.get("signature")}
    found += [f"route signature {s[:8]}..." for s in issued if s.encode() in data]
    found += [marker for marker in ("auth_data", "serverless_signature") if marker.encode() in data]
    return found


@dataclass
class Watcher:
    """Reads everything mitmweb serves, in a loop, from its own thread."""

    api: Web
    saved: Path
    seen: list[tuple[str, bytes]] = field(default_factory=list)
    in_flight: dict[str, bytes] = field(default_factory=dict)  # path -> its request content, read before any response
    stop: threading.Event = field(default_factory=threading.Event)

    def poll(self) -> None:
        flows = self.api.get("/flows").content
        self.seen.append(("/flows", flows))
        for f in json.loads(flows):
            content = self.api.get(f"/flows/{f['id']}/request/content.data").content
            self.seen.append((f"request content of {f['request']['path']}", content))
            if f.get("response") is None or f["response"].get("timestamp_end") is None:  # waiting or streaming
                self.in_flight.setdefault(f["request"]["path"].split("?")[0], content)
            if f.get("response") is not None:
                # While it streams, the response has no content yet: mitmweb answers 500 then.
                got = self.api.s.get(f"{self.api.base}/flows/{f['id']}/response/content.data", timeout=10)
                self.seen.append(("response content", got.content))
        self.seen.append(("/flows/dump", self.api.get("/flows/dump").content))
        answer = self.api.post("/commands/vespa.status", {"arguments": []}).content
        self.seen.append(("vespa.status", answer))
        if self.saved.exists():
            self.seen.append(("-w file", self.saved.read_bytes()))

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()


class Updates:
    """mitmweb's websocket (`/updates`), as its UI receives flows: every message kept."""

    def __init__(self, port: int, token: str | None) -> None:
        self.url = f"ws://127.0.0.1:{port}/updates"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.messages: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._listen(),), daemon=True)
        self.task: asyncio.Task | None = None

    async def _listen(self) -> None:
        self.task = asyncio.current_task()
        try:
            async with aiohttp.ClientSession() as s, s.ws_connect(self.url, headers=self.headers) as ws:
                self.connected.set()
                async for msg in ws:
                    self.messages.append(msg.data.encode() if isinstance(msg.data, str) else bytes(msg.data))
        except asyncio.CancelledError:
            pass

    def __enter__(self) -> Updates:
        self.thread.start()
        assert self.connected.wait(10), "mitmweb's websocket did not open"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)


@pytest.fixture
def web_saving(emulator, tmp_path) -> Iterator[tuple[Proxy, Web, Path, int, str | None]]:
    token, web_port = secrets.token_hex(16), free_port()
    saved = tmp_path / "flows.mitm"
    opts = [f"web_port={web_port}", "web_open_browser=false", "web_host=127.0.0.1"]
    if MITM12:
        opts.append(f"web_password={token}")
    with run_proxy(emulator.autoscaler_url, "demo", endpoint_key(emulator, "demo"), *opts, tool="mitmweb",
                   extra_args=("-w", str(saved))) as p:
        wait_for_port(web_port, p.proc)
        yield p, Web(web_port, token if MITM12 else None), saved, web_port, token if MITM12 else None


def test_no_client_key_and_no_signature_in_mitmweb_or_saved_flows_in_flight_and_after(web_saving, emulator) -> None:
    proxy, api, saved, web_port, token = web_saving
    t0 = time.monotonic()
    rate, workers = emulator.config.tokens_per_s, emulator.workers("demo")
    watcher = Watcher(api, saved)
    poller = threading.Thread(target=watcher.run, daemon=True)
    completion = {"model": "m", "prompt": "hi", "max_tokens": 25}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 25, "stream": True}
    emulator.config.tokens_per_s = SLOW_TOKENS_PER_S
    try:
        with Updates(web_port, token) as updates:
            poller.start()
            t = time.monotonic()
            r = requests.post(proxy.url + "/v1/completions", json=completion, headers=CLIENT_HEADERS, timeout=30)
            assert r.status_code == 200 and time.monotonic() - t > 2, "the non-streamed answer must take seconds"
            with requests.post(proxy.url + "/v1/chat/completions", json=chat, headers=CLIENT_HEADERS,
                               stream=True, timeout=30) as r:
                assert r.status_code == 200 and b"[DONE]" in r.raw.read()
            for w in workers:
                w.faults.stall_s = STALL_S
            r = requests.get(proxy.url + "/echo?x=1", headers=CLIENT_HEADERS, timeout=30)
            assert r.status_code == 200
            for w in workers:
                w.faults.stall_s = 0.0
            wait_for(lambda: len([f for f in api.flows() if f.get("response")]) == 3, "the three flows to end")
            watcher.stop.set()
            poller.join(30)
            watcher.poll()  # and after
    finally:
        emulator.config.tokens_per_s = rate
        watcher.stop.set()
        for w in workers:
            w.faults.stall_s = 0.0

    # The polls did look at each request while it waited or streamed, and at what mitmweb held then.
    assert set(watcher.in_flight) == {"/v1/completions", "/v1/chat/completions", "/echo"}, watcher.in_flight.keys()
    assert json.loads(watcher.in_flight["/v1/completions"]) == completion
    assert json.loads(watcher.in_flight["/v1/chat/completions"]) == chat
    # Every request was signed and the worker accepted it: there were signatures to leak.
    signed = [w for w in emulator.records.worker if w.time >= t0]
    assert sorted(w.path for w in signed) == ["/echo", "/v1/chat/completions", "/v1/completions"]
    assert all(w.signature_ok and w.auth_data.get("signature") for w in signed)
    for what, data in watcher.seen:
        assert leaks(data, emulator, t0) == [], what
    assert updates.messages, "no websocket update arrived"
    assert any(b"/v1/completions" in m for m in updates.messages)
    for message in updates.messages:
        assert leaks(message, emulator, t0) == [], message[:300]

    # The client's headers stay, masked to their last 4 characters (enough to tell keys apart).
    for f in api.flows():
        headers = dict((k.lower(), v) for k, v in f["request"]["headers"])
        assert headers["authorization"] == "Bearer ...abcd" and headers["x-api-key"] == "...wxyz", headers
        assert headers["cookie"] == "...1234" and headers["proxy-authorization"] == "Basic ...cmV0", headers
    # "streamed" only for the answer the worker streamed; the slow plain JSON one is not.
    comments = {f["request"]["path"]: f["comment"] for f in api.flows()}
    assert lead(comments["/v1/chat/completions"])["outcome"].startswith("streamed "), comments
    assert not lead(comments["/v1/completions"])["outcome"].startswith("stream"), comments
    assert lead(comments["/echo?x=1"])["status"] == "200", comments
    proxy.proc.terminate()
    proxy.proc.wait(15)
    assert len(read_flows(saved)) == 3
    assert leaks(saved.read_bytes(), emulator, t0) == []
