"""The request tables of fcgiproto._state, held against what the connections do.

Two properties over random call sequences on both sides:

- The reader's fast path (the set of record headers let through unchecked)
  is always exactly what the tables say, and a connection that never takes
  the fast path behaves identically, event for event and error for error.
- A call that is refused (LocalProtocolError, or TypeError/ValueError for a
  bad argument) changes nothing: a shadow connection that never sees the
  refused calls stays indistinguishable from the one that did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcgiproto import (
    BeginRequest,
    ClientConnection,
    LocalProtocolError,
    Params,
    RemoteProtocolError,
    Role,
    ServerConnection,
    StdinEnd,
)
from fcgiproto._records import encode_pair
from fcgiproto._state import CLIENT, SERVER, Lifecycle, delivers
from tests.helpers import begin_body, end_request_body, parse_records, raw_record

Connection = ClientConnection | ServerConnection
Op = tuple[Any, ...]
REFUSED = (LocalProtocolError, TypeError, ValueError)

rids = st.sampled_from([1, 1, 1, 2, 3])
payloads = st.sampled_from([b"", b"x", b"body" * 3, bytearray(b"ba"), memoryview(b"mv")])
bad_payloads = st.sampled_from(["text", 12.5, None])
params = st.sampled_from(
    [
        {},
        {"A": "b"},
        [(b"N", b"V"), ("\u00e9", "x" * 130)],
        {"A": 1},  # not str or bytes: refused
        [("A", "b"), ("only a name",)],  # not a pair: refused
        {"OK": "yes", "BAD": object()},  # refused after a good pair is encoded
        {"N" * 70_000: "a pair longer than a record"},
    ]
)
roles = st.sampled_from([Role.RESPONDER, Role.FILTER, Role.AUTHORIZER, 7])

client_calls = st.one_of(
    st.tuples(st.just("begin_request"), roles, st.booleans()),
    st.tuples(
        st.just("send_request"),
        params,
        payloads | bad_payloads,
        roles,
        st.booleans(),
        st.none() | payloads | bad_payloads,
    ),
    st.tuples(st.just("send_params"), rids, params),
    st.tuples(st.sampled_from(["end_params", "end_stdin", "end_data", "abort_request"]), rids),
    st.tuples(st.sampled_from(["send_stdin", "send_data"]), rids, payloads | bad_payloads),
    st.tuples(
        st.just("get_values"),
        st.sampled_from([["FCGI_MPXS_CONNS"], [b"FCGI_MAX_REQS", "X"], [1], ["N" * 70_000]]),
    ),
)


def _answer(kind: str, rid: int, padding: int) -> bytes:
    if kind == "stdout":
        return raw_record(6, rid, b"out", padding)
    if kind == "stderr":
        return raw_record(7, rid, b"err", padding)
    if kind in ("stdout_end", "stderr_end"):
        return raw_record(6 if kind == "stdout_end" else 7, rid, b"", padding)
    if kind == "end":
        return raw_record(3, rid, end_request_body(3), padding)
    if kind == "values":
        return raw_record(10, 0, b"\x0f\x01FCGI_MPXS_CONNS1", padding)
    if kind == "values_empty":
        return raw_record(10, 0)
    assert kind == "unknown"
    return raw_record(11, 0, b"\x63" + bytes(7), padding)


answers = st.builds(
    _answer,
    st.sampled_from(
        ["stdout"] * 4
        + ["stderr", "stdout_end", "stderr_end", "end", "end", "values", "values_empty"]
        + ["unknown"]
    ),
    rids,
    st.sampled_from([0, 0, 3]),
)

# The peer's bytes are queued, then fed in pieces of any size, so that calls
# of ours fall between the pieces of one record.
feed_sizes = st.integers(1, 40) | st.just(1 << 12)
wire_ops = st.one_of(
    st.tuples(st.just("queue"), answers),
    st.tuples(st.just("feed"), feed_sizes),
    st.tuples(st.just("drain")),
)
client_ops = st.lists(st.one_of(client_calls, wire_ops, wire_ops), max_size=40)


def _request(kind: str, rid: int, padding: int) -> bytes:
    records = {
        "begin": raw_record(1, rid, begin_body(), padding),
        "begin_filter": raw_record(1, rid, begin_body(3), padding),
        "begin_close": raw_record(1, rid, begin_body(keep_conn=False), padding),
        "begin_unknown_role": raw_record(1, rid, begin_body(9), padding),
        "params": raw_record(4, rid, b"\x01\x01AB", padding),
        "params_end": raw_record(4, rid, b"", padding),
        "stdin": raw_record(5, rid, b"in", padding),
        "stdin_end": raw_record(5, rid, b"", padding),
        "data": raw_record(8, rid, b"dd", padding),
        "data_end": raw_record(8, rid, b"", padding),
        "abort": raw_record(2, rid, b"", padding),
        "get_values": raw_record(9, 0, b"\x0f\x00FCGI_MPXS_CONNS", padding),
        "unknown": raw_record(42, 0, b"?", padding),
    }
    return records[kind]


requests = st.builds(
    _request,
    st.sampled_from(
        ["begin"] * 3
        + ["begin_filter", "begin_close", "begin_unknown_role", "params", "params_end"]
        + ["params_end", "stdin", "stdin", "stdin_end", "data", "data_end", "abort"]
        + ["get_values", "unknown"]
    ),
    rids,
    st.sampled_from([0, 0, 5]),
)
server_calls = st.one_of(
    st.tuples(st.sampled_from(["send_stdout", "send_stderr"]), rids, payloads | bad_payloads),
    st.tuples(
        st.just("end_request"),
        rids,
        st.sampled_from([0, 0, 255, -1, 1 << 32, 2.5, "0"]),
        st.sampled_from([0, 0, 1, 2, 3, 9]),
    ),
)
server_wire_ops = st.one_of(
    st.tuples(st.just("queue"), requests),
    st.tuples(st.just("feed"), feed_sizes),
    st.tuples(st.just("drain")),
)
server_ops = st.lists(st.one_of(server_calls, server_wire_ops, server_wire_ops), max_size=40)


class Driver:
    """Applies ops to one connection, keeping its own queue of the peer's bytes."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending = b""
        self.fed_eof = False

    def apply(self, op: Op) -> tuple[str, object]:
        """What the op did: ("ok", result) or ("raised", (type, message))."""
        name, *args = op
        conn = self.conn
        try:
            if name == "queue":
                self.pending += args[0]
                return ("ok", None)
            if name == "drain":
                return ("ok", conn.data_to_send())
            if name == "feed":
                piece, self.pending = self.pending[: args[0]], self.pending[args[0] :]
                return ("ok", conn.receive_data(piece) if piece else [])
            method: Callable[..., object] = getattr(conn, name)
            if name == "end_request":
                return ("ok", method(args[0], app_status=args[1], protocol_status=args[2]))
            if name == "send_request":
                p, stdin, role, keep_conn, data = args
                return ("ok", method(p, stdin=stdin, role=role, keep_conn=keep_conn, data=data))
            return ("ok", method(*args))
        except (LocalProtocolError, RemoteProtocolError, TypeError, ValueError) as exc:
            return ("raised", (type(exc), str(exc)))

    def observe(self) -> tuple[object, ...]:
        conn = self.conn
        seen: tuple[object, ...] = (conn.active_requests, conn.closed)
        if isinstance(conn, ClientConnection):
            seen += (conn.can_send_request,)
        return seen


def refused(outcome: tuple[str, object]) -> bool:
    kind, detail = outcome
    return kind == "raised" and issubclass(detail[0], REFUSED)  # type: ignore[index]


def table_delivering(conn: Connection, lifecycle: Lifecycle) -> set[int]:
    """The header prefixes the tables let through unchecked, asked of the tables directly."""
    return {
        1 << 24 | rtype << 16 | rid
        for rid, request in conn._requests.items()
        for rtype in conn._STREAMED
        if delivers(lifecycle, request.state, request.received, rtype)
    }


class _NeverCached(set[int]):
    """A fast-path set that never holds anything: every record takes the full checks."""

    def add(self, item: int) -> None:
        pass


def run(make: Callable[[], Connection], lifecycle: Lifecycle, ops: list[Op]) -> None:
    main, shadow, slow = Driver(make()), Driver(make()), Driver(make())
    slow.conn._delivering = _NeverCached()
    if isinstance(slow.conn, ServerConnection):
        slow.conn._head_fast = False  # and no request head in one step either
    for op in [*ops, ("feed", 1 << 20), ("drain",)]:
        before = main.observe()
        outcome = main.apply(op)
        # The fast path is the tables' verdict, and skipping it changes nothing.
        assert main.conn._delivering == table_delivering(main.conn, lifecycle), op
        assert slow.apply(op) == outcome, op
        assert slow.observe() == main.observe(), op
        if refused(outcome):
            # A refused call leaves everything observable as it was...
            assert main.observe() == before, op
        else:
            # ...and the shadow, which never saw the refused calls, agrees.
            assert shadow.apply(op) == outcome, op
        assert shadow.observe() == main.observe(), op


@given(ops=client_ops, multiplex=st.booleans())
@settings(max_examples=300, deadline=None)
def test_client_fast_path_equals_the_tables_and_refused_calls_change_nothing(
    ops: list[Op], multiplex: bool
) -> None:
    run(lambda: ClientConnection(multiplex=multiplex), CLIENT, ops)


@given(ops=server_ops, multiplex=st.booleans())
@settings(max_examples=300, deadline=None)
def test_server_fast_path_equals_the_tables_and_refused_calls_change_nothing(
    ops: list[Op], multiplex: bool
) -> None:
    run(lambda: ServerConnection(multiplex=multiplex, max_requests=2), SERVER, ops)


# --- the server's request head in one step, against record by record ---

head_pairs = st.lists(
    st.tuples(
        st.binary(max_size=4) | st.sampled_from([b"REQUEST_METHOD", b"N" * 130]),
        st.binary(max_size=4) | st.sampled_from([b"GET", b"v" * 127, b"w" * 128]),
    ),
    max_size=6,
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """A request as web servers send it, often whole and well formed, sometimes not."""
    rid = draw(st.sampled_from([1, 1, 2, 65535]))
    padding = st.sampled_from([0, 0, 3, 7])
    wire = raw_record(
        1,
        rid,
        begin_body(draw(st.sampled_from([1, 1, 2, 3, 9])), draw(st.booleans())),
        draw(padding),
    )
    content = b"".join(encode_pair(name, value) for name, value in draw(head_pairs))
    shape = draw(st.sampled_from(["whole"] * 4 + ["bad pair", "other rid", "version"]))
    if shape == "bad pair":
        content += draw(st.sampled_from([b"\x05", b"\x80\x00", b"\x01\x09A"]))
    # PARAMS in records cut anywhere, a pair split between two of them too.
    cuts = sorted(draw(st.lists(st.integers(0, len(content)), max_size=3)))
    for start, stop in zip([0, *cuts], [*cuts, len(content)], strict=True):
        if stop > start:
            wire += raw_record(4, rid, content[start:stop], draw(padding))
    params_rid = rid % 65535 + 1 if shape == "other rid" else rid
    wire += raw_record(4, params_rid, b"", draw(padding), 2 if shape == "version" else 1)
    tail = draw(st.sampled_from(["stdin_end"] * 3 + ["body", "data", "abort", "none", "junk"]))
    if tail == "stdin_end":
        wire += raw_record(5, rid, b"", draw(padding))
    elif tail == "body":
        wire += raw_record(5, rid, b"body", draw(padding)) + raw_record(5, rid, b"")
    elif tail == "data":
        wire += raw_record(5, rid, b"") + raw_record(8, rid, b"dd") + raw_record(8, rid, b"")
    elif tail == "abort":
        wire += raw_record(2, rid)
    elif tail == "junk":
        wire += b"HTTP/1.1"
    return wire


head_ops = st.lists(
    st.one_of(
        st.tuples(st.just("queue"), request_heads()),
        st.tuples(st.just("feed"), st.sampled_from([1 << 20, 1 << 20, 9, 30])),
        st.tuples(st.just("end_request"), st.sampled_from([1, 2, 65535]), st.just(0), st.just(0)),
        st.tuples(st.just("drain")),
    ),
    max_size=12,
)


def server_inside(conn: ServerConnection) -> tuple[object, ...]:
    """Everything the request head changes in a server connection."""
    requests = {
        rid: (r.state, r.role, r.keep_conn, r.received.states, bytes(r.params), r.stderr_used)
        for rid, r in conn._requests.items()
    }
    reader = (conn._state, bytes(conn._header_buf), conn._left + conn._padding)
    return (requests, conn._ended, conn._delivering, conn.dropped_size, conn.closed, reader)


@given(
    ops=head_ops,
    multiplex=st.booleans(),
    roles=st.sampled_from([(Role.RESPONDER,), (Role.RESPONDER, Role.AUTHORIZER, Role.FILTER)]),
    max_params_size=st.sampled_from([1 << 20, 1 << 20, 20]),
    max_params_pairs=st.sampled_from([1000, 1000, 2]),
)
@settings(max_examples=500, deadline=None)
def test_server_request_head_in_one_step_equals_record_by_record(
    ops: list[Op],
    multiplex: bool,
    roles: tuple[Role, ...],
    max_params_size: int,
    max_params_pairs: int,
) -> None:
    def make() -> ServerConnection:
        return ServerConnection(
            roles=roles,
            multiplex=multiplex,
            max_requests=2,
            max_params_size=max_params_size,
            max_params_pairs=max_params_pairs,
        )

    fast, plain = Driver(make()), Driver(make())
    assert isinstance(plain.conn, ServerConnection) and isinstance(fast.conn, ServerConnection)
    plain.conn._head_fast = False
    for op in [*ops, ("feed", 1 << 20), ("drain",)]:
        assert fast.apply(op) == plain.apply(op), op
        assert server_inside(fast.conn) == server_inside(plain.conn), op
        assert fast.conn._delivering == table_delivering(fast.conn, SERVER), op


def test_the_request_head_of_nginx_takes_one_step() -> None:
    """The fast path above is the one a web server's request takes (so the property covers it)."""
    conn = ServerConnection()
    params = {b"REQUEST_METHOD": b"GET", b"SCRIPT_NAME": b"/hello", b"HTTP_X": b"y" * 200}
    content = b"".join(encode_pair(name, value) for name, value in params.items())
    wire = (
        raw_record(1, 1, begin_body(), 0)
        + raw_record(4, 1, content, -len(content) & 7)
        + raw_record(4, 1, b"")
        + raw_record(5, 1, b"")
    )
    events: list[object] = []
    assert conn._request_head(wire, events) == len(wire)  # type: ignore[arg-type]
    assert events == [BeginRequest(1, Role.RESPONDER, True), Params(1, params), StdinEnd(1)]


# --- the cases the properties found or guard, spelled out ---


def test_params_that_cannot_be_encoded_leave_no_request_behind() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="param value must be str or bytes"):
        conn.send_request({"A": 1})  # type: ignore[dict-item]
    assert conn.active_requests == frozenset()
    assert conn.can_send_request
    assert conn.data_to_send() == b""
    assert conn.send_request({"A": "1"}) == 1


def test_data_for_a_role_without_it_leaves_no_request_behind() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="DATA data for request 1 \\(RESPONDER role\\)"):
        conn.send_request({}, data=b"x")
    assert (conn.active_requests, conn.data_to_send()) == (frozenset(), b"")


def test_a_refused_stderr_write_does_not_add_a_stderr_terminator() -> None:
    server = ServerConnection()
    server.receive_data(raw_record(1, 1, begin_body()) + raw_record(4, 1))
    with pytest.raises(TypeError):
        server.send_stderr(1, "text")  # type: ignore[arg-type]
    server.end_request(1)
    assert [rtype for rtype, *_ in parse_records(server.data_to_send())] == [6, 3]


@pytest.mark.parametrize(
    ("app_status", "protocol_status", "error"),
    [(2.5, 0, LocalProtocolError), (1 << 32, 0, LocalProtocolError), (0, 9, ValueError)],
)
def test_a_refused_end_request_queues_nothing(
    app_status: Any, protocol_status: Any, error: type[Exception]
) -> None:
    server = ServerConnection()
    server.receive_data(raw_record(1, 1, begin_body()) + raw_record(4, 1))
    with pytest.raises(error):
        server.end_request(1, app_status, protocol_status)
    assert server.data_to_send() == b""
    assert server.active_requests == {1}


def test_every_refusal_the_tables_can_reach_has_words() -> None:
    for lifecycle in (CLIENT, SERVER):
        for state in {*lifecycle.local, *lifecycle.remote}:
            assert lifecycle.refusal(state, state in lifecycle.local)
