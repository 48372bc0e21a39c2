"""The blocking client: a thread-safe pool of keep-alive connections to one application."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType

from fcgiproto import (
    EndRequest,
    Event,
    GetValuesResult,
    LocalProtocolError,
    PoolTimeout,
    ProtocolStatus,
    ReadError,
    RemoteProtocolError,
    Role,
    StderrData,
    StdoutData,
    TransportError,
    WriteError,
)
from fcgiproto._adapter import (
    AddressInput,
    Response,
    Timeout,
    TimeoutInput,
    parse_address,
    raise_for_protocol_status,
)
from fcgiproto._records import ParamsInput
from fcgiproto.cgi import ResponseHead, ResponseParser

from ._transport import Deadline, SocketConnection, connect

__all__ = ["Client", "StreamResponse"]

MANAGEMENT_VARIABLES = ("FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS")
DEFAULT_TIMEOUT = Timeout()


class Client:
    """Talks to one FastCGI application, keeping connections alive between requests.

    max_connections caps the connections open at once (keep it no larger than
    php-fpm's pm.max_children: each idle kept-alive connection pins a worker);
    max_keepalive caps the idle ones; keepalive_expiry closes connections idle
    longer than that many seconds. Safe to share between threads.
    """

    def __init__(
        self,
        address: AddressInput,
        *,
        max_connections: int = 10,
        max_keepalive: int | None = None,
        keepalive_expiry: float = 5.0,
        timeout: TimeoutInput = DEFAULT_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.address = parse_address(address)
        self.timeout = Timeout.of(timeout)
        self.max_connections = max_connections
        self.max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._cond = threading.Condition()
        self._idle: list[SocketConnection] = []
        self._open = 0  # connections open, idle or in use
        self._closed = False

    # --- public calls ---

    def request(
        self,
        params: ParamsInput,
        stdin: bytes | Iterable[bytes] = b"",
        *,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
    ) -> Response:
        """Send a request and read its whole response."""
        with self.stream(params, stdin, role=role, timeout=timeout) as response:
            stdout = b"".join(response.iter_stdout())
        assert response.protocol_status is not None and response.app_status is not None
        return Response(
            stdout, bytes(response.stderr), response.app_status, response.protocol_status
        )

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
        """
        return StreamResponse(self, params, stdin, role, self._timeout(timeout))

    def get_values(
        self, names: Iterable[str] = MANAGEMENT_VARIABLES, *, timeout: TimeoutInput | None = None
    ) -> dict[str, str]:
        """Ask the application for management variables (FCGI_MPXS_CONNS, ...)."""
        limits = self._timeout(timeout)
        deadline = Deadline(limits.total)
        conn, _ = self._acquire(deadline, limits)
        try:
            conn.proto.get_values(names)
            conn.queue()
            while True:
                for event in conn.exchange(deadline, limits.read, limits.write):
                    if isinstance(event, GetValuesResult):
                        self._release(conn)
                        return dict(event.values)
        except BaseException:
            self._discard(conn)
            raise

    def close(self) -> None:
        """Close idle connections now, and the others when their requests end."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the pool ---

    def _timeout(self, timeout: TimeoutInput | None) -> Timeout:
        return self.timeout if timeout is None else Timeout.of(timeout)

    def _acquire(self, deadline: Deadline, limits: Timeout) -> tuple[SocketConnection, bool]:
        """An idle connection (True) or a new one (False), within the pool limit."""
        stale: list[SocketConnection] = []
        try:
            with self._cond:
                wait, _ = deadline.limit(limits.pool)
                give_up = None if wait is None else time.monotonic() + wait
                while True:
                    if self._closed:
                        raise LocalProtocolError(f"the client for {self.address} is closed")
                    now = time.monotonic()
                    while self._idle:
                        conn = self._idle.pop()
                        if now - conn.idle_since < self.keepalive_expiry and conn.looks_alive():
                            return conn, True
                        stale.append(conn)
                        self._open -= 1
                    if self._open < self.max_connections:
                        self._open += 1
                        break
                    left = None if give_up is None else give_up - now
                    if left is not None and left <= 0:
                        raise PoolTimeout(
                            f"no connection to {self.address} became free within {wait}s "
                            f"({self.max_connections} in use)"
                        )
                    self._cond.wait(left)
        finally:
            for conn in stale:
                conn.close()
        try:
            sock = connect(self.address, deadline.limit(limits.connect)[0])
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        return SocketConnection(sock, self.address, multiplex=False), False

    def _release(self, conn: SocketConnection) -> None:
        """Return a connection in a known-clean state for reuse."""
        with self._cond:
            if not self._closed and len(self._idle) < self.max_keepalive:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
                self._cond.notify()
                return
            self._open -= 1
            self._cond.notify()
        conn.close()

    def _discard(self, conn: SocketConnection) -> None:
        conn.close()
        with self._cond:
            self._open -= 1
            self._cond.notify()


class StreamResponse:
    """One request in progress: status and headers on entry, then the body as it arrives."""

    def __init__(
        self,
        client: Client,
        params: ParamsInput,
        stdin: bytes | Iterable[bytes],
        role: Role,
        limits: Timeout,
    ) -> None:
        self._client = client
        self._params = params
        self._stdin = stdin
        self._role = role
        self._limits = limits
        self._deadline = Deadline(limits.total)
        self._conn: SocketConnection | None = None
        self._rid = 0
        self._stdin_iter: Iterator[bytes] | None = None
        self._stdin_touched = False
        self._stdout: deque[bytes] = deque()
        self._end: EndRequest | None = None
        self._head: ResponseHead | None = None
        self._parser: ResponseParser | None = None
        self._body: deque[bytes] = deque()
        self._head_raw: list[bytes] = []
        self.stderr = bytearray()
        self.app_status: int | None = None
        self.protocol_status: ProtocolStatus | None = None

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
        """Give the connection back when the exchange ended cleanly, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._end is not None and not conn.writing and conn.proto.can_send_request:
            self._client._release(conn)
        else:
            self._client._discard(conn)

    # --- the response ---

    @property
    def head(self) -> ResponseHead:
        """The CGI head of the response, read from stdout on first use."""
        if self._head is None:
            self._parser = ResponseParser()
            while self._head is None:
                chunk = self._next_stdout()
                if chunk is None:
                    parts = self._parser.close()
                else:
                    self._head_raw.append(chunk)
                    parts = self._parser.feed(chunk)
                for part in parts:
                    if isinstance(part, ResponseHead):
                        self._head = part
                    elif part:
                        self._body.append(part)
        return self._head

    @property
    def status(self) -> int:
        return self.head.status

    @property
    def reason(self) -> str:
        return self.head.reason

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self.head.headers

    def iter_body(self) -> Iterator[bytes]:
        """The response body after the CGI head, as it arrives."""
        self.head  # noqa: B018 - reads the head first
        parser = self._parser
        assert parser is not None
        while self._body:
            yield self._body.popleft()
        while (chunk := self._next_stdout()) is not None:
            for part in parser.feed(chunk):
                if isinstance(part, bytes):
                    yield part

    def iter_stdout(self) -> Iterator[bytes]:
        """The raw stdout stream, CGI head included, as it arrives."""
        if self._parser is not None:
            raise LocalProtocolError("the head was already read: use iter_body()")
        while (chunk := self._next_stdout()) is not None:
            yield chunk

    def iter_stderr(self) -> Iterator[bytes]:
        """The stderr stream; stdout is kept in memory meanwhile."""
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
        client, limits = self._client, self._limits
        for attempt in (1, 2):
            conn, reused = client._acquire(self._deadline, limits)
            self._conn = conn
            proto = conn.proto
            if isinstance(self._stdin, (bytes, bytearray, memoryview)):
                self._rid = proto.send_request(self._params, self._stdin, role=self._role)
            else:
                self._rid = proto.begin_request(self._role)
                proto.send_params(self._rid, self._params)
                proto.end_params(self._rid)
                self._stdin_iter = iter(self._stdin)
            conn.queue()
            try:
                self._pump()
                return
            except (ReadError, WriteError):
                # An idle connection the application closed under us (php-fpm
                # after pm.max_requests, or a restart): retry once, fresh, if
                # nothing of the response arrived and the body can be sent again.
                if not reused or attempt == 2 or self._stdin_touched or self._got_output:
                    raise
                self._conn = None
                client._discard(conn)
                self._stdin_iter = None

    @property
    def _got_output(self) -> bool:
        return bool(self._stdout or self.stderr or self._end)

    def _refill(self) -> bool:
        conn, stdin = self._conn, self._stdin_iter
        if stdin is None or conn is None:
            return False
        if self._end is not None:
            self._stdin_iter = None
            return False
        for chunk in stdin:
            if chunk:
                self._stdin_touched = True
                conn.proto.send_stdin(self._rid, chunk)
                return True
        conn.proto.end_stdin(self._rid)
        self._stdin_iter = None
        return True

    def _pump(self) -> None:
        """Exchange bytes until something of the response arrives."""
        conn = self._conn
        if conn is None:
            raise LocalProtocolError("the response is closed")
        limits = self._limits
        events = conn.exchange(self._deadline, limits.read, limits.write, self._refill)
        self._handle(events)

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if type(event) is StdoutData:
                self._stdout.append(event.data)
            elif type(event) is StderrData:
                self.stderr += event.data
            elif isinstance(event, EndRequest) and event.request_id == self._rid:
                self._end = event
                self.app_status = event.app_status
                self.protocol_status = event.protocol_status
                assert self._conn is not None
                raise_for_protocol_status(event, self._conn.address)

    def _next_stdout(self) -> bytes | None:
        while not self._stdout:
            if self._end is not None:
                return None
            try:
                self._pump()
            except (TransportError, RemoteProtocolError):
                self.close()
                raise
        return self._stdout.popleft()
