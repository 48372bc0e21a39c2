# Generated from fcgiproto_anyio/_client.py by scripts/generate_sync.py: do not edit.
"""The client: pooled keep-alive connections to one application, multiplexing when it can.

Written once, async, for both clients: fcgiproto_socket/_client.py, the
blocking Client, is generated from this file by scripts/generate_sync.py, and CI
fails when the copy is stale. What differs between the two faces (locks,
events, the clock, background tasks or threads, the transport) comes from
_primitives and the backend; the control flow here is the same for both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType

from fcgiproto import (
    EndRequest,
    Event,
    GetValuesResult,
    LocalProtocolError,
    ParamsInput,
    PoolTimeout,
    ReadError,
    ReadTimeout,
    Role,
    TransportError,
    WriteError,
)
from fcgiproto.support import (
    DEFAULT_MAX_RESPONSE_SIZE,
    AddressInput,
    Deadline,
    PoolState,
    Response,
    ResponseState,
    Timeout,
    TimeoutInput,
    WholeAnswer,
    parse_address,
    probe_wait,
)

from ._backend import SocketBackend
from ._connection import Connection
from ._interface import NetworkBackend
from ._mux import Inbox, MuxConnection
from ._primitives import (
    Background,
    Body,
    BodyPieces,
    Flag,
    Lock,
    NextChunk,
    Refill,
    StateLock,
    current_time,
    shield,
)

__all__ = ["MANAGEMENT_VARIABLES", "Client", "StreamResponse"]

MANAGEMENT_VARIABLES = ("FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS")
#: How long a body that cannot be sent twice waits, once, for an application
#: not yet seen to keep connections to close a reused one (uWSGI closes
#: within microseconds of its answer; the client can be faster than that).
CLOSE_GRACE = 0.05
#: The reaper's shortest wait: a connection may close this much past its expiry.
REAP_SLACK = 0.001
DEFAULT_TIMEOUT = Timeout()


class Client:
    """Talks to one FastCGI application, keeping connections alive between requests.

    max_connections caps the connections that carry one request at a time
    (keep it no larger than php-fpm's pm.max_children: each idle kept-alive
    connection pins a worker); max_keepalive caps the idle ones;
    keepalive_expiry closes connections idle longer than that many seconds.

    multiplex=None asks the application (GET_VALUES) before the first request
    whether it multiplexes; if it does, concurrent request() calls share one
    connection. True or False decides without asking. stream() always has a
    connection of its own, for the transport's flow control.

    max_response_size bounds what the client holds of one answer: the stdout
    and, separately, the stderr that request() gathers, and what stream()
    keeps unread (see its docstring). One byte more raises ResponseTooLarge
    as it arrives and gives the request up (its connection closed, or the
    request aborted on a shared connection); 0 means no limit. Each call may
    override it.

    backend= is the transport (see NetworkBackend): sockets by default.

    The client asks the application to keep each connection (FCGI_KEEP_CONN)
    unless max_keepalive is 0, or the application has shown that it closes
    connections after every response anyway (uWSGI does): one that closed
    after its first response before any connection carried a second. From
    then on each request has a connection of its own, so none is lost to a
    connection closing under it.
    """

    def __init__(
        self,
        address: AddressInput,
        *,
        max_connections: int = 10,
        max_keepalive: int | None = None,
        keepalive_expiry: float = 5.0,
        multiplex: bool | None = None,
        timeout: TimeoutInput = DEFAULT_TIMEOUT,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        backend: NetworkBackend | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_response_size = _check_size(max_response_size)
        self.address = parse_address(address)
        self.timeout = Timeout.of(timeout)
        self.max_connections = max_connections
        self.max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self.multiplex = multiplex
        self.backend: NetworkBackend = SocketBackend() if backend is None else backend
        self._pool: PoolState[Connection] = PoolState(
            max_connections, self.max_keepalive, keepalive_expiry
        )
        self._lock = StateLock()  # the pool's bookkeeping and its queue
        self._queue: deque[Flag] = deque()  # callers waiting, first come first served
        self._background = Background()
        self._reaper_running = False
        self._reaper_wake = Flag()
        self._probe_lock = Lock()
        self._mux_lock = Lock()
        self._mux: MuxConnection | None = None
        self._retired: list[MuxConnection] = []  # replaced, closed once their requests end
        # Whether to ask for FCGI_KEEP_CONN, and whether some connection has
        # carried a second request, which proves the application keeps them.
        self.keep_conn = self.max_keepalive > 0
        self._kept_one = False

    def __enter__(self) -> Client:
        self._background.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        self._background.__exit__(exc_type, exc, tb)

    # --- public calls ---

    def request(
        self,
        params: ParamsInput,
        stdin: Body = b"",
        *,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
        max_response_size: int | None = None,
    ) -> Response:
        """Send a request and read its whole response.

        On an application that multiplexes, concurrent requests share one
        connection. Its stdout and its stderr may each hold max_response_size
        bytes (None: the client's; 0: no limit); one more raises ResponseTooLarge
        as it arrives, and the request is given up.
        """
        limits = self._limits(timeout)
        max_size = self._max_size(max_response_size)
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            if self.multiplex is False:
                return self._request_whole(params, bytes(stdin), role, limits, max_size)
            if self.multiplex:
                return self._request_shared(params, bytes(stdin), role, limits, max_size)
        with StreamResponse(
            self, params, stdin, role, limits, max_size, shared=True, whole=True
        ) as r:
            return r._read_whole()

    def _request_whole(
        self, params: ParamsInput, body: bytes, role: Role, limits: Timeout, max_size: int
    ) -> Response:
        """request() on a connection of its own, with the body at hand: the hot path.

        What AsyncStreamResponse does, without its iterators and queues.
        """
        deadline = Deadline(limits.total, current_time)
        for attempt in (1, 2):
            conn, reused = self._acquire(deadline, limits)
            answer = WholeAnswer(max_size, conn.address)
            end: EndRequest | None = None
            try:
                conn.proto.send_request(params, body, role=role, keep_conn=self.keep_conn)
                conn.queue()
                while end is None:
                    events = conn.exchange(deadline, limits.read, limits.write)
                    end = answer.take(events)
            except (ReadError, WriteError):
                self._discard(conn)
                if reused and not answer.got_output:
                    self._closed_under_us()
                # The retry rule of AsyncStreamResponse._start: an idle
                # connection the application closed, and no byte of an answer.
                if reused and attempt == 1 and not answer.got_output:
                    continue
                raise
            except BaseException:
                # ResponseTooLarge too: the rest of the answer is still coming.
                self._discard(conn)
                raise
            if reused:
                self._kept_one = True
            self._finish_solo(conn, True, deadline, limits)
            return answer.response(end)
        raise AssertionError("unreachable")

    def _request_shared(
        self, params: ParamsInput, body: bytes, role: Role, limits: Timeout, max_size: int
    ) -> Response:
        """request() on the shared connection, with the body at hand: the hot path.

        What AsyncStreamResponse does on a _MuxExchange, without its iterators,
        and with no shielded scope unless the request ends early.
        """
        deadline = Deadline(limits.total, current_time)
        for attempt in (1, 2):
            self._check_open()
            mux = self._mux
            if mux is not None and mux.usable and not mux.expired():
                reused = True
            else:
                exchange = self._mux_exchange(deadline, limits)
                mux, reused = exchange.mux, exchange.reused
            answer = WholeAnswer(max_size, mux.address)
            inbox: Inbox | None = None
            rid = 0
            end: EndRequest | None = None
            try:
                rid, inbox = mux.begin(params, body, role, deadline, limits.write, max_size)
                while end is None:
                    end = answer.take(mux.events(inbox, deadline, limits.read), rid)
            except BaseException as exc:
                with shield():
                    if inbox is not None:
                        mux.finish(rid, inbox)  # aborts it while in flight
                    self._mux_done(mux)
                # The retry rule of AsyncStreamResponse._start: a kept connection
                # found closed, and no byte of an answer.
                if (
                    isinstance(exc, (ReadError, WriteError))
                    and reused
                    and attempt == 1
                    and not answer.got_output
                ):
                    continue
                raise
            # Ended: finishing writes nothing, and nothing here can be cut short.
            mux.finish(rid, inbox)
            if mux is not self._mux:
                with shield():
                    self._reap_retired()
            return answer.response(end)
        raise AssertionError("unreachable")

    def stream(
        self,
        params: ParamsInput,
        stdin: Body = b"",
        *,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
        max_response_size: int | None = None,
    ) -> StreamResponse:
        """A request whose body is sent and whose response is read in constant memory.

        Use it as a context manager: status and headers are there on entry,
        and leaving early closes the connection. A stream has a connection of
        its own even when the application multiplexes: FastCGI has no flow
        control per request, so on a shared connection a slow reader would
        either hold up the other requests or have its response buffered
        whole. Its own connection gives it the transport's.

        The client reads from the connection only when the caller asks for
        more, so a slow reader slows the application down. What arrives on
        the stream not being read waits: stderr while the body is read (in
        the `stderr` bytearray, until the stderr iterator takes it or the
        caller empties it between body chunks), stdout while stderr is read.
        Each may hold max_response_size bytes (None: the client's; 0: no
        limit); one more raises ResponseTooLarge, and the request is given up.
        """
        return StreamResponse(
            self,
            params,
            stdin,
            role,
            self._limits(timeout),
            self._max_size(max_response_size),
            shared=False,
            read_head=True,
        )

    def get_values(
        self, names: Iterable[str] = MANAGEMENT_VARIABLES, *, timeout: TimeoutInput | None = None
    ) -> dict[str, str]:
        """Ask the application for management variables (FCGI_MPXS_CONNS, ...)."""
        limits = self._limits(timeout)
        deadline = Deadline(limits.total, current_time)
        if self.multiplex:
            exchange = self._mux_exchange(deadline, limits)
            try:
                result = exchange.mux.get_values(list(names), deadline, limits.read)
                return dict(result.values)
            finally:
                exchange.finish(True, deadline, limits)
        return self._solo_get_values(list(names), deadline, limits, limits.read)

    def close(self) -> None:
        """Close idle connections now, and the others when their requests end."""
        with shield():
            with self._lock:
                idle = self._pool.close()
                for waiter in self._queue:
                    waiter.set()  # to find the client closed
                self._reaper_wake.set()
            for conn in idle:
                conn.close()
            with self._mux_lock:
                muxes = [*self._retired, *([self._mux] if self._mux else [])]
                self._mux, self._retired = None, []
            for mux in muxes:
                mux.close()
            self._background.join()

    # --- choosing a connection ---

    def _limits(self, timeout: TimeoutInput | None) -> Timeout:
        return self.timeout if timeout is None else Timeout.of(timeout)

    def _max_size(self, max_response_size: int | None) -> int:
        if max_response_size is None:
            return self.max_response_size
        return _check_size(max_response_size)

    def _check_open(self) -> None:
        if self._pool.closed:
            raise LocalProtocolError(f"the client for {self.address} is closed")
        self._background.check()

    def _exchange(
        self, deadline: Deadline, limits: Timeout, shared: bool
    ) -> _SoloExchange | _MuxExchange:
        self._check_open()
        if shared and self.multiplex is None:
            self._decide_multiplex(deadline, limits)
        if shared and self.multiplex:
            return self._mux_exchange(deadline, limits)
        conn, reused = self._acquire(deadline, limits)
        return _SoloExchange(self, conn, reused)

    def _decide_multiplex(self, deadline: Deadline, limits: Timeout) -> None:
        """Ask the application once whether it multiplexes (FCGI_MPXS_CONNS)."""
        with self._probe_lock:
            self._check_open()
            if self.multiplex is not None:
                return
            wait = probe_wait(limits, deadline)
            try:
                values = self._solo_get_values(["FCGI_MPXS_CONNS"], deadline, limits, wait)
            except ReadTimeout:
                if deadline.limit(None)[0] == 0:
                    raise
                values = {}
            self.multiplex = values.get("FCGI_MPXS_CONNS") == "1"
            if self.multiplex:
                # Requests will share one connection from now on; streams
                # open their own when they come.
                with self._lock:
                    idle = self._pool.take_idle()
                with shield():
                    for conn in idle:
                        conn.close()

    def _mux_exchange(self, deadline: Deadline, limits: Timeout) -> _MuxExchange:
        with self._mux_lock:
            self._check_open()
            mux = self._mux
            if mux is not None and mux.usable and not mux.expired():
                return _MuxExchange(self, mux, reused=True)
            if mux is not None:
                self._retired.append(mux)
            self._mux = None
            stream = self.backend.connect(self.address, deadline.limit(limits.connect)[0])
            conn = Connection(stream, self.address, multiplex=True)
            self._mux = mux = MuxConnection(conn, self.keepalive_expiry)
            self._background.start(mux.read_loop, name=f"fcgiproto reader {self.address}")
        self._reap_retired()
        return _MuxExchange(self, mux, reused=False)

    def _mux_done(self, mux: MuxConnection) -> None:
        if mux is not self._mux:
            self._reap_retired()

    def _reap_retired(self) -> None:
        """Close the replaced shared connections whose requests have all ended."""
        with self._mux_lock:
            done = [mux for mux in self._retired if mux.idle]
            self._retired = [mux for mux in self._retired if not mux.idle]
        with shield():
            for mux in done:
                mux.close()

    def _solo_get_values(
        self, names: list[str], deadline: Deadline, limits: Timeout, wait: float | None
    ) -> dict[str, str]:
        conn, _ = self._acquire(deadline, limits)
        try:
            conn.proto.get_values(names)
            conn.queue()
            while True:
                for event in conn.exchange(deadline, wait, limits.write):
                    if isinstance(event, GetValuesResult):
                        self._release(conn)
                        return dict(event.values)
        except BaseException:
            self._discard(conn)
            raise

    # --- the pool of connections that carry one request at a time ---

    def _acquire(self, deadline: Deadline, limits: Timeout) -> tuple[Connection, bool]:
        """An idle connection (True) or a new one (False), within the pool limit.

        Waiters are served in the order they came: a caller that releases a
        connection cannot take it straight back past those waiting for one,
        which under contention left some waiting out their pool timeout.
        """
        wait, _ = deadline.limit(limits.pool)
        give_up: float | None = None  # when the pool timeout runs out, once this caller waits
        ticket: Flag | None = None  # this caller's turn, once it queues
        while True:
            with self._lock:
                self._check_open()
                conn, may_open = None, False
                stale: list[Connection] = []
                if ticket is not None:
                    ticket.clear()
                if not self._queue or self._queue[0] is ticket:
                    conn, may_open, stale = self._pool.acquire(current_time())
                if conn is not None or may_open:
                    if ticket is not None:
                        self._queue.popleft()
                        self._wake_next()  # there may be more to have
                elif ticket is None:
                    ticket = Flag()
                    self._queue.append(ticket)
            if stale:
                with shield():
                    for old in stale:
                        old.close()
            if conn is not None:
                # Checked even when released moments ago: an application that
                # wrote to it since (garbage, a second END_REQUEST) would
                # otherwise answer the next request with the last one's leftovers.
                if conn.stream.looks_alive():
                    return conn, True
                self._closed_under_us()
                self._discard(conn)
                ticket = None
                continue
            if may_open:
                break
            assert ticket is not None
            if give_up is None and wait is not None:
                give_up = current_time() + wait
            left = None if give_up is None else give_up - current_time()
            if (left is not None and left <= 0) or not self._wait_turn(ticket, left):
                with self._lock:
                    if ticket in self._queue:
                        self._queue.remove(ticket)
                    self._wake_next()
                raise PoolTimeout(
                    f"no connection to {self.address} became free within {wait}s "
                    f"({self.max_connections} in use)"
                )
        try:
            stream = self.backend.connect(self.address, deadline.limit(limits.connect)[0])
        except BaseException:
            with self._lock:
                self._pool.open_failed()
                self._wake_next()
            raise
        return Connection(stream, self.address, multiplex=False), False

    def _wait_turn(self, ticket: Flag, left: float | None) -> bool:
        """Wait for a release to wake this caller; False when the pool timeout ran out."""
        try:
            return ticket.wait(left)
        except BaseException:
            with self._lock:  # cancelled: let the next in line look instead
                if ticket in self._queue:
                    self._queue.remove(ticket)
                self._wake_next()
            raise

    def _release(self, conn: Connection) -> None:
        """Return a connection in a known-clean state for reuse."""
        with self._lock:
            to_close = self._pool.release(conn, current_time())
            self._wake_next()
            start_reaper = not to_close and not self._reaper_running
            self._reaper_running = self._reaper_running or start_reaper
        if start_reaper:
            self._background.start(self._reap_idle, name=f"fcgiproto idle {self.address}")
        if to_close:
            with shield():
                for old in to_close:
                    old.close()

    def _finish_solo(
        self, conn: Connection, ended: bool, deadline: Deadline, limits: Timeout
    ) -> None:
        """Give a connection of its own back after a request, or close it."""
        if ended and conn.proto.can_send_request and not conn.write_failed:
            if conn.flushed:
                self._release(conn)
                return
            try:
                # The application may answer before it has all of the body
                # (php-fpm does once it has CONTENT_LENGTH bytes): the rest,
                # often only the empty STDIN record, goes out before reuse.
                with shield():
                    conn.flush(deadline, limits.write)
            except TransportError:
                pass
            else:
                self._release(conn)
                return
        self._discard(conn)

    def _discard(self, conn: Connection) -> None:
        with shield():
            conn.close()
            with self._lock:
                self._pool.discard()
                self._wake_next()

    def _closed_under_us(self) -> None:
        """An idle connection was found closed by the application.

        Before any connection has carried a second request, that is an
        application that closes after every response whatever FCGI_KEEP_CONN
        says: stop asking, and stop reusing what it will close.
        """
        if not self._kept_one:
            self.keep_conn = False

    def _wake_next(self) -> None:
        """Let the first caller waiting for a connection look again (lock held)."""
        if self._queue:
            self._queue[0].set()

    def _reap_idle(self) -> None:
        """Close idle connections as they expire, without waiting for the next call.

        An idle kept-alive connection pins a php-fpm worker; one the client will
        not reuse must give it back. Runs while connections are open: with
        none idle it looks again after keepalive_expiry, when the first one
        released since could expire at the earliest (with no expiry to wait
        for, it ends, and the next release starts it). Ending there cost
        the async client a task per request, started at one release and gone
        by the next, since the task first runs once its connection is taken
        again.
        """
        while True:
            with self._lock:
                due = self._pool.next_expiry()
                none_to_expire = not self._pool.open or self.keepalive_expiry <= 0
                if self._pool.closed or (due is None and none_to_expire):
                    self._reaper_running = False
                    return
                now = current_time()
                expired = self._pool.expire(now)
                if expired:
                    self._wake_next()
                else:
                    self._reaper_wake.clear()
            if expired:
                with shield():
                    for conn in expired:
                        conn.close()
            else:
                # At least a moment when one is due: `due` and the pool's test
                # of expiry round differently, and a wait shorter than the
                # clock can add to `now` (trio's MockClock jumps by exactly
                # the wait) would never reach `due`.
                wait = self.keepalive_expiry if due is None else max(due - now, REAP_SLACK)
                self._reaper_wake.wait(wait)


class _SoloExchange:
    """A request on a pooled connection of its own; it writes while it reads."""

    def __init__(self, client: Client, conn: Connection, reused: bool) -> None:
        self.client = client
        self.conn = conn
        self.reused = reused
        self.address = conn.address
        self.rid = 0

    def begin(
        self,
        params: ParamsInput,
        stdin: bytes | None,
        role: Role,
        deadline: Deadline,
        limits: Timeout,
        max_size: int,
    ) -> None:
        proto = self.conn.proto
        keep_conn = self.client.keep_conn
        if stdin is None:
            self.rid = proto.begin_request(role, keep_conn=keep_conn)
            proto.send_params(self.rid, params)
            proto.end_params(self.rid)
        else:
            self.rid = proto.send_request(params, stdin, role=role, keep_conn=keep_conn)
        self.conn.queue()

    def closes(self, wait: float | None) -> bool:
        """Whether the application closes this idle connection within `wait` seconds."""
        try:
            self.conn.stream.read(1, wait)
        except ReadTimeout:
            return False
        except ReadError:
            return True
        return True  # closed, or bytes an idle connection must not carry

    def send_stdin(self, chunk: bytes | None, deadline: Deadline, limits: Timeout) -> None:
        if chunk is None:
            self.conn.proto.end_stdin(self.rid)
        else:
            self.conn.proto.send_stdin(self.rid, chunk)
        self.conn.queue()

    def events(self, deadline: Deadline, limits: Timeout, refill: Refill) -> list[Event]:
        return self.conn.exchange(deadline, limits.read, limits.write, refill)

    def finish(self, ended: bool, deadline: Deadline, limits: Timeout) -> None:
        if ended and self.reused:
            self.client._kept_one = True
        self.client._finish_solo(self.conn, ended, deadline, limits)


class _MuxExchange:
    """A request sharing a multiplexed connection with others."""

    def __init__(self, client: Client, mux: MuxConnection, reused: bool) -> None:
        self.client = client
        self.mux = mux
        self.reused = reused
        self.address = mux.address
        self.rid = 0
        self.inbox: Inbox | None = None
        self.body_wanted = True  # until the application ends the request

    def begin(
        self,
        params: ParamsInput,
        stdin: bytes | None,
        role: Role,
        deadline: Deadline,
        limits: Timeout,
        max_size: int,
    ) -> None:
        # The reader bounds what it leaves for the request, however far behind
        # the request's caller is: a shared connection is read for everyone.
        self.rid, self.inbox = self.mux.begin(params, stdin, role, deadline, limits.write, max_size)

    def send_stdin(self, chunk: bytes | None, deadline: Deadline, limits: Timeout) -> None:
        if not self.mux.send_stdin(self.rid, chunk, deadline, limits.write):
            self.body_wanted = False

    def events(self, deadline: Deadline, limits: Timeout, refill: Refill) -> list[Event]:
        # The reader gathers the response meanwhile: send the whole body first,
        # unless the application ends the request before it has all of it.
        while self.body_wanted and refill():
            pass
        assert self.inbox is not None
        return self.mux.events(self.inbox, deadline, limits.read)

    def finish(self, ended: bool, deadline: Deadline, limits: Timeout) -> None:
        with shield():
            if self.inbox is not None:
                self.mux.finish(self.rid, self.inbox)
            self.client._mux_done(self.mux)


class StreamResponse(ResponseState):
    """One request in progress; a context manager. Status and headers are there on entry.

    `stderr` holds the stderr that arrived and that the stderr iterator has
    not taken; app_status and protocol_status are set once the request ends.
    """

    def __init__(
        self,
        client: Client,
        params: ParamsInput,
        stdin: Body,
        role: Role,
        limits: Timeout,
        max_size: int,
        *,
        shared: bool,
        read_head: bool = False,
        whole: bool = False,
    ) -> None:
        self._client = client
        self._shared = shared
        self._params = params
        self._stdin = stdin
        self._role = role
        self._limits = limits
        self._read_head = read_head
        self._deadline = Deadline(limits.total, current_time)
        self._exchange: _SoloExchange | _MuxExchange | None = None
        self._pieces: BodyPieces | None = None
        self._stdin_touched = False
        super().__init__(client.address, max_size, whole=whole)
        self._replay: deque[bytes] = deque()  # stdout read for the head, for aiter_stdout
        self._body_started = self._raw_started = False

    # --- context manager ---

    def __enter__(self) -> StreamResponse:
        try:
            self._start()
            if self._read_head:
                self._parse_head()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Give the connection back when the exchange ended cleanly, else close (or abort) it."""
        exchange, self._exchange = self._exchange, None
        pieces, self._pieces = self._pieces, None
        if (
            pieces is None
            and type(exchange) is _SoloExchange
            and self._end is not None
            and exchange.conn.flushed
        ):
            # Ended, with nothing left to write (most streams): giving the
            # connection back waits for nothing that cancellation could cut
            # (_release shields what it closes), so no shield of its own,
            # the dearest part of leaving on anyio.
            exchange.finish(True, self._deadline, self._limits)
            return
        with shield():
            if exchange is not None:
                exchange.finish(self._end is not None, self._deadline, self._limits)
            if pieces is not None:
                pieces.close()

    # --- the response ---

    # The iterators are plain objects, not generators: one left by `break`
    # needs no finalizing, which trio would otherwise warn about.

    def iter_body(self) -> Iterator[bytes]:
        """The response body after the CGI head, as it arrives."""
        if self._parser is None or self._raw_started:
            raise LocalProtocolError("the body follows the head that stream() reads")
        self._body_started = True
        return _Chunks(self._next_body)

    def iter_stdout(self) -> Iterator[bytes]:
        """The raw stdout stream, CGI head included, as it arrives."""
        if self._body_started:
            raise LocalProtocolError("the body is being read already: use the body iterator")
        self._raw_started = True
        return _Chunks(self._next_raw)

    def iter_stderr(self) -> Iterator[bytes]:
        """The stderr stream as it arrives, taken out of `stderr` as it is given.

        Stdout that arrives meanwhile waits for its reader, within max_response_size.
        """
        return _Chunks(self._next_stderr)

    def read(self) -> bytes:
        """The rest of the body."""
        return b"".join([chunk for chunk in self.iter_body()])

    def _next_body(self) -> bytes | None:
        while not self._body:
            chunk = self._next_stdout()
            if chunk is None:
                return None
            self._body.extend(self._body_of(chunk))
        return self._body.popleft()

    def _next_raw(self) -> bytes | None:
        if self._replay:
            return self._replay.popleft()
        return self._next_stdout()

    def _next_stderr(self) -> bytes | None:
        while not self.stderr:
            if self._end is not None:
                return None
            try:
                self._pump()
            except BaseException:
                self.close()
                raise
        return self._pop_stderr()

    # --- the exchange ---

    def _start(self) -> None:
        client, stdin = self._client, self._stdin
        body: bytes | None = None
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            body = bytes(stdin)
        else:
            source = stdin
        for attempt in (1, 2):
            exchange = client._exchange(self._deadline, self._limits, self._shared)
            if (
                body is None
                and not client._kept_one
                and isinstance(exchange, _SoloExchange)
                and exchange.reused
                and exchange.closes(self._deadline.limit(CLOSE_GRACE)[0])
            ):
                client._closed_under_us()
                exchange.finish(False, self._deadline, self._limits)
                exchange = client._exchange(self._deadline, self._limits, self._shared)
            self._exchange = exchange
            try:
                exchange.begin(
                    self._params, body, self._role, self._deadline, self._limits, self._max_size
                )
                if body is None:
                    self._pieces = BodyPieces(source)
                self._pump()
                return
            except (ReadError, WriteError):
                # An idle connection the application closed under us (php-fpm
                # after pm.max_requests, or a restart): retry once, fresh, if
                # nothing of the response arrived and the body can be sent again.
                if exchange.reused and not self._got_output and isinstance(exchange, _SoloExchange):
                    client._closed_under_us()
                if not exchange.reused or attempt == 2 or self._stdin_touched or self._got_output:
                    raise
                self._exchange = None
                self._pieces = None  # not started: the retry starts it
                with shield():
                    exchange.finish(False, self._deadline, self._limits)

    def _refill(self) -> bool:
        """Hand the exchange the next piece of a streamed body; False when there is none."""
        exchange, pieces = self._exchange, self._pieces
        if pieces is None or exchange is None:
            return False
        if self._end is not None:
            # The application answered without reading the rest of the body.
            self._pieces = None
            pieces.close()
            return False
        while (chunk := pieces.next()) is not None:
            if chunk:
                self._stdin_touched = True
                exchange.send_stdin(chunk, self._deadline, self._limits)
                return True
        self._pieces = None
        exchange.send_stdin(None, self._deadline, self._limits)
        return True

    def _pump(self) -> None:
        """Exchange bytes until something of the response arrives."""
        exchange = self._exchange
        if exchange is None:
            raise LocalProtocolError("the response is closed")
        events = exchange.events(self._deadline, self._limits, self._refill)
        self._take(events, exchange.rid)

    def _next_stdout(self) -> bytes | None:
        while not self._stdout:
            if self._end is not None:
                return None
            try:
                self._pump()
            except BaseException:
                self.close()
                raise
        return self._pop_stdout()

    def _read_whole(self) -> Response:
        """Read the rest of the answer into its WholeAnswer, which bounds it (request())."""
        assert self._answer is not None
        while self._end is None:
            self._pump()
        return self._answer.response(self._end)

    def _parse_head(self) -> None:
        while self._head is None:
            chunk = self._next_stdout()
            if chunk is not None:
                self._replay.append(chunk)
            self._feed_head(chunk)


def _check_size(max_response_size: int) -> int:
    if max_response_size < 0:
        raise ValueError(f"max_response_size must be 0 (no limit) or more, not {max_response_size}")
    return max_response_size


class _Chunks:
    """An iterator over what `next_chunk` gives until it gives None."""

    __slots__ = ("_next_chunk",)

    def __init__(self, next_chunk: NextChunk) -> None:
        self._next_chunk = next_chunk

    def __iter__(self) -> _Chunks:
        return self

    def __next__(self) -> bytes:
        chunk = self._next_chunk()
        if chunk is None:
            raise StopIteration
        return chunk

    def close(self) -> None:
        """Nothing to release; here for closing() helpers, as on a generator."""
