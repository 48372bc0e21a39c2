"""WSGI (PEP 3333) applications on the blocking server.

Each request's app runs once its PARAMS are in, in its connection's thread
(or a thread of its own on a multiplexed connection): `wsgi.input` reads the
body as it arrives, and every chunk the app yields is sent before the next is
asked for, so a slow client slows the app instead of filling memory. When the
web server aborts the request or the connection is lost, the app's iterable
is not asked for more and its close() is called.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeAlias

from fcgiproto import DEFAULT_MAX_PARAMS_PAIRS, DEFAULT_MAX_PARAMS_SIZE, Role
from fcgiproto.support import (
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
    cgi_head,
    failure_report,
    wsgi_environ,
)

from ._server import BodyTooLarge, Exchange, _Listener

__all__ = ["WSGIApp", "serve_wsgi"]

logger = logging.getLogger("fcgiproto_socket.wsgi")
#: What apps write to wsgi.errors is logged here too (besides going to FCGI_STDERR).
errors_logger = logging.getLogger("fcgiproto_socket.wsgi.errors")

WSGIApp: TypeAlias = "Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]"
ExcInfo: TypeAlias = (
    "tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]"
)

#: How long a drain on SIGTERM (or `stop`) waits for requests in progress, by default.
DEFAULT_GRACEFUL_TIMEOUT = 30.0
#: A head and a first chunk this small go out in one write.
JOIN_BELOW = 64 * 1024

_current = threading.local()


class _Input:
    """wsgi.input: the request body, read as the web server sends it."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._buffer = b""
        self._done = False

    def _fill(self, size: int) -> bytes:
        if self._buffer:
            data, self._buffer = self._buffer, b""
            return data
        if self._done:
            return b""
        data = self._exchange.read(size)
        if not data:
            self._done = True
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buffer]
            self._buffer = b""
            while not self._done:
                parts.append(self._fill(-1))
            return b"".join(parts)
        parts, got = [], 0
        while got < size:
            data = self._fill(size - got)
            if not data:
                break
            if len(data) > size - got:
                data, self._buffer = data[: size - got], data[size - got :]
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        parts: list[bytes] = []
        got = 0
        while limit < 0 or got < limit:
            data = self._fill(65536)
            if not data:
                break
            end = data.find(b"\n") + 1
            if limit >= 0 and (end == 0 or end > limit - got):
                end = min(len(data), limit - got) if end == 0 else min(end, limit - got)
            if end:
                parts.append(data[:end])
                got += end
                self._buffer = data[end:] + self._buffer
                if parts[-1].endswith(b"\n") or (limit >= 0 and got >= limit):
                    break
            else:
                parts.append(data)
                got += len(data)
        return b"".join(parts)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class _Errors:
    """wsgi.errors: to the request's FCGI_STDERR (the web server's error log) and to logging."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def write(self, text: str) -> int:
        if text:
            self._exchange.log(text)
            message = text.rstrip("\n")
            if message:
                errors_logger.warning("%s", message)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


class RequestLogHandler(logging.Handler):
    """Sends the log records an app emits while it serves a request to that request's STDERR.

    Installed on the root logger while serve_wsgi runs; records from other
    threads, and those of wsgi.errors (which go to STDERR already), are let by.
    """

    def emit(self, record: logging.LogRecord) -> None:
        exchange: Exchange | None = getattr(_current, "exchange", None)
        if exchange is None or record.name.startswith("fcgiproto"):
            return
        try:
            exchange.log(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class _Response:
    """start_response and what it was given: the status, the headers, and whether they went."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.head: bytes | None = None
        self.head_sent = False
        # A HEAD response keeps the app's headers (Content-Length too) and
        # loses its body, as gunicorn does: HAProxy answers 502 to a HEAD
        # response with a body rather than discard it as RFC 3875 allows.
        self.head_only = exchange.params.get("REQUEST_METHOD") == "HEAD"

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        if exc_info is not None and exc_info[0] is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.head is not None:
            raise RuntimeError("start_response was called twice without exc_info")
        if not isinstance(status, str) or len(status) < 4 or not status[:3].isdigit():
            raise ValueError(f"the WSGI status must be like '200 OK', not {status!r}")
        for pair in headers:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"a WSGI header must be a (name, value) tuple, not {pair!r}")
        self.head = cgi_head(status, headers)
        return self.write

    def write(self, data: bytes) -> None:
        """The write() callable start_response returns (for apps from before iterables)."""
        if not self.send(data):
            raise OSError("the client is gone")
        if self.exchange.held:  # one thread for every connection: it cannot pause, so it waits
            self.exchange.wait_taken()

    def finish(self, data: bytes | bytearray | memoryview) -> bool:
        """Send the last chunk of body, the head first, and end the request; False if over."""
        if not isinstance(data, OUTPUT_TYPES):
            raise TypeError(f"the app yielded {type(data).__name__}, not bytes")
        if self.head is None:
            raise RuntimeError("the app sent body before calling start_response")
        if self.head_only:  # as send() has it
            data = b""
        if not self.head_sent:
            self.head_sent = True
            if len(data) < JOIN_BELOW:
                return self.exchange.finish(self.head + data)
            if not self.exchange.write(self.head):
                return False
        return self.exchange.finish(data)

    def send(self, data: bytes | bytearray | memoryview) -> bool:
        """Send a chunk of body, the head first; False once the request is over."""
        if not isinstance(data, OUTPUT_TYPES):
            raise TypeError(f"the app yielded {type(data).__name__}, not bytes")
        if self.head is None:
            raise RuntimeError("the app sent body before calling start_response")
        if self.head_only:
            data = b""
        if not self.head_sent:
            self.head_sent = True
            if not data:
                return self.exchange.write(self.head)
            if len(data) < JOIN_BELOW:
                return self.exchange.write(self.head + data)
            if not self.exchange.write(self.head):
                return False
        elif not data:
            return not self.exchange.aborted
        return self.exchange.write(data)


class Gateway:
    """Runs one WSGI app on the Exchanges of a streaming server."""

    def __init__(
        self, app: WSGIApp, *, root_path: str, threads: int | None, multiprocess: bool
    ) -> None:
        self.app = app
        self.root_path = root_path
        self.multiprocess = multiprocess
        self.slots = threading.BoundedSemaphore(threads) if threads else None

    def __call__(self, exchange: Exchange) -> None:
        if self.slots is None:
            self.serve(exchange)
            return
        with self.slots:
            if not exchange.aborted:
                self.serve(exchange)

    def serve(self, exchange: Exchange) -> None:
        """Run the app on one request: the gateway itself when `threads` caps nothing."""
        for _ in self.steps(exchange):  # with a thread of its own, output waits in write()
            pass

    def steps(self, exchange: Exchange) -> Iterator[None]:
        """Run the app on one request, pausing (yielding) while its output is `held`.

        Where one thread serves every connection, the server resumes it once
        the client has taken enough; the app's iterable is asked for nothing
        meanwhile, as a slow client slows an app with a thread of its own.
        """
        environ = wsgi_environ(
            exchange.params,
            root_path=self.root_path,
            input=_Input(exchange),
            errors=_Errors(exchange),
            multithread=True,
            multiprocess=self.multiprocess,
        )
        response = _Response(exchange)
        _current.exchange = exchange
        result: Any = None
        try:
            result = self.app(environ, response.start_response)
            if type(result) in (list, tuple):
                # Its last piece is known up front: it goes out with END_REQUEST,
                # in one write (a list has no close() to call first).
                for chunk in result[:-1]:
                    if not response.send(chunk):
                        return
                    if exchange.held:
                        yield from _paused(exchange)
                response.finish(result[-1] if result else b"")
                return
            for chunk in result:
                if not response.send(chunk):
                    return  # aborted or lost: close() below ends the app's iterable
                if exchange.held:
                    yield from _paused(exchange)
            if not response.head_sent:
                response.send(b"")
        except BodyTooLarge:
            if response.head_sent:
                exchange.app_status = ERROR_STATUS
                return
            raise  # the server answers 413
        except Exception:
            self._failed(exchange, response)
        finally:
            _current.exchange = None
            if result is not None:
                try:
                    close = getattr(result, "close", None)
                    if callable(close):
                        close()
                except Exception:
                    self._failed(exchange, response)

    @staticmethod
    def _failed(exchange: Exchange, response: _Response) -> None:
        """The app raised: traceback to the logs and STDERR, a plain 500 if nothing was sent."""
        logger.exception("the WSGI app failed on %r", exchange)
        exchange.app_status = ERROR_STATUS
        if exchange.aborted:
            return
        exchange.log(failure_report())
        if not response.head_sent:
            response.head_sent = True
            exchange.write(INTERNAL_ERROR)


def _paused(exchange: Exchange) -> Iterator[None]:
    """Yield to the server until resumed; what the app logs meanwhile is not this request's."""
    _current.exchange = None
    yield
    _current.exchange = exchange


def serve_wsgi(
    app: WSGIApp,
    address: AddressInput | None = None,
    *,
    sock: socket.socket | None = None,
    threads: int | None = None,
    root_path: str = "",
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
    multiprocess: bool = False,
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
    ready: Callable[[Address], object] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve a WSGI application over FastCGI until `stop` is set (forever without it).

    `address` is as for serve(); or `sock`, a listening socket (inherited on
    fd 0, or shared with other processes), is served instead. Each connection
    has a thread, and the app runs in it once a request's PARAMS are in (in a
    thread per request on a multiplexed connection); `threads` caps how many
    run at once (the others wait their turn), without it `max_requests` does.

    `threads=1` serves with one thread, as gunicorn's sync worker does: it
    reads every connection and runs every app, one at a time, each once its
    whole body is in (up to `max_body_size`, held in memory as serve()
    holds it), so that a client sending slowly holds up nobody. With no
    thread per connection to hand the GIL between, it is the fastest way to
    serve apps that do not wait on I/O; run several `fcgi serve --workers`
    for more at once. While an app runs the others wait; an app whose
    client is slow to take its output is paused (its iterable asked for
    nothing more) until the client takes it, and the others go on. Only
    the write() callable, which cannot pause, waits for its client
    (`send_timeout` at most).
    The environ follows PEP 3333 (see fcgiproto.support.wsgi_environ; the app
    is mounted at `root_path` when the web server sends the whole path as
    SCRIPT_NAME, as nginx does). `wsgi.input` streams the body; `wsgi.errors`
    and the log records the app emits while serving a request go to the
    request's FCGI_STDERR as well as to logging. An app that raises gets its
    traceback logged and sent to FCGI_STDERR, never to the client, who gets a
    plain 500 (or a response cut short, if it had begun). An aborted request
    or a lost connection stops the app's iterable at its next chunk, and its
    close() is called.

    TCP connections from outside `allowed_peers` (FCGI_WEB_SERVER_ADDRS, as
    fcgiproto.support.web_server_addrs reads it) are closed at once. The
    limits are serve()'s, with its defaults; `max_body_size` bounds a
    request's whole body as it streams (413 up front when CONTENT_LENGTH says
    more, or once more arrives if the app has sent nothing yet). A second
    request on a busy connection that does not multiplex waits for the first.

    Setting `stop` drains: no more connections are accepted, idle ones are
    closed, requests in progress get `graceful_timeout` seconds to end;
    whatever is left then is closed.
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
    )
    if threads is not None and (type(threads) is not int or threads < 1):
        raise ValueError(f"threads must be an int of at least 1, not {threads!r}")
    if (address is None) == (sock is None):
        raise TypeError("serve_wsgi takes an address or a listening sock, one of them")
    inline = threads == 1
    gateway = Gateway(
        app, root_path=root_path, threads=None if inline else threads, multiprocess=multiprocess
    )
    run = gateway.steps if inline else gateway if gateway.slots is not None else gateway.serve
    listener = _Listener(
        run,
        address,
        options,
        streaming=True,
        sock=sock,
        graceful_timeout=graceful_timeout,
        inline=inline,
    )
    handler = RequestLogHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        listener.run(stop, ready)
    finally:
        root.removeHandler(handler)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
