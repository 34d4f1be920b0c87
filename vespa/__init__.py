"""Vespa: a local proxy that makes a Vast.ai Serverless endpoint look like a plain HTTP server.

`from vespa import VastClient, fetch_endpoint_key, list_endpoints` is the Python API
(vespa/api.py). It is imported on first use, so `vespa.wire` or the emulator do not pull in
mitmproxy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vespa.api import VastClient, fetch_endpoint_key, list_endpoints

__all__ = ["VastClient", "fetch_endpoint_key", "list_endpoints"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vespa import api

        return getattr(api, name)
    raise AttributeError(f"module 'vespa' has no attribute {name!r}")
