"""What the fuzz targets share: the setup bytes, chunking, memory and output checks.

Every input is ``SETUP_SIZE`` setup bytes followed by the payload. The last two
setup bytes choose how the payload is fed (see `Feeding`); the first two are
the target's own. Only the first ``MAX_FEED`` bytes of the payload are used.

Nothing here imports atheris, so the tests can replay inputs without it.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

SETUP_SIZE = 4
#: At most this much payload is fed per input, which bounds what a run may hold.
MAX_FEED = 64 * 1024
#: A record's content and padding; all that a reader ever needs to hold back.
MAX_RECORD = 0xFFFF + 0xFF
#: What one receive_data() call may allocate beyond a fixed allowance, per byte
#: fed: the events and the answers it queues are proportional to the input
#: (a 9-byte record carrying one STDOUT byte becomes an event of ~90 bytes).
ALLOC_PER_BYTE = 16
#: The fixed allowance: a record being reassembled, plus slack.
ALLOC_FIXED = MAX_RECORD + 64 * 1024

#: Chunk sizes for the "random" schedule: around the 8-byte header, the 8-byte
#: bodies, the padding limit and the 16-bit content length.
_CHUNK_CHOICES = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 255, 256, 1024, 8192, 65535, 65536)
WHOLE, BYTEWISE, FIXED, RANDOM = range(4)
BYTES, BYTEARRAY, VIEW_OF_BYTEARRAY, VIEW_OF_BYTES = range(4)

T = TypeVar("T")


def split_input(data: bytes) -> tuple[bytes, bytes]:
    """(setup, payload): a short input reads as zero setup bytes."""
    setup = data[:SETUP_SIZE].ljust(SETUP_SIZE, b"\0")
    return setup, data[SETUP_SIZE : SETUP_SIZE + MAX_FEED]


@dataclass(frozen=True)
class Feeding:
    """How the payload is cut into receive_data() calls, and what type each chunk is.

    Setup byte 2: bits 0-1 the schedule (whole, 1-byte feeds, fixed size
    ``param + 1``, or sizes drawn from _CHUNK_CHOICES by ``Random(param)``);
    bits 2-3 the buffer type (bytes, bytearray, memoryview of a bytearray,
    memoryview of the payload). Setup byte 3: ``param``. Mutable buffers are
    overwritten after each call, so an event that kept a reference to the
    caller's buffer shows up as a difference from the whole-bytes reference.
    """

    schedule: int = WHOLE
    buffer: int = BYTES
    param: int = 0

    @classmethod
    def decode(cls, b2: int, b3: int) -> Feeding:
        return cls(b2 & 3, (b2 >> 2) & 3, b3)

    def encode(self) -> bytes:
        return bytes((self.schedule | self.buffer << 2, self.param))

    @property
    def is_reference(self) -> bool:
        return self.schedule == WHOLE and self.buffer == BYTES

    def sizes(self, total: int) -> Iterator[int]:
        pos = 0
        rng = random.Random(self.param)
        while pos < total:
            if self.schedule == WHOLE:
                size = total
            elif self.schedule == BYTEWISE:
                size = 1
            elif self.schedule == FIXED:
                size = self.param + 1
            else:
                size = rng.choice(_CHUNK_CHOICES)
            yield min(size, total - pos)
            pos += size

    def pieces(self, payload: bytes) -> Iterator[bytes | bytearray | memoryview]:
        """The chunks to feed, in order; each is scribbled over once the next is asked for."""
        view = memoryview(payload)
        pos = 0
        for size in self.sizes(len(payload)):
            chunk = payload[pos : pos + size]
            pos += size
            if self.buffer == BYTES:
                yield chunk
            elif self.buffer == VIEW_OF_BYTES:
                yield view[pos - size : pos]
            else:
                mutable = bytearray(chunk)
                yield mutable if self.buffer == BYTEARRAY else memoryview(mutable)
                # The caller reuses its buffer for the next read.
                mutable[:] = b"\xaa" * len(mutable)


REFERENCE_FEEDING = Feeding()


# --- known bugs ---

#: Names of known bugs whose checks are relaxed, comma-separated in
#: FCGIPROTO_FUZZ_TOLERATE, so that a long run can look past a bug already
#: reported (tests/test_fuzz_corpus.py holds its regression test). Empty by
#: default: the tests always check everything.
TOLERATE = frozenset(filter(None, os.environ.get("FCGIPROTO_FUZZ_TOLERATE", "").split(",")))


def tolerated(bug: str) -> bool:
    return bug in TOLERATE


# --- memory ---

#: FCGIPROTO_FUZZ_TRACEMALLOC=1 measures every receive_data() call (slower);
#: the corpus replay in tests/test_fuzz_corpus.py turns it on.
TRACE_MEMORY = os.environ.get("FCGIPROTO_FUZZ_TRACEMALLOC") == "1"


def set_trace_memory(enabled: bool) -> None:
    global TRACE_MEMORY
    TRACE_MEMORY = enabled


def measured(call: Callable[[T], list[object]], arg: T, size: int, allowance: int = 0) -> list:
    """call(arg), checking with tracemalloc that it allocated within bounds when enabled.

    The bound is ALLOC_FIXED + allowance + ALLOC_PER_BYTE * size: a parser
    that trusted a declared length (a 2**31-byte name, CVE-2025-23016) or
    grew a buffer without bound fails it.
    """
    if not TRACE_MEMORY:
        return call(arg)
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        return call(arg)
    finally:
        grew = tracemalloc.get_traced_memory()[1] - before
        limit = ALLOC_FIXED + allowance + ALLOC_PER_BYTE * size
        if grew > limit:
            raise AssertionError(
                f"one call fed {size} bytes and allocated {grew} bytes at its peak (limit {limit})"
            )


def check_reader_buffers(conn: object) -> None:
    """The shared record reader holds back at most a header and one record's content."""
    header = getattr(conn, "_header_buf", b"")
    body = getattr(conn, "_body_buf", b"")
    assert len(header) < 8, f"record reader holds {len(header)} header bytes"
    assert len(body) <= MAX_RECORD, f"record reader holds {len(body)} content bytes"


# --- the wire a connection writes ---

_HEADER = struct.Struct(">BBHHBx")


def parse_wire(wire: bytes) -> list[tuple[int, int, bytes]]:
    """(type, request id, content) of each record; asserts that the records are whole and sane.

    An independent reader for what our own side writes: version 1, content
    plus padding within 65535 bytes (php-fpm resets the connection
    otherwise), and no bytes left over.
    """
    records = []
    pos = 0
    while pos < len(wire):
        assert len(wire) - pos >= 8, f"{len(wire) - pos} bytes of a header left at the end"
        version, rtype, rid, clen, plen = _HEADER.unpack_from(wire, pos)
        assert version == 1, f"wrote a record of version {version}"
        assert clen + plen <= 0xFFFF, f"wrote a record of {clen} + {plen} bytes"
        start = pos + 8
        assert start + clen + plen <= len(wire), "wrote a truncated record"
        records.append((rtype, rid, wire[start : start + clen]))
        pos = start + clen + plen
    return records


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    """Name/value pairs, decoded independently of fcgiproto; asserts they are whole."""
    pairs = []
    pos = 0
    lengths = [0, 0]
    while pos < len(data):
        for i in range(2):
            assert pos < len(data), "truncated name/value length"
            if data[pos] < 128:
                lengths[i] = data[pos]
                pos += 1
            else:
                assert pos + 4 <= len(data), "truncated 4-byte name/value length"
                lengths[i] = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
                pos += 4
        name_len, value_len = lengths
        assert pos + name_len + value_len <= len(data), "truncated name/value pair"
        pairs.append(
            (data[pos : pos + name_len], data[pos + name_len : pos + name_len + value_len])
        )
        pos += name_len + value_len
    return pairs


def merge_stream_events(events: list) -> list:
    """Join adjacent data events of one stream and request: chunking may split them anywhere."""
    merged: list = []
    for event in events:
        data = getattr(event, "data", None)
        if data is not None and merged:
            last = merged[-1]
            if type(last) is type(event) and last.request_id == event.request_id:
                merged[-1] = type(event)(event.request_id, last.data + data)
                continue
        merged.append(event)
    return merged


# --- running under atheris ---


def fuzz(one_input: Callable[[bytes], None]) -> None:
    """The libFuzzer main loop over one_input; command-line arguments are libFuzzer's."""
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
