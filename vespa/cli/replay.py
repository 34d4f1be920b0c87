"""`scripts/run.sh --replay FILE`: send every request of a saved flow file again, through a fresh
Vespa, and say what each got.

It runs `mitmdump -n -C FILE -s vespa_addon.py` with the launcher's options and environment, so a
replay routes and signs afresh exactly as the proxy would. Where the endpoint key goes is decided
by the command line and its defaults only: the autoscaler and console URLs are options, and the
addon points every replayed request at its own worker leg (vespa/proxy/addon.py `requestheaders`)
whatever address the file holds. A file from someone else cannot collect the key.

The replayed flows are written to a file (the user's `-w`, or a temporary one) and read back
for the report: one line per flow, method, path, worker, status. A flow counts as answered when
a worker sent an HTTP answer (any status: a worker's 500 is an answer); a Vespa error (the
`X-Vespa-Error` header: no worker, route refused, body refused) or no answer at all does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mitmproxy import exceptions, http, io


@dataclass(frozen=True, slots=True)
class Outcome:
    method: str
    path: str  # without the query: clients put tokens there
    worker: str | None
    status: str  # "200", "503 worker_unavailable", "no answer: <why>"
    answered: bool  # a worker's HTTP answer, whatever its status

    def line(self) -> str:
        return f"{self.method} {self.path} -> {self.worker or '-'} {self.status}"


def read(path: Path) -> list[http.HTTPFlow]:
    """The HTTP flows of a saved file, in order (others cannot be replayed: mitmproxy skips them)."""
    with path.open("rb") as f:
        return [flow for flow in io.FlowReader(f).stream() if isinstance(flow, http.HTTPFlow)]


def command(mitmdump: Path, addon: Path, flows_file: Path, out_file: Path, options: list[str], extra: list[str]) -> list[str]:
    """mitmdump without a listening proxy (-n), replaying the file (-C), then exiting."""
    return [str(mitmdump), "-n", "-C", str(flows_file), "-s", str(addon), *options, "-w", str(out_file), *extra]


def user_wfile(extra: list[str]) -> Path | None:
    """`-- -w FILE` (or --wfile): the replayed flows go there, and the report reads them there."""
    for i, arg in enumerate(extra[:-1]):
        if arg in ("-w", "--wfile"):
            return Path(extra[i + 1])
    return None


def outcomes(sent: list[http.HTTPFlow], replayed_file: Path) -> list[Outcome]:
    """What each flow of `sent` got, from the file mitmdump wrote (a flow saved twice, at its
    response and at a later error, counts as its last state)."""
    got: dict[str, http.HTTPFlow] = {}
    if replayed_file.exists():
        try:
            for flow in read(replayed_file):
                got[flow.id] = flow
        except exceptions.FlowReadException:
            pass  # cut short by a killed mitmdump: what was read so far counts
    return [_outcome(f, got.get(f.id)) for f in sent]


def _outcome(sent: http.HTTPFlow, got: http.HTTPFlow | None) -> Outcome:
    method, path = sent.request.method, sent.request.path.partition("?")[0]
    if got is None:
        return Outcome(method, path, None, "no answer: not replayed (see the log above)", False)
    worker = got.metadata.get("vespa", {}).get("worker")
    response = got.response
    if response is None:
        why = got.error.msg if got.error else "unknown error"
        return Outcome(method, path, worker, f"no answer: {why}", False)
    vespa_error = response.headers.get("x-vespa-error")
    if vespa_error:
        return Outcome(method, path, worker, f"{response.status_code} {vespa_error}", False)
    if got.error:
        return Outcome(method, path, worker, f"{response.status_code}, then broke: {got.error.msg}", False)
    return Outcome(method, path, worker, str(response.status_code), worker is not None)
