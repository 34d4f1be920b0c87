"""The account API client against a scripted console: shapes, errors, and the 429 backoff."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vespa.cli import console
from vespa.errors import ConsoleError, EndpointNotFound, KeyRejected

ACCOUNT = "acct-0123456789abcdef-AAAA"
RESULTS = [
    {"id": 1, "endpoint_name": "llm-prod", "api_key": "ep-key-prod-1111", "endpoint_state": "active", "max_workers": 4},
    {"id": 2, "endpoint_name": "llm-staging", "api_key": "ep-key-stag-2222", "endpoint_state": "stopped", "max_workers": 1},
]


@dataclass
class Script:
    """Answers given in order (the last one repeats); requests seen."""

    answers: list[tuple[int, dict]] = field(default_factory=list)
    seen: list[dict] = field(default_factory=list)


@pytest.fixture
def fake() -> Iterator[tuple[Script, str]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            script.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
            status, body = script.answers[min(len(script.seen), len(script.answers)) - 1]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield script, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_lists_endpoints_with_the_account_key_as_bearer(fake) -> None:
    script, url = fake
    script.answers = [(200, {"success": True, "results": RESULTS})]
    endpoints = console.list_endpoints(ACCOUNT, url + "/")
    assert [(e.name, e.state, e.max_workers) for e in endpoints] == [("llm-prod", "active", 4), ("llm-staging", "stopped", 1)]
    assert script.seen == [{"path": "/api/v0/endptjobs/", "auth": f"Bearer {ACCOUNT}"}]
    assert "ep-key-prod-1111" not in repr(endpoints)
    assert console.fetch_endpoint_key(ACCOUNT, "llm-staging", url) == "ep-key-stag-2222"


def test_no_endpoints_is_an_empty_list(fake) -> None:
    script, url = fake
    script.answers = [(400, {"success": False, "error": "invalid_args", "msg": "No endpoints for user found"})]
    assert console.list_endpoints(ACCOUNT, url) == []
    with pytest.raises(EndpointNotFound) as exc:
        console.fetch_endpoint_key(ACCOUNT, "llm-prod", url)
    assert "no endpoints" in exc.value.message and "console.vast.ai/endpoints" in exc.value.hint


def test_other_400_is_a_console_error(fake) -> None:
    script, url = fake
    script.answers = [(400, {"success": False, "error": "invalid_args", "msg": "something else"})]
    with pytest.raises(ConsoleError, match="something else"):
        console.list_endpoints(ACCOUNT, url)


def test_401_says_an_endpoint_key_does_not_work_here(fake) -> None:
    script, url = fake
    script.answers = [(401, {"success": False, "error": "auth", "msg": "Invalid user key"})]
    with pytest.raises(KeyRejected) as exc:
        console.list_endpoints("ep-key-prod-1111", url)
    assert "...1111" in exc.value.message and "ep-key-prod" not in exc.value.message
    assert "--api-key" in exc.value.hint and "endpoint key" in exc.value.hint


def test_unknown_endpoint_lists_names_and_suggests_the_closest(fake) -> None:
    script, url = fake
    script.answers = [(200, {"success": True, "results": RESULTS})]
    with pytest.raises(EndpointNotFound) as exc:
        console.fetch_endpoint_key(ACCOUNT, "llm-prd", url)
    assert "llm-prod, llm-staging" in exc.value.message
    assert "Did you mean 'llm-prod'?" in exc.value.hint
    with pytest.raises(EndpointNotFound) as exc:
        console.fetch_endpoint_key(ACCOUNT, "zzzzzz", url)
    assert "Did you mean" not in exc.value.hint


def test_429_backs_off_then_succeeds(fake) -> None:
    script, url = fake
    script.answers = [(429, {"detail": "API requests too frequent endpoint threshold=3.0"})] * 2 + [
        (200, {"success": True, "results": RESULTS})
    ]
    sleeps: list[float] = []
    assert len(console.list_endpoints(ACCOUNT, url, sleep=sleeps.append)) == 2
    assert len(script.seen) == 3
    assert len(sleeps) == 2 and 0.2 < sleeps[0] < sleeps[1] < 2.0


def test_429_gives_up_after_a_bounded_number_of_attempts(fake) -> None:
    script, url = fake
    script.answers = [(429, {"detail": "API requests too frequent endpoint threshold=3.0"})]
    sleeps: list[float] = []
    with pytest.raises(ConsoleError, match="429"):
        console.list_endpoints(ACCOUNT, url, sleep=sleeps.append)
    assert len(script.seen) == console.ATTEMPTS
    assert len(sleeps) == console.ATTEMPTS - 1 and sum(sleeps) < 15


def test_backoff_is_jittered() -> None:
    assert len({round(console._backoff_s(1, None), 6) for _ in range(20)}) > 1
    assert console._backoff_s(0, "3") == 3.0  # Retry-After is a floor


def test_unreachable_console() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConsoleError) as exc:
            console.list_endpoints(ACCOUNT, f"http://127.0.0.1:{port}")
    assert "cannot reach" in exc.value.message and "--console-url" in exc.value.hint


def test_unexpected_shape(fake) -> None:
    script, url = fake
    script.answers = [(200, {"workers": []})]
    with pytest.raises(ConsoleError, match="unexpected shape"):
        console.list_endpoints(ACCOUNT, url)
