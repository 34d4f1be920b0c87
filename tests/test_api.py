"""The Python API: VastClient in-process, fetch_endpoint_key and list_endpoints, against the emulator.

The brief's examples call blocking clients (the sync OpenAI SDK, requests) from inside
`async def main()`; they are run here exactly that way.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import openai
import pytest
import requests

from tests.conftest import endpoint_key, free_port
from vespa import VastClient, fetch_endpoint_key, list_endpoints
from vespa.api import ProxyStartError
from vespa.errors import EndpointNotFound, KeyRejected

CHAT = {"model": "llama-2-7b", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 6}


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vespa-proxy")]


def client_for(emulator, name: str = "demo", **kw) -> VastClient:
    return VastClient(name, endpoint_key(emulator, name), port=0, autoscaler_url=emulator.autoscaler_url, **kw)


async def test_start_on_a_free_port_stream_with_openai_then_stop_leaves_nothing(emulator) -> None:
    tasks_before = asyncio.all_tasks()
    client = client_for(emulator)
    await client.start()
    assert client.port != 0 and client.url == f"http://127.0.0.1:{client.port}"
    assert listening(client.port) and client.running
    # The key went to the addon object, not into this process's environment.
    assert os.environ.get("VAST_API_KEY") != endpoint_key(emulator, "demo")

    t0 = time.monotonic()
    oai = openai.OpenAI(base_url=f"{client.url}/v1", api_key="not-used", max_retries=0)
    arrivals, parts = [], []
    for chunk in oai.chat.completions.create(**CHAT, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            parts.append(chunk.choices[0].delta.content)
    whole = oai.chat.completions.create(**CHAT).choices[0].message.content
    assert "".join(parts) == whole and len(parts) >= 6
    # Streamed as produced: the chunks came over a span, not in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.5 * (len(parts) - 1) / emulator.config.tokens_per_s
    workers = [r for r in emulator.records.worker if r.time >= t0]
    assert len(workers) == 2 and all(r.signature_ok and r.reached_backend for r in workers)

    await client.stop()
    assert not client.running and not proxy_threads()
    assert not listening(client.port)
    assert asyncio.all_tasks() - tasks_before - {asyncio.current_task()} == set()
    await client.stop()  # a second stop is harmless


async def test_brief_example_fetch_key_then_requests_through_url(emulator) -> None:
    """The brief's 'Auto-Fetching Endpoint Key' example, with the emulator's console and autoscaler."""
    endpoint_key_ = fetch_endpoint_key(
        account_key=emulator.config.account_key, endpoint_name="demo-b", console_url=emulator.console_url
    )
    assert endpoint_key_ == endpoint_key(emulator, "demo-b")
    async with VastClient(endpoint_name="demo-b", api_key=endpoint_key_, port=0,
                          autoscaler_url=emulator.autoscaler_url) as client:
        response = requests.get(f"{client.url}/v1/models")
        assert response.status_code == 200 and response.json()["object"] == "list"
        response = requests.post(f"{client.url}/v1/chat/completions", json=CHAT)
        assert response.json()["choices"][0]["message"]["content"]
    assert not listening(client.port) and not proxy_threads()


def test_list_endpoints_and_errors_carry_hints(emulator) -> None:
    names = [ep.name for ep in list_endpoints(emulator.config.account_key, console_url=emulator.console_url)]
    assert names == ["demo", "demo-b"]
    with pytest.raises(EndpointNotFound) as err:
        fetch_endpoint_key(emulator.config.account_key, "dmeo", console_url=emulator.console_url)
    assert "demo" in err.value.message and "Did you mean 'demo'" in err.value.hint
    with pytest.raises(KeyRejected) as err:
        list_endpoints(endpoint_key(emulator, "demo"), console_url=emulator.console_url)
    assert "account key" in err.value.hint and endpoint_key(emulator, "demo") not in str(err.value) + err.value.hint
    with pytest.raises(ValueError, match="prod, alpha, candidate"):
        list_endpoints("k", instance="beta")


async def test_run_forever_serves_until_cancelled(emulator) -> None:
    client = client_for(emulator)
    task = asyncio.create_task(client.run_forever())
    while not client.running or client.port == 0:
        await asyncio.sleep(0.01)
    r = await asyncio.to_thread(requests.post, f"{client.url}/v1/completions", json={"prompt": "p", "max_tokens": 3})
    assert r.status_code == 200
    port = client.port
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not listening(port) and not proxy_threads()


async def test_one_proxy_per_process_and_start_errors_are_raised(emulator) -> None:
    async with client_for(emulator) as first:
        second = client_for(emulator, "demo-b")
        with pytest.raises(ProxyStartError) as err:
            await second.start()
        assert "one proxy per process" in err.value.hint
        assert listening(first.port)
    # The port is taken: the error says so instead of mitmproxy's sys.exit ending the program.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = VastClient("demo", endpoint_key(emulator, "demo"), port=taken.getsockname()[1],
                          autoscaler_url=emulator.autoscaler_url)
        with pytest.raises(ProxyStartError) as err:
            await busy.start()
        assert "cannot listen" in err.value.message and "port=0" in err.value.hint
    assert not proxy_threads()
    with pytest.raises(ProxyStartError, match="vespa_autoscaler_url"):
        await VastClient("demo", "k", port=free_port(), autoscaler_url="ftp://nowhere").start()
    # And after all of that a new client starts fine.
    async with client_for(emulator) as again:
        assert requests.get(f"{again.url}/v1/models").status_code == 200
