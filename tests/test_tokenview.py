"""The token-stream content view: what a user reads in mitmweb for a streamed LLM answer.

Streams come from the emulator's backend (the bytes a worker really sends) or are written the way
vLLM, Ollama, TGI and OpenAI send them. What a user checks: the answer text reads as the model
wrote it, the finish reason, usage and errors show, a capture cut short says so, and bodies that
are no token stream keep mitmproxy's own views.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

from tests.conftest import endpoint_key, free_port, run_proxy, wait_for_port
from tests.test_inspection import MITM12, Web, wait_for
from vespa.observe import tokenview
from vespa.emulator.backend import completion_text
from vespa.observe.tokenview import NAME, assemble

CHAT = {"model": "m", "messages": [{"role": "user", "content": "say something nice"}], "max_tokens": 7}
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


def backend(emulator, path: str, body: dict[str, Any]) -> tuple[bytes, str]:
    """A stream straight from the emulator's model server, as a worker relays it."""
    r = requests.post(emulator.backend_url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.content, r.headers["Content-Type"]


def sse(*events: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def ndjson(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def chat_chunk(index: int = 0, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


# --- streams from the emulator's backend --------------------------------------------------------------
def test_chat_stream_reads_as_the_answer_with_finish_reason_usage_and_counts(emulator) -> None:
    data, ctype = backend(emulator, "/v1/chat/completions",
                          {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    got = assemble(data, ctype)
    assert got is not None
    lines = got.text().splitlines()
    # role chunk + 7 tokens + finish chunk + usage chunk + [DONE]
    assert lines == [
        completion_text(7),
        "",
        "finish_reason: length",
        "usage: prompt_tokens=3, completion_tokens=7, total_tokens=10",
        "SSE: 11 events in 22 lines, ended with [DONE]",
    ]


def test_completions_stream_and_ndjson_stream_read_as_the_answer(emulator) -> None:
    data, ctype = backend(emulator, "/v1/completions", {"prompt": "once upon", "max_tokens": 5, "stream": True})
    got = assemble(data, ctype)
    assert got is not None and got.choices[0].text == completion_text(5) and got.choices[0].finish_reason == "length"
    assert got.done and got.usage is None and "usage" not in got.text()

    data, ctype = backend(emulator, "/ndjson", {"max_tokens": 4})
    got = assemble(data, ctype)
    assert got is not None
    assert got.text().splitlines() == [completion_text(4), "", "NDJSON: 5 JSON lines in 5 lines, ended with done"]


def test_a_capture_cut_anywhere_shows_what_came_and_says_it_was_cut(emulator) -> None:
    """Vespa keeps only the first vespa_capture_kb of a stream: every cut point must render the
    tokens received so far, never more, and name the unfinished last event."""
    for path, body in (("/v1/chat/completions", {**CHAT, "max_tokens": 4, "stream": True}), ("/ndjson", {"max_tokens": 4})):
        data, ctype = backend(emulator, path, body)
        full = completion_text(4)
        first_event_end = data.index(b"\n\n" if ctype == SSE else b"\n")
        seen = set()
        for cut in range(1, len(data) + 1):
            got = assemble(data[:cut], ctype)
            if got is None:  # not even the first event is whole: mitmproxy's raw view shows it
                assert cut < first_event_end, (path, cut)
                continue
            text = got.choices[0].text if got.choices else ""
            assert full.startswith(text), (path, cut, text)
            seen.add(text)
            if got.cut_bytes:
                assert "bytes not shown" in got.text() and "vespa_capture_kb" in got.text()
            elif not got.done:
                assert "no end of stream seen" in got.text() or "finish_reason" in got.text(), (path, cut)
        assert got is not None and got.done and got.cut_bytes == 0 and "not shown" not in got.text()
        # Every token boundary was seen on the way: the text grows token by token.
        assert {completion_text(i) for i in range(1, 5)} <= seen


def test_a_cut_in_the_middle_of_an_event_is_named_with_its_size(emulator) -> None:
    data, ctype = backend(emulator, "/v1/chat/completions", {**CHAT, "stream": True})
    events = data.split(b"\n\n")
    kept = b"\n\n".join(events[:3]) + b"\n\n" + events[3][:40]  # role, tok0, tok1, then 40 bytes of tok2
    got = assemble(kept, ctype)
    assert got is not None and got.cut_bytes == 40
    assert got.text().splitlines() == [
        completion_text(2),
        "",
        "SSE: 3 events in 7 lines",
        "the body ends inside an event, 40 bytes not shown: the stream broke or was longer than the capture "
        "(vespa_capture_kb)",
    ]


# --- streams written as other servers send them ------------------------------------------------------
def test_error_event_is_shown_after_the_text_so_far() -> None:
    data = sse(chat_chunk(role="assistant", content=""), chat_chunk(content="Hello"), done=False)
    data += b'event: error\ndata: {"error": {"message": "CUDA out of memory", "type": "server_error", "code": 500}}\n\n'
    got = assemble(data, SSE)
    assert got is not None
    lines = got.text().splitlines()
    assert lines[0] == "Hello"
    assert "error: CUDA out of memory (server_error, 500)" in lines
    # A data-only error object (vLLM) and a plain-text error event are errors too.
    got = assemble(sse({"error": {"message": "bad things", "type": "BadRequestError"}}), SSE)
    assert got is not None and got.errors == ["bad things (BadRequestError)"]
    got = assemble(b"event: error\ndata: upstream went away\n\n", SSE)
    assert got is not None and got.errors == ["upstream went away"]
    assert got.text().splitlines() == ["error: upstream went away", "SSE: 1 event in 3 lines"]


def test_several_choices_are_shown_by_index() -> None:
    data = sse(
        chat_chunk(0, role="assistant", content=""), chat_chunk(1, role="assistant", content=""),
        chat_chunk(0, content="Red"), chat_chunk(1, content="Blue"),
        chat_chunk(1, content=" sky"), chat_chunk(0, content=" rose"),
        chat_chunk(1, finish="stop"), chat_chunk(0, finish="length"),
    )
    got = assemble(data, SSE)
    assert got is not None
    assert got.text().splitlines()[:6] == [
        "--- choice 0 (finish_reason: length) ---", "Red rose", "",
        "--- choice 1 (finish_reason: stop) ---", "Blue sky", "",
    ]


def test_reasoning_and_tool_calls_are_shown_apart_from_the_answer() -> None:
    data = sse(
        chat_chunk(role="assistant", reasoning_content="The user"), chat_chunk(reasoning_content=" wants 4."),
        chat_chunk(content="2 + 2 = "), chat_chunk(content="4"),
        chat_chunk(tool_calls=[{"index": 0, "id": "c1", "type": "function", "function": {"name": "calc", "arguments": ""}}]),
        chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"x": 2}'}}]),
        chat_chunk(finish="tool_calls"),
    )
    got = assemble(data, SSE)
    assert got is not None
    assert got.text().splitlines()[:5] == ["[reasoning]", "The user wants 4.", "[answer]", "2 + 2 = 4",
                                           'tool call: calc({"x": 2})']
    assert "finish_reason: tool_calls" in got.text()


def test_ollama_tgi_anthropic_and_responses_api_streams() -> None:
    generate = ndjson({"model": "llama3", "response": "Hi", "done": False}, {"model": "llama3", "response": " there", "done": False},
                      {"model": "llama3", "response": "", "done": True, "done_reason": "stop",
                       "prompt_eval_count": 12, "eval_count": 2, "total_duration": 123})
    got = assemble(generate, NDJSON)
    assert got is not None and got.text().splitlines()[:4] == ["Hi there", "", "finish_reason: stop",
                                                              "usage: prompt_eval_count=12, eval_count=2"]
    chat = ndjson({"message": {"role": "assistant", "content": "Bon", "thinking": "French?"}, "done": False},
                  {"message": {"role": "assistant", "content": "jour"}, "done": False},
                  {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"})
    got = assemble(chat, "application/x-ndjson; charset=utf-8")
    assert got is not None and got.choices[0].text == "Bonjour" and got.choices[0].reasoning == "French?"
    # TGI: special tokens are not text; the final generated_text repeats the answer and is not added again.
    tgi = [{"token": {"id": 1, "text": "Yes", "logprob": -0.1, "special": False}, "generated_text": None, "details": None},
           {"token": {"id": 2, "text": "</s>", "logprob": 0, "special": True}, "generated_text": "Yes",
            "details": {"finish_reason": "eos_token", "generated_tokens": 2, "seed": None}}]
    for data, ctype in ((sse(*tgi, done=False), SSE), (ndjson(*tgi), NDJSON)):
        got = assemble(data, ctype)
        assert got is not None and got.choices[0].text == "Yes" and got.choices[0].finish_reason == "eos_token"
        assert got.usage == {"generated_tokens": 2}
    anthropic = (b'event: message_start\ndata: {"type": "message_start", "message": {"id": "m1"}}\n\n'
                 b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
                 b'"delta": {"type": "text_delta", "text": "Ahoy"}}\n\n'
                 b'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, '
                 b'"usage": {"output_tokens": 1}}\n\n'
                 b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
    got = assemble(anthropic, SSE)
    assert got is not None and got.choices[0].text == "Ahoy" and got.choices[0].finish_reason == "end_turn" and got.done
    responses = b"".join(
        f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (
            {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
            {"type": "response.reasoning_summary_text.delta", "delta": "Short."},
            {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hel"},
            {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "lo"},
            {"type": "response.output_text.done", "item_id": "msg_1", "text": "Hello"},
            {"type": "response.completed", "response": {"id": "resp_1", "status": "completed",
                                                        "usage": {"input_tokens": 5, "output_tokens": 2}}},
        ))
    got = assemble(responses, SSE)
    assert got is not None and got.text().splitlines()[:7] == [
        "[reasoning]", "Short.", "[answer]", "Hello", "", "finish_reason: completed",
        "usage: input_tokens=5, output_tokens=2"]


def test_sse_without_content_type_and_crlf_lines_are_read() -> None:
    data = sse(chat_chunk(content="a"), chat_chunk(content="b")).replace(b"\n", b"\r\n")
    got = assemble(data, None)
    assert got is not None and got.choices[0].text == "ab" and got.done


@pytest.mark.parametrize("data, ctype", [
    (json.dumps({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "hi"}}]}).encode(),
     "application/json"),
    (json.dumps({"choices": [{"message": {"content": "hi"}}]}, indent=2).encode(), None),
    (b"tok0 tok1 tok2", "text/plain; charset=utf-8"),
    (b"0123456789abcdef" * 100, "application/octet-stream"),
    (b"<html><body>data: no</body></html>", "text/html"),
    (b"data: hello\n\ndata: world\n\n", SSE),  # SSE, but no token stream
    (b'{"a": 1}\n{"b": 2}\n', NDJSON),  # NDJSON, but no token stream
    (b"", SSE),
])
def test_other_bodies_are_left_to_mitmproxys_views(data: bytes, ctype: str | None) -> None:
    assert assemble(data, ctype) is None


# --- the view in the installed mitmproxy ----------------------------------------------------------------
def shown(message: http.Message, flow: http.HTTPFlow) -> tuple[str, str]:
    """(view name, text) of mitmproxy's automatic choice, through its own API (11 or 12)."""
    if MITM12:
        pretty = contentviews.prettify_message(message, flow)
        return pretty.view_name or "", pretty.text
    description, lines, error = contentviews.get_message_content_view("auto", message, flow)
    assert error is None, error
    text = "\n".join("".join(t for _, t in line) for line in lines)
    return (NAME if description.endswith(" token stream") else description), text  # 11 names no view


def flow_with(body: bytes, ctype: str) -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.response = http.Response.make(200, body, {"Content-Type": ctype})
    return f


@pytest.fixture
def registered():
    with taddons.context():  # 12's views read ctx.options
        tokenview.register()
        tokenview.register()  # the addon's load may run twice (script reload): harmless
        try:
            yield
        finally:
            tokenview.unregister()
            tokenview.unregister()


def test_registered_view_is_chosen_for_token_streams_and_only_for_them(registered, emulator) -> None:
    data, ctype = backend(emulator, "/v1/chat/completions", {**CHAT, "stream": True})
    f = flow_with(data, ctype)
    name, text = shown(f.response, f)
    assert name == NAME and text.splitlines()[0] == completion_text(7) and "finish_reason: length" in text
    data, ctype = backend(emulator, "/ndjson", {"max_tokens": 3})
    f = flow_with(data, ctype)
    name, text = shown(f.response, f)
    assert name == NAME and text.startswith(completion_text(3))
    # A plain JSON answer keeps the JSON view.
    data, ctype = backend(emulator, "/v1/chat/completions", CHAT)
    f = flow_with(data, ctype)
    name, text = shown(f.response, f)
    assert name != NAME and completion_text(7) in text


def test_unregister_gives_the_body_back_to_mitmproxys_views(emulator) -> None:
    data, ctype = backend(emulator, "/v1/chat/completions", {**CHAT, "stream": True})
    f = flow_with(data, ctype)
    with taddons.context():
        tokenview.register()
        assert shown(f.response, f)[0] == NAME
        tokenview.unregister()
        name, text = shown(f.response, f)
        assert name != NAME and "data: [DONE]" in text
        tokenview.register()  # and back, as a reloaded addon does
        assert shown(f.response, f)[0] == NAME
        tokenview.unregister()


# --- mitmweb --------------------------------------------------------------------------------------------
def test_mitmweb_renders_a_streamed_answer_with_the_view(emulator) -> None:
    """What mitmweb's Response tab asks for: `GET /flows/ID/response/content/<view>.json`, with
    only vespa_addon.py loaded (its `load` registers the view)."""
    token, web_port = "t" + str(time.monotonic_ns()), free_port()
    opts = [f"web_port={web_port}", "web_open_browser=false", "web_host=127.0.0.1"]
    if MITM12:
        opts.append(f"web_password={token}")
    with run_proxy(emulator.autoscaler_url, "demo", endpoint_key(emulator, "demo"), *opts, tool="mitmweb") as p:
        wait_for_port(web_port, p.proc)
        api = Web(web_port, token if MITM12 else None)
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        with requests.post(p.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
            assert r.status_code == 200 and b"[DONE]" in r.raw.read()
        (flow,) = wait_for(lambda: [f for f in api.flows() if f.get("response") and "streamed" in f["comment"]],
                           "the finished flow")
        base = f"/flows/{flow['id']}/response/content"
        for view in ("auto", NAME.replace(" ", "%20")):
            got = api.get(f"{base}/{view}.json").json()
            if MITM12:
                assert got["view_name"] == NAME, got
                text = got["text"]
            else:
                assert got["description"] == "SSE token stream", got
                text = "\n".join("".join(t for _, t in line) for line in got["lines"])
            assert text.splitlines()[0] == completion_text(7), text
            assert "usage: prompt_tokens=3, completion_tokens=7, total_tokens=10" in text
        # ... and lists it among the views a user can pick (12 lists names in lower case).
        assert NAME.lower() in [v.lower() for v in api.get("/state").json()["contentViews"]]
