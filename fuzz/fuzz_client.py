#!/usr/bin/env python3
"""Fuzz ClientConnection.receive_data: whatever an application sends a web server.

    uv run --group fuzz python fuzz/fuzz_client.py fuzz/corpus/client -max_total_time=600

Input: 4 setup bytes, then the bytes the application sends.

- byte 0, flags: 0x01 multiplex; 0x02 feed EOF at the end; 0x04 a GET_VALUES
  is pending; 0x08 abort a request; 0x10 the request is keep_conn=False (when
  it is the only one); 0x20 the last request's STDIN is left open; 0x40
  reactive: begin a new request whenever one may begin, and (with 0x08) abort
  each request at its first STDOUT byte; 0x80 a second GET_VALUES is pending.
- byte 1: low nibble the number of requests in flight (at most 1 unless
  multiplexed), high nibble which one 0x08 aborts.
- bytes 2-3: the chunking, see _harness.Feeding.

Checks: only the client's events or RemoteProtocolError, nothing else; every
event fits the requests in flight (no data for an aborted, ended or unknown
request; END_REQUEST once; new requests take the lowest free id, never a
retired one); after a RemoteProtocolError the connection refuses everything;
the reader's buffers and each call's allocations stay bounded; and, when not
reactive, the events do not depend on the chunking or the buffer type.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

try:
    import atheris
except ImportError:  # replaying inputs (tests/test_fuzz_corpus.py) needs no atheris
    atheris = None

with (
    atheris.instrument_imports(include=["fcgiproto"])
    if atheris is not None and __name__ == "__main__"
    else nullcontext()
):
    from fcgiproto import (
        ClientConnection,
        EndRequest,
        GetValuesResult,
        LocalProtocolError,
        ProtocolStatus,
        RemoteProtocolError,
        StderrData,
        StdoutData,
        UnknownType,
    )

if __package__:
    from . import _harness as h
else:  # run as a script: fuzz/ is sys.path[0]
    import _harness as h

VALUE_NAMES = ("FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS")
DEFAULT_REQUEST = ({"REQUEST_METHOD": "GET", "SCRIPT_FILENAME": "/srv/index.php"}, b"")
#: Reactive mode begins at most this many requests in all.
MAX_BEGUN = 64


@dataclass(frozen=True)
class ClientSetup:
    multiplex: bool = False
    eof: bool = False
    get_values: bool = False
    abort: bool = False
    close_after: bool = False
    stdin_open: bool = False
    reactive: bool = False
    second_get_values: bool = False
    requests: int = 1
    abort_index: int = 0
    feeding: h.Feeding = field(default_factory=h.Feeding)

    @classmethod
    def decode(cls, setup: bytes) -> ClientSetup:
        flags, counts, b2, b3 = setup
        return cls(
            *(bool(flags & 1 << bit) for bit in range(8)),
            requests=counts & 15,
            abort_index=counts >> 4,
            feeding=h.Feeding.decode(b2, b3),
        )

    def encode(self) -> bytes:
        bits = (
            self.multiplex,
            self.eof,
            self.get_values,
            self.abort,
            self.close_after,
            self.stdin_open,
            self.reactive,
            self.second_get_values,
        )
        flags = sum(1 << bit for bit, on in enumerate(bits) if on)
        return bytes((flags, self.requests | self.abort_index << 4)) + self.feeding.encode()


@dataclass
class Model:
    """What the events so far say about the connection, kept independently of it."""

    multiplex: bool
    active: set[int] = field(default_factory=set)
    aborted: set[int] = field(default_factory=set)
    input_open: set[int] = field(default_factory=set)
    retired: set[int] = field(default_factory=set)
    begun: int = 0


def prepare(
    setup: ClientSetup, requests: list[tuple[Mapping, bytes]] | None = None
) -> tuple[ClientConnection, Model]:
    """The connection as the setup describes it, with its requests sent.

    capture.py calls this with real params, so the captured replies fit the
    state the fuzz target rebuilds from the same setup bytes.
    """
    conn = ClientConnection(multiplex=setup.multiplex)
    model = Model(setup.multiplex)
    if setup.get_values:
        conn.get_values(VALUE_NAMES)
        if setup.second_get_values:
            conn.get_values(VALUE_NAMES)
    count = setup.requests if setup.multiplex else min(setup.requests, 1)
    for i in range(count):
        params, stdin = requests[i] if requests else DEFAULT_REQUEST
        keep_conn = not (setup.close_after and count == 1)
        if setup.stdin_open and i == count - 1:
            rid = conn.begin_request(keep_conn=keep_conn)
            conn.send_params(rid, params)
            conn.end_params(rid)
            conn.send_stdin(rid, stdin)
            model.input_open.add(rid)
        else:
            rid = conn.send_request(params, stdin, keep_conn=keep_conn)
        assert rid == i + 1, f"request {i} of a fresh connection got id {rid}"
        model.active.add(rid)
        model.begun += 1
    if setup.abort and model.active:
        rid = sorted(model.active)[setup.abort_index % len(model.active)]
        conn.abort_request(rid)
        model.aborted.add(rid)
    return conn, model


def check_events(conn: ClientConnection, model: Model, events: list) -> None:
    for event in events:
        if isinstance(event, (StdoutData, StderrData)):
            rid = event.request_id
            assert type(event.data) is bytes and event.data, f"bad data in {event!r}"
            assert rid in model.active, f"{event!r} for a request not in flight"
            # abort-tail: the rest of a record begun before abort_request() still came through.
            assert rid not in model.aborted or h.tolerated("abort-tail"), (
                f"{event!r} for an aborted request"
            )
        elif isinstance(event, EndRequest):
            rid = event.request_id
            assert rid in model.active, f"{event!r} for a request not in flight"
            assert type(event.protocol_status) is ProtocolStatus, repr(event)
            assert 0 <= event.app_status <= 0xFFFFFFFF, repr(event)
            model.active.discard(rid)
            if rid in model.aborted or rid in model.input_open:
                model.retired.add(rid)
        elif isinstance(event, GetValuesResult):
            assert isinstance(event.values, Mapping), repr(event)
            assert all(type(k) is str and type(v) is str for k, v in event.values.items())
        elif isinstance(event, UnknownType):
            assert 0 <= event.record_type <= 255, repr(event)
        else:
            raise AssertionError(f"a client received {event!r}")
    assert conn.active_requests == model.active, (conn.active_requests, model.active)


def react(conn: ClientConnection, setup: ClientSetup, model: Model, events: list) -> None:
    """What a pool does: abort on the first byte (with 0x08), begin a request when it may."""
    if setup.abort:
        for event in events:
            rid = getattr(event, "request_id", None)
            if isinstance(event, StdoutData) and rid in model.active and rid not in model.aborted:
                conn.abort_request(rid)
                model.aborted.add(rid)
    while conn.can_send_request and model.begun < MAX_BEGUN:
        taken = model.active | model.retired
        expected = next(i for i in itertools.count(1) if i not in taken)
        rid = conn.send_request(*DEFAULT_REQUEST)
        assert rid == expected, f"a new request got id {rid}, not the lowest free one {expected}"
        model.active.add(rid)
        model.begun += 1


def check_dead(conn: ClientConnection) -> None:
    """After a RemoteProtocolError: closed, and every later call refuses."""
    assert conn.closed, "closed is False after a RemoteProtocolError"
    assert not conn.can_send_request, "can_send_request after a RemoteProtocolError"
    for probe in (b"\x01\x06\x00\x01\x00\x01\x00\x00x", b""):
        try:
            conn.receive_data(probe)
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError(f"a dead connection accepted {probe!r}")
    try:
        conn.begin_request()
    except LocalProtocolError:
        pass
    else:
        raise AssertionError("a dead connection began a request")


def run(setup: ClientSetup, payload: bytes, feeding: h.Feeding) -> tuple[bool, list, tuple]:
    """(failed, events merged per stream, final state) of feeding the payload."""
    conn, model = prepare(setup)
    conn.data_to_send()
    received: list = []
    try:
        for piece in feeding.pieces(payload):
            events = h.measured(conn.receive_data, piece, len(piece))
            check_events(conn, model, events)
            received += events
            h.check_reader_buffers(conn)
            assert conn.data_to_send() == b"", "the client queued bytes of its own"
            if setup.reactive:
                react(conn, setup, model, events)
                conn.data_to_send()
        if setup.eof:
            events = conn.receive_data(b"")
            check_events(conn, model, events)
            received += events
            assert conn.closed, "closed is False after EOF"
    except RemoteProtocolError:
        check_dead(conn)
        return True, [], ()
    state = (conn.active_requests, conn.closed, conn.can_send_request)
    return False, h.merge_stream_events(received), state


def one_input(data: bytes) -> None:
    raw_setup, payload = h.split_input(data)
    setup = ClientSetup.decode(raw_setup)
    outcome = run(setup, payload, setup.feeding)
    if not setup.reactive and not setup.feeding.is_reference:
        reference = run(setup, payload, h.REFERENCE_FEEDING)
        assert outcome[0] == reference[0], (
            f"fed {setup.feeding}, the client {'failed' if outcome[0] else 'succeeded'}; "
            f"fed whole, it {'failed' if reference[0] else 'succeeded'}"
        )
        assert outcome == reference, f"chunking changed the events:\n{outcome}\n{reference}"


if __name__ == "__main__":
    h.fuzz(one_input)
