"""What crossed the wire, so tests assert on real traffic rather than on the emulator's intent.

Records are appended from the event loop's thread (list.append is atomic, so other threads
may read the lists). Route and console records are appended once answered; a worker record
as soon as the request arrives, then completed in place, its fields final before the last
byte of the response is sent (client_disconnected is set when the disconnect is seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

KeySource = Literal["bearer", "body", "query"]


@dataclass
class RouteRecord:
    time: float
    endpoint: Any
    cost: Any  # the raw JSON value: an int stays an int
    request_idx_in: Any
    request_idx_out: int | None
    status_code: int
    ready: bool
    worker_url: str | None
    key_source: KeySource | None
    headers: dict[str, str]
    signature: str | None = None  # the one a ready answer issued: tests look for it where it must not be


@dataclass
class ConsoleRecord:
    time: float
    method: str
    path: str
    status_code: int
    key_source: KeySource | None


@dataclass
class WorkerRecord:
    time: float
    worker_id: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    payload: Any = None
    connection: str = ""  # the peer address of the TCP connection that carried it
    auth_data: dict[str, Any] | None = None
    signature_ok: bool | None = None
    status_code: int | None = None
    reached_backend: bool = False
    chunks_sent: int = 0
    client_disconnected: bool = False
    raw_path: str = ""  # the request target as it arrived: path and query, %-escapes kept
    # Which WorkerFaults knob decided the outcome: "status", "stall", "die_after_chunks",
    # "reset_before_headers".
    fault: str | None = None


@dataclass
class Records:
    route: list[RouteRecord] = field(default_factory=list)
    console: list[ConsoleRecord] = field(default_factory=list)
    worker: list[WorkerRecord] = field(default_factory=list)

    def clear(self) -> None:
        self.route.clear()
        self.console.clear()
        self.worker.clear()
