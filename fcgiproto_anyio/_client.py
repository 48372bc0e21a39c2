"""The async client on anyio (asyncio and trio): pooled keep-alive connections, multiplexing."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType

import anyio
import anyio.abc

from fcgiproto import (
    Event,
    GetValuesResult,
    LocalProtocolError,
    ParamsInput,
    PoolTimeout,
    ReadError,
    ReadTimeout,
    Role,
    WriteError,
)
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

from ._connection import StreamConnection, connect, deadline_on_anyio_clock
from ._mux import AsyncInbox, AsyncMuxConnection

__all__ = ["AsyncClient", "AsyncStreamResponse"]

MANAGEMENT_VARIABLES = ("FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS")
DEFAULT_TIMEOUT = Timeout()
#: A body up to this size goes out with the request; a larger one, or an
#: iterable, is sent by a task of its own while the response is read, since
#: an application may answer before it has read all of it.
INLINE_BODY = 64 * 1024

Stdin = bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes]


class AsyncClient:
    """Talks to one FastCGI application from asyncio or trio; use it with ``async with``.

    The same pool and limits as the blocking Client: max_connections caps the
    connections that carry one request at a time (keep it no larger than
    php-fpm's pm.max_children), max_keepalive the idle ones, and
    keepalive_expiry closes connections idle that long. When the application
    multiplexes (asked with GET_VALUES when multiplex is None), request()
    calls share one connection, routed by a reader task; stream() calls keep
    a connection of their own, for TCP's flow control.
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
        self.address = parse_address(address)
        self.timeout = Timeout.of(timeout)
        self.max_connections = max_connections
        self.max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self.multiplex = multiplex
        self._pool: PoolState[StreamConnection] = PoolState(
            max_connections, self.max_keepalive, keepalive_expiry
        )
        self._freed = anyio.Condition()  # a pooled connection was released or closed
        self._tasks: anyio.abc.TaskGroup | None = None
        self._reaper_wake = anyio.Event()
        self._reaper_has_deadline = False
        # fast_acquire: an uncontended lock costs no trip through the event loop.
        self._probe_lock = anyio.Lock(fast_acquire=True)
        self._mux_lock = anyio.Lock(fast_acquire=True)
        self._mux: AsyncMuxConnection | None = None

    async def __aenter__(self) -> AsyncClient:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._reap_idle, name=f"fcgiproto idle {self.address}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            # Only the client's own tasks end here; an exception from the
            # block goes on as it was raised, not wrapped in an ExceptionGroup.
            tasks.cancel_scope.cancel()
            await tasks.__aexit__(None, None, None)
        return None

    # --- public calls ---

    async def request(
        self,
        params: ParamsInput,
        stdin: Stdin = b"",
        *,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
    ) -> Response:
        """Send a request and read its whole response."""
        limits = self._limits(timeout)
        if (
            self.multiplex is False
            and isinstance(stdin, (bytes, bytearray, memoryview))
            and len(stdin) <= INLINE_BODY
        ):
            return await self._request_whole(params, bytes(stdin), role, limits)
        async with AsyncStreamResponse(self, params, stdin, role, limits, shared=True) as r:
            stdout = b"".join([chunk async for chunk in r.aiter_stdout()])
        assert r.app_status is not None and r.protocol_status is not None
        return Response(stdout, bytes(r.stderr), r.app_status, r.protocol_status)

    async def _request_whole(
        self, params: ParamsInput, body: bytes, role: Role, limits: Timeout
    ) -> Response:
        """request() on a connection of its own with a small body: the hot path.

        What AsyncStreamResponse does, without its iterators and scopes.
        """
        deadline = deadline_on_anyio_clock(limits.total)
        for attempt in (1, 2):
            conn, reused = await self._acquire(deadline, limits)
            stdout: list[bytes] = []
            stderr: list[bytes] = []
            end = None
            try:
                conn.proto.send_request(params, body, role=role)
                await conn.send(conn.proto.data_to_send(), deadline, limits.write)
                expecting = True
                while end is None:
                    events = await conn.receive(deadline, limits.read, expecting)
                    end = gather_answer(events, stdout, stderr)
                    expecting = False
            except (ReadError, WriteError):
                await self._discard(conn)
                # The retry rule of AsyncStreamResponse._start: an idle
                # connection the application closed, and no byte of an answer.
                if reused and attempt == 1 and not (stdout or stderr):
                    continue
                raise
            except BaseException:
                await self._discard(conn)
                raise
            await _SoloExchange(self, conn, reused).finish(True)
            return whole_answer(stdout, stderr, end, conn.address)
        raise AssertionError("unreachable")

    def stream(
        self,
        params: ParamsInput,
        stdin: Stdin = b"",
        *,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
    ) -> AsyncStreamResponse:
        """A request read as it arrives, its body sent meanwhile; ``async with`` it.

        Status and headers are there on entry. Leaving early (or being
        cancelled) closes its connection, which is its own.
        """
        return AsyncStreamResponse(
            self, params, stdin, role, self._limits(timeout), shared=False, read_head=True
        )

    async def get_values(
        self, names: Iterable[str] = MANAGEMENT_VARIABLES, *, timeout: TimeoutInput | None = None
    ) -> dict[str, str]:
        """Ask the application for management variables (FCGI_MPXS_CONNS, ...)."""
        limits = self._limits(timeout)
        deadline = deadline_on_anyio_clock(limits.total)
        if self.multiplex:
            mux = await self._shared_connection(deadline, limits)
            result = await mux.get_values(list(names), deadline, limits.read)
            return dict(result.values)
        return await self._solo_get_values(list(names), deadline, limits, limits.read)

    async def aclose(self) -> None:
        """Close idle connections now; the others close as their requests end."""
        with anyio.CancelScope(shield=True):
            idle = self._pool.close()
            self._reaper_wake.set()
            for conn in idle:
                await conn.aclose()
            mux, self._mux = self._mux, None
            if mux is not None:
                await mux.aclose()
            async with self._freed:
                self._freed.notify_all()

    # --- choosing a connection ---

    def _limits(self, timeout: TimeoutInput | None) -> Timeout:
        return self.timeout if timeout is None else Timeout.of(timeout)

    def _check_open(self) -> anyio.abc.TaskGroup:
        if self._pool.closed:
            raise LocalProtocolError(f"the client for {self.address} is closed")
        if self._tasks is None:
            raise LocalProtocolError("use the client as `async with AsyncClient(...) as client:`")
        return self._tasks

    async def _exchange(
        self, deadline: Deadline, limits: Timeout, shared: bool
    ) -> _SoloExchange | _MuxExchange:
        self._check_open()
        if shared and self.multiplex is None:
            await self._decide_multiplex(deadline, limits)
        if shared and self.multiplex:
            reused = self._mux is not None and self._mux.usable and not self._mux.expired()
            return _MuxExchange(await self._shared_connection(deadline, limits), reused)
        conn, reused = await self._acquire(deadline, limits)
        return _SoloExchange(self, conn, reused)

    async def _decide_multiplex(self, deadline: Deadline, limits: Timeout) -> None:
        async with self._probe_lock:
            if self.multiplex is not None:
                return
            wait = probe_wait(limits, deadline)
            try:
                values = await self._solo_get_values(["FCGI_MPXS_CONNS"], deadline, limits, wait)
            except ReadTimeout:
                if deadline.limit(None)[0] == 0:
                    raise
                values = {}
            self.multiplex = values.get("FCGI_MPXS_CONNS") == "1"
            if self.multiplex:
                for conn in self._pool.take_idle():
                    await conn.aclose()

    async def _shared_connection(self, deadline: Deadline, limits: Timeout) -> AsyncMuxConnection:
        async with self._mux_lock:
            tasks = self._check_open()
            mux = self._mux
            if mux is not None and mux.usable and not mux.expired():
                return mux
            if mux is not None:
                await mux.aclose()
            sock = await connect(self.address, deadline.limit(limits.connect)[0])
            mux = AsyncMuxConnection(
                StreamConnection(sock, self.address, multiplex=True), self.keepalive_expiry
            )
            self._mux = mux
            tasks.start_soon(mux.read_loop, name=f"fcgiproto reader {self.address}")
            return mux

    async def _solo_get_values(
        self, names: list[str], deadline: Deadline, limits: Timeout, wait: float | None
    ) -> dict[str, str]:
        conn, _ = await self._acquire(deadline, limits)
        try:
            conn.proto.get_values(names)
            await conn.send(conn.proto.data_to_send(), deadline, limits.write)
            while True:
                for event in await conn.receive(deadline, wait):
                    if isinstance(event, GetValuesResult):
                        await self._release(conn)
                        return dict(event.values)
        except BaseException:
            await self._discard(conn)
            raise

    # --- the pool of connections that carry one request at a time ---

    async def _acquire(self, deadline: Deadline, limits: Timeout) -> tuple[StreamConnection, bool]:
        wait, _ = deadline.limit(limits.pool)
        give_up = None if wait is None else anyio.current_time() + wait
        while True:
            self._check_open()
            conn, may_open, stale = self._pool.acquire(anyio.current_time())
            for old in stale:
                await old.aclose()
            if conn is not None:
                if conn.looks_alive():
                    return conn, True
                await self._discard(conn)
                continue
            if may_open:
                break
            left = None if give_up is None else give_up - anyio.current_time()
            if left is not None and left <= 0:
                raise PoolTimeout(
                    f"no connection to {self.address} became free within {wait}s "
                    f"({self.max_connections} in use)"
                )
            with anyio.move_on_after(left):
                async with self._freed:
                    await self._freed.wait()
        try:
            sock = await connect(self.address, deadline.limit(limits.connect)[0])
        except BaseException:
            self._pool.open_failed()
            await self._notify_freed()
            raise
        return StreamConnection(sock, self.address, multiplex=False), False

    async def _release(self, conn: StreamConnection) -> None:
        """Return a connection in a known-clean state for reuse."""
        with anyio.CancelScope(shield=True):
            for old in self._pool.release(conn, anyio.current_time()):
                await old.aclose()
            await self._notify_freed()
            if not self._reaper_has_deadline:
                self._reaper_wake.set()

    async def _discard(self, conn: StreamConnection) -> None:
        with anyio.CancelScope(shield=True):
            await conn.aclose()
            self._pool.discard()
            await self._notify_freed()

    async def _notify_freed(self) -> None:
        # Always: a task that found the pool full may not be counted as
        # waiting yet, and would then sleep out its whole pool timeout.
        async with self._freed:
            self._freed.notify()

    async def _reap_idle(self) -> None:
        """The reaper task: close idle connections as they expire (each pins a php-fpm worker).

        It sleeps until the oldest idle connection is due, or, with none idle,
        until a release wakes it: once per expiry period at most, not per request.
        """
        woken = False
        while not self._pool.closed:
            due = self._pool.next_expiry()
            if due is None and woken:
                # Woken by a release whose connection is in use again already:
                # look again one expiry period later rather than at every release.
                due = anyio.current_time() + self.keepalive_expiry
            self._reaper_wake = anyio.Event()
            self._reaper_has_deadline = due is not None
            with anyio.move_on_after(None if due is None else due - anyio.current_time()):
                await self._reaper_wake.wait()
            woken = self._reaper_wake.is_set()
            for conn in self._pool.expire(anyio.current_time()):
                await conn.aclose()


class _SoloExchange:
    """A request on a pooled connection of its own."""

    def __init__(self, client: AsyncClient, conn: StreamConnection, reused: bool) -> None:
        self.client = client
        self.conn = conn
        self.reused = reused
        self.address = conn.address
        self.rid = 0

    async def begin(
        self,
        params: ParamsInput,
        body: bytes | None,
        role: Role,
        deadline: Deadline,
        limits: Timeout,
    ) -> None:
        proto = self.conn.proto
        if body is None:
            self.rid = proto.begin_request(role)
            proto.send_params(self.rid, params)
            proto.end_params(self.rid)
        else:
            self.rid = proto.send_request(params, body, role=role)
        await self.conn.send(proto.data_to_send(), deadline, limits.write)

    async def send_stdin(self, chunk: bytes | None, deadline: Deadline, limits: Timeout) -> None:
        proto = self.conn.proto
        if chunk is None:
            proto.end_stdin(self.rid)
        else:
            proto.send_stdin(self.rid, chunk)
        await self.conn.send(proto.data_to_send(), deadline, limits.write)

    async def events(self, deadline: Deadline, limits: Timeout) -> list[Event]:
        return await self.conn.receive(deadline, limits.read)

    async def finish(self, ended: bool) -> None:
        conn = self.conn
        if ended and not conn.torn and conn.proto.can_send_request:
            await self.client._release(conn)
        else:
            await self.client._discard(conn)


class _MuxExchange:
    """A request sharing a multiplexed connection with others."""

    def __init__(self, mux: AsyncMuxConnection, reused: bool) -> None:
        self.mux = mux
        self.reused = reused
        self.address = mux.address
        self.rid = 0
        self.inbox: AsyncInbox | None = None

    async def begin(
        self,
        params: ParamsInput,
        body: bytes | None,
        role: Role,
        deadline: Deadline,
        limits: Timeout,
    ) -> None:
        self.rid, self.inbox = await self.mux.begin(params, body, role, deadline, limits.write)

    async def send_stdin(self, chunk: bytes | None, deadline: Deadline, limits: Timeout) -> None:
        await self.mux.send_stdin(self.rid, chunk, deadline, limits.write)

    async def events(self, deadline: Deadline, limits: Timeout) -> list[Event]:
        assert self.inbox is not None
        return await self.mux.events(self.inbox, deadline, limits.read)

    async def finish(self, ended: bool) -> None:
        if self.inbox is not None:
            with anyio.CancelScope(shield=True):
                await self.mux.finish(self.rid, self.inbox)


class AsyncStreamResponse(ResponseState):
    """One request in progress; for ``async with``. Status and headers are there on entry."""

    def __init__(
        self,
        client: AsyncClient,
        params: ParamsInput,
        stdin: Stdin,
        role: Role,
        limits: Timeout,
        *,
        shared: bool,
        read_head: bool = False,
    ) -> None:
        self._client = client
        self._params = params
        self._stdin = stdin
        self._role = role
        self._limits = limits
        self._shared = shared
        self._read_head = read_head
        self._deadline = deadline_on_anyio_clock(limits.total)
        self._exchange: _SoloExchange | _MuxExchange | None = None
        self._inline = True
        self._sender: anyio.abc.TaskGroup | None = None
        self._sender_scope: anyio.CancelScope | None = None
        self._sender_done = anyio.Event()
        self._read_scope: anyio.CancelScope | None = None
        self._send_error: BaseException | None = None
        self._stdin_touched = False
        super().__init__()
        self._replay: deque[bytes] = deque()  # stdout read for the head, for aiter_stdout
        self._stderr_sent = 0
        self._body_started = self._raw_started = False

    # --- context manager ---

    async def __aenter__(self) -> AsyncStreamResponse:
        stdin = self._stdin
        self._inline = (
            isinstance(stdin, (bytes, bytearray, memoryview)) and len(stdin) <= INLINE_BODY
        )
        if not self._inline:
            # The body goes out from a task of its own while the response is read.
            self._sender = anyio.create_task_group()
            await self._sender.__aenter__()
        try:
            await self._start()
            if self._read_head:
                await self._parse_head()
        except BaseException as exc:
            await self._close(exc)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc)

    async def aclose(self) -> None:
        await self._close(None)

    async def _close(self, exc: BaseException | None) -> None:
        sender, self._sender = self._sender, None
        try:
            if sender is not None:
                sender.cancel_scope.cancel()
                # Re-raises a cancellation pending on the caller: the
                # connection is settled below all the same.
                await sender.__aexit__(None, None, None)
        finally:
            exchange, self._exchange = self._exchange, None
            if exchange is not None:
                with anyio.CancelScope(shield=True):
                    await exchange.finish(self._end is not None)

    # --- the response ---

    # The iterators are plain objects, not async generators: one left by
    # `break` needs no finalizing, which trio would otherwise warn about.

    def aiter_body(self) -> AsyncIterator[bytes]:
        """The response body after the CGI head, as it arrives."""
        if self._parser is None or self._raw_started:
            raise LocalProtocolError("the body follows the head that stream() reads")
        self._body_started = True
        return _Chunks(self._next_body)

    def aiter_stdout(self) -> AsyncIterator[bytes]:
        """The raw stdout stream, CGI head included, as it arrives."""
        if self._body_started:
            raise LocalProtocolError("the body is being read already: use aiter_body()")
        self._raw_started = True
        return _Chunks(self._next_raw)

    def aiter_stderr(self) -> AsyncIterator[bytes]:
        """The stderr stream as it arrives; stdout is kept in memory meanwhile."""
        return _Chunks(self._next_stderr)

    async def _next_body(self) -> bytes | None:
        while not self._body:
            chunk = await self._next_stdout()
            if chunk is None:
                return None
            self._body.extend(self._body_of(chunk))
        return self._body.popleft()

    async def _next_raw(self) -> bytes | None:
        if self._replay:
            return self._replay.popleft()
        return await self._next_stdout()

    async def _next_stderr(self) -> bytes | None:
        while len(self.stderr) <= self._stderr_sent:
            if self._end is not None:
                return None
            await self._pump()
        chunk = bytes(self.stderr[self._stderr_sent :])
        self._stderr_sent = len(self.stderr)
        return chunk

    async def aread(self) -> bytes:
        """The rest of the body."""
        return b"".join([chunk async for chunk in self.aiter_body()])

    # --- the exchange ---

    async def _start(self) -> None:
        client, stdin, inline = self._client, self._stdin, self._inline
        for attempt in (1, 2):
            exchange = await client._exchange(self._deadline, self._limits, self._shared)
            self._exchange = exchange
            try:
                await exchange.begin(
                    self._params,
                    bytes(stdin) if inline else None,  # type: ignore[arg-type]
                    self._role,
                    self._deadline,
                    self._limits,
                )
                if not inline:
                    assert self._sender is not None
                    self._sender_done = anyio.Event()
                    self._sender.start_soon(self._send_body, exchange, self._sender_done)
                await self._pump()
                return
            except (ReadError, WriteError):
                # An idle connection the application closed under us: retry
                # once, fresh, if nothing of the response arrived and the
                # body can be sent again.
                if not exchange.reused or attempt == 2 or self._stdin_touched or self._got_output:
                    raise
                self._exchange = None
                with anyio.CancelScope(shield=True):
                    if self._sender_scope is not None:
                        # One sender at a time: the retry's must not share the body.
                        self._sender_scope.cancel()
                        await self._sender_done.wait()
                    self._send_error = None
                    await exchange.finish(False)

    async def _send_body(self, exchange: _SoloExchange | _MuxExchange, done: anyio.Event) -> None:
        """The sender task: the body, while the response is read.

        Its failure, its own or the body iterable's, is raised by the reading
        side, whose wait it cuts short.
        """
        stdin = self._stdin
        try:
            with anyio.CancelScope() as self._sender_scope:
                if isinstance(stdin, (bytes, bytearray, memoryview)):
                    await self._send_chunk(exchange, stdin)  # can be sent again
                else:
                    # An iterable cannot be replayed once pulled from.
                    self._stdin_touched = True
                    if isinstance(stdin, AsyncIterable):
                        async for chunk in stdin:
                            if not await self._send_chunk(exchange, chunk):
                                return
                    else:
                        for chunk in stdin:
                            if not await self._send_chunk(exchange, chunk):
                                return
                if self._end is None:
                    await exchange.send_stdin(None, self._deadline, self._limits)
        except Exception as exc:
            self._send_error = exc
            if self._read_scope is not None:
                self._read_scope.cancel()
        finally:
            self._sender_scope = None
            done.set()

    async def _send_chunk(
        self, exchange: _SoloExchange | _MuxExchange, chunk: bytes | bytearray | memoryview
    ) -> bool:
        """Send a piece of the body; False once the application has answered."""
        if self._end is not None:
            return False  # answered before it read the rest
        if chunk:
            await exchange.send_stdin(bytes(chunk), self._deadline, self._limits)
        return True

    async def _pump(self) -> None:
        """Read until something of the response arrives."""
        exchange = self._exchange
        if exchange is None:
            raise LocalProtocolError("the response is closed")
        if self._send_error is not None:
            raise self._send_error
        with anyio.CancelScope() as self._read_scope:
            events = await exchange.events(self._deadline, self._limits)
        self._read_scope = None
        if self._send_error is not None:
            raise self._send_error
        self._take(events, exchange.rid, exchange.address)

    async def _next_stdout(self) -> bytes | None:
        while not self._stdout:
            if self._end is not None:
                return None
            await self._pump()
        return self._stdout.popleft()

    async def _parse_head(self) -> None:
        while self._head is None:
            chunk = await self._next_stdout()
            if chunk is not None:
                self._replay.append(chunk)
            self._feed_head(chunk)


class _Chunks:
    """An async iterator over what `next_chunk` gives until it gives None."""

    __slots__ = ("_next_chunk",)

    def __init__(self, next_chunk: Callable[[], Awaitable[bytes | None]]) -> None:
        self._next_chunk = next_chunk

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Nothing to release; here for contextlib.aclosing(), as on a generator."""
