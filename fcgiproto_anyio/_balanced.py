"""Several applications behind one client: a balancer over one AsyncClient each.

Written once, async; fcgiproto_socket/_balanced.py, the blocking
BalancedClient, is generated from this file by scripts/generate_sync.py. The
choice of backend, the health bookkeeping and the retry rule live in the
I/O-free `fcgiproto.support.Balancer`; this module moves requests.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence
from types import TracebackType

from fcgiproto import (
    ConnectError,
    ConnectTimeout,
    FastCGIError,
    Overloaded,
    ParamsInput,
    PoolTimeout,
    ReadError,
    RemoteProtocolError,
    Role,
    TransportError,
    WriteError,
)
from fcgiproto.support import (
    DEFAULT_MAX_RESPONSE_SIZE,
    IDEMPOTENT_METHODS,
    Address,
    AddressInput,
    Balancer,
    Policy,
    Response,
    Timeout,
    TimeoutInput,
    may_retry,
)

from ._backend import AnyioBackend
from ._client import AsyncClient, AsyncStreamResponse
from ._interface import AsyncNetworkBackend, AsyncNetworkStream
from ._primitives import AsyncBackground, AsyncFlag, Body, BodyPieces, current_time, shield

__all__ = ["AsyncBalancedClient", "AsyncBalancedStream", "NoBackendAvailable"]

DEFAULT_TIMEOUT = Timeout()
#: Failures that blame the backend (passive health). A read timeout blames
#: the script, a pool timeout this process: neither takes a backend out.
_BACKEND_FAILURES = (ConnectError, ConnectTimeout, ReadError, WriteError, RemoteProtocolError)
#: Failures after which the application surely never saw the request.
_NOTHING_SENT = (ConnectError, ConnectTimeout, Overloaded, PoolTimeout)
_RETRIABLE = (*_BACKEND_FAILURES, Overloaded, PoolTimeout)
#: The bytes that arrived for the attempt running in this context (task or
#: thread): a stream() has a connection of its own, read by its caller, so
#: what its connection reads belongs to that attempt.
_received: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "fcgiproto_received", default=None
)


class NoBackendAvailable(TransportError):
    """Every backend is down (failed or unhealthy) or was tried already."""


class _CountingStream:
    """A transport stream that tells the running attempt that bytes arrived."""

    def __init__(self, stream: AsyncNetworkStream) -> None:
        self._stream = stream

    def _count(self, data: bytes | None) -> None:
        if data:
            counter = _received.get()
            if counter is not None:
                counter[0] += len(data)

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        data = await self._stream.read(max_bytes, timeout)
        self._count(data)
        return data

    async def write_some(self, data: memoryview, timeout: float | None) -> int:
        return await self._stream.write_some(data, timeout)

    async def write_or_read(
        self, data: memoryview, max_bytes: int, timeout: float | None
    ) -> tuple[int, bytes | None]:
        written, read = await self._stream.write_or_read(data, max_bytes, timeout)
        self._count(read)
        return written, read

    def looks_alive(self) -> bool:
        return self._stream.looks_alive()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _CountingBackend:
    def __init__(self, backend: AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect(self, address: Address, timeout: float | None) -> AsyncNetworkStream:
        return _CountingStream(await self._backend.connect(address, timeout))


class _TrackedBody:
    """A request body given as an iterable; remembers whether a piece was taken."""

    def __init__(self, pieces: BodyPieces) -> None:
        self.pieces = pieces
        self.taken = False

    def __aiter__(self) -> _TrackedBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.pieces.next()
        if chunk is None:
            raise StopAsyncIteration
        self.taken = True
        return chunk

    async def aclose(self) -> None:
        """Nothing: an attempt that ends must not close a body the next one may send.

        The balanced client closes the caller's iterable (`close_source`)
        once no attempt follows.
        """

    async def close_source(self) -> None:
        """Close the caller's generator, if it was one."""
        with shield():
            await self.pieces.aclose()


class AsyncBalancedClient:
    """One client over several FastCGI applications (php-fpm pools, hosts).

    :param addresses: the backends, as AsyncClient takes them.
    :param policy: round_robin, least_conn, first, random, or hash (of the
        ``key`` each call gives).
    :param max_connections: the connection cap per backend (php-fpm pins a
        worker per connection: keep it at most pm.max_children).
    :param max_fails: passive health: a backend that failed max_fails times
        within fail_timeout seconds is skipped until then.
    :param fail_timeout: the window of max_fails, in seconds.
    :param health_path: active health: when set, each backend is asked for
        this path (php-fpm's ping.path) every health_interval seconds; it is
        up while it answers 2xx within health_timeout (and, with
        health_expect, a body containing it).
    :param max_tries: attempts per request (None: one per backend).

    Retries never repeat work: a request that never left (no connection
    could be opened, the backend's pool had none free within the pool
    timeout, or it answered OVERLOADED) is retried on the next backend,
    always; any other failure only for an
    idempotent method (or ``idempotent=True``), only when no byte of the
    body was taken from an iterable and no byte of the answer arrived. A read
    timeout is never retried: the script may still be running.
    """

    def __init__(
        self,
        addresses: Sequence[AddressInput],
        *,
        policy: Policy | str = Policy.ROUND_ROBIN,
        max_connections: int = 10,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        health_path: str | None = None,
        health_expect: str | None = None,
        health_interval: float = 10.0,
        health_timeout: float = 5.0,
        max_tries: int | None = None,
        timeout: TimeoutInput = DEFAULT_TIMEOUT,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        multiplex: bool | None = False,
        backend: AsyncNetworkBackend | None = None,
        health_params: Mapping[str, str] | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("AsyncBalancedClient needs at least one address")
        transport = _CountingBackend(AnyioBackend() if backend is None else backend)
        self.clients = [
            AsyncClient(
                address,
                max_connections=max_connections,
                timeout=timeout,
                max_response_size=max_response_size,
                multiplex=multiplex,
                backend=transport,
            )
            for address in addresses
        ]
        self.balancer = Balancer(
            [str(client.address) for client in self.clients],
            policy,
            max_fails=max_fails,
            fail_timeout=fail_timeout,
            max_active=max_connections,
        )
        self.max_tries = len(self.clients) if max_tries is None else max_tries
        self.health_path = health_path
        self.health_expect = health_expect
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.health_params = dict(health_params or {})
        self._background = AsyncBackground()
        self._stop = AsyncFlag()

    async def __aenter__(self) -> AsyncBalancedClient:
        await self._background.__aenter__()
        for client in self.clients:
            await client.__aenter__()
        if self.health_path is not None:
            self._background.start(self._health_loop, name="fcgiproto health checks")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        # Each client holds a task group: leave them in the reverse order, and
        # in no other cancel scope (a shield here would be current instead).
        for client in reversed(self.clients):
            await client.__aexit__(exc_type, exc, tb)
        await self._background.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Stop the health checks and close every backend's connections."""
        await self.__aexit__(None, None, None)

    # --- requests ---

    async def request(
        self,
        params: ParamsInput,
        stdin: Body = b"",
        *,
        idempotent: bool | None = None,
        key: bytes | None = None,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
        max_response_size: int | None = None,
    ) -> Response:
        """Send a request to a backend and read its whole response, retrying as the rules allow."""
        body: Body = stdin
        tracked: _TrackedBody | None = None
        if not isinstance(stdin, (bytes, bytearray, memoryview)):
            tracked = _TrackedBody(BodyPieces(stdin))
            body = tracked
        safe = _idempotent(params) if idempotent is None else idempotent
        tried: list[int] = []
        try:
            while True:
                index = self._choose(tried, key)
                counter = [0]
                token = _received.set(counter)
                self.balancer.started(index)
                try:
                    return await self.clients[index].request(
                        params,
                        body,
                        role=role,
                        timeout=timeout,
                        max_response_size=max_response_size,
                    )
                except FastCGIError as exc:
                    started = self._answer_started(index, counter)
                    if not self._retry_after(exc, index, tried, safe, tracked, started):
                        raise
                finally:
                    self.balancer.finished(index)
                    _received.reset(token)
        finally:
            if tracked is not None:
                await tracked.close_source()

    def stream(
        self,
        params: ParamsInput,
        stdin: Body = b"",
        *,
        idempotent: bool | None = None,
        key: bytes | None = None,
        role: Role = Role.RESPONDER,
        timeout: TimeoutInput | None = None,
        max_response_size: int | None = None,
    ) -> AsyncBalancedStream:
        """A streamed request (see AsyncClient.stream), retried until a backend's head arrives."""
        return AsyncBalancedStream(
            self, params, stdin, idempotent, key, role, timeout, max_response_size
        )

    def _choose(self, tried: list[int], key: bytes | None) -> int:
        if len(tried) >= self.max_tries:
            raise NoBackendAvailable(f"no backend answered after {len(tried)} attempts")
        index = self.balancer.choose(current_time(), exclude=tried, key=key)
        if index is None:
            names = ", ".join(b.name for b in self.balancer.backends)
            if tried:
                raise NoBackendAvailable(f"every backend that is up was tried ({names})")
            raise NoBackendAvailable(f"every backend is down ({names})")
        tried.append(index)
        return index

    def _answer_started(self, index: int, counter: list[int]) -> bool:
        """Whether bytes of the answer arrived for the attempt that `counter` counted.

        On a multiplexed connection a reader task reads for everyone, out of
        the attempt's sight: assume they did.
        """
        return counter[0] > 0 or bool(self.clients[index].multiplex)

    def _failed(self, index: int, exc: BaseException) -> None:
        if isinstance(exc, _BACKEND_FAILURES):
            self.balancer.failed(index, current_time())

    def _retry_after(
        self,
        exc: FastCGIError,
        index: int,
        tried: list[int],
        idempotent: bool,
        tracked: _TrackedBody | None,
        answer_started: bool,
    ) -> bool:
        """Count an attempt's failure against its backend; whether another backend may be tried."""
        self._failed(index, exc)
        if not isinstance(exc, _RETRIABLE) or len(tried) >= self.max_tries:
            return False
        return may_retry(
            # An application that answers OVERLOADED did not run the
            # request, nor one whose pool had no connection to give.
            connect_failed=isinstance(exc, _NOTHING_SENT),
            idempotent=idempotent,
            body_sent=tracked is not None and tracked.taken,
            answer_started=answer_started,
        )

    # --- active health ---

    async def check_health(self) -> list[bool]:
        """Ask every backend for health_path once; record and return the verdicts."""
        if self.health_path is None:
            raise ValueError("check_health needs health_path")
        verdicts = []
        for index, client in enumerate(self.clients):
            healthy = await self._check_one(client)
            self.balancer.checked(index, healthy)
            verdicts.append(healthy)
        return verdicts

    async def _check_one(self, client: AsyncClient) -> bool:
        path = self.health_path or "/"
        params = {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": path,
            "SCRIPT_FILENAME": path,
            "REQUEST_URI": path,
            "QUERY_STRING": "",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            **self.health_params,
        }
        try:
            response = await client.request(params, timeout=self.health_timeout)
            if not 200 <= response.status < 300:
                return False
            return self.health_expect is None or self.health_expect.encode() in response.body
        except FastCGIError:
            return False

    async def _health_loop(self) -> None:
        while not self._stop.is_set():
            await self.check_health()
            if await self._stop.wait(self.health_interval):
                return


class AsyncBalancedStream:
    """A context manager: the response of the backend that answered, head read."""

    def __init__(
        self,
        balanced: AsyncBalancedClient,
        params: ParamsInput,
        stdin: Body,
        idempotent: bool | None,
        key: bytes | None,
        role: Role,
        timeout: TimeoutInput | None,
        max_response_size: int | None,
    ) -> None:
        self._balanced = balanced
        self._params = params
        self._body: Body = stdin
        self._tracked: _TrackedBody | None = None
        if not isinstance(stdin, (bytes, bytearray, memoryview)):
            self._tracked = _TrackedBody(BodyPieces(stdin))
            self._body = self._tracked
        self._idempotent = _idempotent(params) if idempotent is None else idempotent
        self._key = key
        self._role = role
        self._timeout = timeout
        self._max_size = max_response_size
        self._response: AsyncStreamResponse | None = None
        self._index: int | None = None
        #: The backend that answered, once one did.
        self.address: Address | None = None

    async def __aenter__(self) -> AsyncStreamResponse:
        try:
            return await self._start()
        except BaseException:
            if self._tracked is not None:
                await self._tracked.close_source()
            raise

    async def _start(self) -> AsyncStreamResponse:
        balanced = self._balanced
        tried: list[int] = []
        while True:
            index = balanced._choose(tried, self._key)
            counter = [0]
            token = _received.set(counter)
            balanced.balancer.started(index)
            response = balanced.clients[index].stream(
                self._params,
                self._body,
                role=self._role,
                timeout=self._timeout,
                max_response_size=self._max_size,
            )
            try:
                await response.__aenter__()
            except FastCGIError as exc:
                balanced.balancer.finished(index)
                # A stream has a connection of its own, read by this task.
                started = counter[0] > 0
                if not balanced._retry_after(
                    exc, index, tried, self._idempotent, self._tracked, started
                ):
                    raise
                continue
            except BaseException:
                balanced.balancer.finished(index)
                raise
            finally:
                _received.reset(token)
            self._response, self._index = response, index
            self.address = balanced.clients[index].address
            return response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response, self._response = self._response, None
        index, self._index = self._index, None
        if response is None or index is None:
            return
        try:
            await response.__aexit__(exc_type, exc, tb)
        finally:
            self._balanced.balancer.finished(index)
            if isinstance(exc, _BACKEND_FAILURES):
                self._balanced._failed(index, exc)
            if self._tracked is not None:
                await self._tracked.close_source()


def _idempotent(params: ParamsInput) -> bool:
    """Whether the request's REQUEST_METHOD is idempotent (False when it is not given)."""
    method: str | bytes | None = None
    items = params.items() if isinstance(params, Mapping) else params
    for name, value in items:
        if name in ("REQUEST_METHOD", b"REQUEST_METHOD"):
            method = value
            break
    if isinstance(method, bytes):
        method = method.decode("latin-1")
    return method is not None and method.upper() in IDEMPOTENT_METHODS
