"""Where a client put its API key: Vast accepts the Bearer header, a body field or the query."""

from __future__ import annotations

from typing import Any, Mapping

from vespa.emulator.records import KeySource


def find_key(
    headers: Mapping[str, str], body: Mapping[str, Any], query: Mapping[str, str]
) -> tuple[str | None, KeySource | None]:
    """The first key found, in the order the SDK sends them (header, body, query)."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip(), "bearer"
    if isinstance(body.get("api_key"), str):
        return body["api_key"], "body"
    if "api_key" in query:
        return query["api_key"], "query"
    return None, None
