"""The application side on blocking sockets: a thread per connection.

Each connection's thread reads the socket, feeds a `ServerConnection` and
gathers each request's params, stdin and filter data. Once a request is whole
the handler runs: in the connection's thread when the connection does not
multiplex, in a thread of its own when it does. The protocol state is only
touched under the connection's lock, and one thread at a time writes (see
`_Connection`), so records of concurrent requests go out whole and in order.

Only a connection's own thread closes its socket; other threads shut it down
(which wakes a blocked recv or send) and let that thread close it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from types import TracebackType
from typing import TypeAlias

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
    Address,
    AddressInput,
    Liveness,
    RequestBase,
    RequestSlots,
    RequestState,
    ServerOptions,
    close_output,
    dropped_too_much,
    failure_report,
    listen_address,
    log_bytes,
    output_chunks,
)

from ._backend import kernel_timeout

__all__ = ["Handler", "Request", "Server", "serve"]

logger = logging.getLogger("fcgiproto_socket.server")

Handler: TypeAlias = "Callable[[Request], bytes | Iterable[bytes]]"

#: A read takes what the kernel has, up to this: several 64 KiB records at once.
READ_SIZE = 256 * 1024
#: How often serve() looks at a `stop` event that nothing else wakes it for.
POLL_INTERVAL = 0.1
#: At max_connections with no connection able to give way, how soon to look again.
AT_CAP_RECHECK = 0.1
#: A blocking send returns once the kernel took it all: in pieces this big,
#: a send that waits on the peer is seen as such within one piece.
SEND_PIECE = 64 * 1024
#: A streamed request's body read ahead of its app, at most: past it the
#: connection is not read until the app takes some (a multiplexed connection
#: waits for its slowest reader; the web server holds the rest).
BODY_READ_AHEAD = 256 * 1024
#: While draining, a connection that never carried a request is closed once
#: it was this long silent: a web server that just connected sends at once.
DRAIN_FRESH_GRACE = 1.0

_STDOUT, _STDERR = True, False
#: Inline, how long an app runs before it pauses at its next chunk, so that
#: the other connections have their turn (and its own input is read).
APP_TURN = 0.01
#: Pieces of output one sendmsg() hands over at most (IOV_MAX is 1024 on Linux).
_SEND_PIECES = 64
#: What poll and epoll report for a socket with something to read, or shut down.
_READ_EVENTS = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
#: The events of a request begun, after its BeginRequest.
_REQUEST_INPUT = (Params, StdinEnd, StdinData, FilterData, FilterDataEnd, AbortRequest)


class Request(RequestBase):
    """One whole request: what the web server sent, and a way to write to its STDERR.

    Once aborted, its output is dropped; a streaming handler is stopped at its
    next chunk.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: _Connection, state: _State) -> None:
        super().__init__(state, connection.number)
        self._connection = connection

    def log(self, message: str | bytes) -> None:
        """Write to the request's STDERR (the web server's error log), at once."""
        data = log_bytes(message)
        if data:
            self._connection.write(self._state, _STDERR, data)


class _State(RequestState):
    __slots__ = ("dispatched", "unread", "wrote")

    def __init__(self, begin: BeginRequest, options: ServerOptions) -> None:
        super().__init__(begin, options, time.monotonic())
        self.dispatched = False
        self.wrote = False  # some output of it was written
        #: Of a streamed request: body bytes in `stdin` its app has not read yet.
        self.unread = 0


class BodyTooLarge(OSError):
    """A streamed request's body went past max_body_size; the server answers 413."""


class Exchange:
    """A request whose app runs once its PARAMS are in: its body streams in, its output out.

    What serve_wsgi runs applications on. `read()` blocks for more of the
    body; `write()` for the client to take the output (backpressure), and
    returns False once the request is over: aborted, or its connection lost.
    """

    __slots__ = ("_connection", "_state", "app_status", "connection_id", "params", "started")

    def __init__(self, connection: _Connection, state: _State) -> None:
        assert state.params is not None
        self._connection = connection
        self._state = state
        self.params = state.params
        self.connection_id = connection.number
        #: The status END_REQUEST carries.
        self.app_status = 0
        #: Whether any stdout was written.
        self.started = False

    @property
    def request_id(self) -> int:
        return self._state.request_id

    @property
    def aborted(self) -> bool:
        """True once the web server aborted the request or the connection was lost."""
        return self._state.aborted

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of the body (all the rest if negative); b"" at its end.

        b"" too once the request is aborted; BodyTooLarge past max_body_size.
        """
        return self._connection.read_body(self._state, size)

    def write(self, data: bytes | bytearray | memoryview) -> bool:
        """Send stdout, once the client took all but max_unsent_size; False once it is over.

        Where one thread serves every connection (inline) it does not wait:
        the app's runner pauses instead while `held`.
        """
        if not data:
            return not self._state.ended
        self.started = True
        return self._connection.write(self._state, _STDOUT, data)

    @property
    def held(self) -> bool:
        """Inline: pause now. More than max_unsent_size of output waits on the client, or
        the app had its turn (APP_TURN) and the other connections have theirs."""
        return self._connection.pause_due()

    def wait_taken(self) -> None:
        """Inline, where pausing is not possible: wait (send_timeout at most) until not `held`."""
        self._connection.wait_taken()

    def finish(self, data: bytes | bytearray | memoryview) -> bool:
        """Send the last stdout and end the request; False if it was over already.

        The last max_unsent_size of it goes out with END_REQUEST (app_status)
        in one write: a small response costs one send.
        """
        if data:
            self.started = True
        return self._connection.finish(self._state, data, self.app_status)

    def log(self, message: str | bytes) -> None:
        """Write to the request's STDERR (the web server's error log), at once."""
        data = log_bytes(message)
        if data:
            self._connection.write(self._state, _STDERR, data)

    def __repr__(self) -> str:
        method = self.params.get("REQUEST_METHOD", "")
        uri = self.params.get("REQUEST_URI") or self.params.get("SCRIPT_NAME", "")
        what = " ".join(part for part in (method, uri) if part)
        return f"<Exchange {self.request_id} on connection {self.connection_id}: {what}>"


#: Runs a streamed request's app. Inline, it may return the app's steps
#: instead: an iterator that yields whenever the exchange is `held`, and is
#: resumed once the client has taken enough.
StreamHandler: TypeAlias = "Callable[[Exchange], Iterator[None] | None]"


class _Connection:
    """One accepted socket: its protocol state, its requests, and the thread reading it.

    The reading thread is the connection's own, or, for an `inline`
    listener, the listener's: it then reads the socket when poll says there
    is something to read (`step`) and writes when it takes more
    (`writable`), and every app runs in it, one at a time.

    Two locks. `lock` guards the protocol state and the requests, and is never
    held across socket I/O. `send_lock` makes one thread at a time the sender:
    it writes out `pending` until it finds it empty, and checks that and lets
    go under `lock`, so output queued meanwhile by anyone is never left
    behind. Handler threads wait for `send_lock` (backpressure); the reading
    thread only takes it when it is free, so a client that is not reading
    never stops the server from reading (and seeing an ABORT_REQUEST).
    """

    def __init__(self, listener: _Listener, sock: socket.socket, number: int) -> None:
        self.listener = listener
        self.sock = sock
        self.number = number
        self.options = listener.options
        self.proto: ServerConnection = listener.options.connection()
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.pending: list[bytes | memoryview] = []
        # Bytes queued and not yet taken by the kernel; the reader waits on
        # `drained` while there are more than max_unsent_size of them.
        self.unsent = 0
        self.drained = threading.Condition(self.lock)
        # Threads waiting on `drained`: with none, there is nobody to notify
        # (a notify_all costs three Python calls even then, several a request).
        self.drain_waits = 0
        self.states: dict[int, _State] = {}
        # Requests ready for their app, in order: whole ones, or with
        # `streaming`, those whose PARAMS are in. Without multiplexing they run
        # one after another in this connection's thread.
        self.ready: deque[_State] = deque()
        self.streaming = listener.streaming
        self.inline = listener.inline
        # Inline: the streamed app paused until its client takes more output.
        self.pumping: tuple[_State, Exchange, Iterator[None]] | None = None
        # Inline: when the app running has had its turn (time.perf_counter()).
        self.turn_ends = 0.0
        # Inline: what the listener waits on this socket for (select.POLLIN, POLLOUT).
        self.watched = select.POLLIN
        # Apps run in the thread that reads, which pulls their body (inline
        # it is in already) and looks for an abort between chunks; with
        # multiplexing, each has a thread.
        self.runs_apps = listener.inline or not self.options.multiplex
        # A streamed request's app waits on this for more body (with multiplexing).
        self.body_arrived = threading.Condition(self.lock)
        self.workers: set[threading.Thread] = set()
        self.liveness = Liveness(time.monotonic())
        self.dead = False
        self.served = 0  # requests ended on this connection
        self.accepted_at = time.monotonic()

    # --- the connection's thread ---

    def run(self) -> None:
        try:
            self._read_loop()
        except Exception:
            logger.exception("connection %d failed", self.number)
        finally:
            self._close()

    def _read_loop(self) -> None:
        limit = self.options.max_unsent_size
        while True:
            with self.lock:
                # A client that sends without reading makes us answer (GET_VALUES,
                # refusals) into a socket it does not empty: read on once it does.
                # A streamed body is not read further ahead of its app either.
                while (
                    self.unsent > limit or (self.streaming and self.states and self._body_full())
                ) and not self.dead:
                    self.drain_waits += 1
                    try:
                        self.drained.wait()
                    finally:
                        self.drain_waits -= 1
            if not (self.read_once() and self.run_ready()):
                return

    def run_ready(self) -> bool:
        """Run the requests the last read made ready; False once the connection is over.

        Inline, without waiting for the peer: the read took what poll saw, the
        requests run have their whole body in (see _route_streamed), and what
        the kernel does not take of their output waits for it in `pending`
        while their app pauses (`pumping`; see writable()). Only the WSGI
        write() callable waits in a send, send_timeout at most (SO_SNDTIMEO).
        """
        pumping = self.pumping
        if pumping is not None and (pumping[0].ended or self.dead):
            self._resume()  # aborted or lost while paused: its app hears of it now
        while self.pumping is None:  # a paused app's connection runs nothing else meanwhile
            with self.lock:
                if not self.ready or self.dead:
                    break
                state = self.ready.popleft()
            self._dispatch(state)
        with self.lock:
            if self.dead:
                return False
            # While draining, one that finished what it carried closes.
            over = self.proto.closed or (
                self.listener.draining and not self.states and not self.ready
            )
            # Inline, what the kernel did not take yet goes out first.
            return not over or (self.inline and bool(self.pending))

    def writable(self) -> bool:
        """Inline: the socket takes more. Send, go on with a paused app; False once over."""
        self._send_some()
        if self.pumping is not None and not self.held():
            self._resume()
        return self.run_ready()

    def held(self) -> bool:
        """Inline: more than max_unsent_size of output waits on the client."""
        return self.inline and self.unsent > self.options.max_unsent_size

    def pause_due(self) -> bool:
        """Inline: whether the app running should pause (its output held, or its turn over)."""
        return self.inline and (
            self.unsent > self.options.max_unsent_size or time.perf_counter() > self.turn_ends
        )

    def read_once(self) -> bool:
        """Read what the socket has, route it, send what the core answers; False once over.

        Called by the connection's thread, also from within a streamed app
        when it wants more body or looks for an abort between chunks of output.
        """
        try:
            data = self.sock.recv(READ_SIZE)
        except OSError:
            with self.lock:
                self._die()
            return False
        if data:
            self.liveness.received(time.monotonic())
        with self.lock:
            if self.dead or self.proto.closed:
                return False
            try:
                events = self.proto.receive_data(data)
            except RemoteProtocolError as exc:
                logger.info("closing connection %d: %s", self.number, exc)
                self._die()
                return False
            if self.proto.dropped_size and dropped_too_much(self.proto, self.options):
                logger.info("closing connection %d: %s", self.number, DROPPED_TOO_MUCH)
                self._die()
                return False
            self._route(events)
            if not data:
                # The client is gone: a streamed app still running hears of it.
                self._die()
            queued = self._queue()
            sending = queued and not self.inline and self.send_lock.acquire(blocking=False)
        if sending:
            self._send_pending()
        elif queued and self.inline:
            self._send_some()
        return bool(data)

    def _body_full(self) -> bool:
        """Whether a streamed app has more body unread than may be read ahead; `lock` is held."""
        return any(state.unread > BODY_READ_AHEAD for state in self.states.values())

    def _route(self, events: list[Event]) -> None:
        """Act on what the core made of the bytes read; `lock` is held."""
        # One call for all of a read's events (a request's head is three).
        for event in events:
            if isinstance(event, BeginRequest):
                listener = self.listener
                with listener.slots_lock:
                    admitted = listener.slots.admit(self.proto, event)
                if admitted:
                    self.states[event.request_id] = _State(event, self.options)
                continue
            if not isinstance(event, _REQUEST_INPUT):
                continue
            state = self.states.get(event.request_id)
            if state is None:
                continue
            if isinstance(event, AbortRequest):
                state.aborted = True
                self._end(state, ERROR_STATUS)
            elif self.streaming:
                self._route_streamed(state, event)
            elif state.gather(event) and not state.dispatched:
                state.dispatched = True
                self.liveness.app_started()
                self.ready.append(state)
            elif state.too_large:
                self.proto.send_stdout(state.request_id, BODY_TOO_LARGE)
                self._end(state, ERROR_STATUS)

    def _route_streamed(self, state: _State, event: Event) -> None:
        """Gather for a streamed request: ready once PARAMS are in, the body read by its app."""
        before = len(state.stdin)
        state.gather(event)
        if state.too_large:
            if not state.dispatched:
                self.proto.send_stdout(state.request_id, BODY_TOO_LARGE)
                self._end(state, ERROR_STATUS)
            else:  # its app reads BodyTooLarge, and answers 413 if it can
                state.unread = 0
                if self.liveness.body_waits:
                    self.body_arrived.notify_all()
            return
        if isinstance(event, StdinData):
            state.unread += len(event.data)
        # Only an app waiting for body can be waiting on body_arrived.
        if (len(state.stdin) != before or state.stdin_done) and self.liveness.body_waits:
            self.body_arrived.notify_all()
        if state.params is not None and not state.dispatched:
            if (
                state.params.get("CONTENT_LENGTH")
                and _declared_length(state.params) > self.options.max_body_size
            ):
                self.proto.send_stdout(state.request_id, BODY_TOO_LARGE)
                self._end(state, ERROR_STATUS)
                return
            if self.inline and not state.stdin_done:
                # An inline app runs once its whole body is in (max_body_size
                # at most, held as the plain servers hold it): reading on from
                # a client that sends slowly would hold up every connection.
                return
            state.dispatched = True
            self.liveness.app_started()
            self.ready.append(state)

    def _dispatch(self, state: _State) -> None:
        assert state.params is not None
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connection %d: request %d starts", self.number, state.request_id)
        request: Request | Exchange
        if self.streaming:
            request = Exchange(self, state)
            if self.runs_apps:
                self._respond_streamed(state, request)  # what _respond() would call
                return
        else:
            request = Request(self, state)
            state.stdin = state.data = []
        if self.runs_apps:
            self._respond(state, request)
            return
        worker = threading.Thread(
            target=self._respond,
            args=(state, request),
            name=f"fcgi-request-{self.number}-{state.request_id}",
            daemon=True,
        )
        with self.lock:
            self.workers = {thread for thread in self.workers if thread.is_alive()}
            self.workers.add(worker)
        try:
            worker.start()
        except RuntimeError:  # no more threads: answer it in this one
            with self.lock:
                self.workers.discard(worker)
            self._respond(state, request)

    def _close(self) -> None:
        if self.pumping is not None:  # its app, paused, hears that it is over
            self._resume()
        with self.lock:
            self._die()
            workers = list(self.workers)
        for worker in workers:
            worker.join()
        self.listener.forget(self)
        self.sock.close()

    # --- running a request ---

    def _respond(self, state: _State, request: Request | Exchange) -> None:
        if isinstance(request, Exchange):
            self._respond_streamed(state, request)
            return
        status = ERROR_STATUS
        started = False
        try:
            result = self.listener.handler(request)
            try:
                for chunk in output_chunks(result):
                    started = True
                    if not self.write(state, _STDOUT, chunk):
                        break
            finally:
                close_output(result)
            status = request.app_status
        except Exception:
            logger.exception("the handler failed on %r", request)
            self.write(state, _STDERR, failure_report())
            if not started:
                self.write(state, _STDOUT, INTERNAL_ERROR)
        finally:
            with self.lock:
                self._end(state, status)
                queued = self._queue()
                self.liveness.app_ended(time.monotonic())
            if queued:
                self.send_lock.acquire()
                self._send_pending()

    def _respond_streamed(self, state: _State, exchange: Exchange) -> None:
        self._drive(state, exchange, None)

    def _resume(self) -> None:
        """Inline: go on with the app that paused for its client."""
        assert self.pumping is not None
        state, exchange, steps = self.pumping
        self.pumping = None
        self._drive(state, exchange, steps)

    def _drive(self, state: _State, exchange: Exchange, steps: Iterator[None] | None) -> None:
        """Run a streamed request's app, or its steps from where they paused, to its end.

        Inline, an app whose steps pause (its client has not taken its
        output, or it had its turn) is left in `pumping`, and its request
        ends when it is resumed: once the socket takes more output (writable()),
        or, paused for its turn only, after one turn of the listener's loop.
        """
        status = ERROR_STATUS
        paused = False
        try:
            self.turn_ends = time.perf_counter() + APP_TURN
            if steps is None:
                steps = self.listener.stream_handler(exchange)
            if steps is not None:
                for _ in steps:
                    if not (state.ended or self.dead):  # else on, for the app to hear of it
                        self.pumping = (state, exchange, steps)
                        paused = True
                        if not self.held():  # its turn is over: it goes on after the others
                            self.listener.turns.append(self)
                        return
            status = exchange.app_status
        except BodyTooLarge:
            if not exchange.started:
                self.write(state, _STDOUT, BODY_TOO_LARGE)
        except Exception:
            # The gateways answer their app's failures themselves; this is theirs.
            logger.exception("the gateway failed on %r", exchange)
            self.write(state, _STDERR, failure_report())
            if not exchange.started:
                self.write(state, _STDOUT, INTERNAL_ERROR)
        finally:
            if not paused:
                with self.lock:
                    if not state.ended:  # finish() ended it, as a rule
                        self._end(state, status)
                    queued = self._queue()
                    self.liveness.app_ended(time.monotonic())
                if queued:
                    self._flush()

    def read_body(self, state: _State, size: int) -> bytes:
        """Up to `size` bytes (all if negative) of a streamed request's body; b"" at its end."""
        pulls = self.runs_apps
        chunks: list[bytes] = []
        got = 0
        with self.lock:
            while size < 0 or got < size:
                if state.too_large:
                    raise BodyTooLarge(
                        f"the request body is over max_body_size ({self.options.max_body_size})"
                    )
                if state.stdin:
                    chunk = state.stdin[0]
                    want = len(chunk) if size < 0 else min(len(chunk), size - got)
                    if want == len(chunk):
                        state.stdin.pop(0)
                    else:
                        state.stdin[0] = chunk[want:]
                        chunk = chunk[:want]
                    chunks.append(chunk)
                    got += want
                    state.unread -= want
                    if self.drain_waits:
                        self.drained.notify_all()
                    continue
                if got or state.stdin_done or state.ended or self.dead:
                    break  # what there is, as a file's read() returns it
                self.liveness.body_waits += 1
                try:
                    if pulls:
                        self.lock.release()
                        try:
                            self.read_once()
                        finally:
                            self.lock.acquire()
                    else:
                        self.body_arrived.wait()
                finally:
                    self.liveness.body_waits -= 1
        return b"".join(chunks)

    def _look_for_abort(self, state: _State) -> None:
        """Between pieces of a streamed app's output, read what came: an ABORT_REQUEST, EOF.

        Only where the app runs in the reading thread, and not past what may be
        read ahead of the body.
        """
        if state.unread > BODY_READ_AHEAD:
            return
        with contextlib.suppress(OSError, ValueError):
            if not select.select([self.sock], [], [], 0)[0]:
                return
        self.read_once()

    # --- output ---

    def write(
        self, state: RequestState, stdout: bool, data: bytes | bytearray | memoryview
    ) -> bool:
        """Send stdout or stderr of a request, waiting for the socket; False once it is over.

        A big chunk goes out in pieces of OUTPUT_PIECE (max_unsent_size if
        smaller), each sent before the next is encoded, so that the server
        never holds more than that of it.
        """
        piece = min(self.options.max_unsent_size, OUTPUT_PIECE)
        view = memoryview(data)
        # Where a streamed app runs in the reading thread, look for an abort
        # between pieces; not before the first, which follows the request at once.
        # (Inline the listener reads between the app's turns instead.)
        looks = self.streaming and self.runs_apps and not self.inline and isinstance(state, _State)
        for start in range(0, len(view), piece):
            if looks:
                assert isinstance(state, _State)
                if state.wrote:
                    self._look_for_abort(state)
                state.wrote = True
            with self.lock:
                if state.ended or self.dead:
                    return False
                part = view[start : start + piece]
                if stdout:
                    self.proto.send_stdout(state.request_id, part)
                else:
                    self.proto.send_stderr(state.request_id, part)
                self._queue()
            if self.inline:
                # The app's runner pauses while `held`: the chunk it gave (in
                # memory already) is queued whole, and nothing waits here.
                self._send_some()
                continue
            self.send_lock.acquire()
            self._send_pending()
        return not (state.ended or self.dead)

    def wait_taken(self) -> None:
        """Inline: wait until the client took all but max_unsent_size, send_timeout at most.

        For what cannot pause instead (the WSGI write() callable): it holds
        up every connection meanwhile.
        """
        if self.held():
            self.send_lock.acquire()
            self._send_pending()

    def finish(self, state: _State, data: bytes | bytearray | memoryview, app_status: int) -> bool:
        """Send a request's last stdout and END_REQUEST together; False once it is over."""
        piece = min(self.options.max_unsent_size, OUTPUT_PIECE)
        if len(data) > piece:  # all but the last piece as any output, waiting on the client
            view = memoryview(data)
            cut = len(view) - piece
            if not self.write(state, _STDOUT, view[:cut]):
                return False
            data = view[cut:]
        if state.wrote and self.streaming and self.runs_apps and not self.inline:
            self._look_for_abort(state)  # as write() does between pieces
        with self.lock:
            if state.ended or self.dead:
                return False
            if data:
                self.proto.send_stdout(state.request_id, data)
            self._end(state, app_status)
            queued = self._queue()
        if queued:
            self._flush()
        return not self.dead

    def _end(self, state: _State, app_status: int) -> None:
        """End a request, unless it is over already; `lock` is held."""
        if state.ended or self.dead:
            return
        state.ended = True
        if self.states.get(state.request_id) is state:
            del self.states[state.request_id]
            self.listener.give_back(1)
        self.proto.end_request(state.request_id, app_status)
        self.served += 1
        state.stdin = state.data = []
        state.unread = 0
        if self.drain_waits:
            self.drained.notify_all()
        if self.liveness.body_waits:
            self.body_arrived.notify_all()

    def _queue(self) -> bool:
        """Move the protocol's output to `pending`; True if anything is pending. `lock` is held."""
        data = self.proto.data_to_send()
        if data:
            self.pending.append(data)
            self.unsent += len(data)
            self.liveness.sending = True
        return bool(self.pending) and not self.dead

    def _flush(self) -> None:
        """Send what is queued: all of it, or inline what the kernel takes now."""
        if self.inline:
            self._send_some()
        else:
            self.send_lock.acquire()
            self._send_pending()

    def _send_some(self) -> None:
        """Inline: hand the kernel what it takes of `pending` now; the rest waits for it.

        One sendmsg() of the pieces as they are: joining them would copy what
        is left over and over while a slow client takes a big response.
        """
        liveness = self.liveness
        while True:
            with self.lock:
                pending = self.pending
                if self.dead:
                    return
                if not pending:
                    liveness.sending = False
                    if self.proto.closed:  # keep_conn=False, all written: close
                        self._shutdown()
                    return
                pieces = pending[:_SEND_PIECES]
            try:
                if len(pieces) == 1:  # as a rule: send() costs less than sendmsg()
                    sent = self.sock.send(pieces[0], socket.MSG_DONTWAIT)
                else:
                    sent = self.sock.sendmsg(pieces, (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                logger.info("connection %d lost while writing: %s", self.number, exc)
                with self.lock:
                    self._die()
                return
            now = time.monotonic()
            if sent:
                liveness.send_moved(now)
            with self.lock:
                if self.dead:
                    return
                self.unsent = max(0, self.unsent - sent)
                taken = 0
                for piece in pieces:
                    if sent < len(piece):
                        break
                    sent -= len(piece)
                    taken += 1
                del pending[:taken]
                if taken < len(pieces):  # the kernel is full: the rest waits for it
                    if sent:  # of a piece it took part of, the rest, as a view
                        pending[0] = memoryview(pending[0])[sent:]
                    liveness.send_waiting(now)
                    return

    def _send_pending(self) -> None:
        """Write out `pending` until it is empty, then let go of `send_lock`, which is held."""
        while True:
            with self.lock:
                pending = self.pending
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                if not data or self.dead:
                    self.liveness.sending = False
                    if self.proto.closed:
                        # keep_conn=False, all written: wake the reading thread to close.
                        self._shutdown()
                    self.send_lock.release()
                    return
            try:
                self._send_all(data)
            except OSError as exc:
                logger.info("connection %d lost while writing: %s", self.number, exc)
                with self.lock:
                    self._die()

    def _send_all(self, data: bytes | memoryview) -> None:
        """sendall, piece by piece, telling `liveness` and the reader how it goes."""
        liveness = self.liveness
        # Sliced as a view only when it goes in pieces (a small one is sent whole, as a rule).
        view = memoryview(data) if len(data) > SEND_PIECE else data
        while view:
            liveness.send_waiting(time.monotonic())
            sent = self.sock.send(view[:SEND_PIECE])
            liveness.send_moved(time.monotonic())
            view = view[sent:]
            with self.lock:
                self.unsent = max(0, self.unsent - sent)  # _die() may have zeroed it
                if self.drain_waits:
                    self.drained.notify_all()

    def _die(self) -> None:
        """The connection is over: abandon every request; `lock` is held."""
        self.dead = True
        for state in self.states.values():
            state.aborted = state.ended = True
        self.listener.give_back(len(self.states))
        self.states.clear()
        self.ready.clear()
        self.pending.clear()
        self.unsent = 0
        self.drained.notify_all()
        self.body_arrived.notify_all()
        self._shutdown()

    # --- from other threads ---

    def kill(self, reason: str = "") -> None:
        """Abandon the requests and wake the connection's thread, which closes the socket.

        Called with the listener's lock held, so the socket is still open. The
        requests' slots are given back here and now: a connection evicted to
        make room must not leave the new one to find every slot still taken.
        """
        with self.lock:
            if reason and not self.dead:
                logger.info("closing connection %d: %s", self.number, reason)
            self._die()

    def deadline(self) -> tuple[float, str] | None:
        with self.lock:
            return self.liveness.deadline(self.options, self.states.values())

    def drain(self, now: float) -> None:
        """While the server drains: close the connection if it carries no request.

        One that never carried a request is given DRAIN_FRESH_GRACE to send one.
        Called with the listener's lock held.
        """
        with self.lock:
            if self.dead or self.states or self.ready or self.liveness.running or self.unsent:
                return  # a request in progress, or the end of one not yet sent
            if not self.served and now - self.liveness.last_activity < DRAIN_FRESH_GRACE:
                return
            logger.debug("closing connection %d: idle while draining", self.number)
            self._die()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def _declared_length(params: dict[str, str]) -> int:
    """The CONTENT_LENGTH a request announces; 0 if none or not a number."""
    value = params.get("CONTENT_LENGTH", "")
    return int(value) if value.isdigit() else 0


def _step(connection: _Connection, step: Callable[[], bool]) -> bool:
    """Inline: one step of a connection (a read, a send, its apps); False once over or failed."""
    try:
        return step()
    except Exception:
        logger.exception("connection %d failed", connection.number)
        return False


class _Listener:
    """The listening socket, the accept loop, and the connections it started."""

    def __init__(
        self,
        handler: Handler | StreamHandler,
        address: AddressInput | None,
        options: ServerOptions,
        *,
        streaming: bool = False,
        sock: socket.socket | None = None,
        graceful_timeout: float = 0.0,
        inline: bool = False,
    ) -> None:
        self.handler: Handler = handler  # type: ignore[assignment]
        self.stream_handler: StreamHandler = handler  # type: ignore[assignment]
        #: Apps run once PARAMS are in, on an Exchange, their body streamed.
        self.streaming = streaming
        #: One thread: this one reads every connection and runs every app, one
        #: at a time (no thread per connection, and no handing the GIL between
        #: them, which is most of a small request's cost with many connections).
        self.inline = inline
        # The connections read here, by file descriptor (inline only).
        self._inline: dict[int, _Connection] = {}
        #: Inline: the connections whose app paused at the end of its turn.
        self.turns: list[_Connection] = []
        self.options = options
        #: Set while the server drains: no more accepting, connections close once idle.
        self.draining = False
        self._drain_requested: float | None = None
        #: Setting `stop` drains for this long first (0: stops at once).
        self.graceful_timeout = graceful_timeout
        # Requests at once across every connection; taken under its own lock,
        # which is the innermost: nothing else is acquired while it is held.
        self.slots = RequestSlots(options.max_requests)
        self.slots_lock = threading.Lock()
        # A byte on this pair wakes the accept loop: to stop, or to accept again.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            if sock is not None:  # inherited, or shared with other worker processes
                sock.setblocking(False)
                self.sock, self.address, self._inode = sock, _sock_address(sock), 0
            else:
                assert address is not None
                self.sock, self.address, self._inode = _bind(listen_address(address))
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise
        self._poller = _Poller()
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count(1)
        self._stopping = False
        # No timeout is shorter than this: a deadline set after a look at
        # them all is never due before the next look.
        self._watch_every = min(options.params_timeout, options.idle_timeout, options.send_timeout)
        self._next_watch = time.monotonic()

    def run(self, stop: threading.Event | None, ready: Callable[[Address], object] | None) -> None:
        try:
            if ready is not None:
                ready(self.address)
            self._accept_loop(stop)
        finally:
            self._shutdown()

    def request_stop(self) -> None:
        self._stopping = True
        self._wake()

    def request_drain(self, timeout: float) -> None:
        """Stop accepting, let requests in progress end within `timeout` seconds, then stop."""
        if self._drain_requested is None:
            self._drain_requested = timeout
        self._wake()

    def give_back(self, count: int) -> None:
        """Requests of a connection ended or were abandoned."""
        if count:
            with self.slots_lock:
                self.slots.give_back(count)

    def forget(self, connection: _Connection) -> None:
        """A connection's thread is about to close its socket."""
        with self._lock:
            self._connections.discard(connection)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _accept_loop(self, stop: threading.Event | None) -> None:
        poller = self._poller
        wake_fd, listening_fd = self._wake_r.fileno(), self.sock.fileno()
        poller.register(self._wake_r)
        poller.register(self.sock)
        listening = True
        while not self._stopping:
            if stop is not None and stop.is_set():
                if not self.graceful_timeout:
                    return
                self.request_drain(self.graceful_timeout)
            if self._drain_requested is not None:
                if listening:
                    poller.unregister(self.sock)
                self._drain(poller, self._drain_requested)
                return
            if not listening:  # waited a while, or a connection ended: look again
                poller.register(self.sock)
                listening = True
            now = time.monotonic()
            if now >= self._next_watch:
                self._next_watch = self._watch(now)
            wait = self._next_watch - now if not self.turns else 0.0
            if stop is not None:
                wait = min(wait, POLL_INTERVAL)
            ready: list[tuple[int, int]] = []
            for fd, events in poller.wait(max(wait, 0.0)):
                if fd != listening_fd:
                    if fd == wake_fd:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        ready.append((fd, events))
                elif self._make_room():
                    self._accept()
                else:  # every connection runs an app: the backlog holds the rest a while
                    poller.unregister(self.sock)
                    listening = False
                    self._next_watch = min(self._next_watch, time.monotonic() + AT_CAP_RECHECK)
            if ready:
                self._serve(ready)
            if self.turns:
                self._run_turns()

    def _serve(self, ready: list[tuple[int, int]]) -> None:
        """Inline: connections whose sockets have something to read, take more, or were shut down.

        Every one is read first, then the requests that made ready run:
        requests that came together are all taken, then all answered, which
        measured cheaper than each in its turn.
        """
        read: list[tuple[int, _Connection, bool]] = []
        for fd, events in ready:
            connection = self._inline.get(fd)
            if connection is None:
                continue
            going = True
            if events & select.POLLOUT:
                going = _step(connection, connection.writable)
            if going and events & _READ_EVENTS:
                going = _step(connection, connection.read_once)
            read.append((fd, connection, going))
        for fd, connection, going in read:
            self._settle(fd, connection, going and _step(connection, connection.run_ready))

    def _run_turns(self) -> None:
        """Inline: go on with the apps that paused when their turn was over."""
        turns, self.turns = self.turns, []
        for connection in turns:
            fd = connection.sock.fileno()
            if self._inline.get(fd) is not connection:
                continue  # closed meanwhile
            self._settle(fd, connection, _step(connection, connection.writable))

    def _settle(self, fd: int, connection: _Connection, going: bool) -> None:
        """Inline, after a connection's turn: close it, or wait on its socket for what it needs."""
        if not going:
            self._close_inline(connection)
            return
        # Output the kernel did not take: wait for it to take more. Past
        # max_unsent_size of it, read no more until it does (a client that
        # sends without reading the answers: GET_VALUES, refusals).
        watched = (0 if connection.unsent > self.options.max_unsent_size else select.POLLIN) | (
            select.POLLOUT if connection.pending else 0
        )
        if watched != connection.watched:
            connection.watched = watched
            self._poller.watch(fd, watched)

    def _close_inline(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if self._inline.pop(fd, None) is not None:
            self._poller.unregister(fd)
        connection._close()

    def _drain(self, poller: _Poller, timeout: float) -> None:
        """Accept no more; wait until every connection closed once idle, or `timeout` passed."""
        self.draining = True
        # Closing the listening socket here would reset the connections still
        # in its backlog; other processes sharing it take them (and without
        # any, _shutdown() closes it right after).
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._next_watch:
                self._next_watch = self._watch(now)
            with self._lock:
                live = [c for c in self._connections if not c.dead]
                for connection in live:
                    connection.drain(now)
            if not live or now >= deadline or self._stopping:
                if live:
                    logger.warning(
                        "%d connections still busy after the graceful timeout: closing them",
                        len(live),
                    )
                return
            wait = min(POLL_INTERVAL, deadline - now) if not self.turns else 0.0
            ready: list[tuple[int, int]] = []
            for fd, events in poller.wait(wait):
                if fd == self._wake_r.fileno():
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                else:
                    ready.append((fd, events))
            if ready:
                self._serve(ready)
            if self.turns:
                self._run_turns()

    def _watch(self, now: float) -> float:
        """Close the connections that waited too long on their peer; when to look next."""
        with self._lock:
            connections = [c for c in self._connections if not c.dead]
        next_look = now + self._watch_every
        for connection in connections:
            due = connection.deadline()
            if due is None:
                continue
            when, reason = due
            if when <= now:
                with self._lock:
                    if connection in self._connections:
                        connection.kill(reason)
            else:
                next_look = min(next_look, when)
        return next_look

    def _make_room(self) -> bool:
        """Whether a connection may be accepted: below the cap, or another gave way to it."""
        with self._lock:
            live = [c for c in self._connections if not c.dead]
            if len(live) < self.options.max_connections:
                return True
            now = time.monotonic()
            ranked = [
                (rank, c) for c in live if (rank := c.liveness.eviction_rank(now)) is not None
            ]
            if not ranked:
                return False
            _, victim = min(ranked, key=lambda pair: pair[0])
            victim.kill("at max_connections; it waited longest on its client")
            return True

    def _accept(self) -> None:
        try:
            sock, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of file descriptors, ...: the client waits in the backlog
            logger.warning("accepting a connection on %s failed: %s", self.address, exc)
            return
        if not self.options.peer_allowed(peer):
            logger.warning("refused a connection from %s: not in allowed_peers", peer[0])
            sock.close()
            return
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(self, sock, next(self._numbers))
        logger.debug("accepted connection %d", connection.number)
        if self.inline:
            # The one send that waits here (the WSGI write() callable, which
            # cannot pause) the kernel cuts short: the watch cannot meanwhile.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, kernel_timeout(self.options.send_timeout)
            )
            with self._lock:
                self._connections.add(connection)
            self._inline[sock.fileno()] = connection
            self._poller.register(sock)
            return
        thread = threading.Thread(
            target=connection.run, name=f"fcgi-connection-{connection.number}", daemon=True
        )
        with self._lock:
            self._connections.add(connection)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # no more threads: refuse this one, keep serving
            logger.warning("no thread for a connection on %s: %s", self.address, exc)
            with self._lock:
                self._connections.discard(connection)
                self._threads.remove(thread)
            sock.close()

    def _shutdown(self) -> None:
        self._stopping = True
        self.sock.close()
        path = self.address.path
        if path is not None:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == self._inode:
                    os.unlink(path)
        with self._lock:
            for connection in self._connections:
                connection.kill()
            threads = list(self._threads)
        for connection in list(self._inline.values()):
            self._close_inline(connection)
        for thread in threads:
            thread.join()
        self._wake_r.close()
        self._wake_w.close()
        self._poller.close()


class _Poller:
    """Waits for sockets to have something to read: epoll where there is one, poll elsewhere.

    epoll keeps the sockets it watches; poll sets each up again for every
    wait, which costs the one-thread WSGI server about a tenth of a small
    request's CPU.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._poll = select.poll() if self._epoll is None else None

    def register(self, sock: socket.socket) -> None:
        if self._epoll is not None:
            self._epoll.register(sock, select.EPOLLIN)
        else:
            assert self._poll is not None
            self._poll.register(sock, select.POLLIN)

    def unregister(self, fd: int | socket.socket) -> None:
        (self._epoll or self._poll).unregister(fd)  # type: ignore[union-attr]

    def watch(self, fd: int, events: int) -> None:
        """Wait on a registered socket for these (POLLIN, POLLOUT; epoll's bits are the same)."""
        (self._epoll or self._poll).modify(fd, events)  # type: ignore[union-attr]

    def wait(self, seconds: float) -> list[tuple[int, int]]:
        """(descriptor, events) of those ready within `seconds`: poll's event bits, as epoll's."""
        if self._epoll is not None:
            return self._epoll.poll(seconds)
        assert self._poll is not None
        return self._poll.poll(seconds * 1000)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


def _bind(address: Address) -> tuple[socket.socket, Address, int]:
    """A listening socket, the address it is bound to, and its socket file's inode."""
    if address.path is not None:
        path = address.path
        _remove_stale_socket(path)
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
    host = address.host or None
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
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


def _sock_address(sock: socket.socket) -> Address:
    """The address a listening socket was bound to (an inherited one too)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = name if isinstance(name, str) else name.decode("utf-8", "surrogateescape")
        return Address(path=path)
    return Address(host=name[0], port=name[1])


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a server that is gone; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a live server with a full backlog does not answer at once
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nothing listens there: stale
        return
    except FileNotFoundError:
        return
    except (TimeoutError, BlockingIOError):  # alive, its backlog full
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


def serve(
    handler: Handler,
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
    ready: Callable[[Address], object] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run a FastCGI application until `stop` is set (forever without it).

    `handler(request)` is called once a request's params, stdin and filter data
    have all arrived; what it returns, bytes or an iterable of bytes sent as it
    is produced, is the CGI response: headers, a blank line, the body. If it
    raises, the traceback goes to this module's logger and to the request's
    STDERR (the web server's error log), a plain 500 response is sent if
    nothing was yet, and the request ends with app_status 1.

    `address` is as for the client: "host:port" (port 0 takes a free one),
    "[::1]:9000", "unix:/path.sock", an absolute path, or (host, port). A Unix
    socket file left by a server that is gone is replaced, and removed again
    on the way out. `ready` is called with the bound address once listening.

    Each connection has a thread. Without `multiplex` (the default: nginx,
    Apache and Caddy never multiplex, and a client that can asks first) a
    connection carries one request at a time (a second one sent anyway, as
    HAProxy does, waits for the first to end) and the handler runs in that
    thread, so an ABORT_REQUEST is read only after it returns (web servers
    close the connection instead, which stops a streaming handler at its next
    chunk). With `multiplex` a connection carries many requests at once, each
    handler in a thread of its own, and ABORT_REQUEST ends the request at
    once: the handler sees `request.aborted`, and its output is dropped. A
    request's stdin and filter data are held in memory until the handler runs,
    up to `max_body_size` bytes (more is answered 413 at once).

    The options and their defaults are fcgiproto_anyio.serve's, and mean the
    same (see fcgiproto.support.ServerOptions and the README's "Limits");
    GET_VALUES answers them as set. At `max_connections` the server keeps
    accepting and closes the connection that waited longest on its client;
    only while every connection runs a handler does a new one wait in the
    listen backlog. `max_requests` caps requests at once across all
    connections; one more ends with OVERLOADED. Requests in `roles` only are
    accepted (others end with UNKNOWN_ROLE). A client that sends PARAMS of
    more than `max_params_size` bytes or `max_params_pairs` pairs, or
    otherwise breaks the protocol, loses its connection, as does one that
    takes longer than `params_timeout` to send a request's PARAMS, sends
    nothing for `idle_timeout` while no handler runs for it, or leaves a send
    waiting for `send_timeout`; the server goes on. A handler's output waits
    once `max_unsent_size` bytes of it are not yet taken by the client.

    Setting `stop` closes the listener and every connection (requests in
    progress are abandoned) and returns once every thread has ended, waiting
    for handlers still running.
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
    _Listener(handler, address, options).run(stop, ready)


class Server:
    """`serve` in a background thread, for tests, demos and embedding.

    ``with Server(handler, "127.0.0.1:0") as server:`` listens on
    ``server.address`` inside the block; leaving it stops the server and joins
    every thread it started. The options are serve's and are checked here;
    binding happens in ``start()``, so an address in use raises there.
    """

    def __init__(
        self,
        handler: Handler,
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
    ) -> None:
        self._handler = handler
        self._requested = address
        self._options = ServerOptions(
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
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> Address:
        """The bound address (with the real port when port 0 was asked for)."""
        if self._listener is None:
            raise RuntimeError("the server is not started")
        return self._listener.address

    def start(self) -> Server:
        """Bind, and serve in a daemon thread; returns the server. Once only."""
        if self._listener is not None:
            raise RuntimeError("the server is already started")
        listener = _Listener(self._handler, self._requested, self._options)
        thread = threading.Thread(
            target=listener.run,
            args=(None, None),
            name=f"fcgi-server {listener.address}",
            daemon=True,
        )
        self._listener, self._thread = listener, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join every thread."""
        listener, thread = self._listener, self._thread
        if listener is None or thread is None:
            return
        listener.request_stop()
        thread.join()

    def __enter__(self) -> Server:
        return self if self._listener is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
