"""The account API: list endpoints and fetch an endpoint's key with the account key.

`GET {console}/api/v0/endptjobs/` (../shared/vast-protocol.md section 3). The console allows
about 3 requests per second and answers 429 beyond, so calls back off and retry a few times.
"""

from __future__ import annotations

import difflib
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import requests

from vespa.errors import ConsoleError, EndpointNotFound, KeyRejected
from vespa.keys import clean_key, mask

TIMEOUT_S = 10.0
ATTEMPTS = 5
# The console's "no endpoints" answer is a 400, not an empty list.
NO_ENDPOINTS_MSG = "No endpoints for user found"
NO_ENDPOINTS_HINT = "Create one at https://console.vast.ai/endpoints, or check that the key is this account's key."


@dataclass(frozen=True)
class Endpoint:
    name: str
    state: str
    max_workers: int | None
    api_key: str = field(repr=False)  # as the console sent it: check with key_of() before use


def _backoff_s(attempt: int, retry_after: str | None) -> float:
    """Jittered exponential backoff, so several launchers do not retry in lockstep."""
    try:
        floor = float(retry_after) if retry_after else 0.0
    except ValueError:
        floor = 0.0
    return max(floor, min(0.4 * 2**attempt, 4.0) * random.uniform(0.75, 1.25))


def _get(url: str, account_key: str, sleep: Callable[[float], None]) -> requests.Response:
    for attempt in range(ATTEMPTS):
        try:
            resp = requests.get(url, headers={"Authorization": f"Bearer {account_key}"}, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise ConsoleError(
                f"cannot reach the Vast console at {url}: {type(exc).__name__}",
                "Check the network, or the console address (--console-url, env VAST_URL, --instance).",
            ) from exc
        if resp.status_code != 429:
            break
        if attempt < ATTEMPTS - 1:
            sleep(_backoff_s(attempt, resp.headers.get("Retry-After")))
    return resp


def _message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(body, dict):
        return str(body.get("msg") or body.get("detail") or body.get("error_msg") or body.get("error") or body)
    return str(body)[:200]


def list_endpoints(
    account_key: str, console_url: str, *, sleep: Callable[[float], None] = time.sleep
) -> list[Endpoint]:
    """Every endpoint of the account; [] when it has none."""
    url = console_url.rstrip("/") + "/api/v0/endptjobs/"
    resp = _get(url, account_key, sleep)
    if resp.status_code == 401 or resp.status_code == 403:
        raise KeyRejected(
            f"the Vast console rejected the account key {mask(account_key)} ({resp.status_code}: {_message(resp)})",
            "This needs your account key (from "
            f"{console_url.rstrip('/')}/account). If {mask(account_key)} is an endpoint key, pass it with "
            "--api-key (or env VAST_API_KEY) together with --endpoint NAME instead.",
        )
    if resp.status_code == 400 and NO_ENDPOINTS_MSG.lower() in _message(resp).lower():
        return []
    if resp.status_code == 429:
        raise ConsoleError(
            f"the Vast console kept answering 429 (too many requests) after {ATTEMPTS} attempts",
            "Wait a few seconds and retry; something else may be using the same account key heavily.",
        )
    if resp.status_code != 200:
        raise ConsoleError(
            f"the Vast console answered {resp.status_code} to {url}: {_message(resp)}",
            "Retry in a moment; if it persists, check the console address (--console-url, VAST_URL).",
        )
    try:
        results = resp.json()["results"]
        return [
            Endpoint(r["endpoint_name"], str(r.get("endpoint_state") or "unknown"), r.get("max_workers"), r["api_key"])
            for r in results
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConsoleError(
            f"the Vast console's endpoint list at {url} has an unexpected shape",
            "Check --console-url points at the console (e.g. https://console.vast.ai), not the autoscaler.",
        ) from exc


def find_endpoint(endpoints: list[Endpoint], name: str) -> Endpoint:
    for ep in endpoints:
        if ep.name == name:
            return ep
    names = [ep.name for ep in endpoints]
    if not names:
        raise EndpointNotFound(f"endpoint '{name}' not found: this account has no endpoints", NO_ENDPOINTS_HINT)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    suggestion = f"Did you mean '{close[0]}'? " if close else ""
    raise EndpointNotFound(
        f"endpoint '{name}' not found; this account has: {', '.join(names)}",
        f"{suggestion}Endpoint names are case-sensitive; list them with --list.",
    )


def key_of(endpoint: Endpoint) -> str:
    """The endpoint's key, checked like any other key before it goes into a header (BadKey if not)."""
    return clean_key(endpoint.api_key, f"the console's answer for endpoint '{endpoint.name}'", kind="endpoint key")


def fetch_endpoint_key(
    account_key: str, endpoint_name: str, console_url: str, *, sleep: Callable[[float], None] = time.sleep
) -> str:
    return key_of(find_endpoint(list_endpoints(account_key, console_url, sleep=sleep), endpoint_name))
