"""What both adapters share that needs no I/O: addresses, timeouts, responses.

Private: the adapters re-export the public names (Timeout, Response).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TypeAlias, TypeVar

from ._client import ClientConnection
from ._errors import (
    CantMultiplex,
    LocalProtocolError,
    Overloaded,
    ReadError,
    RemoteProtocolError,
    RequestError,
    UnknownRole,
)
from ._events import EndRequest, Event, GetValuesResult, StderrData, StdoutData
from ._records import ProtocolStatus
from .cgi import ResponseHead, ResponseParser, authorizer_variables

__all__ = [
    "Address",
    "AddressInput",
    "Deadline",
    "Response",
    "ResponseState",
    "Timeout",
    "TimeoutInput",
    "gather_answer",
    "parse_address",
    "probe_wait",
    "raise_for_protocol_status",
    "receive_from",
    "recipient",
    "whole_answer",
]

AddressInput: TypeAlias = "str | os.PathLike[str] | tuple[str, int]"


@dataclass(frozen=True)
class Address:
    """Where an application listens: a Unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(address: AddressInput | Address, *, listening: bool = False) -> Address:
    """Read "host:port", "[::1]:9000", "unix:/path.sock", "/path.sock" or (host, port).

    Port 0 (any free port) is only an address to listen on.
    """
    if isinstance(address, Address):
        return address
    if isinstance(address, tuple):
        return Address(host=address[0], port=_port(address[1], address, listening))
    text = os.fspath(address)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"no socket path in address {text!r}")
        return Address(path=path)
    if text.startswith("/") or text.startswith("./"):
        return Address(path=text)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"address {text!r} is not [host]:port")
        return Address(host=host, port=_port(rest[1:], text, listening))
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ValueError(
            f"address {text!r} is not host:port, [host]:port, unix:/path or an absolute path"
        )
    return Address(host=host, port=_port(port_text, text, listening))


def _port(port: str | int, address: object, listening: bool) -> int:
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"bad port in address {address!r}") from None
    if not (0 if listening else 1) <= number < 65536:
        raise ValueError(f"port {number} out of range in address {address!r}")
    return number


TimeoutInput: TypeAlias = "Timeout | float | None"


@dataclass(frozen=True)
class Timeout:
    """Limits in seconds; None means no limit.

    connect: to open a connection. read: between two reads of the response.
    write: for the peer to take more of the request. pool: waiting for a free
    connection. total: the request's whole life, from asking the pool to the
    last byte, so a peer trickling one byte a second still times out.
    """

    connect: float | None = 5.0
    read: float | None = 30.0
    write: float | None = 30.0
    pool: float | None = 10.0
    total: float | None = None

    @classmethod
    def of(cls, value: TimeoutInput) -> Timeout:
        """A Timeout as given; a plain number sets every limit, total included."""
        if isinstance(value, Timeout):
            return value
        if value is None:
            return cls(None, None, None, None, None)
        if isinstance(value, (int, float)) and value > 0:
            number = float(value)
            return cls(number, number, number, number, number)
        raise ValueError(f"timeout must be a Timeout, a positive number or None, not {value!r}")


@dataclass(frozen=True)
class Response:
    """A finished request: the raw streams, and the CGI response parsed from stdout."""

    stdout: bytes
    stderr: bytes
    app_status: int
    protocol_status: ProtocolStatus

    @cached_property
    def _head_and_body(self) -> tuple[ResponseHead, bytes]:
        parser = ResponseParser()
        parts = parser.feed(self.stdout) + parser.close()
        head = parts[0]
        assert isinstance(head, ResponseHead)
        return head, b"".join(part for part in parts[1:] if isinstance(part, bytes))

    @property
    def status(self) -> int:
        return self._head_and_body[0].status

    @property
    def reason(self) -> str:
        return self._head_and_body[0].reason

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._head_and_body[0].headers

    @property
    def body(self) -> bytes:
        return self._head_and_body[1]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header of that name, compared without case."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    @property
    def variables(self) -> dict[str, str]:
        """For the authorizer role: the Variable-* headers, prefix stripped."""
        return authorizer_variables(self.headers)


class Deadline:
    """The `total` limit of one request, on the adapter's clock."""

    __slots__ = ("at", "clock", "total")

    def __init__(self, total: float | None, clock: Callable[[], float]) -> None:
        self.total = total
        self.clock = clock
        self.at = None if total is None else clock() + total

    def limit(self, step: float | None) -> tuple[float | None, bool]:
        """The wait allowed for a step with its own limit; True when the total is the tighter."""
        if self.at is None:
            return step, False
        left = max(0.0, self.at - self.clock())
        if step is None or left < step:
            return left, True
        return step, False


#: How long the first request waits for the answer to "do you multiplex?".
PROBE_WAIT = 2.0


def probe_wait(limits: Timeout, deadline: Deadline) -> float:
    """How long to wait for the answer to "do you multiplex?" before the first request.

    An application that ignores GET_VALUES must not hold up the request: after
    this it is taken not to multiplex. At most half of what is left of the
    request's deadline, so the request itself still has time.
    """
    wait = PROBE_WAIT if limits.read is None else min(limits.read, PROBE_WAIT)
    left, _ = deadline.limit(None)
    return wait if left is None else min(wait, left / 2)


def gather_answer(
    events: list[Event], stdout: list[bytes], stderr: list[bytes]
) -> EndRequest | None:
    """Add a request's output to `stdout` and `stderr`; its END_REQUEST once it comes.

    For connections that carry one request: every event is that request's.
    """
    end = None
    for event in events:
        if isinstance(event, StdoutData):
            stdout.append(event.data)
        elif isinstance(event, StderrData):
            stderr.append(event.data)
        elif isinstance(event, EndRequest):
            end = event
    return end


def whole_answer(
    stdout: list[bytes], stderr: list[bytes], end: EndRequest, address: Address
) -> Response:
    """The Response of a finished request, or the RequestError its END_REQUEST means."""
    raise_for_protocol_status(end, address)
    return Response(b"".join(stdout), b"".join(stderr), end.app_status, end.protocol_status)


Waiter = TypeVar("Waiter")


def recipient(
    event: Event, inboxes: Mapping[int, Waiter], values_waiters: deque[Waiter]
) -> Waiter | None:
    """Whose event it is on a multiplexed connection; None for nobody's.

    GET_VALUES answers come in the order of the questions, so each goes to the
    oldest waiter, even one that gave up, and none gets another's answer.
    """
    if isinstance(event, GetValuesResult):
        return values_waiters.popleft() if values_waiters else None
    return inboxes.get(getattr(event, "request_id", -1))


def receive_from(proto: ClientConnection, data: bytes, address: Address) -> list[Event]:
    """Feed what a read gave (b"": the application closed); errors name the address.

    A close in the middle of a record or of a request is a ReadError, as for
    the transport; invalid bytes are a RemoteProtocolError.
    """
    try:
        events = proto.receive_data(data)
    except RemoteProtocolError as exc:
        if not data:
            raise ReadError(f"{address}: {exc}") from exc
        raise RemoteProtocolError(f"{address}: {exc}") from exc
    if not data and not events:
        raise ReadError(f"{address} closed the connection")
    return events


_STATUS_ERRORS: dict[ProtocolStatus, type[RequestError]] = {
    ProtocolStatus.CANT_MPX_CONN: CantMultiplex,
    ProtocolStatus.OVERLOADED: Overloaded,
    ProtocolStatus.UNKNOWN_ROLE: UnknownRole,
}


def raise_for_protocol_status(end: EndRequest, address: Address) -> None:
    """Raise the RequestError an abnormal END_REQUEST stands for."""
    error = _STATUS_ERRORS.get(end.protocol_status)
    if error is not None:
        raise error(f"{address} ended request {end.request_id} with {end.protocol_status.name}")


class ResponseState:
    """The answer to a request in progress, as both adapters keep it: events in, no I/O.

    Raw stdout waits in a queue until read; stderr gathers whole; the CGI head
    is parsed from stdout when asked for, and the body parts that came with it
    wait for the body's reader.
    """

    def __init__(self) -> None:
        self._stdout: deque[bytes] = deque()
        self._end: EndRequest | None = None
        self._head: ResponseHead | None = None
        self._parser: ResponseParser | None = None
        self._body: deque[bytes] = deque()
        self.stderr = bytearray()
        self.app_status: int | None = None
        self.protocol_status: ProtocolStatus | None = None

    @property
    def head(self) -> ResponseHead:
        if self._head is None:
            raise LocalProtocolError("the head of the response has not been read")
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

    @property
    def _got_output(self) -> bool:
        return bool(self._stdout or self.stderr or self._end)

    def _take(self, events: list[Event], request_id: int, address: Address) -> None:
        for event in events:
            if type(event) is StdoutData:
                self._stdout.append(event.data)
            elif type(event) is StderrData:
                self.stderr += event.data
            elif isinstance(event, EndRequest) and event.request_id == request_id:
                self._end = event
                self.app_status = event.app_status
                self.protocol_status = event.protocol_status
                raise_for_protocol_status(event, address)

    def _feed_head(self, chunk: bytes | None) -> None:
        """Parse more of the head from stdout (None: stdout ended)."""
        if self._parser is None:
            self._parser = ResponseParser()
        parts = self._parser.close() if chunk is None else self._parser.feed(chunk)
        for part in parts:
            if isinstance(part, ResponseHead):
                self._head = part
            elif part:
                self._body.append(part)

    def _body_of(self, chunk: bytes) -> list[bytes]:
        """The body in a stdout chunk that came after the head."""
        assert self._parser is not None
        return [part for part in self._parser.feed(chunk) if isinstance(part, bytes)]
