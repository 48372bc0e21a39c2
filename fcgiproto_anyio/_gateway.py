"""Serve a PHP document root through php-fpm: an ASGI application.

`PhpGateway` is what Caddy's ``php_fastcgi`` is to Caddy: it maps the
request path to a script (the I/O-free `fcgiproto.support.PhpRouter`, told
about the disk by `LocalFileSystem`), sends it to one of several backends
(`AsyncBalancedClient`), and streams both bodies in constant memory. A
client that goes away closes the FastCGI connection, which stops the script.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import mimetypes
import os
import re
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from email.utils import formatdate
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import anyio

from fcgiproto import (
    ConnectTimeout,
    FastCGIError,
    LocalProtocolError,
    ReadTimeout,
    TimeoutException,
    WriteTimeout,
)
from fcgiproto.cgi import build_params
from fcgiproto.support import (
    AddressInput,
    FileKind,
    PhpRouter,
    Policy,
    Redirect,
    Refusal,
    Script,
    StaticFile,
    Timeout,
)

from ._balanced import AsyncBalancedClient, NoBackendAvailable
from ._client import AsyncStreamResponse

__all__ = ["LocalFileSystem", "PhpGateway"]

logger = logging.getLogger("fcgiproto.php")

# The ASGI types as Starlette and uvicorn spell them.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Hop-by-hop headers a script may write that describe its connection to
#: us, not ours to the client; the ASGI server frames the body itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)
_STATIC_CHUNK = 64 * 1024


class LocalFileSystem:
    """The router's view of the local disk: os.stat and os.path.realpath."""

    def kind(self, path: bytes) -> FileKind:
        """What ``path`` is, symbolic links followed; MISSING for any error."""
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):
            return FileKind.MISSING
        if stat.S_ISREG(mode):
            return FileKind.FILE
        if stat.S_ISDIR(mode):
            return FileKind.DIRECTORY
        return FileKind.OTHER

    def realpath(self, path: bytes) -> bytes:
        """``path`` with every symbolic link resolved."""
        # The kernel's answer for an open O_PATH descriptor is three system
        # calls; os.path.realpath walks the path in Python, an lstat a segment.
        if _O_PATH:
            try:
                fd = os.open(path, _O_PATH | os.O_CLOEXEC)
            except (OSError, ValueError):
                return os.path.realpath(path)
            try:
                return os.readlink(b"/proc/self/fd/%d" % fd)
            except OSError:
                return os.path.realpath(path)
            finally:
                os.close(fd)
        return os.path.realpath(path)


#: Linux's O_PATH, when /proc can name what a descriptor points at.
_O_PATH = getattr(os, "O_PATH", 0) if os.path.isdir("/proc/self/fd") else 0


class _ClientGone(Exception):
    """The HTTP client disconnected while its request body was being read."""


class PhpGateway:
    """An ASGI application serving a PHP document root through FastCGI backends.

    The options are those of Caddy's ``php_fastcgi``:

    :param root: the document root.
    :param upstreams: backend addresses (``unix:/run/php/a.sock``,
        ``127.0.0.1:9000``), or an AsyncBalancedClient built by the caller.
    :param split_path: extensions that mark a script (default ``.php``).
    :param index: the directory index, or None for Caddy's ``index off``.
    :param try_files: candidates, ``{path}`` being the request path (default
        ``{path} {path}/index.php index.php``, the front controller).
    :param env: extra params for every request (overriding the computed ones).
    :param resolve_root_symlink: send the root with its symbolic links resolved
        (DOCUMENT_ROOT, SCRIPT_FILENAME), as deploys that swap a symlink need.
    :param capture_stderr: log what scripts write to stderr (logger
        ``fcgiproto.php``): WARNING, or ERROR when the status is 4xx or 5xx.
        False drops it.
    :param dial_timeout: seconds to connect to a backend.
    :param read_timeout: seconds to wait for the next bytes of an answer.
    :param write_timeout: seconds to hand a backend more of the body.
    :param pool_timeout: seconds to wait for a connection when a backend is at
        its cap (then the next backend is tried).
    :param static: ``"serve"`` files under the root that are not scripts, or
        ``"refuse"`` them (403); never sent to PHP either way.
    :param trusted_proxies: addresses or networks (``10.0.0.0/8``) whose
        X-Forwarded-For and X-Forwarded-Proto are believed: only then do they
        decide REMOTE_ADDR and HTTPS. Run the ASGI server without its own
        proxy-header handling (uvicorn ``proxy_headers=False``) so this is the
        only place that decides.
    :param policy: how a backend is chosen (see AsyncBalancedClient).
    :param max_connections: the cap of connections per backend.
    :param max_fails: failures within ``fail_timeout`` that take a backend out.
    :param fail_timeout: the window for ``max_fails``, and how long it stays out.
    :param health_path: php-fpm's ping path asked on an interval, or None.
    :param health_interval: seconds between two health checks of a backend.
    :param health_timeout: the deadline of one health check.
    :param health_expect: the body a healthy ping answers.
    :param max_spooled_body: a chunked request body (no Content-Length) is
        written to a temporary file first, since php-fpm needs its length; one
        larger than this many bytes is refused with 413.
    :param hash_key: for policy "hash": ``"remote_addr"``, ``"uri"``,
        ``"header:NAME"`` or ``"cookie:NAME"``.

    Use it under an ASGI server with lifespan (uvicorn does), or enter it
    with ``async with gateway:`` around the server (a Starlette lifespan), so
    its connections and health checks have a task group.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        upstreams: Sequence[AddressInput] | AsyncBalancedClient,
        *,
        split_path: Iterable[str] = (".php",),
        index: str | None = "index.php",
        try_files: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        resolve_root_symlink: bool = False,
        capture_stderr: bool = True,
        dial_timeout: float | None = 3.0,
        read_timeout: float | None = 60.0,
        write_timeout: float | None = 60.0,
        pool_timeout: float | None = 30.0,
        static: Literal["serve", "refuse"] = "serve",
        trusted_proxies: Iterable[str] = (),
        policy: Policy | str = Policy.ROUND_ROBIN,
        max_connections: int = 8,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        health_path: str | None = None,
        health_interval: float = 10.0,
        health_timeout: float = 5.0,
        health_expect: str | None = None,
        hash_key: str = "remote_addr",
        max_spooled_body: int = 64 << 20,
    ) -> None:
        root_text = os.fspath(root)
        if not os.path.isabs(root_text):
            root_text = os.path.abspath(root_text)
        if resolve_root_symlink:
            root_text = os.path.realpath(root_text)
        if not os.path.isdir(root_text):
            raise ValueError(f"the document root is not a directory: {root_text}")
        self.root = root_text.rstrip("/") or "/"
        if static not in ("serve", "refuse"):
            raise ValueError(f"static must be 'serve' or 'refuse', not {static!r}")
        self.static = static
        self.router = PhpRouter(
            os.fsencode(self.root),
            LocalFileSystem(),
            split_path=split_path,
            index=index,
            try_files=try_files,
        )
        self.env = dict(env or {})
        self.capture_stderr = capture_stderr
        self.timeout = Timeout(
            connect=dial_timeout, read=read_timeout, write=write_timeout, pool=pool_timeout
        )
        if isinstance(upstreams, AsyncBalancedClient):
            self.client = upstreams
        else:
            self.client = AsyncBalancedClient(
                list(upstreams),
                policy=policy,
                max_connections=max_connections,
                max_fails=max_fails,
                fail_timeout=fail_timeout,
                health_path=health_path,
                health_interval=health_interval,
                health_timeout=health_timeout,
                health_expect=health_expect,
                timeout=self.timeout,
                # The body streams through; only unread stderr waits, bounded.
                max_response_size=1 << 20,
            )
        self.trusted_proxies = [ipaddress.ip_network(net, strict=False) for net in trusted_proxies]
        self.hash_key = hash_key
        if not (hash_key in ("remote_addr", "uri") or hash_key.startswith(("header:", "cookie:"))):
            raise ValueError("hash_key must be remote_addr, uri, header:NAME or cookie:NAME")
        self.max_spooled_body = max_spooled_body
        self._entered = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- life ---

    async def __aenter__(self) -> PhpGateway:
        await self.client.__aenter__()
        # Requests run on the loop the gateway was started in.
        self._loop = _asyncio_loop()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        await self.client.__aexit__(exc_type, exc, tb)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.__aenter__()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- requests ---

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"PhpGateway serves HTTP, not {scope['type']!r}")
        if not self._entered:
            raise RuntimeError(
                "PhpGateway was not started: run it under an ASGI server with lifespan, "
                "or `async with gateway:` around the server"
            )
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        raw_path = raw_path.partition(b"?")[0]
        query: bytes = scope.get("query_string", b"")
        route = self.router.route(raw_path, query)
        if isinstance(route, Refusal):
            await _plain(send, route.status, route.reason)
        elif isinstance(route, Redirect):
            await _plain(send, 308, "", [(b"location", route.location)])
        elif isinstance(route, StaticFile):
            if self.static == "refuse":
                await _plain(send, 403, "static files are not served here")
            else:
                await _send_file(scope, send, route.filename)
        else:
            await self._run_script(scope, receive, send, route, raw_path, query)

    def _params(
        self,
        scope: Scope,
        route: Script,
        raw_path: bytes,
        query: bytes,
        spooled: _SpooledBody | None = None,
    ) -> dict[str, str]:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if spooled is not None:  # the body now has a length and is no longer chunked
            headers = [(n, v) for n, v in headers if n != b"transfer-encoding"]
        client = scope.get("client") or ("", 0)
        server = scope.get("server") or ("localhost", 80)
        remote_addr, remote_port, https = self._peer(
            headers, client[0] or "", client[1] or 0, scope
        )
        host = b""
        for name, value in headers:
            if name == b"host":
                host = value
                break
        server_name = _host_name(host) or str(server[0])
        root = self.router.root
        extra: dict[str, bytes | str] = {
            "SCRIPT_NAME": route.script_name,
            "PATH_INFO": route.path_info,
            # nginx's $document_uri: the decoded path that was run.
            "DOCUMENT_URI": route.script_name + route.path_info,
        }
        if route.path_info:
            extra["PATH_TRANSLATED"] = root + route.path_info
        if self.env:
            extra.update(self.env)
        params = build_params(
            scope["method"],
            raw_path,
            query=query,
            headers=headers,
            script_filename=route.filename,
            document_root=root,
            server_name=server_name,
            server_port=int(server[1] or 0),
            server_addr=str(server[0]),
            remote_addr=remote_addr,
            remote_port=remote_port,
            https=https,
            server_protocol=f"HTTP/{scope.get('http_version', '1.1')}",
            content_length=None if spooled is None else spooled.size,
            extra=extra,
        )
        return params

    def _peer(
        self, headers: list[tuple[bytes, bytes]], addr: str, port: int, scope: Scope
    ) -> tuple[str, int, bool]:
        """REMOTE_ADDR, REMOTE_PORT and HTTPS: forwarded values only from a trusted proxy."""
        https = scope.get("scheme") == "https"
        if not self._trusted(addr):
            return addr, port, https
        forwarded = [
            hop.strip()
            for name, value in headers
            if name == b"x-forwarded-for"
            for hop in value.decode("latin-1").split(",")
        ]
        # Walk from the nearest hop back: the first one we do not trust is
        # the client; what lies beyond it the client may have written.
        for hop in reversed(forwarded):
            if not _is_ip(hop):
                break
            addr, port = hop, 0
            if not self._trusted(hop):
                break
        proto = [value for name, value in headers if name == b"x-forwarded-proto"]
        if proto:
            https = proto[-1].decode("latin-1").split(",")[-1].strip().lower() == "https"
        return addr, port, https

    def _trusted(self, addr: str) -> bool:
        if not self.trusted_proxies or not _is_ip(addr):
            return False
        ip = ipaddress.ip_address(addr)
        return any(ip in net for net in self.trusted_proxies)

    def _key(self, scope: Scope, params: Mapping[str, str]) -> bytes | None:
        key = self.hash_key
        if key == "remote_addr":
            return params["REMOTE_ADDR"].encode()
        if key == "uri":
            return params["REQUEST_URI"].encode("utf-8", "surrogateescape")
        kind, _, name = key.partition(":")
        wanted = name.lower().encode()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if kind == "header":
            return next((value for n, value in headers if n == wanted), b"")
        for n, value in headers:
            if n == b"cookie":
                for crumb in value.split(b";"):
                    k, _, v = crumb.strip().partition(b"=")
                    if k == name.encode():
                        return v
        return b""

    async def _run_script(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Script,
        raw_path: bytes,
        query: bytes,
    ) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        has_length = chunked = False
        for name, _ in headers:
            if name == b"content-length":
                has_length = True
            elif name == b"transfer-encoding":
                chunked = True
        spooled: _SpooledBody | None = None
        if chunked and not has_length:
            # php-fpm reads CONTENT_LENGTH bytes of body and no more: a body
            # of unknown length (chunked) is spooled to a file first, as
            # nginx does, and sent with its length.
            try:
                spooled = await _SpooledBody.receive_all(receive, self.max_spooled_body)
            except _ClientGone:
                return
            if spooled is None:
                limit = self.max_spooled_body
                await _plain(send, 413, f"a chunked request body may hold {limit} bytes")
                return
        try:
            try:
                params = self._params(scope, route, raw_path, query, spooled)
            except LocalProtocolError as exc:
                await _plain(send, 400, str(exc))
                return
            await self._exchange(scope, receive, send, params, raw_path, has_length, spooled)
        finally:
            if spooled is not None:
                await spooled.aclose()

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        params: dict[str, str],
        raw_path: bytes,
        has_length: bool,
        spooled: _SpooledBody | None,
    ) -> None:
        """The FastCGI request and its answer, while a watcher waits for the client to leave."""
        key = self._key(scope, params) if self.client.balancer.policy is Policy.HASH else None
        if self._loop is not None:
            # asyncio: no task at all for a request answered within
            # _WATCH_AFTER (nearly all); a timer starts the watcher for the rest.
            with anyio.CancelScope() as cancel:
                state = _Exchange(cancel)
                stdin = self._stdin(receive, state, has_length, spooled)
                watcher = _LateWatcher(self._loop, state, receive)
                try:
                    await self._forward(scope, send, params, raw_path, stdin, key, state)
                finally:
                    watcher.stop()
            return
        async with anyio.create_task_group() as tasks:
            state = _Exchange(tasks.cancel_scope)
            stdin = self._stdin(receive, state, has_length, spooled)
            tasks.start_soon(state.watch_later, receive, name="fcgiproto disconnect watcher")
            try:
                await self._forward(scope, send, params, raw_path, stdin, key, state)
            finally:
                tasks.cancel_scope.cancel()

    @staticmethod
    def _stdin(
        receive: Receive, state: _Exchange, has_length: bool, spooled: _SpooledBody | None
    ) -> bytes | _RequestBody | _SpooledBody:
        if spooled is not None:
            state.body_done = True
            return spooled
        if not has_length:
            state.body_done = True
            return b""
        return _RequestBody(receive, state)

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        params: dict[str, str],
        raw_path: bytes,
        stdin: bytes | _RequestBody | _SpooledBody,
        key: bytes | None,
        state: _Exchange,
    ) -> None:
        try:
            async with self.client.stream(params, stdin, key=key, timeout=self.timeout) as response:
                status = response.status
                out_headers = [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in response.headers
                    if name.lower() not in _HOP_BY_HOP
                ]
                await self._relay(scope, send, response, status, out_headers, params, state)
        except _ClientGone:
            logger.info("client went away: %s %s", scope["method"], raw_path.decode("latin-1"))
        except FastCGIError as exc:
            if state.head_sent:
                # Too late for an error page: the client sees the body cut.
                logger.warning("answer cut after its head: %s", exc)
            else:
                await self._failed(send, exc, params)

    async def _relay(
        self,
        scope: Scope,
        send: Send,
        response: AsyncStreamResponse,
        status: int,
        headers: list[tuple[bytes, bytes]],
        params: Mapping[str, str],
        state: _Exchange,
    ) -> None:
        """The answer's body to the client, as it comes, one chunk held back.

        A body that has all arrived with its first chunk (most pages) goes
        out with a Content-Length in one message; a longer one streams, the
        last chunk riding with the end of the body. Each saves the ASGI
        server a write.
        """
        body = response.aiter_body()
        pending: list[bytes] = []
        async for chunk in body:
            pending.append(chunk)
            if response.app_status is None:
                break  # more is coming: stream it
        else:
            whole = pending[0] if len(pending) == 1 else b"".join(pending)
            if (
                scope["method"] != "HEAD"
                and status not in (204, 304)
                and not _has_header(headers, b"content-length")
            ):
                headers.append((b"content-length", b"%d" % len(whole)))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            state.head_sent = True
            if response.stderr:
                self._log_stderr(response.stderr, status, params)
            state.answered = True
            await send({"type": "http.response.body", "body": whole})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        state.head_sent = True
        held = b"".join(pending)
        async for chunk in body:
            await send({"type": "http.response.body", "body": held, "more_body": True})
            held = chunk
            self._take_stderr(response, status, params)
        self._take_stderr(response, status, params)
        state.answered = True
        await send({"type": "http.response.body", "body": held, "more_body": False})

    def _take_stderr(
        self, response: AsyncStreamResponse, status: int, params: Mapping[str, str]
    ) -> None:
        if response.stderr:
            self._log_stderr(response.stderr, status, params)

    async def _failed(self, send: Send, exc: FastCGIError, params: Mapping[str, str]) -> None:
        if isinstance(exc, NoBackendAvailable):
            status = 503
        elif isinstance(exc, (ConnectTimeout, ReadTimeout, WriteTimeout, TimeoutException)):
            status = 504
        else:
            status = 502
        logger.error(
            "%s %s: %s: %s",
            params["REQUEST_METHOD"],
            params["REQUEST_URI"],
            type(exc).__name__,
            exc,
        )
        await _plain(send, status, _REASONS[status])

    def _log_stderr(self, stderr: bytearray, status: int, params: Mapping[str, str]) -> None:
        if self.capture_stderr:
            level = logging.ERROR if status >= 400 else logging.WARNING
            text = bytes(stderr).decode("utf-8", "replace").rstrip()
            logger.log(
                level, "stderr of %s (status %d): %s", params["SCRIPT_FILENAME"], status, text
            )
        stderr.clear()


_REASONS = {502: "bad gateway", 503: "no backend available", 504: "gateway timeout"}


class _RequestBody:
    """The request body from ASGI messages; a disconnect ends the request.

    An iterator object, not a generator: one left unfinished (the script
    answered before reading it all) needs no finalizing.
    """

    def __init__(self, receive: Receive, state: _Exchange) -> None:
        self._receive = receive
        self._state = state

    def __aiter__(self) -> _RequestBody:
        return self

    async def __anext__(self) -> bytes:
        state = self._state
        while not state.body_done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                state.body_done = True
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            if not message.get("more_body", False):
                state.body_done = True
            if chunk:
                return chunk
        raise StopAsyncIteration


class _SpooledBody:
    """A chunked request body in a temporary file, read back in pieces."""

    def __init__(self, file: anyio.AsyncFile[bytes], size: int) -> None:
        self._file = file
        self.size = size

    @classmethod
    async def receive_all(cls, receive: Receive, limit: int) -> _SpooledBody | None:
        """The whole body, spooled; None when it is larger than `limit` bytes."""
        # Closed by aclose(), or below when the body cannot be had.
        file = anyio.wrap_file(tempfile.TemporaryFile())  # noqa: SIM115
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await file.aclose()
                    return None
                if chunk:
                    await file.write(chunk)
                if not message.get("more_body", False):
                    break
            await file.seek(0)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await file.aclose()
            raise
        return cls(file, size)

    def __aiter__(self) -> _SpooledBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._file.read(_STATIC_CHUNK)
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._file.aclose()


class _Exchange:
    """What the request's task and its disconnect watcher share."""

    __slots__ = ("answered", "body_done", "cancel", "head_sent")

    def __init__(self, cancel: anyio.CancelScope) -> None:
        self.body_done = False
        self.head_sent = False
        self.answered = False
        self.cancel = cancel

    async def watch(self, receive: Receive) -> None:
        """Wait for the client to go, and cancel the request then; call once the body is read.

        Leaving the FastCGI stream early closes its connection, which is how
        php-fpm learns to stop (it ignores FCGI_ABORT_REQUEST).
        """
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.answered:
                    self.cancel.cancel()
                return

    async def watch_later(self, receive: Receive) -> None:
        """`watch`, from _WATCH_AFTER seconds on and once the body is read (any event loop)."""
        await anyio.sleep(_WATCH_AFTER)
        while not self.body_done:
            await anyio.sleep(_WATCH_AFTER)
        await self.watch(receive)


#: A request still running this many seconds after it was sent gets a task
#: that watches for its client to leave. Quicker ones (nearly all) never
#: need one: a task per request costs more than routing it. A client that
#: leaves stops its script at most this much later than it could.
_WATCH_AFTER = 0.1

#: Watcher tasks that run (asyncio keeps only weak references to tasks).
_watchers: set[asyncio.Task[None]] = set()


class _LateWatcher:
    """On asyncio: a timer that starts the watcher task if the request outlives it.

    The receive() of an ASGI request is not for two readers at once, so the
    watcher waits for the body to be read: until then the timer is set again.
    """

    __slots__ = ("_loop", "_receive", "_state", "_task", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, state: _Exchange, receive: Receive) -> None:
        self._loop = loop
        self._state = state
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = loop.call_later(_WATCH_AFTER, self._start)

    def _start(self) -> None:
        if not self._state.body_done:
            self._timer = self._loop.call_later(_WATCH_AFTER, self._start)
            return
        self._timer = None
        self._task = task = self._loop.create_task(self._state.watch(self._receive))
        _watchers.add(task)
        task.add_done_callback(_watchers.discard)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()  # a plain asyncio task: cheap to cancel


async def _plain(
    send: Send, status: int, text: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = (text + "\n").encode() if text else b""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_file(scope: Scope, send: Send, filename: bytes) -> None:
    """A static file under the root, in chunks; GET and HEAD only."""
    method = scope["method"]
    if method not in ("GET", "HEAD"):
        await _plain(send, 405, "static files answer GET and HEAD", [(b"allow", b"GET, HEAD")])
        return
    try:
        file = await anyio.open_file(os.fsdecode(filename), "rb")
    except OSError:
        await _plain(send, 404, "not found")
        return
    async with file:
        info = os.fstat(file.wrapped.fileno())
        kind, encoding = mimetypes.guess_type(os.fsdecode(filename))
        headers = [
            (b"content-type", (kind or "application/octet-stream").encode()),
            (b"content-length", str(info.st_size).encode()),
            (b"last-modified", formatdate(info.st_mtime, usegmt=True).encode()),
        ]
        if encoding:
            headers.append((b"content-encoding", encoding.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        while chunk := await file.read(_STATIC_CHUNK):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None under another event loop (trio)."""
    try:
        if asyncio.current_task() is not None:
            return asyncio.get_running_loop()
    except RuntimeError:
        pass
    return None


def _host_name(host: bytes) -> str:
    """The name in a Host header, without its port; "" if it is not one."""
    text = host.decode("latin-1")
    if text.startswith("["):
        name = text.partition("]")[0] + "]"
    else:
        name = text.rpartition(":")[0] if ":" in text else text
    if _NOT_IN_HOST.search(name):
        return ""
    return name


_NOT_IN_HOST = re.compile("[\r\n\x00/ ]")


def _has_header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> bool:
    # A loop, not any() over a generator: a frame resumed per header.
    for name, _ in headers:  # noqa: SIM110
        if name == wanted:
            return True
    return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
