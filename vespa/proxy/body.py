"""The client's request body as the worker leg accepts it: bounded as it is read and as it is
decoded, strict UTF-8 JSON, not too deep. Pure functions, apart from reading the stream."""

from __future__ import annotations

import json
import zlib
from typing import Any

import aiohttp

from vespa.errors import BadBody, BodyTooLarge

# Deeper JSON than any API payload; Python's parser would hit its recursion limit past ~100k.
MAX_JSON_DEPTH = 512
READ_CHUNK = 1 << 16


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    buf = bytearray()
    while chunk := await content.read(READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise BodyTooLarge(f"the request body is over the limit of {limit // 1024} KiB")
    return bytes(buf)


def decode(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding, never more than `limit` bytes decoded (a 500 KB
    gzip bomb inflates to gigabytes)."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip() and c.strip().lower() != "identity"]
    data = raw
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            wbits = 16 + zlib.MAX_WBITS
        elif coding == "deflate":
            wbits = zlib.MAX_WBITS
        else:
            raise BadBody(f"the request body's Content-Encoding {coding!r} is not supported",
                          hint="Send the body uncompressed, or with gzip or deflate.")
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(data, limit + 1)
        except zlib.error as e:
            raise BadBody(f"cannot decode the request body ({coding}: {e})") from None
        if len(data) > limit:
            raise BodyTooLarge(f"the request body is over the limit of {limit // 1024} KiB once decoded ({coding})")
    return data


def check_json(payload: bytes) -> Any:
    """The body parsed: strict UTF-8 JSON, at most MAX_JSON_DEPTH deep; raises BadBody.

    Strict UTF-8: json.loads(bytes) would also take UTF-16/32 and a BOM, which the worker cannot
    read once the payload is spliced into its UTF-8 body. The depth is counted before parsing,
    since a 100,000-deep array makes the parser raise RecursionError.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadBody(f"the request body is not valid UTF-8 JSON ({e})") from None
    if _depth_exceeds(text, MAX_JSON_DEPTH):
        raise BadBody(f"the request body's JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadBody(f"the request body is not valid UTF-8 JSON ({e})") from None


def _depth_exceeds(text: str, limit: int) -> bool:
    # Brackets inside strings count too: an overestimate only for bodies with hundreds of
    # brackets in strings, which then get a clear 400 rather than a worker's confusion.
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False
