#!/usr/bin/env python3
"""Fuzz fcgiproto.cgi.ResponseParser: whatever a CGI application writes to STDOUT.

    uv run --group fuzz python fuzz/fuzz_response_parser.py fuzz/corpus/response_parser \\
        -max_total_time=600

Input: 4 setup bytes, then the STDOUT bytes.

- byte 0, flags: 0x01 call close() at the end; bits 1-2 max_header_size (the
  default 64 KiB, 64, 512, 4096).
- byte 1: unused.
- bytes 2-3: the chunking, see _harness.Feeding (always fed as bytes).

Checks: feed() returns one ResponseHead, first, then non-empty bytes, or
raises RemoteProtocolError, nothing else; after RemoteProtocolError feed() and
close() keep raising it; close() before the head raises it too; the head is
what an independent reading of the lines says (status 100-999, Location alone
is 302, headers in order without Status, names tokens, values without control
characters) and never larger than max_header_size; a plainly valid head is
never refused; the body is exactly the bytes after the blank line; the parser
holds at most max_header_size bytes; and the chunking changes nothing.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

try:
    import atheris
except ImportError:  # replaying inputs (tests/test_fuzz_corpus.py) needs no atheris
    atheris = None

with (
    atheris.instrument_imports(include=["fcgiproto"])
    if atheris is not None and __name__ == "__main__"
    else nullcontext()
):
    from fcgiproto import LocalProtocolError, RemoteProtocolError
    from fcgiproto.cgi import DEFAULT_MAX_HEADER_SIZE, ResponseHead, ResponseParser

if __package__:
    from . import _harness as h
else:  # run as a script: fuzz/ is sys.path[0]
    import _harness as h

HEADER_LIMITS = (None, 64, 512, 4096)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# What no reasonable parser may refuse: "Name: printable ASCII", and a Status
# of three digits, optionally followed by a space and a reason.
_PLAIN_LINE = re.compile(rb"[A-Za-z0-9-]+: ?[\x21-\x7e]?[\x20-\x7e]*")
_PLAIN_STATUS = re.compile(rb"[1-9][0-9][0-9](?: [\x20-\x7e]*)?")


def reference_head(data: bytes) -> tuple[list[bytes], int] | None:
    """The head's lines and where the body starts; None while the head is incomplete."""
    lines = []
    pos = 0
    while (lf := data.find(b"\n", pos)) != -1:
        line = data[pos:lf]
        if line.endswith(b"\r"):
            line = line[:-1]
        pos = lf + 1
        if not line:
            return lines, pos
        lines.append(line)
    return None


def plainly_valid(lines: list[bytes]) -> bool:
    statuses = [line for line in lines if line[:7].lower() == b"status:"]
    return (
        bool(lines)
        and all(_PLAIN_LINE.fullmatch(line) for line in lines)
        and len(statuses) <= 1
        and all(_PLAIN_STATUS.fullmatch(s[7:].strip(b" ")) for s in statuses)
    )


def check_head(head: ResponseHead, lines: list[bytes]) -> None:
    assert type(head.status) is int and 100 <= head.status <= 999, repr(head)
    assert type(head.reason) is str, repr(head)
    assert type(head.headers) is list, repr(head)
    expected = []
    status_lines = 0
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon and _TOKEN.fullmatch(name), f"accepted the header line {line!r}"
        text = value.decode("latin-1").strip(" \t")
        assert not _CONTROL.search(text), f"accepted control characters in {line!r}"
        if name.lower() == b"status":
            status_lines += 1
            assert head.status == int(text[:3]), f"status {head.status} from {line!r}"
        else:
            expected.append((name.decode("latin-1"), text))
    assert status_lines <= 1, "accepted two Status lines"
    assert head.headers == expected, f"headers {head.headers!r}, expected {expected!r}"
    if not status_lines:
        location = any(name.lower() == "location" for name, _ in expected)
        assert head.status == (302 if location else 200), f"status {head.status}"


def run(close: bool, limit: int | None, payload: bytes, feeding: h.Feeding) -> tuple:
    """(failed, head, body) of feeding the payload; the head and body are checked."""
    parser = ResponseParser() if limit is None else ResponseParser(max_header_size=limit)
    max_header_size = DEFAULT_MAX_HEADER_SIZE if limit is None else limit
    head = None
    body = bytearray()
    try:
        for piece in feeding.pieces(payload):
            out = h.measured(parser.feed, bytes(piece), len(piece))
            for item in out:
                if isinstance(item, ResponseHead):
                    assert head is None and not body, f"a second head, or a head after body: {out}"
                    head = item
                else:
                    assert type(item) is bytes and item, f"feed() returned {item!r}"
                    assert head is not None, "body bytes before the head"
                    body += item
            held = len(getattr(parser, "_buf", b""))
            assert held <= max_header_size, f"the parser holds {held} bytes"
        if close:
            assert parser.close() == [], "close() returned events"
            assert head is not None, "close() before the head did not raise"
            try:
                parser.feed(b"x")
            except LocalProtocolError:
                pass
            else:
                raise AssertionError("feed() after close() did not raise LocalProtocolError")
    except RemoteProtocolError:
        for call in (lambda: parser.feed(b"Status: 200\r\n\r\n"), parser.close):
            try:
                call()
            except RemoteProtocolError:
                pass
            else:
                raise AssertionError("a failed parser took more input") from None
        return True, None, b""
    return False, head, bytes(body)


def one_input(data: bytes) -> None:
    raw_setup, payload = h.split_input(data)
    close = bool(raw_setup[0] & 1)
    limit = HEADER_LIMITS[(raw_setup[0] >> 1) & 3]
    max_header_size = DEFAULT_MAX_HEADER_SIZE if limit is None else limit
    feeding = h.Feeding.decode(raw_setup[2] & 3, raw_setup[3])  # bytes only
    failed, head, body = run(close, limit, payload, feeding)
    reference = reference_head(payload)
    if head is not None:
        assert reference is not None, "a head from an incomplete head"
        lines, start = reference
        assert start <= max_header_size, f"accepted a head of {start} bytes"
        check_head(head, lines)
        assert body == payload[start:], "the body is not the bytes after the head"
    elif not failed:
        assert reference is None, "a complete head was neither parsed nor refused"
        assert len(payload) <= max_header_size, f"held {len(payload)} bytes of an unfinished head"
    if failed and reference is not None:
        lines, start = reference
        assert not (start <= max_header_size and plainly_valid(lines)), (
            f"refused a plainly valid head: {payload[:start]!r}"
        )
    if not feeding.is_reference:
        whole = run(close, limit, payload, h.REFERENCE_FEEDING)
        assert (failed, head, body) == whole, "chunking changed the outcome"


if __name__ == "__main__":
    h.fuzz(one_input)
