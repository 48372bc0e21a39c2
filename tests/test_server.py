"""ServerConnection, the application side, mostly through a client wired to it."""

from __future__ import annotations

import gc
import weakref

import pytest

from fcgiproto import (
    AbortRequest,
    BeginRequest,
    ClientConnection,
    EndRequest,
    FilterData,
    FilterDataEnd,
    GetValuesResult,
    LocalProtocolError,
    Params,
    ProtocolStatus,
    RemoteProtocolError,
    Role,
    ServerConnection,
    StderrData,
    StdinData,
    StdinEnd,
    StdoutData,
    UnknownType,
)
from fcgiproto._records import decode_pairs
from tests.helpers import ConnectionPair, begin_body, parse_records, raw_record

BEGIN, ABORT, PARAMS, STDIN, DATA = 1, 2, 4, 5, 8


def test_request_arrives_as_begin_params_stdin_events() -> None:
    pair = ConnectionPair()
    rid = pair.client.send_request({"REQUEST_METHOD": "POST", b"RAW": b"\x00\xff"}, stdin=b"body")
    assert pair.to_server() == [
        BeginRequest(rid, Role.RESPONDER, True),
        Params(rid, {b"REQUEST_METHOD": b"POST", b"RAW": b"\x00\xff"}),
        StdinData(rid, b"body"),
        StdinEnd(rid),
    ]


def test_response_reaches_the_client_with_streams_kept_apart() -> None:
    pair = ConnectionPair()
    rid = pair.client.send_request({})
    pair.to_server()
    pair.server.send_stdout(rid, b"Content-Type: text/plain\r\n\r\nout")
    pair.server.send_stderr(rid, b"err")
    pair.server.end_request(rid, app_status=2)
    assert pair.to_client() == [
        StdoutData(rid, b"Content-Type: text/plain\r\n\r\nout"),
        StderrData(rid, b"err"),
        EndRequest(rid, 2, ProtocolStatus.REQUEST_COMPLETE),
    ]
    assert pair.client.can_send_request


def test_end_request_closes_stdout_always_and_stderr_only_when_used() -> None:
    server = ServerConnection()
    server.receive_data(raw_record(BEGIN, 1, begin_body()))
    server.end_request(1)
    assert [t for t, *_ in parse_records(server.data_to_send())] == [6, 3]


def test_filter_role_delivers_the_data_stream() -> None:
    pair = ConnectionPair()
    rid = pair.client.send_request({}, stdin=b"in", role=Role.FILTER, data=b"file")
    assert pair.to_server()[-4:] == [
        StdinData(rid, b"in"),
        StdinEnd(rid),
        FilterData(rid, b"file"),
        FilterDataEnd(rid),
    ]


def test_unconfigured_role_is_refused_with_unknown_role_and_its_records_dropped() -> None:
    pair = ConnectionPair(roles=[Role.RESPONDER])
    rid = pair.client.send_request({"A": "b"}, stdin=b"x", role=Role.AUTHORIZER)
    assert pair.to_server() == []
    assert pair.to_client() == [EndRequest(rid, 0, ProtocolStatus.UNKNOWN_ROLE)]
    # The id can begin again.
    rid = pair.client.send_request({})
    assert pair.to_server()[0] == BeginRequest(rid, Role.RESPONDER, True)


def test_a_role_number_outside_the_spec_is_refused_with_unknown_role() -> None:
    server = ServerConnection()
    assert server.receive_data(raw_record(BEGIN, 1, begin_body(role=9))) == []
    assert parse_records(server.data_to_send())[0][:2] == (3, 1)


def test_second_request_on_a_plain_connection_gets_cant_mpx_conn() -> None:
    client = ClientConnection(multiplex=True)  # a client that multiplexes anyway
    server = ServerConnection(multiplex=False)
    client.send_request({})
    client.send_request({})
    events = server.receive_data(client.data_to_send())
    assert [e for e in events if isinstance(e, BeginRequest)] == [
        BeginRequest(1, Role.RESPONDER, True)
    ]
    assert client.receive_data(server.data_to_send()) == [
        EndRequest(2, 0, ProtocolStatus.CANT_MPX_CONN)
    ]


def test_requests_past_max_requests_are_overloaded() -> None:
    pair = ConnectionPair(multiplex=True, max_requests=2)
    for _ in range(3):
        pair.client.send_request({})
    begins = [e for e in pair.to_server() if isinstance(e, BeginRequest)]
    assert [e.request_id for e in begins] == [1, 2]
    assert pair.to_client() == [EndRequest(3, 0, ProtocolStatus.OVERLOADED)]


def test_get_values_is_answered_from_the_configuration() -> None:
    pair = ConnectionPair(multiplex=True, max_requests=50, max_connections=7)
    pair.client.get_values(["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS", "OTHER"])
    assert pair.to_server() == []
    assert pair.to_client() == [
        GetValuesResult({"FCGI_MAX_CONNS": "7", "FCGI_MAX_REQS": "50", "FCGI_MPXS_CONNS": "1"})
    ]


def test_unknown_record_type_is_answered_with_unknown_type() -> None:
    server = ServerConnection()
    assert server.receive_data(raw_record(42, 0, b"whatever")) == []
    client = ClientConnection()
    assert client.receive_data(server.data_to_send()) == [UnknownType(42)]


def test_abort_is_reported_once_and_late_input_for_an_ended_request_is_dropped() -> None:
    pair = ConnectionPair()
    rid = pair.client.begin_request()
    pair.client.end_params(rid)
    pair.to_server()
    pair.client.abort_request(rid)
    pair.client.abort_request(rid)
    assert pair.to_server() == [AbortRequest(rid)]
    pair.server.end_request(rid)
    # The client had STDIN on the wire when the request ended: dropped.
    assert pair.server.receive_data(raw_record(STDIN, rid, b"late") + raw_record(ABORT, rid)) == []


def test_cancelled_requests_sent_whole_leave_nothing_behind_on_a_multiplexed_connection() -> None:
    # Our client retires a cancelled request's id for the life of the
    # connection, so every cancellation brings a new id: remembering each one
    # would grow the server by an id per cancelled request, up to 65,535.
    pair = ConnectionPair(multiplex=True)
    for number in range(3000):
        rid = pair.client.send_request({"A": "b"}, stdin=b"body")
        pair.to_server()
        if number % 2:
            # Aborted before the server ended it.
            pair.client.abort_request(rid)
            assert pair.to_server() == [AbortRequest(rid)]
            pair.server.end_request(rid, 1)
        else:
            # Ended before the ABORT arrived: the two crossed on the wire.
            pair.server.end_request(rid)
            pair.client.abort_request(rid)
            assert pair.to_server() == []
        pair.to_client()
    assert rid == 3000
    assert pair.server._ended == {}
    assert pair.server.active_requests == frozenset()
    # Nothing more may come for such an id: a record for it is the client's error.
    with pytest.raises(
        RemoteProtocolError,
        match="STDIN record \\(4 bytes\\) for request 3000, which has not begun",
    ):
        pair.server.receive_data(raw_record(STDIN, rid, b"late"))


def test_ended_ids_stay_remembered_while_their_records_may_still_come() -> None:
    pair = ConnectionPair(multiplex=True)
    whole = pair.client.send_request({})
    streaming = pair.client.begin_request()
    pair.client.end_params(streaming)
    pair.client.send_stdin(streaming, b"half")
    pair.to_server()
    pair.client.abort_request(streaming)
    pair.to_server()
    # Ended with its input all in, not aborted: an ABORT may cross the END_REQUEST.
    pair.server.end_request(whole)
    # Aborted while its STDIN was still open: the rest of it may be on the wire.
    pair.server.end_request(streaming)
    assert set(pair.server._ended) == {whole, streaming}
    late = raw_record(STDIN, streaming, b"late") + raw_record(STDIN, streaming)
    assert pair.server.receive_data(late) == []
    assert set(pair.server._ended) == {whole, streaming}
    # An id that ended is forgotten when the client begins it again...
    pair.to_client()
    assert pair.client.send_request({}) == whole
    pair.to_server()
    assert set(pair.server._ended) == {streaming}
    pair.server.end_request(whole)
    # ...or once the ABORT that crossed its end arrives: nothing more can come for it.
    assert pair.server.receive_data(raw_record(ABORT, whole)) == []
    assert set(pair.server._ended) == {streaming}


def test_params_split_mid_pair_are_reassembled() -> None:
    server = ServerConnection()
    server.receive_data(raw_record(BEGIN, 1, begin_body()))
    pairs = b"\x04\x05NAMEvalue\x01\x01AB"
    events = server.receive_data(
        raw_record(PARAMS, 1, pairs[:3]) + raw_record(PARAMS, 1, pairs[3:]) + raw_record(PARAMS, 1)
    )
    assert events == [Params(1, {b"NAME": b"value", b"A": b"B"})]


def test_params_past_the_limit_are_a_remote_error() -> None:
    server = ServerConnection(max_params_size=100)
    server.receive_data(raw_record(BEGIN, 1, begin_body()))
    server.receive_data(raw_record(PARAMS, 1, b"x" * 60))
    with pytest.raises(RemoteProtocolError, match="PARAMS of request 1 exceed the limit of 100"):
        server.receive_data(raw_record(PARAMS, 1, b"x" * 60))


def test_keep_conn_false_request_closes_the_connection_when_it_ends() -> None:
    pair = ConnectionPair()
    rid = pair.client.send_request({}, keep_conn=False)
    pair.to_server()
    assert not pair.server.closed
    pair.server.end_request(rid)
    assert pair.server.closed
    pair.to_client()
    assert pair.client.closed


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            raw_record(STDIN, 1, b"x"),
            "STDIN record \\(1 bytes\\) for request 1, which has not begun",
        ),
        (raw_record(6, 1, b"x"), "STDOUT record .* only an application sends"),
        (raw_record(3, 1, bytes(8)), "END_REQUEST record .* only an application sends"),
        (raw_record(BEGIN, 1, b"\x00\x01"), "BEGIN_REQUEST for request 1 with a 2-byte body"),
        (raw_record(BEGIN, 0, begin_body()), "BEGIN_REQUEST record for request 0"),
        (raw_record(9, 3, b""), "GET_VALUES record for request 3: management"),
        (raw_record(BEGIN, 1, begin_body()) * 2, "BEGIN_REQUEST for request 1, which is already"),
        (
            raw_record(BEGIN, 1, begin_body()) + raw_record(STDIN, 1, b"x"),
            "STDIN record \\(1 bytes\\) for request 1 \\(RESPONDER role\\) before PARAMS ended",
        ),
        (
            raw_record(BEGIN, 1, begin_body()) + raw_record(PARAMS, 1) + raw_record(DATA, 1, b"x"),
            "DATA record \\(1 bytes\\) for request 1 \\(RESPONDER role\\) which this request",
        ),
        (
            raw_record(BEGIN, 1, begin_body()) + raw_record(PARAMS, 1) + raw_record(PARAMS, 1),
            "PARAMS record \\(0 bytes\\) for request 1 after the stream ended",
        ),
        (
            raw_record(BEGIN, 1, begin_body())
            + raw_record(PARAMS, 1, b"\x7f\xff\xff\xff\xff")
            + raw_record(PARAMS, 1),
            "PARAMS of request 1: a pair declares 127 \\+ 2147483647 bytes but only 0 remain",
        ),
        (raw_record(1, 1, begin_body(), version=0), "version 0"),
    ],
)
def test_invalid_client_input_is_a_remote_error(wire: bytes, message: str) -> None:
    server = ServerConnection()
    with pytest.raises(RemoteProtocolError, match=message):
        server.receive_data(wire)
    assert server.closed
    with pytest.raises(RemoteProtocolError):
        server.receive_data(raw_record(9, 0))


def test_client_closing_mid_request_is_a_remote_error() -> None:
    server = ServerConnection()
    server.receive_data(raw_record(BEGIN, 1, begin_body()))
    with pytest.raises(RemoteProtocolError, match="client closed the connection with request 1"):
        server.receive_data(b"")


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        (lambda s: s.send_stdout(5, b"x"), "request 5 is not active"),
        (lambda s: (s.end_request(1), s.send_stdout(1, b"x")), "request 1 is not active"),
        (lambda s: s.end_request(1, app_status=-1), "does not fit in 32 bits"),
        (lambda s: (s.end_request(1), s.receive_data(b""), s.send_stderr(1, b"x")), "peer closed"),
    ],
)
def test_server_api_misuse_is_a_local_error(misuse: object, message: str) -> None:
    server = ServerConnection()
    server.receive_data(raw_record(BEGIN, 1, begin_body()) + raw_record(PARAMS, 1))
    with pytest.raises(LocalProtocolError, match=message):
        misuse(server)  # type: ignore[operator]


def test_get_values_query_names_decode_with_values_ignored() -> None:
    server = ServerConnection()
    server.receive_data(raw_record(9, 0, b"\x0f\x03FCGI_MPXS_CONNSabc"))
    ((rtype, rid, content, _),) = parse_records(server.data_to_send())
    assert (rtype, rid) == (10, 0)
    assert decode_pairs(content, "answer") == [(b"FCGI_MPXS_CONNS", b"0")]


def test_active_requests_are_those_begun_and_not_ended() -> None:
    pair = ConnectionPair(multiplex=True)
    first, second = pair.client.send_request({}), pair.client.send_request({})
    pair.to_server()
    assert pair.server.active_requests == {first, second}
    pair.server.end_request(first)
    assert pair.server.active_requests == {second}


def test_a_connection_killed_by_a_protocol_error_is_freed_without_the_gc() -> None:
    # Kept as the exception, the error's traceback would hold the frames that
    # raised it, and they the connection: a cycle per broken connection.
    server = ServerConnection()
    server.receive_data(raw_record(BEGIN, 1, begin_body()))
    alive = weakref.ref(server)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(RemoteProtocolError, match="closed the connection with request 1"):
            server.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="closed the connection with request 1"):
            server.receive_data(b"more")
        del server
        assert alive() is None
    finally:
        if enabled:
            gc.enable()
