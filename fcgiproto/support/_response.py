"""Answers as clients gather them: whole responses and responses in progress."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

from fcgiproto import (
    CantMultiplex,
    ClientConnection,
    EndRequest,
    Event,
    GetValuesResult,
    LocalProtocolError,
    Overloaded,
    ProtocolStatus,
    ReadError,
    RemoteProtocolError,
    RequestError,
    StderrData,
    StdoutData,
    UnknownRole,
)
from fcgiproto.cgi import ResponseHead, ResponseParser, authorizer_variables

from ._address import Address

__all__ = [
    "Response",
    "ResponseState",
    "gather_answer",
    "raise_for_protocol_status",
    "receive_from",
    "recipient",
    "whole_answer",
]


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
        return first_header(self.headers, name, default)

    @property
    def variables(self) -> dict[str, str]:
        """For the authorizer role: the Variable-* headers, prefix stripped."""
        return authorizer_variables(self.headers)


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


def first_header(
    headers: list[tuple[str, str]], name: str, default: str | None = None
) -> str | None:
    """The first header of that name, compared without case."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return default


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

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header of that name, compared without case."""
        return first_header(self.head.headers, name, default)

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
