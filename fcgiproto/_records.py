"""Record layout, record types, roles, statuses, and name/value pair coding.

A record is an 8-byte header (version, type, request id, content length,
padding length, reserved) followed by the content and the padding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Any, TypeAlias

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "FCGI_VERSION",
    "HEADER",
    "MAX_CONTENT",
    "MAX_PAIR_LENGTH",
    "STREAM_CHUNK",
    "ParamsInput",
    "ProtocolStatus",
    "RecordType",
    "Role",
    "decode_pairs",
    "decode_params",
    "encode_pair",
    "encode_pair_records",
    "encode_stream_records",
    "pairs_of",
    "record",
    "to_bytes",
]

FCGI_VERSION = 1
HEADER = struct.Struct(">BBHHBx")
#: Content length is a 16-bit field.
MAX_CONTENT = 0xFFFF
#: Streams are cut at 65528 bytes: a multiple of 8, so content plus alignment
#: padding stays <= 65535, which php-fpm insists on (it resets the connection
#: when content + padding exceeds it).
STREAM_CHUNK = 65528
#: A name or value length is 31 bits on the wire.
MAX_PAIR_LENGTH = 0x7FFFFFFF


class RecordType(IntEnum):
    """The record types of FastCGI 1.0; `UnknownType.record_type` may hold any other."""

    BEGIN_REQUEST = 1
    ABORT_REQUEST = 2
    END_REQUEST = 3
    PARAMS = 4
    STDIN = 5
    STDOUT = 6
    STDERR = 7
    DATA = 8
    GET_VALUES = 9
    GET_VALUES_RESULT = 10
    UNKNOWN_TYPE = 11


class Role(IntEnum):
    """What the application is asked to do: answer, authorize, or filter FCGI_DATA."""

    RESPONDER = 1
    AUTHORIZER = 2
    FILTER = 3


class ProtocolStatus(IntEnum):
    """How END_REQUEST says a request ended; anything but REQUEST_COMPLETE is a refusal."""

    REQUEST_COMPLETE = 0
    CANT_MPX_CONN = 1
    OVERLOADED = 2
    UNKNOWN_ROLE = 3


StrOrBytes: TypeAlias = "str | bytes"
#: What send_params() takes: a mapping, or an iterable of (name, value) pairs.
# Mapping is invariant in its key type, hence one Mapping per key type.
ParamsInput: TypeAlias = (
    "Mapping[str, StrOrBytes] | Mapping[bytes, StrOrBytes] | Mapping[StrOrBytes, StrOrBytes]"
    " | Iterable[tuple[StrOrBytes, StrOrBytes]]"
)

_PADDING = bytes(7)


def record(rtype: int, request_id: int, content: bytes = b"") -> bytes:
    """One whole record, padded to a multiple of 8 bytes as the spec recommends."""
    padding = -len(content) & 7
    return (
        HEADER.pack(FCGI_VERSION, rtype, request_id, len(content), padding)
        + content
        + (_PADDING[:padding])
    )


def encode_stream_records(
    rtype: int, request_id: int, data: bytes | memoryview
) -> list[bytes | memoryview]:
    """Pieces (header, content, padding) carrying `data` in records of <= STREAM_CHUNK bytes.

    The content pieces are memoryview slices of `data`: the payload is copied
    only when the pieces are finally joined for the wire.
    """
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    size = len(view)
    pack = HEADER.pack
    for start in range(0, size, STREAM_CHUNK):
        chunk = view[start : start + STREAM_CHUNK]
        padding = -len(chunk) & 7
        pieces.append(pack(FCGI_VERSION, rtype, request_id, len(chunk), padding))
        pieces.append(chunk)
        if padding:
            pieces.append(_PADDING[:padding])
    return pieces


def to_bytes(value: StrOrBytes, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        # surrogateescape gives back the very bytes that were decoded the same
        # way (as fcgiproto.cgi.build_params does), so any bytes round-trip.
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise LocalProtocolError(f"{what} must be str or bytes, not {type(value).__name__}")


def pairs_of(params: ParamsInput) -> Iterable[tuple[StrOrBytes, StrOrBytes]]:
    if isinstance(params, Mapping):
        return params.items()
    return params


def _length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    return (n | 0x80000000).to_bytes(4, "big")


def encode_pair(name: bytes, value: bytes) -> bytes:
    if len(name) > MAX_PAIR_LENGTH or len(value) > MAX_PAIR_LENGTH:
        raise LocalProtocolError(
            f"name/value pair too long ({len(name)} + {len(value)} bytes; "
            f"each is limited to {MAX_PAIR_LENGTH})"
        )
    return _length(len(name)) + _length(len(value)) + name + value


def encode_pair_records(rtype: int, request_id: int, params: ParamsInput) -> list[bytes]:
    """Records carrying the pairs, each pair whole in one record where it fits.

    php-fpm parses each PARAMS record on its own, so a pair split across two
    records is lost there. A pair longer than one record's content can only
    be sent split; peers that reassemble (Go, our ServerConnection) accept it.
    """
    if type(params) is dict:
        content = _short_ascii_pairs(params)
        if content is not None:
            return [record(rtype, request_id, content)] if content else []
    out: list[bytes] = []
    parts: list[bytes] = []  # the encoded pairs of the record being filled
    text: list[str] = []  # short ASCII str pairs after those, encoded together
    size = 0
    for name, value in pairs_of(params):
        # The common case first: short ASCII str pairs, whose lengths in
        # characters are their lengths in bytes. They are gathered as text and
        # encoded once per record; this loop is most of the client's cost
        # of encoding a request.
        if (
            type(name) is str
            and type(value) is str
            and len(name) < 128
            and len(value) < 128
            and name.isascii()
            and value.isascii()
        ):
            pair_len = 2 + len(name) + len(value)
            if size + pair_len > STREAM_CHUNK:
                out.append(_params_record(rtype, request_id, parts, text))
                size = 0
            text += (chr(len(name)), chr(len(value)), name, value)
            size += pair_len
            continue
        name_bytes = to_bytes(name, "a param name")
        value_bytes = to_bytes(value, "a param value")
        pair = encode_pair(name_bytes, value_bytes)
        if size + len(pair) > STREAM_CHUNK and (parts or text):
            out.append(_params_record(rtype, request_id, parts, text))
            size = 0
        if len(pair) > STREAM_CHUNK:
            view = memoryview(pair)
            for start in range(0, len(pair), STREAM_CHUNK):
                out.append(record(rtype, request_id, bytes(view[start : start + STREAM_CHUNK])))
            continue
        if text:
            parts.append("".join(text).encode("ascii"))
            text.clear()
        parts.append(pair)
        size += len(pair)
    if parts or text:
        out.append(_params_record(rtype, request_id, parts, text))
    return out


def _short_ascii_pairs(params: dict[Any, Any]) -> bytes | None:
    """The pairs of a dict of short ASCII str, encoded as one record's content; else None.

    The common case (CGI params built by a gateway) in a handful of C calls:
    every name and value is joined, each after its two one-byte lengths, and
    one isascii() over the whole text proves at once that every string is
    ASCII and every length below 128 (chr() of a larger one is not ASCII).
    str.join refuses anything but str, so bytes or other values fall back to
    the general loop, which encodes or rejects them one by one.
    """
    text: list[str] = []
    try:
        for name, value in params.items():
            text += (chr(len(name)), chr(len(value)), name, value)
        joined = "".join(text)
    except (TypeError, ValueError, OverflowError):
        return None
    if len(joined) > STREAM_CHUNK or not joined.isascii():
        return None
    return joined.encode("ascii")


def _params_record(rtype: int, request_id: int, parts: list[bytes], text: list[str]) -> bytes:
    """One record of the pairs gathered so far, which it takes."""
    if text:
        parts.append("".join(text).encode("ascii"))
        text.clear()
    content = parts[0] if len(parts) == 1 else b"".join(parts)
    parts.clear()
    return record(rtype, request_id, content)


def decode_pairs(
    data: bytes | bytearray, where: str, max_pairs: int | None = None
) -> list[tuple[bytes, bytes]]:
    """Decode a complete run of name/value pairs; lengths are checked before slicing.

    Past `max_pairs` pairs it raises before decoding the rest, so that many tiny
    pairs cost no more than the limit allows.
    """
    if type(data) is not bytes:
        data = bytes(data)  # one copy, then each name and value is sliced once
    pairs: list[tuple[bytes, bytes]] = []
    pos = 0
    end = len(data)
    left = -1 if max_pairs is None else max_pairs
    while pos < end:
        if not left:
            raise RemoteProtocolError(f"{where}: more than {max_pairs} name/value pairs")
        left -= 1
        name_len = data[pos]
        if name_len < 128:
            pos += 1
        else:
            if pos + 4 > end:
                raise RemoteProtocolError(
                    f"{where}: truncated 4-byte name/value length at byte {pos}"
                )
            name_len = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
            pos += 4
        if pos >= end:
            raise RemoteProtocolError(f"{where}: truncated name/value length at byte {pos}")
        value_len = data[pos]
        if value_len < 128:
            pos += 1
        else:
            if pos + 4 > end:
                raise RemoteProtocolError(
                    f"{where}: truncated 4-byte name/value length at byte {pos}"
                )
            value_len = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
            pos += 4
        if name_len + value_len > end - pos:
            raise RemoteProtocolError(
                f"{where}: a pair declares {name_len} + {value_len} bytes "
                f"but only {end - pos} remain"
            )
        stop = pos + name_len
        pos = stop + value_len
        pairs.append((data[stop - name_len : stop], data[stop:pos]))
    return pairs


def decode_params(data: bytes, max_pairs: int) -> dict[bytes, bytes] | None:
    """`dict(decode_pairs(data, ..., max_pairs))` when that succeeds; None when it would raise.

    A server's PARAMS, decoded straight into the dict its Params event
    carries: one pass, no list of tuples, and no error message built. On
    None the caller runs decode_pairs, which raises with the reason (a
    property test holds the two equal).
    """
    end = len(data)
    if end > 2 * max_pairs:
        # Room for more pairs than allowed (each takes two bytes at least):
        # decode_pairs counts them, and stops at the limit.
        try:
            return dict(decode_pairs(data, "PARAMS", max_pairs))
        except RemoteProtocolError:
            return None
    pairs: dict[bytes, bytes] = {}
    pos = 0
    try:
        while pos < end:
            name_len = data[pos]
            value_len = data[pos + 1]
            if name_len | value_len < 128:  # both lengths in one byte, as a rule
                stop = pos + 2 + name_len
            else:
                if name_len < 128:
                    pos += 1
                else:
                    # Four bytes, or fewer at the end: then pos passes `end`,
                    # and the pair's end too.
                    name_len = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
                    pos += 4
                    if pos >= end:
                        return None
                value_len = data[pos]
                if value_len < 128:
                    pos += 1
                else:
                    value_len = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
                    pos += 4
                stop = pos + name_len
            pos = stop + value_len
            # A pair cut short is sliced short, and ends past `end`: None below.
            pairs[data[stop - name_len : stop]] = data[stop:pos]
    except IndexError:  # a pair's lengths cut off at the end
        return None
    return pairs if pos == end else None
