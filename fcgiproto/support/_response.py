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
    ResponseTooLarge,
    StderrData,
    StdoutData,
    UnknownRole,
)
from fcgiproto.cgi import ResponseHead, ResponseParser, authorizer_variables

from ._address import Address

__all__ = [
    "DEFAULT_MAX_RESPONSE_SIZE",
    "Response",
    "ResponseState",
    "WholeAnswer",
    "raise_for_protocol_status",
    "receive_from",
    "recipient",
    "response_too_large",
]

#: How much stdout, and separately how much stderr, a client holds of one
#: answer. request() holds a whole answer in memory: 64 MiB is far above any
#: page or API answer, and low enough that a few runaway answers at once do
#: not exhaust a process; larger answers are for stream(), which holds only
#: what waits unread, or for a raised limit. 0 turns the limit off.
DEFAULT_MAX_RESPONSE_SIZE = 64 << 20


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
        """The HTTP status: `Status:`, else 302 for a `Location` alone, else 200."""
        return self._head_and_body[0].status

    @property
    def reason(self) -> str:
        """The reason phrase of `Status:`, or the standard one for the status."""
        return self._head_and_body[0].reason

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The CGI response headers, in order, `Status:` taken out."""
        return self._head_and_body[0].headers

    @property
    def body(self) -> bytes:
        """Stdout after the CGI head."""
        return self._head_and_body[1]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header of that name, compared without case."""
        return first_header(self.headers, name, default)

    @property
    def variables(self) -> dict[str, str]:
        """For the authorizer role: the Variable-* headers, prefix stripped."""
        return authorizer_variables(self.headers)


def response_too_large(
    stream: str, limit: int, address: Address, request_id: int, *, unread: bool = False
) -> ResponseTooLarge:
    """The error for a stream of an answer past max_response_size: which, whose, what limit.

    `unread`: the bytes waiting for a stream()'s reader, rather than a whole answer.
    """
    if unread:
        return ResponseTooLarge(
            f"{address}: request {request_id} has more than {limit} bytes of {stream} "
            f"waiting to be read (max_response_size); read it as it comes, or raise the limit"
        )
    return ResponseTooLarge(
        f"{address}: request {request_id} sent more than {limit} bytes of {stream} "
        f"(max_response_size)"
    )


class WholeAnswer:
    """A request's answer gathered whole, as request() returns it, each stream bounded.

    `max_size` bounds stdout and stderr, each; 0 means no bound. The chunk
    that would take a stream past it raises ResponseTooLarge as it arrives,
    before it is kept: what is held never exceeds the limit, whatever the
    application sends. Both clients gather whole answers here and only here.
    """

    __slots__ = ("_stderr", "_stderr_size", "_stdout", "_stdout_size", "address", "max_size")

    def __init__(self, max_size: int, address: Address) -> None:
        self.max_size = max_size
        self.address = address
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []
        self._stdout_size = self._stderr_size = 0

    @property
    def got_output(self) -> bool:
        """Whether any byte of stdout or stderr arrived."""
        return bool(self._stdout_size or self._stderr_size)

    def take(self, events: list[Event], request_id: int = 1) -> EndRequest | None:
        """Keep the stdout and stderr in `events`; the request's END_REQUEST once it comes.

        Every data event is taken as the request's: on a connection of its
        own, or from its inbox on a shared one.
        """
        end = None
        limit = self.max_size
        for event in events:
            if type(event) is StdoutData:
                size = self._stdout_size + len(event.data)
                if limit and size > limit:
                    raise response_too_large("stdout", limit, self.address, request_id)
                self._stdout.append(event.data)
                self._stdout_size = size
            elif type(event) is StderrData:
                size = self._stderr_size + len(event.data)
                if limit and size > limit:
                    raise response_too_large("stderr", limit, self.address, request_id)
                self._stderr.append(event.data)
                self._stderr_size = size
            elif isinstance(event, EndRequest) and event.request_id == request_id:
                end = event
        return end

    def response(self, end: EndRequest) -> Response:
        """The Response of the finished request, or the RequestError its END_REQUEST means."""
        if end.protocol_status is not ProtocolStatus.REQUEST_COMPLETE:
            raise_for_protocol_status(end, self.address)
        # Response's fields set straight into its __dict__: what its frozen
        # dataclass __init__ does, without four object.__setattr__ calls, once
        # per request.
        response = object.__new__(Response)
        response.__dict__.update(
            stdout=b"".join(self._stdout),
            stderr=b"".join(self._stderr),
            app_status=end.app_status,
            protocol_status=end.protocol_status,
        )
        return response


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

    Raw stdout waits in a queue until read; stderr waits in `stderr` until
    read with the stderr iterator, which takes it out; the CGI head is parsed
    from stdout when asked for, and the body parts that came with it wait for
    the body's reader. Adapters read from the transport only when their
    caller asks for more, so a caller reading one stream holds back the
    application (the transport's flow control); what piles up meanwhile on
    the other stream is bounded by `max_size` (0: no bound), past which
    ResponseTooLarge is raised.

    With `whole`, nothing waits to be read: stdout and stderr go to a
    WholeAnswer (`_answer`), which bounds each in total, for request().
    """

    def __init__(self, address: Address, max_size: int, *, whole: bool = False) -> None:
        self._address = address
        self._max_size = max_size
        self._answer = WholeAnswer(max_size, address) if whole else None
        self._stdout: deque[bytes] = deque()
        self._stdout_size = 0  # bytes waiting in _stdout
        self._end: EndRequest | None = None
        self._head: ResponseHead | None = None
        self._parser: ResponseParser | None = None
        self._body: deque[bytes] = deque()
        #: The stderr that arrived and was not taken by the stderr iterator.
        self.stderr = bytearray()
        self.app_status: int | None = None
        self.protocol_status: ProtocolStatus | None = None

    @property
    def head(self) -> ResponseHead:
        """The parsed CGI head; LocalProtocolError until it has been read."""
        if self._head is None:
            raise LocalProtocolError("the head of the response has not been read")
        return self._head

    @property
    def status(self) -> int:
        """The HTTP status: `Status:`, else 302 for a `Location` alone, else 200."""
        return self.head.status

    @property
    def reason(self) -> str:
        """The reason phrase of `Status:`, or the standard one for the status."""
        return self.head.reason

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The CGI response headers, in order, `Status:` taken out."""
        return self.head.headers

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header of that name, compared without case."""
        return first_header(self.head.headers, name, default)

    @property
    def _got_output(self) -> bool:
        if self._answer is not None and self._answer.got_output:
            return True
        return bool(self._stdout or self.stderr or self._end)

    def _take(self, events: list[Event], request_id: int) -> None:
        if self._answer is not None:
            end = self._answer.take(events, request_id)
            if end is not None:
                self._ended(end)
            return
        limit = self._max_size
        for event in events:
            if type(event) is StdoutData:
                size = self._stdout_size + len(event.data)
                if limit and size > limit:
                    raise response_too_large(
                        "stdout", limit, self._address, request_id, unread=True
                    )
                self._stdout.append(event.data)
                self._stdout_size = size
            elif type(event) is StderrData:
                if limit and len(self.stderr) + len(event.data) > limit:
                    raise response_too_large(
                        "stderr", limit, self._address, request_id, unread=True
                    )
                self.stderr += event.data
            elif isinstance(event, EndRequest) and event.request_id == request_id:
                self._ended(event)

    def _ended(self, end: EndRequest) -> None:
        self._end = end
        self.app_status = end.app_status
        self.protocol_status = end.protocol_status
        raise_for_protocol_status(end, self._address)

    def _pop_stdout(self) -> bytes:
        """The oldest stdout chunk waiting to be read (there must be one)."""
        chunk = self._stdout.popleft()
        self._stdout_size -= len(chunk)
        return chunk

    def _pop_stderr(self) -> bytes:
        """All the stderr waiting to be read, taken out."""
        chunk = bytes(self.stderr)
        del self.stderr[:]
        return chunk

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
