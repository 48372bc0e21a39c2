"""Record layout and name/value pair coding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcgiproto import LocalProtocolError, RemoteProtocolError
from fcgiproto._records import (
    MAX_PAIR_LENGTH,
    STREAM_CHUNK,
    decode_pairs,
    decode_params,
    encode_pair,
    encode_pair_records,
    encode_stream_records,
    record,
)
from tests.helpers import parse_records


def test_record_is_padded_to_a_multiple_of_eight() -> None:
    wire = record(6, 1, b"abc")
    assert wire[:8] == bytes([1, 6, 0, 1, 0, 3, 5, 0])
    assert len(wire) == 16
    assert parse_records(wire) == [(6, 1, b"abc", 5)]


@pytest.mark.parametrize(
    ("length", "prefix"),
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x00\x00\x80"), (70000, b"\x80\x01\x11\x70")],
)
def test_pair_lengths_take_one_byte_up_to_127_and_four_from_128(length: int, prefix: bytes) -> None:
    encoded = encode_pair(b"N", b"v" * length)
    assert encoded[1 : 1 + len(prefix)] == prefix
    assert decode_pairs(encoded, "test") == [(b"N", b"v" * length)]


def test_pair_longer_than_31_bits_is_refused() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return MAX_PAIR_LENGTH + 1

    with pytest.raises(LocalProtocolError, match="too long"):
        encode_pair(b"n", Huge())


def test_declared_pair_length_is_checked_before_anything_is_allocated() -> None:
    # A 2**31-1 byte value declared in a 10-byte body: refused, not allocated.
    hostile = b"\x01\xff\xff\xff\xff" + b"Nv"
    with pytest.raises(RemoteProtocolError, match="declares 1 \\+ 2147483647 bytes"):
        decode_pairs(hostile, "PARAMS of request 1")


@pytest.mark.parametrize("body", [b"\x05", b"\x80\x00", b"\x01\x80\x00\x00"])
def test_truncated_lengths_are_remote_errors(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_pairs(body, "PARAMS")


# Pairs under 128 bytes of ASCII text are encoded on a faster path of their own.
@pytest.mark.parametrize("value_size", [100, 1000])
def test_params_records_never_split_a_pair_that_fits(value_size: int) -> None:
    params = [(f"NAME_{i}", "x" * value_size) for i in range(3 * STREAM_CHUNK // value_size)]
    records = encode_pair_records(4, 1, params)
    assert len(records) > 1
    decoded = []
    for wire in records:
        ((rtype, rid, content, padding),) = parse_records(wire)
        assert (rtype, rid) == (4, 1)
        assert len(content) + padding <= 65535
        decoded += decode_pairs(content, "one record")  # each record decodes on its own
    assert decoded == [(n.encode(), v.encode()) for n, v in params]


def test_a_pair_larger_than_a_record_is_split_as_the_only_way_to_send_it() -> None:
    records = encode_pair_records(4, 1, {b"BIG": b"x" * 100_000})
    contents = [parse_records(wire)[0][2] for wire in records]
    assert all(len(c) <= STREAM_CHUNK for c in contents)
    assert decode_pairs(b"".join(contents), "joined") == [(b"BIG", b"x" * 100_000)]


def test_stream_is_cut_into_records_of_at_most_65528_bytes() -> None:
    data = bytes(range(256)) * 300  # 76800 bytes
    wire = b"".join(encode_stream_records(5, 3, data))
    records = parse_records(wire)
    assert [len(c) for _, _, c, _ in records] == [STREAM_CHUNK, len(data) - STREAM_CHUNK]
    assert all(len(c) + p <= 65535 for _, _, c, p in records)
    assert b"".join(c for _, _, c, _ in records) == data


def test_param_names_and_values_must_be_str_or_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="param value must be str or bytes, not int"):
        encode_pair_records(4, 1, {"A": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"A": "", "": "b", "REQUEST_METHOD": "GET"},
        {"A" * 127: "v" * 127},  # the longest one-byte lengths
        {"A" * 128: "v", "B": "w"},  # a four-byte length
        {"NAME": "caf\xe9"},  # not ASCII: UTF-8
        {"NAME": b"\xff raw", "OTHER": "text"},  # bytes among str
        {f"NAME_{i}": "x" * 100 for i in range(700)},  # more than one record
    ],
)
def test_a_dict_encodes_as_the_same_pairs_given_one_by_one(
    params: dict[str, str | bytes],
) -> None:
    # A dict of short ASCII str takes a shortcut; it must put on the wire
    # exactly what the general loop puts there for the same pairs.
    assert encode_pair_records(4, 1, params) == encode_pair_records(4, 1, list(params.items()))


# Pairs as web servers send them, and bytes that are almost that: cut short,
# a byte changed, lengths of one and of four bytes, more pairs than allowed.
_pair_parts = st.binary(max_size=3) | st.sampled_from([b"N" * 127, b"v" * 128, b"x" * 300])
_encoded_pairs = st.lists(st.tuples(_pair_parts, _pair_parts), max_size=8).map(
    lambda pairs: b"".join(encode_pair(name, value) for name, value in pairs)
)


@st.composite
def _pairs_content(draw: st.DrawFn) -> bytes:
    data = draw(_encoded_pairs)
    how = draw(st.sampled_from(["as is", "as is", "cut", "byte", "random"]))
    if how == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "byte" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif how == "random":
        data = draw(st.binary(max_size=40))
    return data


@given(data=_pairs_content(), max_pairs=st.integers(1, 10) | st.just(1000))
@settings(max_examples=500, deadline=None)
def test_decode_params_is_decode_pairs_as_a_dict_or_none_where_that_raises(
    data: bytes, max_pairs: int
) -> None:
    try:
        expected: dict[bytes, bytes] | None = dict(decode_pairs(data, "PARAMS", max_pairs))
    except RemoteProtocolError:
        expected = None
    assert decode_params(data, max_pairs) == expected
