"""The client side: what a web server says to an application, and what it hears back."""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable
from typing import ClassVar

from ._connection import Connection
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    Event,
    GetValuesResult,
    StderrData,
    StdoutData,
    UnknownType,
    end_request_maker,
    stream_event_maker,
)
from ._records import (
    FCGI_VERSION,
    HEADER,
    STREAM_CHUNK,
    ParamsInput,
    ProtocolStatus,
    RecordType,
    Role,
    decode_pairs,
    encode_pair,
    encode_pair_records,
    encode_stream_records,
    record,
    to_bytes,
)
from ._state import (
    ABORT,
    BEGUN,
    CLIENT,
    DROP,
    END,
    END_EARLY,
    IDLE,
    RECEIVE,
    RETIRED,
    SEND,
    STRAND,
    Layout,
    Streams,
    stream_name,
)

__all__ = ["ClientConnection"]

_BEGIN_REQUEST, _ABORT_REQUEST, _END_REQUEST = 1, 2, 3
_PARAMS, _STDIN, _STDOUT, _STDERR, _DATA = 4, 5, 6, 7, 8
_GET_VALUES, _GET_VALUES_RESULT, _UNKNOWN_TYPE = 9, 10, 11
_MAX_REQUEST_ID = 0xFFFF
_END_BODY = struct.Struct(">IB3x")
_BEGIN_BODY = struct.Struct(">HB5x")
#: A whole BEGIN_REQUEST record (header and body) in one pack.
_BEGIN_RECORD = struct.Struct(">BBHHBxHB5x")
#: The empty records that end two streams, back to back (PARAMS then STDIN).
_TWO_EMPTY = struct.Struct(">BBH4xBBH4x")

_SEND_STREAMS = {
    Role.RESPONDER: Layout((_PARAMS,), (_STDIN,)),
    Role.AUTHORIZER: Layout((_PARAMS,), (_STDIN,)),
    Role.FILTER: Layout((_PARAMS,), (_STDIN,), (_DATA,)),
}
_RECEIVE_STREAMS = Layout((_STDOUT, _STDERR))


def _sent_whole(layout: Layout) -> dict[int, int]:
    """The send streams of a request once send_request() has ended PARAMS and STDIN."""
    streams = Streams(layout)
    streams.move(_PARAMS, True)
    streams.move(_STDIN, True)
    return streams.states


_SENT_WHOLE = {role: _sent_whole(layout) for role, layout in _SEND_STREAMS.items()}
_PROTOCOL_STATUSES = tuple(ProtocolStatus)
_new_end_request = end_request_maker()


class _Request:
    """A request in flight: BEGUN or ABORTED in the request table."""

    __slots__ = ("keep_conn", "received", "role", "sent", "state")

    def __init__(self, role: Role, keep_conn: bool) -> None:
        self.state = BEGUN  # where (IDLE, BEGIN) leads
        self.role = role
        self.keep_conn = keep_conn
        self.sent = Streams(_SEND_STREAMS[role])
        self.received = Streams(_RECEIVE_STREAMS)


class ClientConnection(Connection):
    """The web server's side of one FastCGI connection.

    With ``multiplex=False`` (the default, and what php-fpm needs) one request
    is in flight at a time, always with request id 1. With ``multiplex=True``
    many are, each taking the lowest free id.
    """

    _STREAMED: ClassVar = {
        _STDOUT: stream_event_maker(StdoutData),
        _STDERR: stream_event_maker(StderrData),
    }
    _WHOLE: ClassVar = frozenset({_END_REQUEST, _GET_VALUES_RESULT, _UNKNOWN_TYPE})
    _PEER: ClassVar = "application"
    _LIFECYCLE: ClassVar = CLIENT

    def __init__(self, multiplex: bool = False) -> None:
        super().__init__()
        self.multiplex = multiplex
        self._requests: dict[int, _Request] = {}
        self._free_ids: list[int] = []  # heap of ids below _next_id that are free again
        self._next_id = 1
        self._retired: set[int] = set()
        self._closing = False  # a keep_conn=False request has begun
        self._unreusable: str | None = None
        self._values_pending = 0
        self._after_values_result = False

    # --- state ---

    @property
    def active_requests(self) -> frozenset[int]:
        """Ids of the requests in flight (an aborted one until its END_REQUEST)."""
        return frozenset(self._requests)

    @property
    def closed(self) -> bool:
        """True once the peer closed, a keep_conn=False request ended, or after a protocol error."""
        return (
            self._error is not None or self._peer_closed or (self._closing and not self._requests)
        )

    @property
    def can_send_request(self) -> bool:
        """Whether begin_request() would succeed now."""
        return self._refusal() is None

    def _refusal(self) -> str | None:
        if self.closed:
            return "the connection is closed"
        if self._closing:
            return "a keep_conn=False request is in flight; the application closes after it"
        if self._unreusable:
            return self._unreusable
        if self._requests and not self.multiplex:
            (rid,) = self._requests
            return f"request {rid} is in flight and the connection is not multiplexed"
        if not self._free_ids and self._next_id > _MAX_REQUEST_ID:
            return "every request id is in use or retired"
        return None

    # --- sending ---
    #
    # Each call checks everything (its arguments, the tables) and encodes
    # what it will queue before it changes anything, so a call that raises
    # leaves the connection exactly as it was.

    def begin_request(self, role: Role = Role.RESPONDER, keep_conn: bool = True) -> int:
        """Start a request; returns its id, the lowest one free."""
        role = self._check_begin(role, keep_conn)
        rid = self._free_ids[0] if self._free_ids else self._next_id
        begin = record(_BEGIN_REQUEST, rid, _BEGIN_BODY.pack(role, 1 if keep_conn else 0))
        self._begin(rid, _Request(role, keep_conn))
        self._out.append(begin)
        return rid

    def send_params(self, request_id: int, params: ParamsInput) -> None:
        """Queue name/value pairs (str is sent as UTF-8, bytes as they are)."""
        request = self._sendable(request_id, _PARAMS, False)
        records = encode_pair_records(_PARAMS, request_id, params)
        request.sent.move(_PARAMS, False)
        self._out.extend(records)

    def end_params(self, request_id: int) -> None:
        """Queue the empty PARAMS record that ends the name/value pairs."""
        self._end_stream(request_id, _PARAMS)

    def send_stdin(self, request_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue request body bytes, of any length; b"" queues nothing."""
        self._send_stream(request_id, _STDIN, data)

    def end_stdin(self, request_id: int) -> None:
        """Queue the empty STDIN record that ends the request body."""
        self._end_stream(request_id, _STDIN)

    def send_data(self, request_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue FCGI_DATA bytes (filter role, after end_stdin)."""
        self._send_stream(request_id, _DATA, data)

    def end_data(self, request_id: int) -> None:
        """Queue the empty FCGI_DATA record that ends the filter data."""
        self._end_stream(request_id, _DATA)

    def send_request(
        self,
        params: ParamsInput,
        stdin: bytes | bytearray | memoryview = b"",
        role: Role = Role.RESPONDER,
        keep_conn: bool = True,
        data: bytes | bytearray | memoryview | None = None,
    ) -> int:
        """A whole request in one call: begin, params, stdin (and, for a filter, data).

        For the filter role the DATA stream is sent and ended when `data` is
        given, and left open otherwise.
        """
        role = self._check_begin(role, keep_conn)
        rid = self._free_ids[0] if self._free_ids else self._next_id
        # The request is built, encoded and its streams moved before it is
        # registered: a refusal on the way leaves the connection untouched.
        request = _Request(role, keep_conn)
        sent = request.sent
        out: list[bytes | memoryview] = [
            _BEGIN_RECORD.pack(FCGI_VERSION, _BEGIN_REQUEST, rid, 8, 0, role, 1 if keep_conn else 0)
        ]
        out += encode_pair_records(_PARAMS, rid, params)
        if stdin:
            out.append(_empty(_PARAMS, rid))
            out += encode_stream_records(_STDIN, rid, _frozen(stdin))
            out.append(_empty(_STDIN, rid))
        else:
            out.append(_TWO_EMPTY.pack(FCGI_VERSION, _PARAMS, rid, FCGI_VERSION, _STDIN, rid))
        if data is None:
            # Where the moves below lead from a fresh request, worked out once.
            sent.states = dict(_SENT_WHOLE[role])
        else:
            sent.move(_PARAMS, True)
            sent.move(_STDIN, True)
            self._check_stream(rid, request, _DATA, False)
            if data:
                out += encode_stream_records(_DATA, rid, _frozen(data))
            out.append(_empty(_DATA, rid))
            sent.move(_DATA, True)
        self._begin(rid, request)
        self._out += out
        return rid

    def abort_request(self, request_id: int) -> None:
        """Ask the application to abort; the id stays taken until its END_REQUEST.

        After that the id is retired: a late reply for it is dropped. Output
        for the request that arrives meanwhile is dropped too. Aborting twice
        does nothing more.
        """
        request, target, action = self._local_move(request_id, ABORT)
        if action == DROP:
            return
        request.state = target
        self._settle(request_id, target, request.received)
        self._out.append(record(_ABORT_REQUEST, request_id))

    def get_values(self, names: Iterable[str | bytes]) -> None:
        """Ask for management variables such as FCGI_MPXS_CONNS; see GetValuesResult."""
        self._check_sendable()
        content = b"".join(encode_pair(to_bytes(name, "a variable name"), b"") for name in names)
        if len(content) > STREAM_CHUNK - 8:
            raise LocalProtocolError(f"GET_VALUES of {len(content)} bytes does not fit in a record")
        self._values_pending += 1
        # Never without padding: libfcgi (fcgiapp.c 2.4.x, so fcgiwrap and every
        # fcgiapp.h program) reads the pairs until the record ends and notices
        # the end only when padding or more input follows the content; it
        # never answers a bare 48-byte question for the three standard names.
        padding = -len(content) & 7 or 8
        self._out.append(
            HEADER.pack(FCGI_VERSION, _GET_VALUES, 0, len(content), padding)
            + content
            + bytes(padding)
        )

    def _check_begin(self, role: Role, keep_conn: bool) -> Role:
        role = self._check_role(role)
        refusal = self._refusal()
        if refusal is not None:
            raise LocalProtocolError(f"cannot begin a request: {refusal}")
        if not keep_conn and self._requests:
            raise LocalProtocolError(
                "cannot begin a keep_conn=False request while others are in flight: "
                "the application would close the connection under them"
            )
        return role

    def _begin(self, rid: int, request: _Request) -> None:
        """Register a checked request under `rid`, the lowest free id."""
        if self._free_ids:
            heapq.heappop(self._free_ids)
        else:
            self._next_id += 1
        self._requests[rid] = request
        self._closing = not request.keep_conn
        self._settle(rid, request.state, request.received)

    def _local_move(self, request_id: int, move: int) -> tuple[_Request, int, int]:
        """The request, and the target and action of our caller's `move`; raises if refused."""
        if self._error is not None or self._peer_closed:
            self._check_sendable()
        request = self._requests.get(request_id)
        if request is None:
            state = RETIRED if request_id in self._retired else IDLE
        else:
            state = request.state
        step = CLIENT.steps.get(state << 3 | move)
        if step is None:
            raise LocalProtocolError(f"request {request_id} {CLIENT.refusal(state, True)}")
        assert request is not None  # only a request in flight has moves of our caller
        return request, step[0], step[1]

    def _check_stream(self, request_id: int, request: _Request, rtype: int, end: bool) -> None:
        complaint = request.sent.check(rtype, end)
        if complaint is not None:
            action = "end" if end else "data"
            raise LocalProtocolError(
                f"{stream_name(rtype)} {action} for request {request_id} "
                f"({request.role.name} role) {complaint}"
            )

    def _sendable(self, request_id: int, rtype: int, end: bool) -> _Request:
        """The request, once both tables allow sending on its stream `rtype`; changes nothing."""
        request = self._local_move(request_id, SEND)[0]
        self._check_stream(request_id, request, rtype, end)
        return request

    def _send_stream(
        self, request_id: int, rtype: int, data: bytes | bytearray | memoryview
    ) -> None:
        request = self._sendable(request_id, rtype, False)
        if data:
            self._out.extend(encode_stream_records(rtype, request_id, _frozen(data)))
        request.sent.move(rtype, False)

    def _end_stream(self, request_id: int, rtype: int) -> None:
        request = self._sendable(request_id, rtype, True)
        request.sent.move(rtype, True)
        self._out.append(_empty(rtype, request_id))

    @staticmethod
    def _check_role(role: Role | int) -> Role:
        if type(role) is Role:
            return role
        try:
            return Role(role)
        except ValueError:
            raise LocalProtocolError(f"unknown role {role!r}") from None

    # --- receiving ---

    def _stream_allowed(self, rtype: int, rid: int, clen: int, events: list[Event]) -> bool:
        request = self._requests.get(rid)
        state = (RETIRED if rid in self._retired else IDLE) if request is None else request.state
        step = CLIENT.steps.get(state << 3 | RECEIVE)
        if step is None:
            raise RemoteProtocolError(
                f"{stream_name(rtype)} record ({clen} bytes) for request {rid}, "
                f"{CLIENT.refusal(state, False)}"
            )
        if step[1] == DROP:
            return False
        assert request is not None  # only a request in flight receives
        complaint = request.received.move(rtype, clen == 0)
        if complaint is not None:
            raise RemoteProtocolError(
                f"{stream_name(rtype)} record ({clen} bytes) for request {rid} {complaint}"
            )
        if not clen:
            self._settle(rid, state, request.received)
        return True

    def _on_record(self, rtype: int, rid: int, content: bytes, events: list[Event]) -> None:
        if rtype == _END_REQUEST:
            self._end_request(rid, content, events)
        else:
            if rid != 0:
                raise RemoteProtocolError(
                    f"{stream_name(rtype)} record for request {rid}: "
                    "management records carry request id 0"
                )
            if rtype == _UNKNOWN_TYPE:
                if len(content) != 8:
                    raise RemoteProtocolError(
                        f"UNKNOWN_TYPE record with a {len(content)}-byte body; it must be 8"
                    )
                events.append(UnknownType(content[0]))
            else:
                self._values_result(content, events)

    def _values_result(self, content: bytes, events: list[Event]) -> None:
        pairs = decode_pairs(content, "GET_VALUES_RESULT")
        # Go's server follows every result with an empty one, written
        # separately, so other records may come between the two.
        after_result, self._after_values_result = self._after_values_result, bool(pairs)
        if not pairs and (after_result or not self._values_pending):
            return
        self._values_pending = max(0, self._values_pending - 1)
        values = {name.decode("latin-1"): value.decode("latin-1") for name, value in pairs}
        events.append(GetValuesResult(values))

    def _end_request(self, rid: int, content: bytes, events: list[Event]) -> None:
        request = self._requests.get(rid)
        state = (RETIRED if rid in self._retired else IDLE) if request is None else request.state
        move = END if request is None or request.sent.all_closed() else END_EARLY
        step = CLIENT.steps.get(state << 3 | move)
        if step is None:
            raise RemoteProtocolError(
                f"END_REQUEST record ({len(content)} bytes) for request {rid}, "
                f"{CLIENT.refusal(state, False)}"
            )
        target, action = step
        if action == DROP:
            return
        if len(content) != 8:
            raise RemoteProtocolError(
                f"END_REQUEST for request {rid} with a {len(content)}-byte body; it must be 8"
            )
        app_status, status = _END_BODY.unpack(content)
        if status >= len(_PROTOCOL_STATUSES):
            raise RemoteProtocolError(
                f"END_REQUEST for request {rid} with unknown protocol status {status}"
            )
        del self._requests[rid]
        self._settle(rid, target, None)
        if target == RETIRED:
            # A late reply may still follow (Go's server sends one): never reuse the id.
            self._retired.add(rid)
        else:
            heapq.heappush(self._free_ids, rid)
        if action == STRAND and not self.multiplex:
            self._unreusable = (
                f"request {rid} ended before its input was sent whole; the application "
                "may still read it, so the connection cannot carry another request"
            )
        events.append(_new_end_request(rid, app_status, _PROTOCOL_STATUSES[status]))

    def _on_foreign_record(self, rtype: int, rid: int, clen: int) -> None:
        if rtype in RecordType._value2member_map_:
            what = "a record type that only a client sends"
        else:
            what = "not a record type an application sends"
        raise RemoteProtocolError(
            f"{stream_name(rtype)} record ({clen} bytes, request {rid}): {what}"
        )

    def _on_eof(self) -> None:
        if self._requests:
            ids = ", ".join(map(str, sorted(self._requests)))
            raise RemoteProtocolError(
                f"the application closed the connection with request {ids} in flight"
            )


def _empty(rtype: int, rid: int) -> bytes:
    return HEADER.pack(FCGI_VERSION, rtype, rid, 0, 0)


def _frozen(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    # Queued pieces are referenced until data_to_send(): freeze mutable buffers
    # so that a caller reusing theirs cannot change what goes on the wire.
    return data if type(data) is bytes else bytes(data)
