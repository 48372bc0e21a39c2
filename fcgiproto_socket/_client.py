"""The blocking client: a thread-safe pool of keep-alive connections to one application."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

from fcgiproto import (
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
from fcgiproto.cgi import ResponseHead
from fcgiproto.support import (
    AddressInput,
    Deadline,
    PoolState,
    Response,
    ResponseState,
    Timeout,
    TimeoutInput,
    gather_answer,
    parse_address,
    probe_wait,
    whole_answer,
)

from ._mux import Inbox, MuxConnection
from ._transport import SocketConnection, connect

__all__ = ["Client", "StreamResponse"]

MANAGEMENT_VARIABLES = ("FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS")
DEFAULT_TIMEOUT = Timeout()


class Client:
    """Talks to one FastCGI application, keeping connections alive between requests.

    max_connections caps the connections open at once (keep it no larger than
    php-fpm's pm.max_children: each idle kept-alive connection pins a worker);
    max_keepalive caps the idle ones; keepalive_expiry closes connections idle
    longer than that many seconds. Safe to share between threads.

    multiplex=None asks the application (GET_VALUES) before the first request
    whether it multiplexes; if it does, concurrent requests share one
    connection. True or False decides without asking.
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
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.address = parse_address(address)
        self.timeout = Timeout.of(timeout)
        self.max_connections = max_connections
        self.max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._lock = threading.Lock()
        self._reaper_wake = threading.Condition(self._lock)
        self._reaper: threading.Thread | None = None
        self._queue: deque[threading.Condition] = deque()  # threads waiting, first come first
        self._pool: PoolState[SocketConnection] = PoolState(
            max_connections, self.max_keepalive, keepalive_expiry
        )
        self.multiplex = multiplex
        self._probe_lock = threading.Lock()
        self._mux_lock = threading.Lock()
        self._mux: MuxConnection | None = None
        self._retired: list[MuxConnection] = []  # replaced, closed once their requests end

    # --- public calls ---

    def request(
        self,
        params: ParamsInput,
        stdin: bytes | Iterable[bytes] = b"",
        *,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
    ) -> Response:
        """Send a request and read its whole response.

        On an application that multiplexes, concurrent requests share one connection.
        """
        limits = self._timeout(timeout)
        if isinstance(stdin, (bytes, bytearray, memoryview)) and self.multiplex is False:
            return self._request_whole(params, bytes(stdin), role, limits)
        with StreamResponse(self, params, stdin, role, limits, shared=True) as response:
            stdout = b"".join(response.iter_stdout())
        assert response.protocol_status is not None and response.app_status is not None
        return Response(
            stdout, bytes(response.stderr), response.app_status, response.protocol_status
        )

    def _request_whole(
        self, params: ParamsInput, body: bytes, role: Role, limits: Timeout
    ) -> Response:
        """request() on a connection of its own, with the body at hand: the hot path.

        What StreamResponse does, without its generators and queues.
        """
        deadline = Deadline(limits.total, time.monotonic)
        for attempt in (1, 2):
            conn, reused = self._acquire(deadline, limits)
            stdout: list[bytes] = []
            stderr: list[bytes] = []
            end = None
            try:
                conn.proto.send_request(params, body, role=role)
                conn.queue()
                while end is None:
                    events = conn.exchange(deadline, limits.read, limits.write)
                    end = gather_answer(events, stdout, stderr)
            except (ReadError, WriteError):
                self._discard(conn)
                # The retry rule of StreamResponse._start: an idle connection
                # the application closed under us, and no byte of an answer.
                if reused and attempt == 1 and not (stdout or stderr):
                    continue
                raise
            except BaseException:
                self._discard(conn)
                raise
            _SoloExchange(self, conn, reused).finish(True, deadline, limits)
            return whole_answer(stdout, stderr, end, conn.address)
        raise AssertionError("unreachable")

    def stream(
        self,
        params: ParamsInput,
        stdin: bytes | Iterable[bytes] = b"",
        *,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
    ) -> StreamResponse:
        """A request whose body is sent and whose response is read in constant memory.

        Use it as a context manager; leaving it early closes the connection.
        A stream has a connection of its own even when the application
        multiplexes: FastCGI has no flow control per request, so on a shared
        connection a slow reader would either hold up the other requests or
        have its response buffered whole. Its own connection gives it TCP's.
        """
        return StreamResponse(self, params, stdin, role, self._timeout(timeout), shared=False)

    def get_values(
        self, names: Iterable[str] = MANAGEMENT_VARIABLES, *, timeout: TimeoutInput | None = None
    ) -> dict[str, str]:
        """Ask the application for management variables (FCGI_MPXS_CONNS, ...)."""
        limits = self._timeout(timeout)
        deadline = Deadline(limits.total, time.monotonic)
        if self.multiplex:
            exchange = self._mux_exchange(deadline, limits)
            try:
                return dict(exchange.mux.get_values(list(names), deadline, limits.read).values)
            finally:
                exchange.finish(True, deadline, limits)
        return self._solo_get_values(list(names), deadline, limits, limits.read)

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

    def close(self) -> None:
        """Close idle connections now, and the others when their requests end."""
        with self._lock:
            idle = self._pool.close()
            for waiter in self._queue:
                waiter.notify()  # to find the client closed
            self._reaper_wake.notify()
            reaper = self._reaper
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join()
        for conn in idle:
            conn.close()
        with self._mux_lock:
            muxes = [*self._retired, *([self._mux] if self._mux else [])]
            self._mux, self._retired = None, []
        for mux in muxes:
            mux.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- choosing a connection ---

    def _check_open(self) -> None:
        if self._pool.closed:
            raise LocalProtocolError(f"the client for {self.address} is closed")

    def _exchange(
        self, deadline: Deadline, limits: Timeout, shared: bool
    ) -> _SoloExchange | _MuxExchange:
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
                for conn in idle:
                    conn.close()

    def _mux_exchange(self, deadline: Deadline, limits: Timeout) -> _MuxExchange:
        with self._mux_lock:
            self._check_open()
            mux = self._mux
            if mux is not None and mux.usable and not mux.expired(self.keepalive_expiry):
                return _MuxExchange(self, mux, reused=True)
            if mux is not None:
                self._retired.append(mux)
            self._mux = None
            sock = connect(self.address, deadline.limit(limits.connect)[0])
            self._mux = mux = MuxConnection(sock, self.address, self.keepalive_expiry)
        self._reap_retired()
        return _MuxExchange(self, mux, reused=False)

    def _mux_done(self, mux: MuxConnection) -> None:
        if mux is not self._mux:
            self._reap_retired()

    def _reap_retired(self) -> None:
        with self._mux_lock:
            done = [mux for mux in self._retired if mux.idle]
            self._retired = [mux for mux in self._retired if not mux.idle]
        for mux in done:
            mux.close()

    def _timeout(self, timeout: TimeoutInput | None) -> Timeout:
        return self.timeout if timeout is None else Timeout.of(timeout)

    def _acquire(self, deadline: Deadline, limits: Timeout) -> tuple[SocketConnection, bool]:
        """An idle connection (True) or a new one (False), within the pool limit.

        Waiters are served in the order they came: a thread that releases a
        connection cannot take it straight back past the threads waiting for
        one, which under contention left some waiting out their pool timeout.
        """
        wait, _ = deadline.limit(limits.pool)
        give_up = None if wait is None else time.monotonic() + wait
        ticket = threading.Condition(self._lock)  # this thread's turn, when it comes
        queued = False
        while True:
            with self._lock:
                self._check_open()
                conn, may_open = None, False
                stale: list[SocketConnection] = []
                if not self._queue or self._queue[0] is ticket:
                    conn, may_open, stale = self._pool.acquire(time.monotonic())
                if conn is not None or may_open:
                    if queued:
                        self._queue.popleft()
                        self._wake_next()  # there may be more to have
                else:
                    if not queued:
                        self._queue.append(ticket)
                        queued = True
                    left = None if give_up is None else give_up - time.monotonic()
                    if left is not None and left <= 0:
                        self._queue.remove(ticket)
                        self._wake_next()
                        raise PoolTimeout(
                            f"no connection to {self.address} became free within {wait}s "
                            f"({self.max_connections} in use)"
                        )
                    ticket.wait(left)
            for old in stale:
                old.close()
            if conn is not None:
                # Checked even when released moments ago: an application that
                # wrote to it since (garbage, a second END_REQUEST) would
                # otherwise answer the next request with the last one's leftovers.
                if conn.looks_alive():
                    return conn, True
                self._discard(conn)
                queued = False
            elif may_open:
                break
        try:
            sock = connect(self.address, deadline.limit(limits.connect)[0])
        except BaseException:
            with self._lock:
                self._pool.open_failed()
                self._wake_next()
            raise
        return SocketConnection(sock, self.address, multiplex=False), False

    def _release(self, conn: SocketConnection) -> None:
        """Return a connection in a known-clean state for reuse."""
        with self._lock:
            to_close = self._pool.release(conn, time.monotonic())
            self._wake_next()
            if not to_close and self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap_idle, name=f"fcgiproto idle {self.address}", daemon=True
                )
                self._reaper.start()
        for old in to_close:
            old.close()

    def _wake_next(self) -> None:
        """Let the first thread waiting for a connection look again (lock held)."""
        if self._queue:
            self._queue[0].notify()

    def _reap_idle(self) -> None:
        """Close idle connections as they expire, without waiting for the next call.

        An idle kept-alive connection pins a php-fpm worker; one the client will
        not reuse must give it back. Runs while there are idle connections.
        """
        while True:
            with self._lock:
                due = self._pool.next_expiry()
                if self._pool.closed or due is None:
                    self._reaper = None
                    return
                now = time.monotonic()
                expired = self._pool.expire(now)
                if not expired:
                    self._reaper_wake.wait(due - now)
                    continue
                self._wake_next()
            for conn in expired:
                conn.close()

    def _discard(self, conn: SocketConnection) -> None:
        conn.close()
        with self._lock:
            self._pool.discard()
            self._wake_next()


class _SoloExchange:
    """A request on a pooled connection of its own; the pump writes while it reads."""

    def __init__(self, client: Client, conn: SocketConnection, reused: bool) -> None:
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
    ) -> None:
        proto = self.conn.proto
        if stdin is None:
            self.rid = proto.begin_request(role)
            proto.send_params(self.rid, params)
            proto.end_params(self.rid)
        else:
            self.rid = proto.send_request(params, stdin, role=role)
        self.conn.queue()

    def send_stdin(self, chunk: bytes | None, deadline: Deadline, limits: Timeout) -> None:
        if chunk is None:
            self.conn.proto.end_stdin(self.rid)
        else:
            self.conn.proto.send_stdin(self.rid, chunk)
        self.conn.queue()

    def events(
        self, deadline: Deadline, limits: Timeout, refill: Callable[[], bool]
    ) -> list[Event]:
        return self.conn.exchange(deadline, limits.read, limits.write, refill)

    def finish(self, ended: bool, deadline: Deadline, limits: Timeout) -> None:
        conn = self.conn
        if ended and conn.proto.can_send_request:
            try:
                # The application may answer before it has all of the body
                # (php-fpm does once it has CONTENT_LENGTH bytes): the rest,
                # often only the empty STDIN record, goes out before reuse.
                conn.flush(deadline, limits.write)
            except TransportError:
                pass
            else:
                self.client._release(conn)
                return
        self.client._discard(conn)


class _MuxExchange:
    """A request sharing a multiplexed connection with others."""

    def __init__(self, client: Client, mux: MuxConnection, reused: bool) -> None:
        self.client = client
        self.mux = mux
        self.reused = reused
        self.address = mux.address
        self.rid = 0
        self.inbox: Inbox | None = None

    def begin(
        self,
        params: ParamsInput,
        stdin: bytes | None,
        role: Role,
        deadline: Deadline,
        limits: Timeout,
    ) -> None:
        self.rid, self.inbox = self.mux.begin(params, stdin, role, deadline, limits.write)

    def send_stdin(self, chunk: bytes | None, deadline: Deadline, limits: Timeout) -> None:
        self.mux.send_stdin(self.rid, chunk, deadline, limits.write)

    def events(
        self, deadline: Deadline, limits: Timeout, refill: Callable[[], bool]
    ) -> list[Event]:
        # The reader thread gathers the response meanwhile.
        while refill():
            pass
        assert self.inbox is not None
        return self.mux.events(self.inbox, deadline, limits.read)

    def finish(self, ended: bool, deadline: Deadline, limits: Timeout) -> None:
        if self.inbox is not None:
            self.mux.finish(self.rid, self.inbox)
        self.client._mux_done(self.mux)


class StreamResponse(ResponseState):
    """One request in progress: status and headers on first use, then the body as it arrives."""

    def __init__(
        self,
        client: Client,
        params: ParamsInput,
        stdin: bytes | Iterable[bytes],
        role: Role,
        limits: Timeout,
        shared: bool,
    ) -> None:
        self._client = client
        self._shared = shared
        self._params = params
        self._stdin = stdin
        self._role = role
        self._limits = limits
        self._deadline = Deadline(limits.total, time.monotonic)
        self._exchange: _SoloExchange | _MuxExchange | None = None
        self._stdin_iter: Iterator[bytes] | None = None
        self._stdin_touched = False
        super().__init__()

    # --- context manager ---

    def __enter__(self) -> StreamResponse:
        try:
            self._start()
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
        if exchange is not None:
            exchange.finish(self._end is not None, self._deadline, self._limits)

    # --- the response ---

    @property
    def head(self) -> ResponseHead:
        """The CGI head of the response, read from stdout on first use."""
        while self._head is None:
            self._feed_head(self._next_stdout())
        return self._head

    def iter_body(self) -> Iterator[bytes]:
        """The response body after the CGI head, as it arrives."""
        self.head  # noqa: B018 - reads the head first
        while self._body:
            yield self._body.popleft()
        while (chunk := self._next_stdout()) is not None:
            yield from self._body_of(chunk)

    def iter_stdout(self) -> Iterator[bytes]:
        """The raw stdout stream, CGI head included, as it arrives."""
        if self._parser is not None:
            raise LocalProtocolError("the head was already read: use iter_body()")
        while (chunk := self._next_stdout()) is not None:
            yield chunk

    def iter_stderr(self) -> Iterator[bytes]:
        """The stderr stream as it arrives; stdout is kept in memory meanwhile."""
        sent = 0
        while True:
            if len(self.stderr) > sent:
                chunk = bytes(self.stderr[sent:])
                sent = len(self.stderr)
                yield chunk
            elif self._end is not None:
                return
            else:
                self._pump()

    def read(self) -> bytes:
        """The rest of the body."""
        return b"".join(self.iter_body())

    # --- the exchange ---

    def _start(self) -> None:
        client = self._client
        stdin = self._stdin
        body: bytes | None = None
        chunks: Iterable[bytes] = ()
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            body = bytes(stdin)
        else:
            chunks = stdin
        for attempt in (1, 2):
            exchange = client._exchange(self._deadline, self._limits, self._shared)
            self._exchange = exchange
            try:
                exchange.begin(self._params, body, self._role, self._deadline, self._limits)
                if body is None:
                    self._stdin_iter = iter(chunks)
                self._pump()
                return
            except (ReadError, WriteError):
                # An idle connection the application closed under us (php-fpm
                # after pm.max_requests, or a restart): retry once, fresh, if
                # nothing of the response arrived and the body can be sent again.
                if not exchange.reused or attempt == 2 or self._stdin_touched or self._got_output:
                    raise
                self._exchange = None
                exchange.finish(False, self._deadline, self._limits)
                self._stdin_iter = None

    def _refill(self) -> bool:
        """Hand the exchange the next piece of a streamed body; False when there is none."""
        exchange, stdin = self._exchange, self._stdin_iter
        if stdin is None or exchange is None:
            return False
        if self._end is not None:
            # The application answered without reading the rest of the body.
            self._stdin_iter = None
            return False
        for chunk in stdin:
            if chunk:
                self._stdin_touched = True
                exchange.send_stdin(bytes(chunk), self._deadline, self._limits)
                return True
        self._stdin_iter = None
        exchange.send_stdin(None, self._deadline, self._limits)
        return True

    def _pump(self) -> None:
        """Exchange bytes until something of the response arrives."""
        exchange = self._exchange
        if exchange is None:
            raise LocalProtocolError("the response is closed")
        events = exchange.events(self._deadline, self._limits, self._refill)
        self._take(events, exchange.rid, exchange.address)

    def _next_stdout(self) -> bytes | None:
        while not self._stdout:
            if self._end is not None:
                return None
            try:
                self._pump()
            except BaseException:
                self.close()
                raise
        return self._stdout.popleft()
