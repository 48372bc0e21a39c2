"""What both servers share that needs no I/O: a request's state and the face apps see.

Private: the adapters build their own Request on RequestBase, each with its
own way of writing to STDERR.
"""

from __future__ import annotations

from fcgiproto import Event, FilterData, FilterDataEnd, Params, Role, StdinData, StdinEnd

__all__ = [
    "ALL_ROLES",
    "ERROR_STATUS",
    "INTERNAL_ERROR",
    "OUTPUT_TYPES",
    "RequestBase",
    "RequestState",
    "check_output",
    "log_bytes",
]

ALL_ROLES = (Role.RESPONDER, Role.AUTHORIZER, Role.FILTER)
#: The app_status of a request whose app raised, or that was aborted.
ERROR_STATUS = 1
INTERNAL_ERROR = (
    b"Status: 500 Internal Server Error\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Internal Server Error\n"
)
OUTPUT_TYPES = (bytes, bytearray, memoryview)


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def check_output(chunk: object) -> bool:
    """Whether a chunk of an app's output has bytes to send; TypeError if it is not bytes."""
    if not isinstance(chunk, OUTPUT_TYPES):
        raise TypeError(f"the app yielded {type(chunk).__name__}, not bytes")
    return bool(chunk)


def log_bytes(message: str | bytes) -> bytes:
    """What Request.log writes for a message: str as UTF-8, any bytes as they are."""
    if not isinstance(message, str):
        return bytes(message)
    try:
        return message.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return message.encode("utf-8", "backslashreplace")


class RequestState:
    """What has arrived of one request, and whether it is over."""

    __slots__ = (
        "aborted",
        "data",
        "data_done",
        "ended",
        "keep_conn",
        "params",
        "request_id",
        "role",
        "stdin",
        "stdin_done",
    )

    def __init__(self, request_id: int, role: Role, keep_conn: bool) -> None:
        self.request_id = request_id
        self.role = role
        self.keep_conn = keep_conn
        self.params: dict[str, str] | None = None
        self.stdin: list[bytes] = []
        self.data: list[bytes] = []
        self.stdin_done = False
        self.data_done = role is not Role.FILTER
        self.ended = False
        self.aborted = False

    @property
    def whole(self) -> bool:
        """Params, stdin and (for a filter) data have all arrived."""
        return self.params is not None and self.stdin_done and self.data_done

    def gather(self, event: Event) -> bool:
        """Take one input event of this request; whether the request is now whole."""
        if isinstance(event, Params):
            self.params = {_decode(k): _decode(v) for k, v in event.params.items()}
        elif isinstance(event, StdinData):
            self.stdin.append(event.data)
        elif isinstance(event, StdinEnd):
            self.stdin_done = True
        elif isinstance(event, FilterData):
            self.data.append(event.data)
        elif isinstance(event, FilterDataEnd):
            self.data_done = True
        return self.whole

    def take_input(self) -> tuple[dict[str, str], bytes, bytes]:
        """Params, stdin and data, handed over once the request is whole."""
        assert self.params is not None
        stdin, data = b"".join(self.stdin), b"".join(self.data)
        self.stdin = self.data = []
        return self.params, stdin, data


class RequestBase:
    """One whole request as an app sees it: what the web server sent.

    ``params`` names and values are decoded as UTF-8 with surrogateescape:
    ``value.encode("utf-8", "surrogateescape")`` gives back the bytes sent.
    """

    __slots__ = ("_app_status", "_connection_id", "_data", "_params", "_state", "_stdin")

    def __init__(self, state: RequestState, connection_id: int) -> None:
        self._state = state
        self._connection_id = connection_id
        self._params, self._stdin, self._data = state.take_input()
        self._app_status = 0

    @property
    def request_id(self) -> int:
        return self._state.request_id

    @property
    def role(self) -> Role:
        return self._state.role

    @property
    def keep_conn(self) -> bool:
        """Whether the web server keeps the connection open after this request."""
        return self._state.keep_conn

    @property
    def params(self) -> dict[str, str]:
        return self._params

    @property
    def stdin(self) -> bytes:
        """The request body."""
        return self._stdin

    @property
    def data(self) -> bytes:
        """The FCGI_DATA stream (the file to filter, in the filter role); b"" otherwise."""
        return self._data

    @property
    def connection_id(self) -> int:
        """Which connection the request came on: 1 for the server's first, then 2, ..."""
        return self._connection_id

    @property
    def aborted(self) -> bool:
        """True once the web server aborted the request or the connection was lost."""
        return self._state.aborted

    @property
    def app_status(self) -> int:
        """The status END_REQUEST carries, 0 unless set (1 when the app raises)."""
        return self._app_status

    @app_status.setter
    def app_status(self, value: int) -> None:
        if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"app_status must be an int from 0 to 2**32 - 1, not {value!r}")
        self._app_status = value

    def __repr__(self) -> str:
        method = self._params.get("REQUEST_METHOD", "")
        uri = self._params.get("REQUEST_URI") or self._params.get("SCRIPT_NAME", "")
        what = " ".join(part for part in (self.role.name, method, uri) if part)
        return f"<Request {self.request_id} on connection {self.connection_id}: {what}>"
