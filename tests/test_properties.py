"""Properties over generated input: fuzzing both sides, round trips, chunking."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcgiproto import (
    BeginRequest,
    ClientConnection,
    EndRequest,
    Event,
    FilterData,
    GetValuesResult,
    Params,
    ProtocolStatus,
    RemoteProtocolError,
    Role,
    ServerConnection,
    StderrData,
    StdinData,
    StdoutData,
)
from tests.helpers import ConnectionPair, feed, merge_stream_events, raw_record

chunk_sizes = st.lists(st.integers(min_value=1, max_value=70), max_size=40)

# Records that are mostly well-formed, so the fuzzing reaches deep states
# (open streams, ends, aborts) instead of stopping at the first header.
records = st.builds(
    raw_record,
    rtype=st.one_of(st.sampled_from(range(1, 12)), st.integers(0, 255)),
    rid=st.sampled_from([1, 2, 3, 0, 4, 1]),
    content=st.one_of(
        st.just(b""),
        st.binary(min_size=8, max_size=8),
        st.binary(max_size=24),
        st.sampled_from([b"\x01\x01AB", b"\x0f\x01FCGI_MPXS_CONNS1", b"\x7f\xff\xff\xff\xff"]),
    ),
    padding=st.sampled_from([0, 0, 1, 7, 255]),
    version=st.sampled_from([1] * 12 + [0, 2, 72]),
)
wires = st.one_of(st.binary(max_size=400), st.lists(records, max_size=12).map(b"".join))


def client_in_flight(multiplex: bool) -> ClientConnection:
    conn = ClientConnection(multiplex=multiplex)
    for _ in range(3 if multiplex else 1):
        conn.send_request({"A": "b"})
    conn.get_values(["FCGI_MPXS_CONNS"])
    conn.abort_request(1)
    conn.data_to_send()
    return conn


def only_events_or_remote_errors(
    conn: ClientConnection | ServerConnection, wire: bytes, chunks: list[int], close: bool
) -> None:
    pos = 0
    try:
        for size in [*chunks, len(wire)]:
            if pos >= len(wire):
                break
            for event in conn.receive_data(wire[pos : pos + size]):
                assert isinstance(event, Event)
            pos += size
            conn.data_to_send()
        if close:
            conn.receive_data(b"")
    except RemoteProtocolError:
        assert conn.closed
        try:
            conn.receive_data(b"more")
        except RemoteProtocolError:
            return
        raise AssertionError("a dead connection accepted more input") from None


@given(wire=wires, chunks=chunk_sizes, multiplex=st.booleans(), close=st.booleans())
@settings(max_examples=400)
def test_client_turns_any_bytes_into_events_or_a_remote_error(
    wire: bytes, chunks: list[int], multiplex: bool, close: bool
) -> None:
    only_events_or_remote_errors(client_in_flight(multiplex), wire, chunks, close)


@given(
    wire=st.lists(records, max_size=16).map(
        lambda rs: raw_record(1, 1, b"\x00\x03\x01" + bytes(5)) + b"".join(rs)
    )
    | wires,
    chunks=chunk_sizes,
    multiplex=st.booleans(),
    close=st.booleans(),
)
@settings(max_examples=400)
def test_server_turns_any_bytes_into_events_or_a_remote_error(
    wire: bytes, chunks: list[int], multiplex: bool, close: bool
) -> None:
    server = ServerConnection(multiplex=multiplex, max_params_size=64)
    only_events_or_remote_errors(server, wire, chunks, close)


names = st.binary(max_size=140)
values = st.one_of(st.binary(max_size=200), st.integers(0, 70_000).map(lambda n: b"v" * n))
payloads = st.one_of(
    st.binary(max_size=300), st.integers(0, 200_000).map(lambda n: bytes(range(256)) * (n // 256))
)


@given(
    params=st.dictionaries(names, values, max_size=8),
    stdin=payloads,
    data=payloads,
    role=st.sampled_from(list(Role)),
    chunks=chunk_sizes,
)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_what_the_client_sends_the_server_receives_unchanged(
    params: dict[bytes, bytes], stdin: bytes, data: bytes, role: Role, chunks: list[int]
) -> None:
    client, server = ClientConnection(), ServerConnection()
    rid = client.send_request(
        params, stdin=stdin, role=role, data=data if role == Role.FILTER else None
    )
    events = feed(server, client.data_to_send(), chunks)
    assert events[:2] == [BeginRequest(rid, role, True), Params(rid, params)]
    received_stdin = b"".join(e.data for e in events if isinstance(e, StdinData))
    received_data = b"".join(e.data for e in events if isinstance(e, FilterData))
    assert received_stdin == stdin
    assert received_data == (data if role == Role.FILTER else b"")


@given(
    stdout=st.lists(payloads, max_size=4),
    stderr=st.lists(st.binary(max_size=100), max_size=4),
    app_status=st.integers(0, 0xFFFFFFFF),
    status=st.sampled_from(list(ProtocolStatus)),
    chunks=chunk_sizes,
)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_what_the_server_sends_the_client_receives_unchanged(
    stdout: list[bytes],
    stderr: list[bytes],
    app_status: int,
    status: ProtocolStatus,
    chunks: list[int],
) -> None:
    pair = ConnectionPair()
    rid = pair.client.send_request({})
    pair.to_server()
    for out, err in itertools.zip_longest(stdout, stderr, fillvalue=b""):
        pair.server.send_stdout(rid, out)
        pair.server.send_stderr(rid, err)
    pair.server.end_request(rid, app_status, status)
    events = feed(pair.client, pair.server.data_to_send(), chunks)
    assert b"".join(e.data for e in events if isinstance(e, StdoutData)) == b"".join(stdout)
    assert b"".join(e.data for e in events if isinstance(e, StderrData)) == b"".join(stderr)
    assert events[-1] == EndRequest(rid, app_status, status)


@given(
    multiplex=st.booleans(),
    max_requests=st.integers(1, 1000),
    max_connections=st.integers(1, 1000),
)
def test_get_values_round_trip(multiplex: bool, max_requests: int, max_connections: int) -> None:
    pair = ConnectionPair(
        multiplex=multiplex, max_requests=max_requests, max_connections=max_connections
    )
    pair.client.get_values(["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS"])
    pair.to_server()
    assert pair.to_client() == [
        GetValuesResult(
            {
                "FCGI_MAX_CONNS": str(max_connections),
                "FCGI_MAX_REQS": str(max_requests if multiplex else 1),
                "FCGI_MPXS_CONNS": "1" if multiplex else "0",
            }
        )
    ]


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=10),
    cuts=st.lists(st.integers(1, 200), max_size=30),
)
def test_events_do_not_depend_on_chunking(pieces: list[bytes], cuts: list[int]) -> None:
    def response(chunking: list[int] | None) -> list[Event]:
        pair = ConnectionPair()
        rid = pair.client.send_request({})
        pair.to_server()
        for i, piece in enumerate(pieces):
            (pair.server.send_stdout if i % 3 else pair.server.send_stderr)(rid, piece)
        pair.server.end_request(rid)
        wire = pair.server.data_to_send()
        if chunking is None:
            return merge_stream_events(pair.client.receive_data(wire))
        return feed(pair.client, wire, chunking)

    whole = response(None)
    assert response(cuts) == whole
    assert response([1] * 100_000) == whole


@given(
    bodies=st.lists(
        st.lists(st.binary(min_size=1, max_size=30), max_size=5), min_size=1, max_size=20
    ),
    seed=st.integers(0, 2**32),
    cuts=st.lists(st.integers(1, 100), max_size=20),
)
def test_interleaved_multiplexed_responses_reach_the_right_request(
    bodies: list[list[bytes]], seed: int, cuts: list[int]
) -> None:
    pair = ConnectionPair(multiplex=True, max_requests=100)
    ids = [pair.client.send_request({"N": str(i)}) for i in range(len(bodies))]
    pair.to_server()
    # Every piece of every response, shuffled while keeping each request's order.
    schedule = [rid for rid, body in zip(ids, bodies, strict=True) for _ in range(len(body) + 1)]
    random.Random(seed).shuffle(schedule)
    sent = {rid: 0 for rid in ids}
    for rid in schedule:
        body = bodies[ids.index(rid)]
        if sent[rid] < len(body):
            pair.server.send_stdout(rid, body[sent[rid]])
            sent[rid] += 1
        else:
            pair.server.end_request(rid)
    events = feed(pair.client, pair.server.data_to_send(), cuts)
    for rid, body in zip(ids, bodies, strict=True):
        got = b"".join(e.data for e in events if isinstance(e, StdoutData) and e.request_id == rid)
        assert got == b"".join(body)
    assert {e.request_id for e in events if isinstance(e, EndRequest)} == set(ids)
    assert pair.client.active_requests == frozenset()


@given(
    params=st.lists(
        st.tuples(
            st.one_of(st.text(max_size=200), st.binary(max_size=200)),
            st.one_of(st.text(max_size=200), st.binary(max_size=200)),
        ),
        max_size=30,
    )
)
def test_str_and_bytes_params_mixed_arrive_as_their_utf8_bytes(
    params: list[tuple[str | bytes, str | bytes]],
) -> None:
    def encoded(value: str | bytes) -> bytes:
        return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value

    client, server = ClientConnection(), ServerConnection(max_params_size=1 << 22)
    client.send_request(params)
    events = server.receive_data(client.data_to_send())
    assert events[1] == Params(1, {encoded(n): encoded(v) for n, v in params})
