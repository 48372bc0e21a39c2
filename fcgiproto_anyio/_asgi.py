"""ASGI applications (HTTP and lifespan) on the anyio server, asyncio or trio.

Each request's app runs in a task of its own once its PARAMS are in.
`receive()` gives the body as it arrives, then waits for the client to go
(http.disconnect: an ABORT_REQUEST, the connection lost, or the response
done). `send()` returns once the client has taken the output (all but
`max_unsent_size` of it), so an app is never further ahead of a slow client
than that; once the client is gone it raises ClientDisconnected, an OSError,
as ASGI's HTTP spec 2.4 has it. The request ends (END_REQUEST) as soon as
the last body message is sent: work the app does after it (background
tasks) does not hold up the web server.
"""

from __future__ import annotations

import contextvars
import logging
import math
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any, Literal, TypeAlias

import anyio
import anyio.abc

from fcgiproto import DEFAULT_MAX_PARAMS_PAIRS, DEFAULT_MAX_PARAMS_SIZE, Role
from fcgiproto.support import (
    ASGI_VERSION,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_MAX_UNSENT_SIZE,
    DEFAULT_MULTIPLEX,
    DEFAULT_PARAMS_TIMEOUT,
    DEFAULT_SEND_TIMEOUT,
    ERROR_STATUS,
    INTERNAL_ERROR,
    OUTPUT_TYPES,
    Address,
    AddressInput,
    ServerOptions,
    asgi_scope_from_bytes,
    cgi_head,
    failure_report,
)

from ._server import AsyncExchange, BodyTooLarge, run_server

__all__ = ["ASGIApp", "ClientDisconnected", "serve_asgi"]

logger = logging.getLogger("fcgiproto_anyio.asgi")

Message: TypeAlias = "MutableMapping[str, Any]"
Receive: TypeAlias = "Callable[[], Awaitable[Message]]"
Send: TypeAlias = "Callable[[Message], Awaitable[None]]"
ASGIApp: TypeAlias = "Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]"

#: How long a drain on `stop` waits for requests in progress, by default.
DEFAULT_GRACEFUL_TIMEOUT = 30.0
#: A head and a first body this small go out in one write.
JOIN_BELOW = 64 * 1024

_current: contextvars.ContextVar[AsyncExchange | None] = contextvars.ContextVar(
    "fcgiproto_asgi_exchange", default=None
)


class ClientDisconnected(OSError):
    """send() after the client went away (ASGI HTTP spec 2.4)."""


class LifespanFailed(RuntimeError):
    """The app's lifespan startup (or shutdown) failed."""


class RequestLogHandler(logging.Handler):
    """Sends the log records an app emits while it serves a request to that request's STDERR.

    Installed on the root logger while serve_asgi runs. The request is the
    one of the task (or of the context copied into a thread, whose records are
    let by: the protocol state belongs to the event loop's thread).
    """

    def __init__(self, loop_thread: int) -> None:
        super().__init__()
        self.loop_thread = loop_thread

    def emit(self, record: logging.LogRecord) -> None:
        exchange = _current.get()
        if (
            exchange is None
            or record.name.startswith("fcgiproto")
            or threading.get_ident() != self.loop_thread
        ):
            return
        try:
            exchange.log_nowait(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class _Cycle:
    """One request's receive() and send(), and where its response stands."""

    __slots__ = ("body_done", "complete", "exchange", "head", "head_only", "head_sent")

    def __init__(self, exchange: AsyncExchange) -> None:
        self.exchange = exchange
        self.body_done = False
        self.head: bytes | None = None
        self.head_sent = False
        self.complete = False
        # A HEAD response keeps the app's headers (Content-Length too) and
        # loses its body, as uvicorn does: HAProxy answers 502 to a HEAD
        # response with a body rather than discard it as RFC 3875 allows.
        self.head_only = exchange.raw_params.get(b"REQUEST_METHOD") == b"HEAD"

    async def receive(self) -> Message:
        exchange = self.exchange
        if not self.body_done and not exchange.aborted:
            data, more = await exchange.receive()
            if not exchange.aborted:
                self.body_done = not more
                return {"type": "http.request", "body": data, "more_body": more}
        if not self.complete:
            await exchange.wait_over()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        exchange = self.exchange
        if exchange.aborted:
            raise ClientDisconnected("the client is gone")
        kind = message["type"]
        if kind == "http.response.start":
            if self.head is not None:
                raise RuntimeError("http.response.start sent twice")
            status = message["status"]
            if type(status) is not int or not 100 <= status <= 999:
                raise ValueError(f"http.response.start status must be an int, not {status!r}")
            # cgi_head takes each (name, value) pair as it comes: no copy of the list.
            self.head = cgi_head(status, message.get("headers", ()))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r} in an http request")
        if self.head is None:
            raise RuntimeError("http.response.body sent before http.response.start")
        if self.complete:
            raise RuntimeError("http.response.body sent after the response was complete")
        body = message.get("body", b"")
        if not isinstance(body, OUTPUT_TYPES):
            raise TypeError(f"http.response.body body must be bytes, not {type(body).__name__}")
        if self.head_only:
            body = b""
        more = bool(message.get("more_body", False))
        if more:
            if not await self._write(body):
                raise ClientDisconnected("the client is gone")
            return
        self.complete = True
        if not self.head_sent:
            assert self.head is not None
            self.head_sent = True
            body = self.head + body
        if not await exchange.finish(body):
            raise ClientDisconnected("the client is gone")

    async def _write(self, body: bytes | bytearray | memoryview) -> bool:
        exchange = self.exchange
        if not self.head_sent:
            assert self.head is not None
            self.head_sent = True
            if len(body) < JOIN_BELOW:
                return await exchange.write(self.head + body)
            if not await exchange.write(self.head):
                return False
        if not body:
            return not exchange.aborted
        return await exchange.write(body)


class Gateway:
    """Runs one ASGI app on the AsyncExchanges of a streaming server."""

    def __init__(self, app: ASGIApp, *, root_path: str, state: dict[str, Any] | None) -> None:
        self.app = app
        self.root_path = root_path
        self.state = state

    async def __call__(self, exchange: AsyncExchange) -> None:
        scope = asgi_scope_from_bytes(
            exchange.raw_params, root_path=self.root_path, state=self.state
        )
        cycle = _Cycle(exchange)
        token = _current.set(exchange)
        try:
            await self.app(scope, cycle.receive, cycle.send)
        except BodyTooLarge:
            if cycle.head_sent:
                exchange.app_status = ERROR_STATUS
                return
            raise  # the server answers 413
        except Exception:
            if exchange.aborted:  # what an app does once its client is gone is its own business
                logger.debug("the ASGI app raised after its client went away", exc_info=True)
                exchange.app_status = ERROR_STATUS
                return
            logger.exception("the ASGI app failed on %r", exchange)
            exchange.app_status = ERROR_STATUS
            if not exchange.ended:
                await exchange.log(failure_report())
                if not cycle.head_sent:
                    await exchange.write(INTERNAL_ERROR)
            return
        finally:
            _current.reset(token)
        if not cycle.head_sent and not exchange.aborted:
            logger.error("the ASGI app returned without a response on %r", exchange)
            await exchange.log("the ASGI app returned without a response\n")
            await exchange.write(INTERNAL_ERROR)
            exchange.app_status = ERROR_STATUS


class Lifespan:
    """The app's lifespan: startup before the first request, shutdown after the last."""

    def __init__(self, app: ASGIApp, mode: Literal["auto", "on", "off"]) -> None:
        self.app = app
        self.mode = mode
        self.state: dict[str, Any] = {}
        self.supported = False
        self._to_app: list[Message] = []
        self._to_app_ready = anyio.Event()
        self._from_app: Message | None = None
        self._from_app_ready = anyio.Event()
        self._ended = anyio.Event()
        self._error: BaseException | None = None
        self.failure: LifespanFailed | None = None
        # The app's lifespan task outlives the cancellation that stops the
        # server: it is told to shut down, and cancelled only if it does not.
        self._app_scope = anyio.CancelScope(shield=True)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The lifespan task: started once startup is complete; returns after shutdown."""
        scope = {"type": "lifespan", "asgi": dict(ASGI_VERSION), "state": self.state}
        self._put({"type": "lifespan.startup"})
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._app_task, scope)
            try:
                reply = await self._get()
                if reply is not None and reply["type"] == "lifespan.startup.complete":
                    self.supported = True
                elif reply is not None and reply["type"] == "lifespan.startup.failed":
                    raise LifespanFailed(f"lifespan startup failed: {reply.get('message', '')}")
                elif self.mode == "on":
                    raise LifespanFailed("the app does not support the lifespan protocol") from (
                        self._error
                    )
                else:
                    logger.info("the ASGI app does not support lifespan: served without it")
            except LifespanFailed as exc:
                # Raised by serve_asgi, out of its task group (no exception group around it).
                self.failure = exc
                self._app_scope.cancel()
                task_status.started()
                return
            except BaseException:
                self._app_scope.cancel()
                raise
            task_status.started()
            if not self.supported:
                return
            try:
                await anyio.sleep(math.inf)
            finally:
                # Cancelled: the server stopped. Tell the app, shielded, then let it go.
                with anyio.CancelScope(shield=True):
                    await self._shutdown()
                self._app_scope.cancel()

    async def _shutdown(self) -> None:
        self._put({"type": "lifespan.shutdown"})
        with anyio.move_on_after(DEFAULT_GRACEFUL_TIMEOUT):
            reply = await self._get()
            if reply is not None and reply["type"] == "lifespan.shutdown.failed":
                logger.error("lifespan shutdown failed: %s", reply.get("message", ""))

    async def _app_task(self, scope: dict[str, Any]) -> None:
        try:
            with self._app_scope:
                await self.app(scope, self._receive, self._send)
        except Exception as exc:
            self._error = exc
            if self.mode == "on" or self.supported:
                logger.exception("the ASGI app's lifespan failed")
        finally:
            self._ended.set()
            self._from_app_ready.set()

    def _put(self, message: Message) -> None:
        self._to_app.append(message)
        self._to_app_ready.set()

    async def _receive(self) -> Message:
        while not self._to_app:
            self._to_app_ready = anyio.Event()
            await self._to_app_ready.wait()
        return self._to_app.pop(0)

    async def _send(self, message: Message) -> None:
        self._from_app = message
        self._from_app_ready.set()

    async def _get(self) -> Message | None:
        """The app's next message; None if it returned (or raised) instead."""
        while self._from_app is None and not self._ended.is_set():
            self._from_app_ready = anyio.Event()
            await self._from_app_ready.wait()
        message, self._from_app = self._from_app, None
        return message


async def serve_asgi(
    app: ASGIApp,
    address: AddressInput | None = None,
    *,
    sock: socket.socket | None = None,
    root_path: str = "",
    lifespan: Literal["auto", "on", "off"] = "auto",
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
    stop: anyio.Event | None = None,
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
    allowed_peers: Collection[str] | None = None,
    task_status: anyio.abc.TaskStatus[Address] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI application over FastCGI until `stop` is set, or until cancelled.

    `address` is as for serve(); or `sock`, a listening socket (inherited on
    fd 0, or shared with other processes), is served instead. The lifespan
    protocol runs first (`lifespan="auto"` goes on without it when the app
    does not support it, "on" requires it, "off" skips it); its state is
    copied into each request's scope. The scope follows the ASGI HTTP spec
    (see fcgiproto.support.asgi_scope_from_bytes; the app is mounted at `root_path` when
    the web server sends the whole path as SCRIPT_NAME, as nginx does).
    Log records the app emits while serving a request go to the request's
    FCGI_STDERR as well as to logging. An app that raises gets its traceback
    logged and sent to FCGI_STDERR, never to the client, who gets a plain 500
    (or a response cut short, if it had begun).

    TCP connections from outside `allowed_peers` (FCGI_WEB_SERVER_ADDRS, as
    fcgiproto.support.web_server_addrs reads it) are closed at once. The
    limits are serve()'s, with its defaults; `max_unsent_size` is also
    how far send() may get ahead of a slow client. `max_body_size` bounds a
    request's whole body as it streams (413 up front when CONTENT_LENGTH says
    more, or once more arrives if the app has sent nothing yet). A second
    request on a busy connection that does not multiplex waits for the first.

    Setting `stop` drains: no more connections are accepted, idle ones are
    closed, requests in progress get `graceful_timeout` seconds to end; then
    the lifespan shuts down and serve_asgi returns. Cancelling it stops at
    once. ``await task_group.start(serve_asgi, app, address)`` returns the
    bound address once listening (after lifespan startup).
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
        roles=(Role.RESPONDER,),
        allowed_peers=allowed_peers,
        decode_params=False,  # the scope is built from the bytes
    )
    if lifespan not in ("auto", "on", "off"):
        raise ValueError(f"lifespan must be 'auto', 'on' or 'off', not {lifespan!r}")
    if (address is None) == (sock is None):
        raise TypeError("serve_asgi takes an address or a listening sock, one of them")
    handler = RequestLogHandler(threading.get_ident())
    root = logging.getLogger()
    root.addHandler(handler)
    failure: LifespanFailed | None = None
    try:
        async with anyio.create_task_group() as tasks:
            state: dict[str, Any] | None = None
            if lifespan != "off":
                cycle = Lifespan(app, lifespan)
                await tasks.start(cycle.run)
                failure = cycle.failure
                state = cycle.state if cycle.supported else None
            if failure is None:
                gateway = Gateway(app, root_path=root_path, state=state)
                await run_server(
                    gateway,
                    options,
                    address=address,
                    sock=sock,
                    streaming=True,
                    stop=stop,
                    graceful_timeout=graceful_timeout,
                    task_status=task_status,
                )
            tasks.cancel_scope.cancel()  # the lifespan shuts down
    finally:
        root.removeHandler(handler)
    if failure is not None:
        raise failure  # out of the task group: not wrapped in an exception group


def run_asgi_process(
    app: ASGIApp,
    *,
    sock: socket.socket,
    backend: str = "asyncio",
    recycle_after: int = 0,
    stopped: threading.Event | None = None,
    **options: Any,
) -> None:
    """What `fcgi serve` runs in a process serving an ASGI app: serve_asgi on `sock`.

    SIGTERM and SIGINT drain (see serve_asgi's `stop`); so does serving
    `recycle_after` requests (0: no limit), for the process to be replaced.
    `stopped` is set by the caller's own handlers of those signals, up to now.
    """

    async def main() -> None:
        stop = anyio.Event()
        served = 0

        async def counted(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
            nonlocal served
            if scope["type"] == "http":
                served += 1
                if served >= recycle_after:
                    stop.set()
            await app(scope, receive, send)

        async with anyio.create_task_group() as tasks:
            await tasks.start(_stop_on_signals, stop, stopped)
            await serve_asgi(counted if recycle_after else app, sock=sock, stop=stop, **options)
            tasks.cancel_scope.cancel()

    anyio.run(main, backend=backend)


async def _stop_on_signals(
    stop: anyio.Event,
    stopped: threading.Event | None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if stopped is not None and stopped.is_set():  # a signal came before we listened
            stop.set()
        task_status.started()
        async for _ in signals:
            stop.set()
