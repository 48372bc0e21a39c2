"""ClientConnection: what it sends, what it accepts, and what it refuses."""

from __future__ import annotations

import pytest

from fcgiproto import (
    ClientConnection,
    EndRequest,
    GetValuesResult,
    LocalProtocolError,
    ProtocolStatus,
    RemoteProtocolError,
    Role,
    StderrData,
    StdoutData,
    UnknownType,
)
from fcgiproto._records import decode_pairs
from tests.helpers import begin_body, end_request_body, feed, parse_records, raw_record

STDOUT, STDERR, END = 6, 7, 3
COMPLETE = ProtocolStatus.REQUEST_COMPLETE


def started(multiplex: bool = False, requests: int = 1) -> ClientConnection:
    conn = ClientConnection(multiplex=multiplex)
    for _ in range(requests):
        conn.send_request({"REQUEST_METHOD": "GET"})
    conn.data_to_send()
    return conn


def end(rid: int, app_status: int = 0, status: int = 0) -> bytes:
    return raw_record(END, rid, end_request_body(app_status, status))


# --- sending ---


def test_send_request_writes_begin_params_and_exactly_one_empty_terminator_each() -> None:
    conn = ClientConnection()
    rid = conn.send_request({"REQUEST_METHOD": "POST", "X": b"\xff\x00"}, stdin=b"body")
    assert rid == 1
    records = parse_records(conn.data_to_send())
    assert [(t, r) for t, r, _, _ in records] == [(1, 1), (4, 1), (4, 1), (5, 1), (5, 1)]
    assert records[0][2] == begin_body(Role.RESPONDER, keep_conn=True)
    assert decode_pairs(records[1][2], "params") == [
        (b"REQUEST_METHOD", b"POST"),
        (b"X", b"\xff\x00"),
    ]
    assert (records[2][2], records[3][2], records[4][2]) == (b"", b"body", b"")
    assert conn.data_to_send() == b""


def test_step_by_step_calls_write_the_same_bytes_as_send_request() -> None:
    one_call = ClientConnection()
    one_call.send_request([("A", "1")], stdin=b"x" * 70000, role=Role.AUTHORIZER, keep_conn=False)
    steps = ClientConnection()
    rid = steps.begin_request(role=Role.AUTHORIZER, keep_conn=False)
    steps.send_params(rid, [("A", "1")])
    steps.end_params(rid)
    steps.send_stdin(rid, b"x" * 70000)
    steps.end_stdin(rid)
    assert steps.data_to_send() == one_call.data_to_send()


def test_large_stdin_is_split_into_records_php_fpm_accepts() -> None:
    conn = ClientConnection()
    body = bytes(range(256)) * 4096  # 1 MiB
    conn.send_request({}, stdin=body)
    records = parse_records(conn.data_to_send())
    stdin = [(c, p) for t, _, c, p in records if t == 5]
    assert all(len(c) + p <= 65535 for c, p in stdin)
    assert b"".join(c for c, _ in stdin) == body
    assert [c for c, _ in stdin].count(b"") == 1


def test_filter_role_sends_one_empty_data_record() -> None:
    conn = ClientConnection()
    conn.send_request({}, stdin=b"in", role=Role.FILTER, data=b"file")
    types = [(t, c) for t, _, c, _ in parse_records(conn.data_to_send())]
    assert types[-2:] == [(8, b"file"), (8, b"")]


def test_filter_request_without_data_leaves_the_data_stream_open() -> None:
    conn = ClientConnection()
    rid = conn.send_request({}, role=Role.FILTER)
    conn.send_data(rid, b"later")
    conn.end_data(rid)
    assert [t for t, *_ in parse_records(conn.data_to_send())][-2:] == [8, 8]


def test_a_mutable_buffer_is_frozen_when_queued() -> None:
    conn = ClientConnection()
    rid = conn.begin_request()
    conn.end_params(rid)
    buffer = bytearray(b"before")
    conn.send_stdin(rid, buffer)
    buffer[:] = b"AFTER!"
    assert b"before" in conn.data_to_send()


def test_empty_stdin_chunk_sends_nothing() -> None:
    conn = ClientConnection()
    rid = conn.begin_request()
    conn.end_params(rid)
    conn.data_to_send()
    conn.send_stdin(rid, b"")
    assert conn.data_to_send() == b""


def test_non_multiplexed_connection_refuses_a_second_request_naming_the_first() -> None:
    conn = started()
    assert not conn.can_send_request
    with pytest.raises(LocalProtocolError, match="request 1 is in flight"):
        conn.begin_request()


def test_multiplexed_requests_take_the_lowest_free_id() -> None:
    conn = started(multiplex=True, requests=3)
    assert conn.active_requests == {1, 2, 3}
    conn.receive_data(end(2))
    assert conn.begin_request() == 2
    assert conn.begin_request() == 4


def test_ended_request_frees_id_1_on_a_plain_connection() -> None:
    conn = started()
    assert conn.receive_data(end(1)) == [EndRequest(1, 0, COMPLETE)]
    assert conn.can_send_request
    assert conn.begin_request() == 1


def test_keep_conn_false_closes_the_connection_after_the_request() -> None:
    conn = ClientConnection(multiplex=True)
    conn.send_request({}, keep_conn=False)
    assert not conn.can_send_request
    assert not conn.closed
    conn.receive_data(end(1))
    assert conn.closed
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.begin_request()


def test_keep_conn_false_cannot_join_requests_in_flight() -> None:
    conn = started(multiplex=True)
    with pytest.raises(LocalProtocolError, match="keep_conn=False"):
        conn.begin_request(keep_conn=False)


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        (lambda c, r: c.send_stdin(99, b"x"), "request 99 is not active"),
        (lambda c, r: c.send_stdin(r, b"x"), "STDIN data for request 1 .* before PARAMS ended"),
        (lambda c, r: (c.end_params(r), c.send_params(r, {})), "PARAMS data .* after the stream"),
        (
            lambda c, r: (c.end_params(r), c.end_stdin(r), c.send_stdin(r, b"x")),
            "STDIN data .* after the stream ended",
        ),
        (
            lambda c, r: (c.end_params(r), c.end_stdin(r), c.send_data(r, b"x")),
            "DATA data for request 1 \\(RESPONDER role\\) which this request does not have",
        ),
        (lambda c, r: c.begin_request(role=7), "unknown role 7"),  # type: ignore[arg-type]
    ],
)
def test_api_misuse_is_a_local_protocol_error(misuse: object, message: str) -> None:
    conn = ClientConnection()
    rid = conn.begin_request()
    with pytest.raises(LocalProtocolError, match=message):
        misuse(conn, rid)  # type: ignore[operator]


def test_sending_on_a_connection_the_peer_closed_is_a_local_error() -> None:
    conn = ClientConnection()
    assert conn.receive_data(b"") == []
    assert conn.closed
    with pytest.raises(LocalProtocolError, match="peer closed"):
        conn.get_values(["FCGI_MPXS_CONNS"])
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send_request({})
    with pytest.raises(LocalProtocolError, match="after the peer closed"):
        conn.receive_data(b"x")


# --- receiving ---


def test_response_events_carry_stdout_stderr_and_end_status() -> None:
    conn = started()
    wire = (
        raw_record(STDOUT, 1, b"Status: 200\r\n\r\nhi")
        + raw_record(STDERR, 1, b"warning")
        + raw_record(STDOUT, 1)
        + raw_record(STDERR, 1)
        + end(1, app_status=3)
    )
    assert conn.receive_data(wire) == [
        StdoutData(1, b"Status: 200\r\n\r\nhi"),
        StderrData(1, b"warning"),
        EndRequest(1, 3, COMPLETE),
    ]


def test_stdout_is_delivered_as_it_arrives_not_per_record() -> None:
    conn = started()
    wire = raw_record(STDOUT, 1, b"x" * 65535)
    first = conn.receive_data(wire[:1024])
    assert first == [StdoutData(1, b"x" * 1016)]
    for pos in range(1024, len(wire), 1024):
        (event,) = conn.receive_data(wire[pos : pos + 1024])
        assert isinstance(event, StdoutData)


def test_any_padding_and_any_alignment_is_accepted() -> None:
    conn = started()
    wire = (
        raw_record(STDOUT, 1, b"a", padding=255)
        + raw_record(STDOUT, 1, b"bc", padding=0)
        + raw_record(STDERR, 1, b"e", padding=3)
        + raw_record(END, 1, end_request_body(), padding=255)
    )
    assert feed(conn, wire, [3, 1, 300, 2]) == [
        StdoutData(1, b"abc"),
        StderrData(1, b"e"),
        EndRequest(1, 0, COMPLETE),
    ]


def test_end_request_without_an_empty_stdout_is_accepted() -> None:
    conn = started()
    assert conn.receive_data(raw_record(STDOUT, 1, b"x") + end(1)) == [
        StdoutData(1, b"x"),
        EndRequest(1, 0, COMPLETE),
    ]


@pytest.mark.parametrize("status", list(ProtocolStatus))
def test_every_protocol_status_is_reported(status: ProtocolStatus) -> None:
    conn = started()
    assert conn.receive_data(end(1, 0, status)) == [EndRequest(1, 0, status)]


def test_app_status_is_unsigned_32_bits() -> None:
    conn = started()
    assert conn.receive_data(end(1, 0xFFFFFFFF)) == [EndRequest(1, 0xFFFFFFFF, COMPLETE)]


REMOTE_ERRORS = [
    (
        raw_record(STDOUT, 1) + raw_record(STDOUT, 1, b"late"),
        "STDOUT record \\(4 bytes\\) for request 1 after the stream ended",
    ),
    (
        raw_record(STDERR, 1) + raw_record(STDERR, 1),
        "STDERR record \\(0 bytes\\) for request 1 after",
    ),
    (raw_record(STDOUT, 1, b"x", version=2), "version 2 \\(type 6, request 1, 1 bytes\\)"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "answered with HTTP, not FastCGI"),
    (
        raw_record(5, 1, b"x"),
        "STDIN record \\(1 bytes, request 1\\): a record type that only a client sends",
    ),
    (raw_record(1, 1, begin_body()), "BEGIN_REQUEST record .* only a client sends"),
    (raw_record(42, 0, b""), "record type 42 record .* not a record type an application sends"),
    (raw_record(END, 1, b"\x00" * 5), "END_REQUEST for request 1 with a 5-byte body; it must be 8"),
    (raw_record(END, 1, end_request_body(0, 9)), "unknown protocol status 9"),
    (raw_record(11, 0, b"\x01"), "UNKNOWN_TYPE record with a 1-byte body"),
    (raw_record(11, 1, b"\x01" + bytes(7)), "UNKNOWN_TYPE record for request 1: management"),
    (raw_record(10, 2, b""), "GET_VALUES_RESULT record for request 2: management"),
    (raw_record(STDOUT, 2, b"x"), "STDOUT record \\(1 bytes\\) for request 2, which is not active"),
    (raw_record(STDOUT, 0, b"x"), "STDOUT record \\(1 bytes\\) for request 0, which is not active"),
    (end(1) + end(1), "END_REQUEST record \\(8 bytes\\) for request 1, which is not active"),
    (
        end(1) + raw_record(STDOUT, 1, b"late"),
        "STDOUT record \\(4 bytes\\) for request 1, which is not active",
    ),
    (
        raw_record(10, 0, b"\x05\x00ab"),
        "GET_VALUES_RESULT: a pair declares 5 \\+ 0 bytes but only 2 remain",
    ),
]


@pytest.mark.parametrize(("wire", "message"), REMOTE_ERRORS)
def test_invalid_input_is_a_remote_protocol_error_and_the_connection_stays_dead(
    wire: bytes, message: str
) -> None:
    conn = started()
    with pytest.raises(RemoteProtocolError, match=message):
        conn.receive_data(wire)
    assert conn.closed
    assert not conn.can_send_request
    with pytest.raises(RemoteProtocolError, match=message):
        conn.receive_data(end(1))
    with pytest.raises(LocalProtocolError, match="dead after a protocol error"):
        conn.get_values([])


@pytest.mark.parametrize(("wire", "message"), REMOTE_ERRORS)
def test_the_same_errors_when_fed_one_byte_at_a_time(wire: bytes, message: str) -> None:
    conn = started()
    with pytest.raises(RemoteProtocolError, match=message):
        for i in range(len(wire)):
            conn.receive_data(wire[i : i + 1])


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (raw_record(STDOUT, 1, b"abc")[:5], "after 5 of a record header's 8 bytes"),
        (
            raw_record(STDOUT, 1, b"abcdef")[:11],
            "in the middle of a STDOUT record for request 1 \\(3 bytes missing\\)",
        ),
        (raw_record(END, 1, end_request_body())[:12], "in the middle of a END_REQUEST record"),
        (raw_record(STDOUT, 1, b"partial"), "closed the connection with request 1 in flight"),
    ],
)
def test_end_of_input_inside_a_record_or_a_request_is_a_remote_error(
    wire: bytes, message: str
) -> None:
    conn = started()
    conn.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        conn.receive_data(b"")
    assert conn.closed


def test_end_of_input_between_requests_is_a_clean_close() -> None:
    conn = started()
    conn.receive_data(end(1))
    assert conn.receive_data(b"") == []
    assert conn.closed


def test_aborted_request_holds_its_id_then_retires_it_and_drops_the_late_reply() -> None:
    # Go's server answers an abort with END_REQUEST at once, then sends the
    # handler's late output and a second END_REQUEST for the same id.
    conn = started(multiplex=True, requests=2)
    conn.abort_request(1)
    conn.abort_request(1)  # a second abort changes nothing
    assert parse_records(conn.data_to_send()) == [(2, 1, b"", 0)]
    assert conn.active_requests == {1, 2}
    assert conn.receive_data(raw_record(STDOUT, 1, b"dropped")) == []
    assert conn.receive_data(end(1)) == [EndRequest(1, 0, COMPLETE)]
    assert conn.active_requests == {2}
    assert conn.begin_request() == 3  # id 1 is retired, never reused
    late = raw_record(STDOUT, 1, b"late reply") + raw_record(STDOUT, 1) + end(1)
    assert conn.receive_data(late + raw_record(STDOUT, 3, b"mine")) == [StdoutData(3, b"mine")]


def test_aborting_an_unknown_request_is_a_local_error() -> None:
    conn = started()
    with pytest.raises(LocalProtocolError, match="request 5 is not active"):
        conn.abort_request(5)
    with pytest.raises(LocalProtocolError, match="aborted"):
        conn.abort_request(1)
        conn.send_stdin(1, b"x")


def test_request_ended_before_its_stdin_makes_a_plain_connection_unusable() -> None:
    conn = ClientConnection()
    rid = conn.begin_request()
    conn.end_params(rid)
    conn.send_stdin(rid, b"part of the body")
    conn.receive_data(end(rid))
    assert not conn.can_send_request
    with pytest.raises(LocalProtocolError, match="ended before its input was sent whole"):
        conn.begin_request()


def test_request_ended_early_on_a_multiplexed_connection_retires_its_id() -> None:
    conn = ClientConnection(multiplex=True)
    rid = conn.begin_request()
    conn.receive_data(end(rid))
    assert conn.can_send_request
    assert conn.begin_request() == 2


def test_get_values_round_trip_and_go_s_trailing_empty_result_is_dropped() -> None:
    conn = ClientConnection()
    conn.get_values(["FCGI_MPXS_CONNS", b"FCGI_MAX_REQS"])
    ((rtype, rid, content, _),) = parse_records(conn.data_to_send())
    assert (rtype, rid) == (9, 0)
    assert decode_pairs(content, "q") == [(b"FCGI_MPXS_CONNS", b""), (b"FCGI_MAX_REQS", b"")]
    answer = raw_record(10, 0, b"\x0f\x01FCGI_MPXS_CONNS1") + raw_record(10, 0)
    assert conn.receive_data(answer) == [GetValuesResult({"FCGI_MPXS_CONNS": "1"})]


@pytest.mark.parametrize(
    "names",
    [[], ["FCGI_MPXS_CONNS"], ["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS"], ["AB"]],
)
def test_get_values_is_always_padded_and_aligned(names: list[str]) -> None:
    # libfcgi answers GET_VALUES only when padding follows its content; the
    # three standard names make exactly 48 bytes, which alignment leaves bare.
    conn = ClientConnection()
    conn.get_values(names)
    wire = conn.data_to_send()
    ((rtype, _, content, padding),) = parse_records(wire)
    assert rtype == 9 and 1 <= padding <= 8
    assert len(wire) % 8 == 0
    assert decode_pairs(content, "q") == [(name.encode(), b"") for name in names]


def test_get_values_too_large_for_a_padded_record_is_refused() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="does not fit in a record"):
        conn.get_values(["N" * 65516])  # 65521 bytes with its five length bytes
    conn.get_values(["N" * 65515])  # 65520: with 8 of padding, 65528 of record
    ((_, _, content, padding),) = parse_records(conn.data_to_send())
    assert (len(content), padding) == (65520, 8)


def test_an_empty_answer_to_a_question_is_reported() -> None:
    conn = ClientConnection()
    conn.get_values(["UNKNOWN_NAME"])
    assert conn.receive_data(raw_record(10, 0)) == [GetValuesResult({})]


def test_unknown_type_answer_is_an_event() -> None:
    conn = ClientConnection()
    assert conn.receive_data(raw_record(11, 0, b"\x63" + bytes(7))) == [UnknownType(0x63)]


def test_receive_data_takes_bytearray_and_memoryview() -> None:
    conn = started()
    wire = raw_record(STDOUT, 1, b"ab")
    assert conn.receive_data(bytearray(wire[:9])) == [StdoutData(1, b"a")]
    assert conn.receive_data(memoryview(wire)[9:]) == [StdoutData(1, b"b")]


def test_one_event_per_stream_run_in_a_chunk() -> None:
    conn = started()
    wire = b"".join(raw_record(STDOUT, 1, bytes([i])) for i in range(100)) + end(1)
    assert conn.receive_data(wire) == [StdoutData(1, bytes(range(100))), EndRequest(1, 0, COMPLETE)]


def test_one_byte_at_a_time_gives_the_same_events() -> None:
    conn = started()
    wire = raw_record(STDOUT, 1, b"hello", padding=3) + raw_record(STDERR, 1, b"err") + end(1, 7)
    events = feed(conn, wire, [1] * len(wire))
    assert events == [StdoutData(1, b"hello"), StderrData(1, b"err"), EndRequest(1, 7, COMPLETE)]


def test_a_stream_that_delivered_is_checked_again_once_its_request_ends() -> None:
    conn = started()
    conn.receive_data(raw_record(STDOUT, 1, b"a"))
    conn.receive_data(end(1))
    with pytest.raises(
        RemoteProtocolError, match="STDOUT record \\(1 bytes\\) for request 1, which"
    ):
        conn.receive_data(raw_record(STDOUT, 1, b"b"))


def test_a_stream_that_delivered_is_dropped_once_its_request_is_aborted() -> None:
    conn = started(multiplex=True)
    assert conn.receive_data(raw_record(STDOUT, 1, b"a")) == [StdoutData(1, b"a")]
    conn.abort_request(1)
    assert conn.receive_data(raw_record(STDOUT, 1, b"b") + raw_record(STDOUT, 1, b"c")) == []


def test_a_stream_that_delivered_then_ended_refuses_more() -> None:
    conn = started()
    conn.receive_data(raw_record(STDERR, 1, b"a") + raw_record(STDERR, 1))
    with pytest.raises(
        RemoteProtocolError, match="STDERR record \\(1 bytes\\) for request 1 after"
    ):
        conn.receive_data(raw_record(STDERR, 1, b"b"))


def test_a_dropped_empty_record_at_the_end_of_input_leaves_a_clean_close() -> None:
    conn = started(multiplex=True)
    conn.abort_request(1)
    assert conn.receive_data(end(1)) == [EndRequest(1, 0, COMPLETE)]
    assert conn.receive_data(raw_record(STDOUT, 1)) == []  # Go's late stream end
    assert conn.receive_data(b"") == []
    assert conn.closed


def test_when_every_request_id_is_taken_no_request_can_begin_until_one_ends() -> None:
    conn = ClientConnection(multiplex=True)
    for _ in range(0xFFFF):
        conn.send_request({})
    assert not conn.can_send_request
    with pytest.raises(LocalProtocolError, match="every request id is in use or retired"):
        conn.begin_request()
    conn.data_to_send()
    conn.receive_data(end(300))
    assert conn.begin_request() == 300


def test_a_get_values_query_larger_than_a_record_is_refused() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="does not fit in a record"):
        conn.get_values(["N" * 1000] * 70)
    assert conn.data_to_send() == b""


def test_params_may_be_bytearray_or_memoryview() -> None:
    client = ClientConnection()
    client.send_request([(bytearray(b"NAME"), memoryview(b"value"))])
    records = parse_records(client.data_to_send())
    assert decode_pairs(records[1][2], "params") == [(b"NAME", b"value")]


def test_a_buffer_of_wider_items_is_read_as_its_bytes() -> None:
    import array

    conn = started()
    wire = raw_record(STDOUT, 1, b"abcd") + end(1)
    assert len(wire) % 2 == 0
    items = array.array("H")
    items.frombytes(wire)
    assert conn.receive_data(memoryview(items)) == [
        StdoutData(1, b"abcd"),
        EndRequest(1, 0, COMPLETE),
    ]


def test_a_strided_view_is_read_as_the_bytes_it_shows() -> None:
    conn = started()
    wire = raw_record(STDOUT, 1, b"abcd")
    doubled = bytes(b for byte in wire for b in (byte, 0))
    assert conn.receive_data(memoryview(doubled)[::2]) == [StdoutData(1, b"abcd")]
