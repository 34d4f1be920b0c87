"""One exception per failure Vespa answers itself, each with its HTTP status and a hint.

The proxy turns them into `{"error": {"type", "message", "hint"}}` with `X-Vespa-Error: <type>`;
the launcher prints `message` and `hint` as two lines.
"""

from __future__ import annotations

import json
from typing import ClassVar


class VespaError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_hint: ClassVar[str] = ""
    # Seconds the client may wait before trying again; sent as Retry-After when set.
    retry_after: ClassVar[int | None] = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def to_json(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "hint": self.hint}}

    def body(self) -> bytes:
        return json.dumps(self.to_json()).encode()

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Vespa-Error": self.type}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers


# --- the client's request -------------------------------------------------------------------
class BadCost(VespaError):
    status, type = 400, "bad_cost"
    default_hint = "Send X-Serverless-Cost as a positive number of workload units, e.g. 'X-Serverless-Cost: 256'."


class BadBody(VespaError):
    status, type = 400, "bad_body"
    default_hint = "Vast workers take a JSON body on POST/PUT/PATCH: send valid JSON with Content-Type: application/json."


class BodyTooLarge(VespaError):
    status, type = 413, "body_too_large"
    default_hint = "Raise the limit with --set vespa_max_body_kb=N if the request is meant to be this big."


class TooManyHeaders(VespaError):
    status, type = 431, "too_many_headers"
    default_hint = "Send fewer header fields, or raise the limit with --set vespa_max_headers=N."


class UriTooLong(VespaError):
    status, type = 414, "uri_too_long"
    default_hint = "Send the data in a JSON body (POST) rather than in the URL."


class ProxyNotConfigured(VespaError):
    status, type = 503, "not_configured"


class NotRouted(VespaError):
    """The request's headers reached another instance of the addon (a script reload)."""

    status, type = 503, "not_routed"
    default_hint = "Vespa was reloaded while the request arrived; it was not sent anywhere and may be retried."
    retry_after = 1


class ModelNotFound(VespaError):
    """Several endpoints are served and the request's `model` selects none of them."""

    status, type = 404, "model_not_found"
    default_hint = (
        "Set the request's \"model\" to one of the names above (GET /v1/models lists them), "
        "or pick the endpoint with the header 'X-Vast-Endpoint: NAME'."
    )

    def to_json(self) -> dict:
        # OpenAI's own 404 carries code/param; its SDK exposes them as e.code / e.param.
        body = super().to_json()
        body["error"].update(code="model_not_found", param="model")
        return body


class UnknownEndpoint(VespaError):
    """`X-Vast-Endpoint` names an endpoint this proxy does not serve."""

    status, type = 404, "unknown_endpoint"
    default_hint = "Name one of the endpoints above in X-Vast-Endpoint, or drop the header to choose by model."


# --- configuration ----------------------------------------------------------------------------
class BadConfig(VespaError):
    """The endpoint configuration (config file, --endpoint/--cost, the addon option) is refused."""

    status, type = 500, "bad_config"
    default_hint = "Fix the endpoint configuration and start Vespa again."


# --- keys and the account API ---------------------------------------------------------------
class KeyRejected(VespaError):
    status, type = 401, "key_rejected"


class BadKey(VespaError):
    """A key that cannot be sent as `Authorization: Bearer <key>`: several lines, a byte-order mark,
    spaces or non-ASCII characters. 503 like `not_configured`: the proxy cannot serve until whoever
    runs it fixes the key; the client can do nothing about it. The message names the source
    (flag, env var or file), never any part of the value."""

    status, type = 503, "bad_key"
    default_hint = "Give the key alone, on one line, exactly as the Vast console shows it, and restart Vespa."


class EndpointNotFound(VespaError):
    status, type = 404, "endpoint_not_found"


class ConsoleError(VespaError):
    status, type = 502, "console_error"


# --- the autoscaler ---------------------------------------------------------------------------
class AutoscalerUnreachable(VespaError):
    status, type = 502, "autoscaler_unreachable"
    default_hint = "Check the network and the autoscaler URL (--autoscaler-url / vespa_autoscaler_url)."
    retry_after = 5


class BadRouteAnswer(VespaError):
    status, type = 502, "bad_route_answer"
    default_hint = "The autoscaler answered something Vespa cannot use; this is on Vast's side. Retry, or report it."


class NoWorkerInTime(VespaError):
    status, type = 503, "no_worker_ready"
    default_hint = (
        "The endpoint has no worker ready yet (cold start). Retry in a minute, raise the wait with "
        "--set vespa_route_deadline_s=N, or keep a warm worker (min_load / cold_workers)."
    )
    retry_after = 30


# --- the worker -------------------------------------------------------------------------------
class LoopDetected(VespaError):
    status, type = 508, "loop_detected"
    default_hint = (
        "The autoscaler named a worker at this proxy's own address; nothing was sent to a worker. "
        "Check --autoscaler-url: it must be Vast's autoscaler (or the emulator), not this proxy."
    )


class WorkerRejectedSignature(VespaError):
    status, type = 502, "worker_rejected_signature"
    default_hint = (
        "The worker refused the routing signature (its 401). The worker may not have loaded the "
        "autoscaler's public key yet, or runs another signature generation. Retry; report it if it persists."
    )


class WorkerTlsFailed(VespaError):
    """The worker's certificate did not verify: nothing was sent to it."""

    status, type = 502, "worker_tls_failed"
    default_hint = (
        "The worker's HTTPS certificate does not chain to Vast's root CA (or the usual CA bundle), so "
        "Vespa sent nothing to it. After such a failure Vespa downloads the CA again (at most once a "
        "minute), in case Vast rotated it; if it persists, the worker is not the one the autoscaler "
        "named. Do not set ssl_insecure to get past it: that hands your requests to whoever answers."
    )


class WorkerCaUnavailable(VespaError):
    """Vast's worker root CA could not be loaded, so no HTTPS worker can be verified."""

    status, type = 502, "worker_ca_unavailable"


class WorkerUnavailable(VespaError):
    """The worker never took the request: it is safe for the client to send it again."""

    status, type = 503, "worker_unavailable"
    default_hint = "The request was not processed by any worker and may be retried."
    retry_after = 2


# --- reliability (docs/RELIABILITY.md) ---------------------------------------------------------
class BadRequest(VespaError):
    status, type = 400, "bad_request"
    default_hint = "The request is not valid HTTP as the proxy reads it; check the client."


class WorkerBroke(VespaError):
    """The worker had the request and failed: it may have run, so Vespa never resends it."""

    status, type = 502, "worker_failed"
    default_hint = (
        "The worker failed after it received the request, so it may have been processed (and billed); "
        "Vespa does not resend it. Send it again if a second run is acceptable."
    )


class LegUnreachable(WorkerUnavailable):
    """mitmproxy could not connect to the worker leg: nothing was sent anywhere."""

    status, type = 503, "worker_leg_unreachable"
    default_hint = "The request was not processed and may be retried; if it persists, the proxy log says why."


class RouteTimeout(VespaError):
    status, type = 504, "route_timeout"
    default_hint = "The autoscaler did not answer /route/ in time; raise --set vespa_route_timeout_s=N or retry."
    retry_after = 5


class WorkerConnectTimeout(WorkerUnavailable):  # retried like a refusal: nothing was sent
    """No connection to the worker in time: nothing was sent, so the client may resend."""

    status, type = 503, "worker_connect_timeout"
    default_hint = "The request was not processed and may be retried; raise --set vespa_connect_timeout_s=N if workers are far away."
    retry_after = 2


class WorkerFirstByteTimeout(VespaError):
    status, type = 504, "worker_first_byte_timeout"
    default_hint = (
        "The worker took the request but sent nothing in time; it may still be running it. "
        "Raise --set vespa_first_byte_timeout_s=N for long prompts or cold models."
    )


class WorkerIdleTimeout(VespaError):
    status, type = 504, "worker_idle_timeout"
    default_hint = (
        "The worker's stream went silent for too long and was cut; the answer is incomplete. "
        "Raise --set vespa_idle_timeout_s=N if the model pauses that long."
    )
