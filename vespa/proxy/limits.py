"""Reliability options: one timeout per stage, each with its own error type, and the body limit.

Int options only (mitmproxy's `--set` cannot parse floats). docs/RELIABILITY.md has the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import exceptions

KIB = 1024
# (name, default, help). Defaults: cold starts are handled by vespa_route_deadline_s, so each
# call can be short; the first byte waits for a whole prompt to be read, so it is generous.
OPTIONS: tuple[tuple[str, int, str], ...] = (
    ("vespa_route_timeout_s", 10, "Seconds for one /route/ call (retried inside vespa_route_deadline_s); error route_timeout."),
    ("vespa_connect_timeout_s", 10, "Seconds to connect to a worker before routing again; error worker_connect_timeout."),
    ("vespa_first_byte_timeout_s", 300, "Seconds from sending the request to the worker's first response byte; error worker_first_byte_timeout."),
    ("vespa_idle_timeout_s", 120, "Longest silence inside a streamed answer before it is cut; error worker_idle_timeout."),
    ("vespa_max_body_kb", 10240, "Largest request body in KiB, compressed or decoded; bigger ones get 413 body_too_large "
     "(it sets mitmproxy's body_size_limit, so a declared or chunked body over it is refused before it is held)."),
    ("vespa_max_headers", 256, "Most header fields in one request; more get 431 too_many_headers."),
    ("vespa_header_timeout_s", 30, "Seconds a client connection may take to send a complete request head; then it is closed."),
)


@dataclass(frozen=True, slots=True)
class Limits:
    route_timeout_s: int = 10
    connect_timeout_s: int = 10
    first_byte_timeout_s: int = 300
    idle_timeout_s: int = 120
    max_body_kb: int = 10240
    max_headers: int = 256
    header_timeout_s: int = 30

    @classmethod
    def from_options(cls, opts) -> Limits:
        values = {name: getattr(opts, name) for name, _, _ in OPTIONS}
        for name, value in values.items():
            if value <= 0:
                raise exceptions.OptionsError(f"vespa: {name} must be a positive number, got {value}.")
        return cls(**{name.removeprefix("vespa_"): value for name, value in values.items()})


def add_options(loader) -> None:
    for name, default, help_text in OPTIONS:
        loader.add_option(name, int, default, help_text)
