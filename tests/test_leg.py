"""The worker leg's pure parts: what it accepts of a body, what it forwards of the headers."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from vespa.proxy import body as bodies, leg
from vespa.errors import BadBody, BodyTooLarge


@pytest.mark.parametrize("body", [
    b'\xef\xbb\xbf{"a": 1}',  # UTF-8 with a byte-order mark
    '{"a": 1}'.encode("utf-16"),
    b"not json",
    b"[" * 100_000 + b"]" * 100_000,  # the parser's recursion limit
    b'{"a": ' * 600 + b"1" + b"}" * 600,
])
def test_bodies_a_worker_cannot_read_are_bad_body(body: bytes) -> None:
    with pytest.raises(BadBody):
        bodies.check_json(body)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    bodies.check_json(json.dumps({"prompt": "[" * 5000 + "{" * 5000}).encode())


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                    max_leaves=20))
def test_any_ordinary_json_is_accepted(value) -> None:
    bodies.check_json(json.dumps(value).encode())


def test_gzip_bodies_are_decoded_within_the_limit() -> None:
    data = json.dumps({"x": "y" * 1000}).encode()
    assert bodies.decode(gzip.compress(data), "gzip", 10_000) == data
    assert bodies.decode(zlib.compress(data), "deflate", 10_000) == data
    assert bodies.decode(data, "identity", 10_000) == data


def test_a_gzip_bomb_is_refused_at_the_limit_not_inflated() -> None:
    bomb = gzip.compress(b"0" * (50 * 1024 * 1024))  # 50 MiB in about 50 KB
    assert len(bomb) < 100_000
    with pytest.raises(BodyTooLarge, match="once decoded"):
        bodies.decode(bomb, "gzip", 1024 * 1024)


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, compress"])
def test_unknown_encodings_are_bad_body(encoding: str) -> None:
    with pytest.raises(BadBody, match="Content-Encoding"):
        bodies.decode(b"x", encoding, 100)


def test_worker_headers_drop_credentials_and_hop_headers_keep_duplicates() -> None:
    headers = CIMultiDictProxy(CIMultiDict([
        ("Authorization", "Bearer sk-1"), ("Cookie", "a=b"), ("X-Api-Key", "k"), ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"), ("X-Serverless-Cost", "5"), ("X-Vast-Endpoint", "demo"),
        ("Accept", "text/event-stream"), ("X-Trace", "1"), ("X-Trace", "2"), ("Host", "127.0.0.1:1"),
    ]))
    out = leg._worker_headers(headers)
    assert sorted(out.items()) == [("Accept", "text/event-stream"), ("X-Trace", "1"), ("X-Trace", "2")]


def test_worker_headers_are_linear_in_their_number() -> None:
    # 20,000 headers: one pass (the old rewrite deleted them one by one, quadratic: ~48 s).
    headers = CIMultiDictProxy(CIMultiDict((f"x-h{i}", "v") for i in range(20_000)))
    assert len(leg._worker_headers(headers)) == 20_000


def test_config_round_trips_through_json_and_hides_keys_in_repr() -> None:
    config = leg.LegConfig("http://a", (leg.EndpointKey("demo", "ep-SECRETMARKER-1234"),), max_body_bytes=5)
    assert leg.LegConfig.from_json(config.to_json()) == config
    assert "SECRETMARKER" not in repr(config)
