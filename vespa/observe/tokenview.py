"""A mitmproxy content view that reads an LLM token stream as the answer it spells.

A streamed chat answer is a wall of `data: {...}` lines in mitmweb; this view joins the tokens
of OpenAI-style SSE (chat `delta.content`, completions `text`, `reasoning_content`) and NDJSON
streams (Ollama, TGI, the emulator's backend) into text, then shows the finish reason, usage and
errors the stream carried and how many events it held. Vespa keeps only the first
`vespa_capture_kb` of a stream, so a cut last event is expected and said, not an error.

`assemble` is pure (bytes in, `Assembled` or None out). mitmproxy 11 and 12 have different
content view APIs; the two adapters at the end are thin, and `register`/`unregister` pick one.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

NAME = "LLM stream"

SSE_TYPES = ("text/event-stream",)
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines",
                "application/jsonlines", "application/json-seq", "application/stream+json")
# An SSE field at the start of the body: enough to tell SSE from JSON or binary without a content type.
_SSE_START = re.compile(rb"\A\s*(?:(?:data|event|id|retry)[ \t]*:|:)")

Style = str
Line = list[tuple[Style, str]]


@dataclass
class ToolCall:
    name: str = ""
    arguments: str = ""


@dataclass
class Choice:
    index: int
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    tool_calls: dict[int, ToolCall] = field(default_factory=dict)


@dataclass
class Assembled:
    """What a token stream said, in the order it said it."""

    kind: str  # "SSE" or "NDJSON"
    choices: dict[int, Choice] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    lines: int = 0
    events: int = 0  # SSE events (without comments) or NDJSON lines
    recognized: int = 0  # events that carried tokens, usage, an end or an error
    done: bool = False  # `data: [DONE]`, Ollama's `"done": true`, Anthropic's message_stop
    cut_bytes: int = 0  # size of an unfinished last event (the capture or the stream ended inside it)

    def choice(self, index: int) -> Choice:
        if index not in self.choices:
            self.choices[index] = Choice(index)
        return self.choices[index]

    def render(self) -> list[Line]:
        """The view's lines as (style, text) pairs: mitmproxy 11 styles them, 12 joins them."""
        out: list[Line] = []
        many = len(self.choices) > 1
        for c in sorted(self.choices.values(), key=lambda c: c.index):
            if many:
                end = f" (finish_reason: {c.finish_reason})" if c.finish_reason else ""
                out.append([("header", f"--- choice {c.index}{end} ---")])
            if c.reasoning:
                out.append([("header", "[reasoning]")])
                out += _text_lines(c.reasoning)
                out.append([("header", "[answer]")])
            out += _text_lines(c.text)
            for i in sorted(c.tool_calls):
                call = c.tool_calls[i]
                out.append([("header", "tool call: "), ("text", f"{call.name}({call.arguments})")])
            if many:
                out.append([])
        if len(self.choices) == 1:
            out.append([])
        for err in self.errors:
            out.append([("error", "error: "), ("error", err)])
        reasons = {c.finish_reason for c in self.choices.values() if c.finish_reason}
        if reasons and not many:
            out.append([("header", "finish_reason: "), ("text", ", ".join(sorted(reasons)))])
        if self.usage:
            out.append([("header", "usage: "), ("text", _flat(self.usage))])
        out.append([("header", f"{self.kind}: "), ("text", self.summary())])
        if self.cut_bytes:
            unit = "event" if self.kind == "SSE" else "line"
            out.append([("error", f"the body ends inside an {unit}, {self.cut_bytes} bytes not shown: the stream "
                                  "broke or was longer than the capture (vespa_capture_kb)")])
        elif not self.done and not reasons and not self.errors:
            out.append([("error", "no end of stream seen: the stream or its capture was cut short")])
        return out

    def summary(self) -> str:
        unit = "event" if self.kind == "SSE" else "JSON line"
        text = f"{_count(self.events, unit)} in {_count(self.lines, 'line')}"
        if self.events > self.recognized:
            text += f" ({self.events - self.recognized} not understood)"
        if self.done:
            text += ", ended with [DONE]" if self.kind == "SSE" else ", ended with done"
        return text

    def text(self) -> str:
        return "\n".join("".join(t for _, t in line) for line in self.render())


def assemble(data: bytes, content_type: str | None) -> Assembled | None:
    """The stream's answer, or None when `data` is not a token stream this view understands
    (then mitmproxy's other views show it)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in SSE_TYPES or (not ctype.startswith("application/") and _SSE_START.match(data[:64])):
        out = _sse(data)
    elif ctype in NDJSON_TYPES or _looks_like_ndjson(data):
        out = _ndjson(data)
    else:
        return None
    return out if out.recognized else None


def _looks_like_ndjson(data: bytes) -> bool:
    """Two or more lines, the first a JSON object on its own: a single (maybe pretty-printed)
    JSON document fails this and stays with the JSON view."""
    head = data.lstrip()[:1]
    if head != b"{":
        return False
    first, sep, rest = data.strip().partition(b"\n")
    return bool(sep and rest.strip()) and isinstance(_json(first), dict)


def _json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return None


def _sse(data: bytes) -> Assembled:
    out = Assembled("SSE")
    lines = data.splitlines(keepends=True)
    out.lines = len(lines)
    event, payload, pending = "", [], 0
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:  # a blank line dispatches the event (SSE spec)
            if payload or event:
                _sse_event(out, event, payload)
            event, payload, pending = "", [], 0
            continue
        pending += len(raw)
        name, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if name == b"data":
            payload.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace").strip()
    if payload or event:
        # No blank line after the last event: a capture cut there. A complete-looking last event is
        # shown (the end was cut just before the blank line); a broken one is counted as cut.
        if _json(b"\n".join(payload)) is not None or b"\n".join(payload).strip() == b"[DONE]":
            _sse_event(out, event, payload)
        else:
            out.cut_bytes = pending
    return out


def _sse_event(out: Assembled, event: str, payload: list[bytes]) -> None:
    out.events += 1
    data = b"\n".join(payload)
    if data.strip() == b"[DONE]":
        out.done = True
        out.recognized += 1
        return
    obj = _json(data)
    if event == "error":
        out.errors.append(_error_text(obj if obj is not None else data.decode("utf-8", "replace")))
        out.recognized += 1
    elif isinstance(obj, dict) and _absorb(out, obj):
        out.recognized += 1


def _ndjson(data: bytes) -> Assembled:
    out = Assembled("NDJSON")
    lines = data.splitlines(keepends=True)
    out.lines = len(lines)
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        obj = _json(raw)
        if obj is None and n == len(lines) - 1 and not raw.endswith(b"\n"):
            out.cut_bytes = len(raw)  # the capture ended inside this line
            continue
        out.events += 1
        if isinstance(obj, dict) and _absorb(out, obj):
            out.recognized += 1
    return out


def _absorb(out: Assembled, obj: dict[str, Any]) -> bool:
    """Take what one event object says into `out`; False if it is no shape this view knows."""
    known = False
    if obj.get("error"):
        out.errors.append(_error_text(obj))
        return True
    choices = obj.get("choices")
    if isinstance(choices, list):  # OpenAI chat and completions (an empty list: the usage chunk)
        known = True
        for pos, c in enumerate(choices):
            if isinstance(c, dict):
                _openai_choice(out.choice(_int(c.get("index"), pos)), c)
    if isinstance(obj.get("usage"), dict) and obj["usage"]:
        out.usage = obj["usage"]
        known = True
    if not isinstance(choices, list):
        known = _other_shapes(out, obj) or known
    return known


def _openai_choice(ch: Choice, c: dict[str, Any]) -> None:
    ch.text += _str(c.get("text"))
    delta = c.get("delta") if isinstance(c.get("delta"), dict) else c.get("message")
    if isinstance(delta, dict):
        ch.text += _str(delta.get("content"))
        ch.reasoning += _str(delta.get("reasoning_content")) or _str(delta.get("reasoning"))
        for pos, call in enumerate(delta.get("tool_calls") or []):
            if isinstance(call, dict):
                tc = ch.tool_calls.setdefault(_int(call.get("index"), pos), ToolCall())
                fn = call.get("function") if isinstance(call.get("function"), dict) else {}
                tc.name += _str(fn.get("name"))
                tc.arguments += _str(fn.get("arguments"))
    if c.get("finish_reason"):
        ch.finish_reason = str(c["finish_reason"])


def _other_shapes(out: Assembled, obj: dict[str, Any]) -> bool:
    """NDJSON and other SSE: Ollama generate/chat, TGI, Anthropic, OpenAI Responses, the emulator's backend."""
    ch, known = out.choice(0), False
    kind = obj.get("type")
    if isinstance(kind, str) and kind.startswith("response."):  # its `*.done` events repeat the text
        return _responses_event(out, ch, kind, obj)
    token = obj.get("token")
    if isinstance(token, dict) and isinstance(token.get("text"), str):  # TGI; its final generated_text repeats all
        if not token.get("special"):
            ch.text += token["text"]
        known = True
    details = obj.get("details")
    if isinstance(details, dict) and details.get("finish_reason"):
        ch.finish_reason = str(details["finish_reason"])
        out.usage = {k: v for k, v in details.items() if k.endswith("tokens") and isinstance(v, int)} or out.usage
        known = True
    for key in ("response", "text"):  # Ollama generate; the emulator ({"index": token number, "text": ...})
        if isinstance(obj.get(key), str):
            ch.text += obj[key]
            known = True
    message = obj.get("message")
    if isinstance(message, dict):  # Ollama chat
        ch.text += _str(message.get("content"))
        ch.reasoning += _str(message.get("thinking"))
        known = True
    ch.reasoning += _str(obj.get("thinking"))
    if obj.get("done") is True:  # Ollama (and the emulator) end with "done"; Ollama adds counts
        out.done, known = True, True
        if obj.get("done_reason"):
            ch.finish_reason = str(obj["done_reason"])
        counts = {k: obj[k] for k in ("prompt_eval_count", "eval_count") if isinstance(obj.get(k), int)}
        out.usage = counts or out.usage
    # Anthropic messages
    delta = obj.get("delta") if isinstance(obj.get("delta"), dict) else {}
    if kind == "content_block_delta":
        ch.text += _str(delta.get("text"))
        ch.reasoning += _str(delta.get("thinking"))
        known = True
    elif kind == "message_delta":
        if delta.get("stop_reason"):
            ch.finish_reason = str(delta["stop_reason"])
        known = True
    elif kind == "message_stop":
        out.done, known = True, True
    elif kind in ("message_start", "content_block_start", "content_block_stop", "ping"):
        known = True
    return known


def _responses_event(out: Assembled, ch: Choice, kind: str, obj: dict[str, Any]) -> bool:
    """OpenAI's Responses API (`/v1/responses`): typed events, `delta` is a string."""
    if kind == "response.output_text.delta":
        ch.text += _str(obj.get("delta"))
    elif kind.startswith("response.reasoning") and kind.endswith(".delta"):
        ch.reasoning += _str(obj.get("delta"))
    elif kind in ("response.completed", "response.incomplete", "response.failed"):
        resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
        out.done = True
        details = resp.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        ch.finish_reason = str(reason or resp.get("status") or kind.rpartition(".")[2])
        if isinstance(resp.get("usage"), dict):
            out.usage = resp["usage"]
        if resp.get("error"):
            out.errors.append(_error_text(resp))
    return True


def _error_text(obj: Any) -> str:
    """`{"error": {"message", "type", "code"}}`, `{"error": "..."}`, `{"message": ...}` or plain text."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)
            tags = [str(err[k]) for k in ("type", "code") if err.get(k)]
            return f"{msg} ({', '.join(tags)})" if tags else str(msg)
        return str(err)
    return str(obj)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _flat(d: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, dict):
            if inner := _flat(v, f"{prefix}{k}."):
                parts.append(inner)
        elif v is not None:
            parts.append(f"{prefix}{k}={v}")
    return ", ".join(parts)


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def _text_lines(text: str) -> Iterator[Line]:
    return ([("text", line)] for line in text.split("\n"))


# --- mitmproxy adapters ------------------------------------------------------------------------------
# mitmweb asks a view's priority for every body it shows and then renders with the winner: a small
# cache keeps that to one parse (bytes cache their own hash).
@functools.lru_cache(maxsize=4)
def _cached(data: bytes, content_type: str | None) -> Assembled | None:
    return assemble(data, content_type)


PRIORITY = 2.0  # above the JSON view (1), which claims application/x-ndjson and then fails on it


def _priority(data: bytes, content_type: str | None) -> float:
    return PRIORITY if data and _cached(data, content_type) is not None else -1.0


def _make_view() -> object:
    from mitmproxy import contentviews

    if hasattr(contentviews, "Contentview"):  # mitmproxy 12+
        from mitmproxy.contentviews import Contentview, Metadata

        class TokenStreamView(Contentview):
            @property
            def name(self) -> str:
                return NAME

            def prettify(self, data: bytes, metadata: Metadata) -> str:
                got = _cached(data, metadata.content_type)
                if got is None:  # chosen by hand for a body it does not understand
                    raise ValueError("not an SSE or NDJSON token stream")
                return got.text()

            def render_priority(self, data: bytes, metadata: Metadata) -> float:
                return _priority(data, metadata.content_type)

        return TokenStreamView()

    from mitmproxy.contentviews import base

    class LegacyTokenStreamView(base.View):
        name = NAME

        def __call__(self, data: bytes, *, content_type: str | None = None, **metadata: Any) -> Any:
            got = _cached(data, content_type)
            if got is None:
                return None  # mitmproxy 11 shows Raw, saying it could not parse
            return f"{got.kind} token stream", iter(got.render())

        def render_priority(self, data: bytes, *, content_type: str | None = None, **metadata: Any) -> float:
            return _priority(data, content_type)

    return LegacyTokenStreamView()


_view: object | None = None


def register() -> None:
    """Add the view (the addon's `load`); calling it again changes nothing."""
    global _view
    from mitmproxy import contentviews

    if _view is not None and _is_registered(_view):
        return
    _view = _view or _make_view()
    if hasattr(contentviews, "registry"):
        contentviews.registry.register(_view)  # type: ignore[arg-type]
    else:
        old = contentviews.get(NAME)  # a view of ours from before a script reload
        if old is not None:
            contentviews.remove(old)
        contentviews.add(_view)  # type: ignore[arg-type]


def unregister() -> None:
    """Remove the view (the addon's `done`); calling it again changes nothing."""
    from mitmproxy import contentviews

    if _view is None or not _is_registered(_view):
        return
    if hasattr(contentviews, "registry"):
        # 12 has no public removal (`contentviews.remove` is a deprecated no-op).
        contentviews.registry._by_name.pop(NAME.lower(), None)
    else:
        contentviews.remove(_view)  # type: ignore[arg-type]


def _is_registered(view: object) -> bool:
    from mitmproxy import contentviews

    if hasattr(contentviews, "registry"):
        return contentviews.registry.get(NAME.lower()) is view
    return view in contentviews.views


