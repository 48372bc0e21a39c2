"""The application side on anyio (asyncio or trio): a task per connection, a task per request.

Each connection has three kinds of task. Its reader feeds a `ServerConnection`
and gathers each request's params, stdin and filter data; once a request is
whole it starts the request's task, which runs the app under a cancel scope
of its own (ABORT_REQUEST cancels it). Its writer is the only task that
writes to the socket: the others move the core's output to `pending` and,
for a request's output, wait until the writer has sent it, so a slow peer
holds back the apps instead of making memory grow.

The control flow is this one for every loop; what differs by loop is in
small primitives chosen once per server: how a socket is waited on (the
client's stream for the running loop), the tasks requests run in (bare
asyncio tasks on asyncio, an anyio task group elsewhere: _request_tasks.py)
and the clock. On asyncio a small read is taken where the loop's callback
read it (AsyncioStream.read_fed hands it to the reader's `_feed`, which does
what the read loop would), so a request's task starts in the turn of the
loop its bytes arrived in.

Everything runs in one thread, so the protocol state needs no lock: a task
(or the read callback) that calls the core moves its output to `pending`
before its next await.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import itertools
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel

from fcgiproto import (
    DEFAULT_MAX_PARAMS_PAIRS,
    DEFAULT_MAX_PARAMS_SIZE,
    AbortRequest,
    BeginRequest,
    Event,
    FilterData,
    FilterDataEnd,
    Params,
    RemoteProtocolError,
    Role,
    ServerConnection,
    StdinData,
    StdinEnd,
    TransportError,
)
from fcgiproto.support import (
    ALL_ROLES,
    BODY_TOO_LARGE,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_MAX_UNSENT_SIZE,
    DEFAULT_MULTIPLEX,
    DEFAULT_PARAMS_TIMEOUT,
    DEFAULT_SEND_TIMEOUT,
    DROPPED_TOO_MUCH,
    ERROR_STATUS,
    INTERNAL_ERROR,
    OUTPUT_PIECE,
    OUTPUT_TYPES,
    Address,
    AddressInput,
    Liveness,
    RequestBase,
    RequestSlots,
    RequestState,
    ServerOptions,
    check_output,
    close_output,
    dropped_too_much,
    failure_report,
    listen_address,
    log_bytes,
    output_chunks,
)

from ._asyncio_stream import AsyncioStream, Feed
from ._backend import _stream_type
from ._request_tasks import RequestTasks, request_tasks_type
from ._running import loop_clock

__all__ = ["App", "Request", "serve"]

logger = logging.getLogger("fcgiproto_anyio.server")

Output: TypeAlias = "bytes | AsyncIterable[bytes] | Iterable[bytes]"
App: TypeAlias = "Callable[[Request], Awaitable[Output] | AsyncIterable[bytes]]"

#: A read takes what the kernel has, up to this: several 64 KiB records at once.
READ_SIZE = 256 * 1024
#: A read is decoded in steps of this size, with a turn of the event loop between steps
#: once they have taken DECODE_BUDGET seconds: 256 KiB of tiny records (the core spends
#: ~3 µs on each GET_VALUES) would otherwise hold the loop, and every other connection,
#: for tens of milliseconds.
DECODE_STEP = 32 * 1024
DECODE_BUDGET = 0.002
#: Small pieces of output waiting together go out in one write, up to this size.
COALESCE_SIZE = 64 * 1024
#: After a keep_conn=False request, how long the client has to take the rest
#: of the output and close its end before the connection is closed anyway.
LINGER_TIMEOUT = 5.0
#: How long to wait before accepting again after accept() failed (out of fds, ...).
ACCEPT_RETRY = 0.1
#: At max_connections with no connection able to give way, how soon to look again.
AT_CAP_RECHECK = 0.1
#: A streamed request's body read ahead of its app, at most: past it the
#: connection is not read until the app takes some.
BODY_READ_AHEAD = 256 * 1024
#: A streamed app told its client is gone (http.disconnect) has this long to
#: return before it is cancelled.
DISCONNECT_GRACE = 5.0
#: While draining, a connection that never carried a request is closed once
#: it was this long silent: a web server that just connected sends at once.
DRAIN_FRESH_GRACE = 1.0
#: How often a draining server looks for connections that went idle.
DRAIN_POLL = 0.1

_STDOUT, _STDERR = True, False


class Request(RequestBase):
    """One whole request: what the web server sent, and a way to write to its STDERR.

    Once aborted, the app's task is cancelled; output from a shielded app is dropped.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: _Connection, state: _State) -> None:
        super().__init__(state, connection.number)
        self._connection = connection

    async def log(self, message: str | bytes) -> None:
        """Write to the request's STDERR (the web server's error log), once it is sent."""
        data = log_bytes(message)
        if data:
            await self._connection.write(self._state, _STDERR, data)


class _State(RequestState):
    __slots__ = ("changed", "dispatched", "scope", "unread")

    def __init__(self, begin: BeginRequest, options: ServerOptions, now: float) -> None:
        super().__init__(begin, options, now)
        self.scope: anyio.CancelScope | None = None  # set once the app's task is started
        self.dispatched = False
        #: Of a streamed request: body bytes its app has not taken yet.
        self.unread = 0
        # Set, then dropped, when a streamed request gets body, ends or is aborted;
        # made by whoever waits (most requests never wait on it).
        self.changed: anyio.Event | None = None

    async def wait_changed(self) -> None:
        if self.changed is None:
            self.changed = anyio.Event()
        await self.changed.wait()

    def wake(self) -> None:
        if self.changed is not None:
            self.changed.set()
            self.changed = None


class BodyTooLarge(OSError):
    """A streamed request's body went past max_body_size; the server answers 413."""


class AsyncExchange:
    """A request whose app runs once its PARAMS are in: its body streams in, its output out.

    What serve_asgi runs applications on. `receive()` waits for more of the
    body; `write()` for the client to take the output (backpressure), and
    returns False once the request is over: aborted, or its connection lost.
    """

    __slots__ = ("_connection", "_state", "app_status", "connection_id", "raw_params", "started")

    def __init__(self, connection: _Connection, state: _State) -> None:
        assert state.raw_params is not None
        self._connection = connection
        self._state = state
        #: The params as they came; `params` decodes them when asked.
        self.raw_params = state.raw_params
        self.connection_id = connection.number
        #: The status END_REQUEST carries.
        self.app_status = 0
        #: Whether any stdout was written.
        self.started = False

    @property
    def params(self) -> dict[str, str]:
        return self._state.text_params()

    @property
    def request_id(self) -> int:
        return self._state.request_id

    @property
    def aborted(self) -> bool:
        """True once the web server aborted the request or the connection was lost."""
        return self._state.aborted

    @property
    def ended(self) -> bool:
        return self._state.ended

    async def receive(self) -> tuple[bytes, bool]:
        """The next piece of the body, and whether more follows; (b"", False) once aborted.

        BodyTooLarge once the body went past max_body_size.
        """
        return await self._connection.receive_body(self._state)

    def end(self) -> None:
        """End the request now (END_REQUEST with app_status), though the app goes on."""
        self._connection.end_now(self._state, self.app_status)

    async def wait_over(self) -> None:
        """Return once the request is aborted, its connection lost, or it ended."""
        state = self._state
        while not (state.ended or state.aborted):
            await state.wait_changed()

    async def write(self, data: bytes | bytearray | memoryview) -> bool:
        """Send stdout, once the client took all but max_unsent_size; False once it is over."""
        if not data:
            return not self._state.ended
        self.started = True
        return await self._connection.write(self._state, _STDOUT, data)

    def finish(self, data: bytes | bytearray | memoryview) -> Awaitable[bool]:
        """Send the last stdout and end the request; False if it was over already.

        Up to max_unsent_size of it goes out with END_REQUEST in one write,
        and the app does not wait for the client to take it: a response whose
        body is small costs one send and no turn of the loop. (The
        connection's coroutine itself, to be awaited: no wrapping one.)
        """
        if data:
            self.started = True
        return self._connection.finish(self._state, data, self.app_status)

    async def log(self, message: str | bytes) -> None:
        """Write to the request's STDERR (the web server's error log), once it is sent."""
        data = log_bytes(message)
        if data:
            await self._connection.write(self._state, _STDERR, data)

    def log_nowait(self, message: str | bytes) -> None:
        """Queue a message for the request's STDERR without waiting (from the event loop)."""
        data = log_bytes(message)
        if data:
            self._connection.log_nowait(self._state, data)

    def __repr__(self) -> str:
        method = self.params.get("REQUEST_METHOD", "")
        uri = self.params.get("REQUEST_URI") or self.params.get("SCRIPT_NAME", "")
        what = " ".join(part for part in (method, uri) if part)
        return f"<Exchange {self.request_id} on connection {self.connection_id}: {what}>"


StreamApp: TypeAlias = "Callable[[AsyncExchange], Awaitable[None]]"


class _Connection:
    """One accepted connection: its protocol state, its requests, its reader and writer.

    Output offsets count every byte ever queued (`queued`) and sent (`sent`):
    a task that queued output up to offset n waits for `sent >= n`.
    """

    def __init__(self, server: _Server, sock: _Socket, number: int) -> None:
        self.server = server
        self.app = server.app
        self.options = server.options
        self.sock = sock
        self.number = number
        self.clock = server.clock
        self.proto: ServerConnection = server.options.connection()
        # Output is encoded and sent in pieces of this size at most.
        self.piece = min(self.options.max_unsent_size, OUTPUT_PIECE)
        self.states: dict[int, _State] = {}
        self.pending: deque[bytes] = deque()
        self.queued = 0
        self.sent = 0
        # (offset, size) of the core's own answers not yet known to be sent.
        self.answers: deque[tuple[int, int]] = deque()
        self.unsent_answers = 0
        self.wake_writer = anyio.Event()
        # Set, then dropped, whenever `sent` moves or we die; made by whoever waits.
        self.progress: anyio.Event | None = None
        self.read_scope = anyio.CancelScope()
        self.scope = anyio.CancelScope()  # the whole connection: cancelled to evict it
        self.liveness = sock.liveness
        self.requests: RequestTasks | None = None
        self.dead = False  # lost, broken, or shut down: nothing more is sent
        self.closing = False  # a keep_conn=False request ended: close once it is all sent
        self.writing = False  # the writer is in a send
        self.writer_done = False  # the writer returns once nothing is pending
        self.streaming = server.streaming
        # Without multiplexing, requests run one at a time: the next wait here.
        self.waiting: deque[_State] = deque()
        self.busy = False
        # Dispatched while a read is routed; started once it all is (see _take).
        self.starting: list[_State] = []
        self.served = 0  # requests ended on this connection
        # Set, then dropped, when a streamed app takes body; made by whoever waits.
        self.body_taken: anyio.Event | None = None

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
        finally:
            self._die()
            self.requests = None  # it names _request_failed: a cycle the gc would have to free
            await self.sock.aclose()

    async def _run(self) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._write_loop, name=f"fcgi-writer-{self.number}")
            async with self.server.request_tasks(self._request_failed) as requests:
                self.requests = requests
                graceful = await self._read_loop()
                if not graceful:
                    self._die()
                if self.streaming:
                    # Streamed apps hear of it (http.disconnect) and may return by themselves.
                    requests.cancel_at(self.clock() + DISCONNECT_GRACE)
                else:
                    requests.cancel()
            if graceful:
                await self._close_gracefully()
            # The writer returns once it finds nothing to send; one stuck in a
            # send to a peer that does not read is cancelled.
            self.writer_done = True
            if self.writing:
                tasks.cancel_scope.cancel()
            else:
                self.wake_writer.set()

    def _request_failed(self, exc: BaseException) -> None:
        """A request's task let an exception out (not the app's: ours): the connection goes."""
        logger.error("connection %d failed", self.number, exc_info=exc)
        self._die()
        self.scope.cancel()

    def evict(self, reason: str) -> None:
        """Close the connection from outside its tasks: it waited too long, or gives way."""
        if not self.scope.cancel_called:
            logger.info("closing connection %d: %s", self.number, reason)
        self._die()
        self.scope.cancel()

    def deadline(self) -> tuple[float, str] | None:
        return self.liveness.deadline(self.options, self.states.values())

    # --- reading ---

    async def _read_loop(self) -> bool:
        """Read and route until the connection is over; True if it closes in good order."""
        with self.read_scope:
            while not (self.dead or self.closing):
                if self.answers:
                    await self._wait_for_answers()
                while self.streaming and not self.dead and self._body_full():
                    if self.body_taken is None:
                        self.body_taken = anyio.Event()
                    await self.body_taken.wait()
                try:
                    data = await self.sock.receive(READ_SIZE, self._feed)
                except (OSError, TransportError) as exc:
                    logger.info("connection %d lost while reading: %s", self.number, exc)
                    return False
                if data is None:
                    continue  # taken by _feed while the read waited
                if not data:
                    self._take(data)  # the core learns of the end (a cut record is logged)
                    return False
                if len(data) <= DECODE_STEP:
                    self.liveness.received(self.clock())
                    if not self._take(data):
                        return False
                    if self.states:
                        for state in self.states.values():
                            if not (state.stdin_done and state.data_done):
                                break
                        else:
                            # Every request is in whole: the peer sends more once
                            # answered, so a read tried now would only fail.
                            self.sock.stream.wait_first()
                    continue
                self.liveness.received(self.clock())
                step_began = time.perf_counter()
                for start in range(0, len(data), DECODE_STEP):
                    if time.perf_counter() - step_began > DECODE_BUDGET:
                        await anyio.lowlevel.checkpoint()
                        await self._wait_for_answers()
                        if self.dead:
                            return False
                        step_began = time.perf_counter()
                    if not self._take(data[start : start + DECODE_STEP]):
                        return False
        return self.closing and not self.dead

    def _feed(self, data: bytes) -> bool | bytes:
        """What the read loop does with a small read, done where the read's callback has it.

        On asyncio the loop's callback that read the bytes hands them here
        while the read loop waits (AsyncioStream.read_fed): a request is
        taken, and its task started, in the turn of the loop it arrived in,
        without a turn to wake the read loop. True when the read loop goes on
        waiting; False when it has to look again first (an answer to wait
        for, a streamed body read far enough ahead, the connection over);
        bytes too many for one step are left to it.
        """
        if len(data) > DECODE_STEP:
            return data
        self.liveness.received(self.clock())
        if not self._take(data, in_callback=True):
            self._die()
            return False
        return not (
            self.dead
            or self.closing
            or self.answers
            or (self.streaming and self.states and self._body_full())
        )

    def _take(self, data: bytes, in_callback: bool = False) -> bool:
        """Feed the core and route what it decodes; False if the connection must close.

        `in_callback`: called by the loop's read callback (_feed), outside any
        task, where a request started may take its first step there and then
        (see AsyncioRequestTasks.start); never one started by a request's task
        as it ends (_next_waiting), even from within such a step.
        """
        try:
            events = self.proto.receive_data(data)
        except RemoteProtocolError as exc:
            logger.info("closing connection %d: %s", self.number, exc)
            return False
        if self.proto.dropped_size and dropped_too_much(self.proto, self.options):
            logger.info("closing connection %d: %s", self.number, DROPPED_TOO_MUCH)
            return False
        before = self.queued
        for event in events:
            self._route(event)
        self._queue()
        if self.queued > before:
            self.answers.append((self.queued, self.queued - before))
            self.unsent_answers += self.queued - before
        if self.starting:
            # After the whole read is routed and the core's answers counted: a
            # request's task may run at once (from the loop's read callback),
            # and finds the rest of its body in, its output not counted as theirs.
            starting, self.starting = self.starting, []
            for state in starting:
                self._start(state, at_once=in_callback)
        return True

    async def _wait_for_answers(self) -> None:
        while self.answers and self.answers[0][0] <= self.sent:
            self.unsent_answers -= self.answers.popleft()[1]
        if self.unsent_answers > self.options.max_unsent_size:
            await self._sent_up_to(self.answers[-1][0])

    def _body_full(self) -> bool:
        """Whether a streamed app has more body unread than may be read ahead."""
        # A loop, not any() over a generator: this runs for every read.
        for state in self.states.values():  # noqa: SIM110
            if state.unread > BODY_READ_AHEAD:
                return True
        return False

    def _route(self, event: Event) -> None:
        if isinstance(event, BeginRequest):
            if self.server.slots.admit(self.proto, event):
                self.states[event.request_id] = _State(event, self.options, self.clock())
            elif self.proto.closed:  # refused, and keep_conn=False: close once it is sent
                self.closing = True
            return
        if not isinstance(
            event, (Params, StdinData, StdinEnd, FilterData, FilterDataEnd, AbortRequest)
        ):
            return
        state = self.states.get(event.request_id)
        if state is None:
            return
        if isinstance(event, AbortRequest):
            state.aborted = True
            if state.scope is not None and not self.streaming:
                state.scope.cancel()  # a streamed app hears of it instead
            self._end(state, ERROR_STATUS)
            return
        if not self.streaming:
            if state.gather(event) and not state.dispatched:
                self._dispatch(state)
            elif state.too_large:
                self.proto.send_stdout(state.request_id, BODY_TOO_LARGE)
                self._end(state, ERROR_STATUS)
            return
        # A streamed request: started once PARAMS are in (unless CONTENT_LENGTH
        # already says too much), its body read by its app.
        state.gather(event)
        if state.too_large:
            if not state.dispatched:
                self.proto.send_stdout(state.request_id, BODY_TOO_LARGE)
                self._end(state, ERROR_STATUS)
            else:  # its app reads BodyTooLarge, and answers 413 if it can
                state.unread = 0
                state.wake()
            return
        if isinstance(event, StdinData):
            state.unread += len(event.data)
            state.wake()
        elif isinstance(event, StdinEnd) and state.changed is not None:
            state.wake()
        if state.raw_params is not None and not state.dispatched:
            if _declared_length(state.raw_params) > self.options.max_body_size:
                self.proto.send_stdout(state.request_id, BODY_TOO_LARGE)
                self._end(state, ERROR_STATUS)
                return
            self._dispatch(state)

    def _dispatch(self, state: _State) -> None:
        """Start a request's app, or queue it behind the one running on a plain connection."""
        state.dispatched = True
        if not self.options.multiplex:
            if self.busy:
                self.waiting.append(state)
                return
            self.busy = True
        self.starting.append(state)

    def _start(self, state: _State, at_once: bool = False) -> None:
        """Start a request's task; `at_once` only from the read callback, outside any task."""
        assert state.raw_params is not None and self.requests is not None
        request: Request | AsyncExchange
        request = AsyncExchange(self, state) if self.streaming else Request(self, state)
        if not self.streaming:  # an ABORT_REQUEST cancels it; a streamed app hears of it instead
            state.scope = anyio.CancelScope()
        self.liveness.app_started()
        self.requests.start(
            self._respond,
            state,
            request,
            name=f"fcgi-request-{self.number}-{state.request_id}",
            at_once=at_once,
        )

    def _next_waiting(self) -> None:
        """A plain connection's request ended: start the next that waits, if any."""
        self.busy = False
        while self.waiting and not self.dead:
            state = self.waiting.popleft()
            if not state.ended:
                self.busy = True
                self._start(state)
                return

    # --- running a request ---

    async def _respond(self, state: _State, request: Request | AsyncExchange) -> None:
        status = ERROR_STATUS
        try:
            if isinstance(request, AsyncExchange):
                if not state.ended:  # the gateway's run inline: a coroutine less a request
                    try:
                        await self.server.stream_app(request)
                        status = request.app_status
                    except BodyTooLarge:
                        if not request.started:
                            await self.write(state, _STDOUT, BODY_TOO_LARGE)
                    except Exception:
                        # The gateways answer their app's failures themselves; this is theirs.
                        logger.exception("the gateway failed on %r", request)
                        await self.write(state, _STDERR, failure_report())
                        if not request.started:
                            await self.write(state, _STDOUT, INTERNAL_ERROR)
            else:
                assert state.scope is not None
                with state.scope:
                    if not state.ended:
                        status = await self._run_app(state, request)
        finally:
            self._end(state, status)  # queues END_REQUEST, so `sending` is set first
            self.liveness.app_ended(self.clock())
            if not self.options.multiplex:
                self._next_waiting()

    async def receive_body(self, state: _State) -> tuple[bytes, bool]:
        """The body that came for a streamed request since last asked, and whether more follows."""
        liveness = self.liveness
        while True:
            if state.too_large:
                raise BodyTooLarge(
                    f"the request body is over max_body_size ({self.options.max_body_size})"
                )
            if state.stdin:
                data = state.stdin[0] if len(state.stdin) == 1 else b"".join(state.stdin)
                state.stdin = []
                state.unread = 0
                self._body_was_taken()
                return data, not state.stdin_done
            if state.stdin_done or state.ended or self.dead:
                return b"", False
            liveness.body_waits += 1
            try:
                await state.wait_changed()
            finally:
                liveness.body_waits -= 1

    def end_now(self, state: _State, app_status: int) -> None:
        self._end(state, app_status)

    async def finish(
        self, state: _State, data: bytes | bytearray | memoryview, app_status: int
    ) -> bool:
        piece = self.piece
        if len(data) > piece:  # all but the last piece as any output, waiting on the client
            cut = len(data) - piece
            if not await self.write(state, _STDOUT, memoryview(data)[:cut]):
                return False
            data = memoryview(data)[cut:]
        if state.ended or self.dead:
            return False
        if data:
            self.proto.send_stdout(state.request_id, data)
        self._end(state, app_status)  # queues stdout and END_REQUEST together
        return True

    def log_nowait(self, state: RequestState, data: bytes) -> None:
        """Queue STDERR for a request without waiting for it to be sent."""
        if state.ended or self.dead:
            return
        self.proto.send_stderr(state.request_id, data)
        self._queue()

    def drain(self, now: float) -> None:
        """While the server drains: close the connection if it carries no request.

        One that never carried a request is given DRAIN_FRESH_GRACE to send one.
        """
        if self.dead or self.states or self.liveness.running or self.sent < self.queued:
            return  # a request in progress, or the end of one not yet sent
        if not self.served and now - self.liveness.last_activity < DRAIN_FRESH_GRACE:
            return
        self._die()
        self.scope.cancel()

    async def _run_app(self, state: _State, request: Request) -> int:
        """Run the app and send its output; the app_status to end the request with."""
        started = False
        try:
            result: Any = self.app(request)
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, OUTPUT_TYPES):
                if result:
                    started = True
                    await self.write(state, _STDOUT, result)
            elif isinstance(result, AsyncIterable):
                try:
                    async for chunk in result:
                        if check_output(chunk):
                            started = True
                            if not await self.write(state, _STDOUT, chunk):
                                break
                finally:
                    aclose = getattr(result, "aclose", None)
                    if callable(aclose):
                        await aclose()
            else:
                chunks = output_chunks(result, "bytes or an (async) iterable of bytes")
                try:
                    for chunk in chunks:
                        started = True
                        if not await self.write(state, _STDOUT, chunk):
                            break
                finally:
                    close_output(result)
            return request.app_status
        except Exception:
            logger.exception("the app failed on %r", request)
            await self.write(state, _STDERR, failure_report())
            if not started:
                await self.write(state, _STDOUT, INTERNAL_ERROR)
            return ERROR_STATUS

    # --- output ---

    async def write(
        self, state: RequestState, stdout: bool, data: bytes | bytearray | memoryview
    ) -> bool:
        """Send stdout or stderr of a request, once it is sent; False once the request is over.

        A big chunk goes out in pieces of OUTPUT_PIECE (max_unsent_size if
        smaller), each sent before the next is encoded, so that the server
        never holds more than that of it.
        """
        piece = self.piece
        view = memoryview(data)
        for start in range(0, len(view), piece):
            if state.ended or self.dead:
                return False
            part = view[start : start + piece]
            if stdout:
                self.proto.send_stdout(state.request_id, part)
            else:
                self.proto.send_stderr(state.request_id, part)
            await self._sent_up_to(self._queue())
        return not (state.ended or self.dead)

    def _end(self, state: _State, app_status: int) -> None:
        """End a request, unless it is over already."""
        if state.ended or self.dead:
            return
        state.ended = True
        if self.states.get(state.request_id) is state:
            del self.states[state.request_id]
            self.server.slots.give_back()
        self.proto.end_request(state.request_id, app_status)
        self.served += 1
        if self.streaming:
            state.stdin = []
            state.unread = 0
            if state.changed is not None:
                state.wake()
            if self.body_taken is not None:
                self._body_was_taken()
        self._queue()
        if self.proto.closed:  # keep_conn=False: read no more, close once it is sent
            self.closing = True
            self.read_scope.cancel()

    def _queue(self) -> int:
        """Move the core's output to `pending`; the offset where it ends."""
        data = self.proto.data_to_send()
        if data and not self.dead:
            self.queued += len(data)
            if not self.pending and not self.writing and not self.writer_done:
                # The writer is idle: the kernel takes what it has room for now,
                # which spares the writer's turns of the event loop (a small
                # response costs no task switch at all). It stays the only
                # writer of whatever has to wait.
                data = self._send_now(data)
            if data:
                self.pending.append(data)
                self.liveness.sending = True
                self.wake_writer.set()
        return self.queued

    def _send_now(self, data: bytes) -> bytes:
        """Hand `data` to the kernel without waiting; what it did not take."""
        try:
            sent = self.sock.send_nowait(data)
        except OSError:
            return data  # the writer meets the error again, and closes the connection
        if sent:
            # No liveness.send_moved(): no send was stalled (the writer is idle),
            # and the activity clock is set by what queued this (a read, an app).
            self.sent += sent
            if self.progress is not None:
                self._progressed()
        return data[sent:]

    async def _sent_up_to(self, offset: int) -> None:
        while self.sent < offset and not self.dead:
            if self.progress is None:
                self.progress = anyio.Event()
            await self.progress.wait()

    async def _write_loop(self) -> None:
        while True:
            while self.pending:
                data = self._next_write()
                self.writing = True
                try:
                    await self.sock.send(data)
                except (OSError, TransportError) as exc:
                    logger.info("connection %d lost while writing: %s", self.number, exc)
                    self._die()
                    return
                finally:
                    self.writing = False
                self.sent += len(data)
                self._progressed()
            if self.writer_done:
                return
            self.liveness.sending = False
            self.wake_writer = anyio.Event()
            await self.wake_writer.wait()

    def _next_write(self) -> bytes:
        pending = self.pending
        first = pending.popleft()
        if len(first) >= COALESCE_SIZE or not pending:
            return first
        parts, size = [first], len(first)
        while pending and size + len(pending[0]) <= COALESCE_SIZE:
            part = pending.popleft()
            parts.append(part)
            size += len(part)
        return first if len(parts) == 1 else b"".join(parts)

    def _progressed(self) -> None:
        if self.progress is not None:
            self.progress.set()
            self.progress = None

    def _body_was_taken(self) -> None:
        if self.body_taken is not None:
            self.body_taken.set()
            self.body_taken = None

    # --- closing ---

    async def _close_gracefully(self) -> None:
        """After a keep_conn=False request: send the rest, then wait for the client to close."""
        with anyio.move_on_after(LINGER_TIMEOUT):
            await self._sent_up_to(self.queued)
            if self.dead:
                return
            self.dead = True
            with contextlib.suppress(OSError, TransportError):
                self.sock.send_eof()
                # Read what the client still sends, so that closing does not reset
                # the connection (which could drop our last bytes at the client).
                while await self.sock.receive(READ_SIZE):
                    pass

    def _die(self) -> None:
        """Nothing more is sent: abandon every request and wake whoever waits."""
        self.dead = True
        for state in self.states.values():
            state.aborted = True
            state.wake()
        self.server.slots.give_back(len(self.states))
        self.states.clear()
        self.waiting.clear()
        self._body_was_taken()
        self.pending.clear()
        self._progressed()
        self.read_scope.cancel()


class _Server:
    """The accept loops and the connections they started, all in one task group."""

    def __init__(
        self,
        app: App | StreamApp,
        options: ServerOptions,
        tasks: anyio.abc.TaskGroup,
        bound: Address,
        *,
        streaming: bool = False,
    ) -> None:
        self.app: App = app  # type: ignore[assignment]
        self.stream_app: StreamApp = app  # type: ignore[assignment]
        #: Apps run once PARAMS are in, on an AsyncExchange, their body streamed.
        self.streaming = streaming
        self.options = options
        self.tasks = tasks
        self.connections: set[_Connection] = set()
        self.connection_ended = anyio.Event()
        self.slots = RequestSlots(options.max_requests)  # one thread: no lock needed
        self.clock = loop_clock()
        #: How accepted sockets are waited on: the client's stream for the running loop.
        self.stream_type = _stream_type()
        self.request_tasks = request_tasks_type()
        self.bound = bound
        self.numbers = itertools.count(1)

    async def accept_loop(self, listener: socket.socket) -> None:
        while True:
            await anyio.wait_readable(listener)
            if not self._make_room():
                # Every connection runs an app: the backlog holds the rest a while.
                with anyio.move_on_after(AT_CAP_RECHECK):
                    await self.connection_ended.wait()
                continue
            sock = await _accept(listener, self)
            if sock is None:
                continue
            connection = _Connection(self, sock, next(self.numbers))
            self.connections.add(connection)
            self.tasks.start_soon(
                self._connection, connection, name=f"fcgi-connection-{connection.number}"
            )

    def _make_room(self) -> bool:
        """Whether a connection may be accepted: below the cap, or another gave way to it."""
        live = [c for c in self.connections if not c.dead]
        if len(live) < self.options.max_connections:
            return True
        now = self.clock()
        ranked = [(rank, c) for c in live if (rank := c.liveness.eviction_rank(now)) is not None]
        if not ranked:
            return False
        _, victim = min(ranked, key=lambda pair: pair[0])
        victim.evict("at max_connections; it waited longest on its client")
        return True

    async def watch_loop(self) -> None:
        """Close the connections that waited too long on their peer."""
        options = self.options
        # No timeout is shorter than this: a deadline set after a look at them
        # all is never due before the next look.
        every = min(options.params_timeout, options.idle_timeout, options.send_timeout)
        while True:
            now = self.clock()
            next_look = now + every
            for connection in list(self.connections):
                due = None if connection.dead else connection.deadline()
                if due is None:
                    continue
                when, reason = due
                if when <= now:
                    connection.evict(reason)
                else:
                    next_look = min(next_look, when)
            await anyio.sleep(max(next_look - now, 0.0))

    async def drain(self, timeout: float) -> None:
        """Close connections as they go idle; return once none is left, or after `timeout`."""
        with anyio.move_on_after(timeout):
            while self.connections:
                now = self.clock()
                for connection in list(self.connections):
                    connection.drain(now)
                with anyio.move_on_after(DRAIN_POLL):
                    await self.connection_ended.wait()
        if self.connections:
            logger.warning(
                "%d connections still busy after the graceful timeout: closing them",
                len(self.connections),
            )

    async def _connection(self, connection: _Connection) -> None:
        try:
            await connection.run()
        except Exception:
            logger.exception("connection %d failed", connection.number)
        finally:
            self.connections.discard(connection)
            self.connection_ended.set()
            self.connection_ended = anyio.Event()


class _Socket:
    """A connected non-blocking socket: read and written at once when it can be, else waited on.

    The waits go through the stream the client uses on the running loop
    (AnyioBackend's): on asyncio the socket is registered with the loop once
    for the life of the connection and read by the loop's callback
    (AsyncioStream), where anyio.wait_readable() added and removed it with
    epoll around every wait; on trio through trio itself. Not an anyio
    stream, for two things they do on asyncio: a stream from a listener reads
    ahead without bound until a receive() first has to wait, so a client that
    sends without reading its answers fills our memory instead of its socket
    buffer; and cancelling a Unix stream's receive() or send(), or a
    listener's accept(), in the loop iteration in which the socket becomes
    ready makes the event loop call set_result() on a cancelled future
    (InvalidStateError, reported by the loop). Cancelling is how serve()
    stops. Here the kernel holds what we have not read, and a send is done
    once the kernel has it all. Errors are OSError or fcgiproto's
    TransportError (ReadError, WriteError).
    """

    __slots__ = ("clock", "fed", "liveness", "sock", "stream")

    def __init__(self, sock: socket.socket, server: _Server) -> None:
        self.sock = sock
        self.clock = server.clock
        self.liveness = Liveness(self.clock())
        self.stream = server.stream_type(sock, server.bound)
        self.fed = isinstance(self.stream, AsyncioStream)

    async def receive(self, max_bytes: int, feed: Feed | None = None) -> bytes | None:
        """Up to max_bytes, at least one; b"" once the peer has closed.

        With `feed`, bytes that come while it waits go there first where the
        loop can do that (AsyncioStream.read_fed); None when it took them.
        """
        # A keep-alive connection mostly waits here for its next request.
        if feed is not None and self.fed:
            return await self.stream.read_fed(max_bytes, feed)  # type: ignore[union-attr]
        return await self.stream.read(max_bytes, None)

    async def send(self, data: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(data)
        start, end = 0, len(data)
        liveness = self.liveness
        while start < end:
            try:
                start += self.sock.send(view[start:])
            except (BlockingIOError, InterruptedError):
                liveness.send_waiting(self.clock())
                start += await self.stream.write_some(view[start:], None)
            liveness.send_moved(self.clock())

    def send_nowait(self, data: bytes) -> int:
        """How much of `data` the kernel took at once: 0 if it had no room."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        """Off the loop, then closed; a task waiting on the socket wakes."""
        await self.stream.aclose()


async def _accept(listener: socket.socket, server: _Server) -> _Socket | None:
    """The connection waiting on a listening socket; None if there is none after all."""
    try:
        sock, peer = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:  # out of file descriptors, ...: the client waits in the backlog
        logger.warning("accepting a connection failed: %s", exc)
        await anyio.sleep(ACCEPT_RETRY)
        return None
    if not server.options.peer_allowed(peer):
        logger.warning("refused a connection from %s: not in allowed_peers", peer[0])
        sock.close()
        return None
    sock.setblocking(False)
    if sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):  # the client may be gone already
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _Socket(sock, server)


async def _listen(address: Address) -> tuple[socket.socket, Address, int]:
    """A listening socket, the address it is bound to, and its socket file's inode (0 for TCP)."""
    if address.path is not None:
        path = address.path
        await _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            inode = os.stat(path).st_ino
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock, address, inode
    family, kind, proto, _, sockaddr = (
        await anyio.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
        bound = sock.getsockname()
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, Address(host=bound[0], port=bound[1]), 0


async def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a server that is gone; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    try:
        with anyio.fail_after(1.0):  # a live server with a full backlog does not answer at once
            probe = await anyio.connect_unix(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nothing listens there: stale
        return
    except FileNotFoundError:
        return
    except TimeoutError:  # alive, its backlog full
        pass
    else:
        await probe.aclose()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


async def serve(
    app: App,
    address: AddressInput,
    *,
    multiplex: bool = DEFAULT_MULTIPLEX,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    max_params_size: int = DEFAULT_MAX_PARAMS_SIZE,
    max_params_pairs: int = DEFAULT_MAX_PARAMS_PAIRS,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    max_unsent_size: int = DEFAULT_MAX_UNSENT_SIZE,
    params_timeout: float = DEFAULT_PARAMS_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    roles: Collection[Role] = ALL_ROLES,
    task_status: anyio.abc.TaskStatus[Address] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a FastCGI application until cancelled.

    ``await app(request)`` runs once a request's params, stdin and filter data
    have all arrived; what it returns, bytes or an iterable or async iterable
    of bytes sent as it is produced, is the CGI response: headers, a blank
    line, the body. The app may also be an async generator function. If it
    raises, the traceback goes to this module's logger and to the request's
    STDERR (the web server's error log), a plain 500 response is sent if
    nothing was yet, and the request ends with app_status 1; the connection
    goes on. Each chunk is sent before the next is asked for, so a slow client
    slows the app down instead of making memory grow. A synchronous iterable
    runs in the event loop: it must not block.

    `address` is as for the client: "host:port" (port 0 takes a free one),
    "[::1]:9000", "unix:/path.sock", an absolute path, or (host, port). A Unix
    socket file left by a server that is gone is replaced, and removed on the
    way out. ``await task_group.start(serve, app, address)`` returns the bound
    address once listening.

    Each connection has a task, and each request a task of its own: with
    `multiplex` a connection carries many requests at once, without it (the
    default: nginx, Apache and Caddy never multiplex, and a client that can
    asks first) one at a time: a second request sent anyway (HAProxy does)
    waits for the first to end. An ABORT_REQUEST cancels that request's task
    and ends the request at once with app_status 1; the connection's other
    requests go on. A request's stdin and filter data are held in memory
    until the app runs, up to `max_body_size` bytes (more is answered 413 at
    once).

    The options and their defaults are fcgiproto_socket.serve's, and mean the
    same (see fcgiproto.support.ServerOptions and the README's "Limits");
    GET_VALUES answers them as set. At `max_connections` the server keeps
    accepting and closes the connection that waited longest on its client;
    only while every connection runs an app does a new one wait in the
    listen backlog. `max_requests` caps requests at once across all
    connections; one more ends with OVERLOADED. Requests in `roles` only are
    accepted (others end with UNKNOWN_ROLE). PARAMS beyond `max_params_size`
    bytes or `max_params_pairs` pairs, anything else against the protocol,
    PARAMS slower than `params_timeout`, silence for `idle_timeout` while no
    app runs for the connection, and a send left waiting for `send_timeout`
    close that connection only, as does the client closing it, which cancels
    its requests. An app's output waits once `max_unsent_size` bytes of it
    are not yet taken by the client. After a keep_conn=False request the
    connection is closed once its output is sent.

    Cancelling serve closes the listener and every connection (requests in
    progress are cancelled) and returns once every task has ended.
    """
    options = ServerOptions(
        multiplex=multiplex,
        max_connections=max_connections,
        max_requests=max_requests,
        max_params_size=max_params_size,
        max_params_pairs=max_params_pairs,
        max_body_size=max_body_size,
        max_unsent_size=max_unsent_size,
        params_timeout=params_timeout,
        idle_timeout=idle_timeout,
        send_timeout=send_timeout,
        roles=roles,
    )
    await run_server(app, options, address=address, task_status=task_status)


async def run_server(
    app: App | StreamApp,
    options: ServerOptions,
    *,
    address: AddressInput | None = None,
    sock: socket.socket | None = None,
    streaming: bool = False,
    stop: anyio.Event | None = None,
    graceful_timeout: float = 0.0,
    task_status: anyio.abc.TaskStatus[Address] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """serve(), or with `streaming` serve_asgi's server: on `address`, or a listening `sock`.

    Setting `stop` drains: no more accepting, connections closed as they go
    idle, `graceful_timeout` seconds for the requests in progress, then return.
    """
    if sock is not None:  # inherited, or shared with other worker processes
        sock.setblocking(False)
        listener, bound, inode = sock, _sock_address(sock), 0
    else:
        assert address is not None
        listener, bound, inode = await _listen(listen_address(address))
    try:
        async with anyio.create_task_group() as tasks:
            server = _Server(app, options, tasks, bound, streaming=streaming)
            accepting = anyio.CancelScope()
            tasks.start_soon(
                _accept_until_cancelled, accepting, server, listener, name=f"fcgi-accept {bound}"
            )
            tasks.start_soon(server.watch_loop, name=f"fcgi-watch {bound}")
            task_status.started(bound)
            if stop is not None:
                await stop.wait()
                accepting.cancel()
                # Closing the listening socket here would reset the connections
                # still in its backlog; other processes sharing it take them.
                await server.drain(graceful_timeout)
                tasks.cancel_scope.cancel()
    finally:
        listener.close()
        if bound.path is not None and inode:
            with contextlib.suppress(OSError):
                if os.stat(bound.path).st_ino == inode:
                    os.unlink(bound.path)


async def _accept_until_cancelled(
    scope: anyio.CancelScope, server: _Server, listener: socket.socket
) -> None:
    with scope:
        await server.accept_loop(listener)


def _declared_length(params: Mapping[bytes, bytes]) -> int:
    """The CONTENT_LENGTH a request announces; 0 if none or not a number."""
    value = params.get(b"CONTENT_LENGTH", b"")
    return int(value) if value.isdigit() else 0


def _sock_address(sock: socket.socket) -> Address:
    """The address a listening socket was bound to (an inherited one too)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = name if isinstance(name, str) else name.decode("utf-8", "surrogateescape")
        return Address(path=path)
    return Address(host=name[0], port=name[1])
