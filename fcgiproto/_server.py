"""The application side: what an application hears from a web server, and its answers."""

from __future__ import annotations

import struct
from collections.abc import Collection
from typing import ClassVar

from ._connection import _HEADER, _RUN_BASE, Connection
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    AbortRequest,
    BeginRequest,
    Event,
    FilterData,
    FilterDataEnd,
    StdinData,
    StdinEnd,
    request_head_makers,
    stream_event_maker,
)
from ._records import (
    FCGI_VERSION,
    HEADER,
    STREAM_CHUNK,
    ProtocolStatus,
    RecordType,
    Role,
    decode_pairs,
    decode_params,
    encode_pair,
    encode_stream_records,
    record,
)
from ._state import (
    ABORT,
    BEGIN,
    BEGUN,
    DROP,
    END,
    END_EARLY,
    ENDED,
    GO,
    IDLE,
    OPEN,
    RECEIVE,
    REFUSE,
    SEND,
    SERVER,
    Layout,
    Streams,
    stream_name,
)

__all__ = ["ServerConnection"]

_BEGIN_REQUEST, _ABORT_REQUEST, _END_REQUEST = 1, 2, 3
_PARAMS, _STDIN, _STDOUT, _STDERR, _DATA = 4, 5, 6, 7, 8
_GET_VALUES, _GET_VALUES_RESULT, _UNKNOWN_TYPE = 9, 10, 11
_BEGIN_BODY = struct.Struct(">HB5x")
_END_BODY = struct.Struct(">IB3x")
# What end_request() queues: the empty STDOUT (and STDERR) closing the
# streams, and the END_REQUEST record (header, then _END_BODY), in one pack.
_STDOUT_END = struct.Struct(">BBHHBx BBHHBx IB3x")
_STDOUT_STDERR_END = struct.Struct(">BBHHBx BBHHBx BBHHBx IB3x")
#: ProtocolStatus by value, found as ProtocolStatus() finds it, without its two Python calls.
_PROTOCOL_STATUSES: dict[object, ProtocolStatus] = {status: status for status in ProtocolStatus}
_PADDING = bytes(7)
_RECEIVE_STREAMS = {
    Role.RESPONDER: Layout((_PARAMS,), (_STDIN,)),
    Role.AUTHORIZER: Layout((_PARAMS,), (_STDIN,)),
    Role.FILTER: Layout((_PARAMS,), (_STDIN, _DATA)),
}
_STREAM_END_EVENTS = {_STDIN: StdinEnd, _DATA: FilterDataEnd}
_new_begin_request, _new_params, _new_stdin_end = request_head_makers()

#: CGI environments are a few KiB; nginx caps a whole request head at 32 KiB
#: by default (large_client_header_buffers 4 8k). 1 MiB leaves room for odd
#: deployments while bounding what a hostile client can make us hold.
DEFAULT_MAX_PARAMS_SIZE = 1 << 20
#: nginx's fastcgi_params sends about 20 variables plus one per HTTP header;
#: Apache and lighttpd a few more. Decoding and holding a pair costs far more
#: than its bytes, so 1 MiB of 7-byte pairs (150,000 of them) is refused long
#: before it costs tens of MB and a quarter of a second of CPU.
DEFAULT_MAX_PARAMS_PAIRS = 1000


# The request head's fast path (ServerConnection._request_head), derived from
# the tables once, here and in _Head: a BEGIN_REQUEST that the table lets
# begin leads to BEGUN, its PARAMS and STDIN records leave it there, and its
# streams move as the stream table says.
_BEGIN_STEP = (BEGUN, GO)
_HEAD_RECEIVES = SERVER.steps.get(BEGUN << 3 | RECEIVE) == (BEGUN, GO)
_ROLE_BY_NUMBER = {role.value: role for role in Role}
_BEGIN_PREFIX = _RUN_BASE | _BEGIN_REQUEST << 16
_PARAMS_PREFIX = _RUN_BASE | _PARAMS << 16
_STDIN_PREFIX = _RUN_BASE | _STDIN << 16
_unpack_prefix = struct.Struct(">IHBx").unpack_from
_unpack_begin = _BEGIN_BODY.unpack_from


class _Request:
    """A request in flight: BEGUN or ABORTED in the request table."""

    __slots__ = ("keep_conn", "params", "received", "role", "state", "stderr_used")

    def __init__(self, role: Role, keep_conn: bool) -> None:
        self.state = BEGUN  # where BEGIN leads
        self.role = role
        self.keep_conn = keep_conn
        self.received = Streams(_RECEIVE_STREAMS[role])
        self.params = bytearray()
        self.stderr_used = False


class ServerConnection(Connection):
    """The application's side of one FastCGI connection.

    Answers GET_VALUES from its configuration and unknown record types with
    UNKNOWN_TYPE by itself. A request in a role not in `roles` is ended with
    UNKNOWN_ROLE, a second concurrent one on a connection that does not
    multiplex with CANT_MPX_CONN (unless `serial`), and one past `max_requests` concurrent ones
    with OVERLOADED; none of those produce events.

    With `serial` a connection that does not multiplex still takes a second
    concurrent request (HAProxy with max-reqs sends one even after reading
    FCGI_MPXS_CONNS=0), up to `max_requests`, for the server to answer after
    the first, as php-fpm does; GET_VALUES still says FCGI_MPXS_CONNS=0.
    """

    _STREAMED: ClassVar = {
        _STDIN: stream_event_maker(StdinData),
        _DATA: stream_event_maker(FilterData),
    }
    _WHOLE: ClassVar = frozenset({_BEGIN_REQUEST, _ABORT_REQUEST, _PARAMS, _GET_VALUES})
    _PEER: ClassVar = "client"
    _LIFECYCLE: ClassVar = SERVER
    #: Whether a request head arriving whole takes the fast path (the tests
    #: turn it off in a twin connection, which must behave the same).
    _head_fast: bool = _HEAD_RECEIVES

    def __init__(
        self,
        *,
        roles: Collection[Role] = (Role.RESPONDER, Role.AUTHORIZER, Role.FILTER),
        multiplex: bool = False,
        max_requests: int = 100,
        max_connections: int = 100,
        max_params_size: int = DEFAULT_MAX_PARAMS_SIZE,
        max_params_pairs: int = DEFAULT_MAX_PARAMS_PAIRS,
        serial: bool = False,
    ) -> None:
        super().__init__()
        self.roles = frozenset(Role(role) for role in roles)
        self.multiplex = multiplex
        self.serial = serial
        self.max_requests = max_requests if multiplex or serial else 1
        self.max_connections = max_connections
        self.max_params_size = max_params_size
        self.max_params_pairs = max_params_pairs
        self._requests: dict[int, _Request] = {}
        # Ids whose request ended (or was refused) while the client may still
        # be sending for it, and their state (ENDED or DONE): their records are
        # dropped until a new BEGIN_REQUEST. The others are IDLE.
        self._ended: dict[int, int] = {}
        #: Content bytes of records dropped because their request was over:
        #: body a web server was still sending when the request ended, or more.
        self.dropped_size = 0
        self._closing = False

    @property
    def active_requests(self) -> frozenset[int]:
        """Ids of the requests begun and not yet ended with end_request()."""
        return frozenset(self._requests)

    @property
    def closed(self) -> bool:
        """True once the peer closed, a keep_conn=False request ended, or after a protocol error."""
        return self._error is not None or self._peer_closed or self._closing

    # --- sending ---
    #
    # As on the client, each call checks and encodes before it changes
    # anything, so a call that raises leaves the connection as it was.

    def send_stdout(self, request_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue response bytes (a CGI head, then the body), of any length; b"" queues nothing."""
        self._local_move(request_id, SEND)
        if not data:
            return
        if type(data) is bytes and len(data) <= STREAM_CHUNK:
            # One record (what encode_stream_records makes of it), built here.
            padding = -len(data) & 7
            out = self._out
            out.append(HEADER.pack(FCGI_VERSION, _STDOUT, request_id, len(data), padding))
            out.append(data)
            if padding:
                out.append(_PADDING[:padding])
            return
        self._out.extend(encode_stream_records(_STDOUT, request_id, _frozen(data)))

    def send_stderr(self, request_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for the web server's error log; b"" queues nothing."""
        request = self._local_move(request_id, SEND)[0]
        if data:
            self._out.extend(encode_stream_records(_STDERR, request_id, _frozen(data)))
            request.stderr_used = True

    def end_request(
        self,
        request_id: int,
        app_status: int = 0,
        protocol_status: ProtocolStatus = ProtocolStatus.REQUEST_COMPLETE,
    ) -> None:
        """End the request: close STDOUT (and STDERR if used), then END_REQUEST."""
        current = self._requests.get(request_id)
        move = END if current is None or current.received.all_closed() else END_EARLY
        request, target, _ = self._local_move(request_id, move)
        if not 0 <= app_status <= 0xFFFFFFFF:
            raise LocalProtocolError(f"app_status {app_status} does not fit in 32 bits")
        try:
            status = _PROTOCOL_STATUSES[protocol_status]
        except (KeyError, TypeError):
            status = ProtocolStatus(protocol_status)  # raises ValueError: it is none
        try:
            if request.stderr_used:
                ends = _STDOUT_STDERR_END.pack(
                    FCGI_VERSION, _STDOUT, request_id, 0, 0,
                    FCGI_VERSION, _STDERR, request_id, 0, 0,
                    FCGI_VERSION, _END_REQUEST, request_id, 8, 0, app_status, status,
                )  # fmt: skip
            else:
                ends = _STDOUT_END.pack(
                    FCGI_VERSION, _STDOUT, request_id, 0, 0,
                    FCGI_VERSION, _END_REQUEST, request_id, 8, 0, app_status, status,
                )  # fmt: skip
        except struct.error:
            raise LocalProtocolError(f"app_status {app_status!r} is not an integer") from None
        self._out.append(ends)
        del self._requests[request_id]
        if target != IDLE:  # its late records are dropped; IDLE needs no memory
            self._ended[request_id] = target
        self._settle(request_id, target, None)
        if not request.keep_conn:
            self._closing = True

    def _local_move(self, request_id: int, move: int) -> tuple[_Request, int, int]:
        """The request, and the target and action of our caller's `move`; raises if refused."""
        if self._error is not None or self._peer_closed:
            self._check_sendable()
        request = self._requests.get(request_id)
        state = self._ended.get(request_id, IDLE) if request is None else request.state
        step = SERVER.steps.get(state << 3 | move)
        if step is None:
            raise LocalProtocolError(f"request {request_id} {SERVER.refusal(state, True)}")
        assert request is not None  # only a request in flight has moves of our caller
        return request, step[0], step[1]

    # --- receiving ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; b"" means the peer closed the connection."""
        if (
            type(data) is bytes
            and not self._requests
            and self._state == _HEADER
            and not self._header_buf
            and self._error is None
            and not self._peer_closed
            and self._head_fast
        ):
            events: list[Event] = []
            pos = self._request_head(data, events)
            if pos:
                if pos < len(data):
                    try:
                        self._parse(data, events, pos)
                    except RemoteProtocolError as exc:
                        self._error = str(exc)
                        raise
                return events
        return super().receive_data(data)

    def _request_head(self, data: bytes, events: list[Event]) -> int:
        """Take a request's head in one step, if `data` starts with all of it; where it ended.

        The shape web servers send a request in, in one write: BEGIN_REQUEST,
        PARAMS records, the empty PARAMS, and (when the request has no body)
        the empty STDIN. Taken here, with no request in flight, it has exactly
        the effect the record-by-record path would have (a property test holds
        the two equal); anything else, or anything that path would refuse or
        drop, returns 0 having changed nothing, and goes that way.
        """
        end = len(data)
        if end < 24:
            return 0
        prefix: int
        clen: int
        plen: int
        prefix, clen, plen = _unpack_prefix(data)
        rid = prefix - _BEGIN_PREFIX
        if not 0 < rid <= 0xFFFF or clen != 8:
            return 0
        role_number, flags = _unpack_begin(data, 8)
        if role_number not in self.roles or self.max_requests < 1:
            return 0
        ended = self._ended
        if SERVER.steps.get(ended.get(rid, IDLE) << 3 | BEGIN) != _BEGIN_STEP:
            return 0
        pos = 16 + plen
        # The PARAMS records, whole, up to the empty one.
        params_prefix = _PARAMS_PREFIX | rid
        pieces: list[bytes] = []
        size = 0
        while True:
            if pos + 8 > end:
                return 0
            prefix, clen, plen = _unpack_prefix(data, pos)
            if prefix != params_prefix:
                return 0
            pos += 8
            if not clen:
                pos += plen
                break
            stop = pos + clen
            pieces.append(data[pos:stop])
            size += clen
            pos = stop + plen
        if pos > end or size > self.max_params_size:
            return 0
        content = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pairs = decode_params(content, self.max_params_pairs)
        if pairs is None:
            return 0
        # Nothing refused it: now it happens.
        role = _ROLE_BY_NUMBER[role_number]
        keep_conn = bool(flags & 1)
        ended.pop(rid, None)
        request = self._requests[rid] = _Request(role, keep_conn)
        events.append(_new_begin_request(rid, role, keep_conn))
        events.append(_new_params(rid, pairs))
        # With no other request in flight, no stream of the connection was
        # delivering: the streams that opened are all there is to add.
        head = _HEAD[role]
        if pos + 8 <= end and head.after_stdin is not None:
            prefix, clen, plen = _unpack_prefix(data, pos)
            if prefix == _STDIN_PREFIX | rid and not clen and pos + 8 + plen <= end:
                request.received.states = dict(head.after_stdin)
                for base in head.open_after_stdin:
                    self._delivering.add(base | rid)
                events.append(_new_stdin_end(rid))
                return pos + 8 + plen
        request.received.states = dict(head.after_params)
        for base in head.open_after_params:
            self._delivering.add(base | rid)
        return pos

    def _received(self, rtype: int, rid: int, clen: int, move: int) -> _Request | None:
        """Apply the peer's `move` to request `rid`; the request, or None to drop the record."""
        request = self._requests.get(rid)
        state = self._ended.get(rid, IDLE) if request is None else request.state
        step = SERVER.steps.get(state << 3 | move)
        if step is None:
            raise RemoteProtocolError(
                f"{stream_name(rtype)} record ({clen} bytes) for request {rid}, "
                f"{SERVER.refusal(state, False)}"
            )
        if step[1] == DROP:
            if step[0] == IDLE:  # a crossing ABORT: nothing more can come for it
                del self._ended[rid]
            self.dropped_size += clen
            return None
        assert request is not None  # only a request in flight takes the peer's moves
        request.state = step[0]
        return request

    def _stream_allowed(self, rtype: int, rid: int, clen: int, events: list[Event]) -> bool:
        request = self._received(rtype, rid, clen, RECEIVE)
        if request is None:
            return False
        complaint = request.received.move(rtype, clen == 0)
        if complaint is not None:
            raise RemoteProtocolError(
                f"{stream_name(rtype)} record ({clen} bytes) for request {rid} "
                f"({request.role.name} role) {complaint}"
            )
        if not clen:
            self._settle(rid, request.state, request.received)
            events.append(_STREAM_END_EVENTS[rtype](rid))
        return True

    def _on_record(self, rtype: int, rid: int, content: bytes, events: list[Event]) -> None:
        if rtype == _GET_VALUES:
            self._get_values(rid, content)
            return
        if rid == 0:
            raise RemoteProtocolError(
                f"{stream_name(rtype)} record for request 0, which only management records use"
            )
        if rtype == _BEGIN_REQUEST:
            self._begin(rid, content, events)
            return
        request = self._received(
            rtype, rid, len(content), ABORT if rtype == _ABORT_REQUEST else RECEIVE
        )
        if request is None:
            return
        if rtype == _ABORT_REQUEST:
            self._settle(rid, request.state, request.received)
            events.append(AbortRequest(rid))
        else:
            self._params(rid, request, content, events)

    def _begin(self, rid: int, content: bytes, events: list[Event]) -> None:
        if len(content) != 8:
            raise RemoteProtocolError(
                f"BEGIN_REQUEST for request {rid} with a {len(content)}-byte body; it must be 8"
            )
        role_number, flags = _BEGIN_BODY.unpack(content)
        if role_number not in Role._value2member_map_ or Role(role_number) not in self.roles:
            refusal = ProtocolStatus.UNKNOWN_ROLE
        elif self._requests and not (self.multiplex or self.serial):
            refusal = ProtocolStatus.CANT_MPX_CONN
        elif len(self._requests) >= self.max_requests:
            refusal = ProtocolStatus.OVERLOADED
        else:
            refusal = None
        current = self._requests.get(rid)
        state = self._ended.get(rid, IDLE) if current is None else current.state
        if SERVER.steps.get(state << 3 | (REFUSE if refusal else BEGIN)) is None:
            raise RemoteProtocolError(
                f"BEGIN_REQUEST for request {rid}, {SERVER.refusal(state, False)}"
            )
        if refusal is not None:
            # Its records may still come: dropped until it begins again.
            self._ended[rid] = ENDED
            self._out.append(record(_END_REQUEST, rid, _END_BODY.pack(0, refusal)))
            return
        self._ended.pop(rid, None)
        role, keep_conn = Role(role_number), bool(flags & 1)
        self._requests[rid] = _Request(role, keep_conn)
        # No _settle(): nothing this side streams is open before PARAMS ends,
        # and the id's streams were let go when it last ended (the property
        # tests hold the fast path to the tables).
        events.append(BeginRequest(rid, role, keep_conn))

    def _params(self, rid: int, request: _Request, content: bytes, events: list[Event]) -> None:
        complaint = request.received.move(_PARAMS, not content)
        if complaint is not None:
            raise RemoteProtocolError(
                f"PARAMS record ({len(content)} bytes) for request {rid} {complaint}"
            )
        if content:
            if len(request.params) + len(content) > self.max_params_size:
                raise RemoteProtocolError(
                    f"PARAMS of request {rid} exceed the limit of {self.max_params_size} bytes"
                )
            if len(self._requests) > 1 and (
                sum(len(other.params) for other in self._requests.values()) + len(content)
                > self.max_params_size
            ):
                # Multiplexed requests share the bound: a hundred ids each
                # holding just under it would otherwise hold a hundred times it.
                raise RemoteProtocolError(
                    f"PARAMS held for the requests of this connection exceed the limit "
                    f"of {self.max_params_size} bytes (request {rid})"
                )
            request.params += content
            return
        self._settle(rid, request.state, request.received)  # its end opened STDIN (and DATA)
        content = bytes(request.params)
        pairs = decode_params(content, self.max_params_pairs)
        if pairs is None:  # malformed: decode_pairs raises, saying why
            where = f"PARAMS of request {rid}"
            pairs = dict(decode_pairs(content, where, self.max_params_pairs))
        request.params = bytearray()
        events.append(_new_params(rid, pairs))

    def _get_values(self, rid: int, content: bytes) -> None:
        if rid != 0:
            raise RemoteProtocolError(
                f"GET_VALUES record for request {rid}: management records carry request id 0"
            )
        known = {
            b"FCGI_MAX_CONNS": str(self.max_connections).encode(),
            b"FCGI_MAX_REQS": str(self.max_requests).encode(),
            b"FCGI_MPXS_CONNS": b"1" if self.multiplex else b"0",
        }
        answer = b"".join(
            encode_pair(name, known[name])
            for name, _ in decode_pairs(content, "GET_VALUES")
            if name in known
        )
        self._out.append(record(_GET_VALUES_RESULT, 0, answer))

    def _on_foreign_record(self, rtype: int, rid: int, clen: int) -> None:
        if rtype in RecordType._value2member_map_:
            raise RemoteProtocolError(
                f"{stream_name(rtype)} record ({clen} bytes, request {rid}): "
                "a record type that only an application sends"
            )
        self._out.append(record(_UNKNOWN_TYPE, 0, bytes((rtype,)) + bytes(7)))

    def _on_eof(self) -> None:
        if self._requests:
            ids = ", ".join(map(str, sorted(self._requests)))
            raise RemoteProtocolError(
                f"the client closed the connection with request {ids} in flight"
            )


def _frozen(data: bytes | bytearray | memoryview) -> bytes:
    return data if type(data) is bytes else bytes(data)


class _Head:
    """What the request head's fast path does to a request's streams, from the stream table."""

    __slots__ = ("after_params", "after_stdin", "open_after_params", "open_after_stdin")

    def __init__(self, role: Role) -> None:
        streams = Streams(_RECEIVE_STREAMS[role])
        complaint = streams.move(_PARAMS, True)
        assert complaint is None, complaint
        #: The streams once PARAMS ended, and once an empty STDIN followed
        #: (None where the table refuses that).
        self.after_params = dict(streams.states)
        self.after_stdin = dict(streams.states) if streams.move(_STDIN, True) is None else None
        #: The reader's delivering-set entries (less the request id) of each:
        #: what _settle() makes of a BEGUN request's open streams.
        items = ServerConnection._STREAM_ITEMS
        self.open_after_params = tuple(
            base for rtype, base in items if self.after_params.get(rtype) == OPEN
        )
        after_stdin = self.after_stdin or {}
        self.open_after_stdin = tuple(
            base for rtype, base in items if after_stdin.get(rtype) == OPEN
        )


assert BEGUN in SERVER.delivering_states  # what _Head's delivering entries assume
_HEAD = {role: _Head(role) for role in Role}
