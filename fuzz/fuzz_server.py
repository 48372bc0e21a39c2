#!/usr/bin/env python3
"""Fuzz ServerConnection.receive_data: whatever a web server sends an application.

    uv run --group fuzz python fuzz/fuzz_server.py fuzz/corpus/server -max_total_time=600

Input: 4 setup bytes, then the bytes the client sends.

- byte 0, flags: 0x01 multiplex; 0x02 feed EOF at the end; 0x04 reactive: the
  application answers each request once its input has ended (STDIN, and DATA
  for a filter) and ends an aborted one; 0x08 (with 0x04) it ends each request
  as soon as its PARAMS arrive, before reading STDIN; bits 4-5 the roles
  served (all, responder, responder and authorizer, filter); bits 6-7
  max_params_size (the default 1 MiB, 64, 1024, 16384).
- byte 1: max_requests (0 means the default, 100).
- bytes 2-3: the chunking, see _harness.Feeding.

Checks: only the application's events or RemoteProtocolError; every event
fits the requests begun (BEGIN_REQUEST in a role served and within the limits,
PARAMS once and within max_params_size, STDIN after PARAMS and before its end,
DATA only for a filter, ABORT once, nothing for a request after it ended);
what the server writes by itself (GET_VALUES_RESULT, UNKNOWN_TYPE, refusals)
and in answer is whole, valid records; after a RemoteProtocolError the
connection refuses everything; buffers and allocations stay bounded; and, when
not reactive, events and output do not depend on the chunking.
"""

from __future__ import annotations

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
        AbortRequest,
        BeginRequest,
        FilterData,
        FilterDataEnd,
        LocalProtocolError,
        Params,
        ProtocolStatus,
        RemoteProtocolError,
        Role,
        ServerConnection,
        StdinData,
        StdinEnd,
    )

if __package__:
    from . import _harness as h
else:  # run as a script: fuzz/ is sys.path[0]
    import _harness as h

ROLE_SETS = (
    (Role.RESPONDER, Role.AUTHORIZER, Role.FILTER),
    (Role.RESPONDER,),
    (Role.RESPONDER, Role.AUTHORIZER),
    (Role.FILTER,),
)
PARAMS_LIMITS = (None, 64, 1024, 16384)
DEFAULT_PARAMS_LIMIT = 1 << 20
DEFAULT_MAX_REQUESTS = 100
_BEGIN, _ABORT, _END, _STDOUT, _STDERR = 1, 2, 3, 6, 7
_GET_VALUES_RESULT, _UNKNOWN_TYPE = 10, 11
RESPONSE = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nok"


@dataclass(frozen=True)
class ServerSetup:
    multiplex: bool = False
    eof: bool = False
    reactive: bool = False
    early_end: bool = False
    roles: int = 0
    params_limit: int = 0
    max_requests: int = 0
    feeding: h.Feeding = field(default_factory=h.Feeding)

    @classmethod
    def decode(cls, setup: bytes) -> ServerSetup:
        flags, max_requests, b2, b3 = setup
        return cls(
            bool(flags & 1),
            bool(flags & 2),
            bool(flags & 4),
            bool(flags & 8),
            (flags >> 4) & 3,
            flags >> 6,
            max_requests,
            h.Feeding.decode(b2, b3),
        )

    def encode(self) -> bytes:
        flags = (
            self.multiplex
            | self.eof << 1
            | self.reactive << 2
            | self.early_end << 3
            | self.roles << 4
            | self.params_limit << 6
        )
        return bytes((flags, self.max_requests)) + self.feeding.encode()

    def connection(self) -> ServerConnection:
        options: dict = {"roles": ROLE_SETS[self.roles], "multiplex": self.multiplex}
        if PARAMS_LIMITS[self.params_limit] is not None:
            options["max_params_size"] = PARAMS_LIMITS[self.params_limit]
        if self.max_requests:
            options["max_requests"] = self.max_requests
        return ServerConnection(**options)

    @property
    def max_params_size(self) -> int:
        return PARAMS_LIMITS[self.params_limit] or DEFAULT_PARAMS_LIMIT

    @property
    def concurrent(self) -> int:
        return (self.max_requests or DEFAULT_MAX_REQUESTS) if self.multiplex else 1


@dataclass
class Request:
    role: Role
    params: bool = False
    stdin: bool = False
    data: bool = False
    aborted: bool = False


def check_events(
    conn: ServerConnection,
    setup: ServerSetup,
    model: dict[int, Request],
    events: list,
    ended: set[int] | None = None,
) -> None:
    ended = set() if ended is None else ended
    for event in events:
        rid = event.request_id
        request = model.get(rid)
        if request is None and rid in ended and isinstance(event, (StdinData, FilterData)):
            # abort-tail: the rest of a record begun before end_request() still came through.
            assert h.tolerated("abort-tail"), f"{event!r} after the application ended it"
            continue
        if isinstance(event, BeginRequest):
            assert rid != 0, repr(event)
            assert request is None, f"{event!r} for a request already active"
            assert event.role in ROLE_SETS[setup.roles], f"{event!r} in a role not served"
            assert type(event.keep_conn) is bool, repr(event)
            assert len(model) < setup.concurrent, f"{event!r} past {setup.concurrent} requests"
            model[rid] = Request(event.role)
            ended.discard(rid)
            continue
        assert request is not None, f"{event!r} for a request not active"
        if isinstance(event, Params):
            assert not request.params, f"second {event!r}"
            assert type(event.params) is dict, repr(event)
            size = sum(len(k) + len(v) for k, v in event.params.items())
            assert all(type(k) is bytes and type(v) is bytes for k, v in event.params.items())
            assert size <= setup.max_params_size, f"PARAMS of {size} bytes got through"
            request.params = True
        elif isinstance(event, (StdinData, StdinEnd)):
            assert request.params, f"{event!r} before PARAMS ended"
            assert not request.stdin, f"{event!r} after STDIN ended"
            if isinstance(event, StdinData):
                assert type(event.data) is bytes and event.data, repr(event)
            else:
                request.stdin = True
        elif isinstance(event, (FilterData, FilterDataEnd)):
            assert request.role == Role.FILTER, f"{event!r} for a {request.role.name}"
            assert request.params, f"{event!r} before PARAMS ended"
            assert not request.data, f"{event!r} after DATA ended"
            if isinstance(event, FilterData):
                assert type(event.data) is bytes and event.data, repr(event)
            else:
                request.data = True
        elif isinstance(event, AbortRequest):
            assert not request.aborted, f"second {event!r}"
            request.aborted = True
        else:
            raise AssertionError(f"an application received {event!r}")
    assert conn.active_requests == frozenset(model), (conn.active_requests, set(model))


def react(
    conn: ServerConnection,
    setup: ServerSetup,
    model: dict[int, Request],
    events: list,
    ended: set[int],
) -> None:
    """An application: answer once the input has ended, end early or on abort."""
    for event in events:
        rid = event.request_id
        request = model.get(rid)
        if request is None or isinstance(event, BeginRequest):
            continue
        done = request.stdin and (request.data or request.role != Role.FILTER)
        if (
            request.aborted
            or (setup.early_end and isinstance(event, Params))
            or (done and isinstance(event, (StdinEnd, FilterDataEnd)))
        ):
            conn.send_stdout(rid, RESPONSE)
            if rid & 1:
                conn.send_stderr(rid, b"warning")
            conn.end_request(rid, app_status=rid & 3)
            del model[rid]
            ended.add(rid)
    assert conn.active_requests == frozenset(model), (conn.active_requests, set(model))


def check_output(setup: ServerSetup, wire: bytes, answered: set[int]) -> None:
    """What the server wrote: whole records of the types an application sends."""
    for rtype, rid, content in h.parse_wire(wire):
        if rtype in (_STDOUT, _STDERR):
            assert rid in answered, f"stream type {rtype} for request {rid}, never answered"
        elif rtype == _END:
            assert len(content) == 8 and rid != 0, (rid, content)
            status = content[4]
            assert status in ProtocolStatus._value2member_map_, f"protocol status {status}"
            if status == ProtocolStatus.CANT_MPX_CONN:
                assert not setup.multiplex, "CANT_MPX_CONN from a multiplexing server"
        elif rtype == _GET_VALUES_RESULT:
            assert rid == 0, rid
            names = [name for name, _ in h.decode_pairs(content)]
            assert set(names) <= {b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS", b"FCGI_MPXS_CONNS"}, names
        elif rtype == _UNKNOWN_TYPE:
            assert rid == 0 and len(content) == 8, (rid, content)
            assert not 1 <= content[0] <= 11, f"UNKNOWN_TYPE for known type {content[0]}"
        else:
            raise AssertionError(f"the server wrote a record of type {rtype}")


def check_buffers(conn: ServerConnection, setup: ServerSetup) -> None:
    h.check_reader_buffers(conn)
    for rid, request in getattr(conn, "_requests", {}).items():
        held = len(getattr(request, "params", b""))
        assert held <= setup.max_params_size, f"request {rid} holds {held} bytes of PARAMS"


def check_dead(conn: ServerConnection) -> None:
    assert conn.closed, "closed is False after a RemoteProtocolError"
    for probe in (b"\x01\x01\x00\x01\x00\x08\x00\x00\x00\x01\x01\x00\x00\x00\x00\x00", b""):
        try:
            conn.receive_data(probe)
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError(f"a dead connection accepted {probe!r}")
    for rid in conn.active_requests:
        try:
            conn.send_stdout(rid, b"x")
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("a dead connection sent STDOUT")


def run(setup: ServerSetup, payload: bytes, feeding: h.Feeding) -> tuple:
    """(failed, events merged per stream, output, final state) of feeding the payload."""
    conn = setup.connection()
    model: dict[int, Request] = {}
    answered: set[int] = set()
    ended: set[int] = set()  # requests the application ended
    received: list = []
    output = bytearray()
    allowance = setup.max_params_size + 4096 * min(setup.concurrent, 300)
    try:
        for piece in feeding.pieces(payload):
            events = h.measured(conn.receive_data, piece, len(piece), allowance)
            check_events(conn, setup, model, events, ended)
            received += events
            check_buffers(conn, setup)
            output += conn.data_to_send()
            if setup.reactive:
                answered.update(model)
                react(conn, setup, model, events, ended)
                output += conn.data_to_send()
        if setup.eof:
            events = conn.receive_data(b"")
            check_events(conn, setup, model, events)
            received += events
            assert conn.closed, "closed is False after EOF"
    except RemoteProtocolError:
        check_dead(conn)
        output += conn.data_to_send()
        check_output(setup, bytes(output), answered)
        return True, [], b"", ()
    check_output(setup, bytes(output), answered)
    state = (conn.active_requests, conn.closed)
    return False, h.merge_stream_events(received), bytes(output), state


def one_input(data: bytes) -> None:
    raw_setup, payload = h.split_input(data)
    setup = ServerSetup.decode(raw_setup)
    outcome = run(setup, payload, setup.feeding)
    if not setup.reactive and not setup.feeding.is_reference:
        reference = run(setup, payload, h.REFERENCE_FEEDING)
        assert outcome[0] == reference[0], (
            f"fed {setup.feeding}, the server {'failed' if outcome[0] else 'succeeded'}; "
            f"fed whole, it {'failed' if reference[0] else 'succeeded'}"
        )
        assert outcome == reference, f"chunking changed the outcome:\n{outcome}\n{reference}"


if __name__ == "__main__":
    h.fuzz(one_input)
