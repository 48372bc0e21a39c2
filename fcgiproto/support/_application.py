"""What both servers share that needs no I/O: options, a request's state, the face apps see.

The blocking server and the anyio one take the same options with the same
defaults, check them here, answer GET_VALUES from them alike, count requests
against the same application-wide limit, and turn an app's result (or its
failure) into output the same way; each keeps only its I/O loop. They build
their own Request on RequestBase, each with its own way of writing to STDERR.
"""

from __future__ import annotations

import ipaddress
import traceback
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from fcgiproto import (
    DEFAULT_MAX_PARAMS_PAIRS,
    DEFAULT_MAX_PARAMS_SIZE,
    BeginRequest,
    Event,
    FilterData,
    FilterDataEnd,
    Params,
    ProtocolStatus,
    Role,
    ServerConnection,
    StdinData,
    StdinEnd,
)

from ._address import Address, AddressInput, parse_address

__all__ = [
    "ALL_ROLES",
    "BODY_TOO_LARGE",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_MAX_UNSENT_SIZE",
    "DEFAULT_MULTIPLEX",
    "DEFAULT_PARAMS_TIMEOUT",
    "DEFAULT_SEND_TIMEOUT",
    "DROPPED_TOO_MUCH",
    "ERROR_STATUS",
    "INTERNAL_ERROR",
    "OUTPUT_PIECE",
    "OUTPUT_TYPES",
    "RequestBase",
    "RequestSlots",
    "RequestState",
    "ServerOptions",
    "check_output",
    "close_output",
    "dropped_too_much",
    "failure_report",
    "listen_address",
    "log_bytes",
    "output_chunks",
    "web_server_addrs",
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
#: What a request whose body is over `max_body_size` is answered with.
BODY_TOO_LARGE = (
    b"Status: 413 Content Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Content Too Large\n"
)
OUTPUT_TYPES = (bytes, bytearray, memoryview)
#: A server encodes an app's output in pieces this big at most. A bigger
#: buffer is one malloc maps apart and unmaps on free: its pages are faulted
#: in afresh for every piece (about 380 page faults a 1 MiB response, twice
#: the CPU, once the heap's top is too small to take it).
OUTPUT_PIECE = 64 * 1024


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
        "begun_at",
        "data",
        "data_done",
        "decode_params",
        "ended",
        "input_left",
        "keep_conn",
        "params",
        "raw_params",
        "request_id",
        "role",
        "stdin",
        "stdin_done",
    )

    def __init__(self, begin: BeginRequest, options: ServerOptions, now: float) -> None:
        self.request_id = begin.request_id
        self.role = begin.role
        self.keep_conn = begin.keep_conn
        #: When BEGIN_REQUEST arrived (`now`, on the server's clock): PARAMS are due by then.
        self.begun_at = now
        #: The PARAMS as they came (None until they have), and decoded: at
        #: once unless `options.decode_params` is off, else by text_params().
        self.raw_params: Mapping[bytes, bytes] | None = None
        self.params: dict[str, str] | None = None
        self.decode_params = options.decode_params
        self.stdin: list[bytes] = []
        self.data: list[bytes] = []
        #: Bytes of stdin and data that may still be held; below 0, too many came.
        self.input_left = options.max_body_size
        self.stdin_done = False
        self.data_done = begin.role is not Role.FILTER
        self.ended = False
        self.aborted = False

    @property
    def too_large(self) -> bool:
        """More stdin and data came than `max_body_size` lets a request hold."""
        return self.input_left < 0

    @property
    def whole(self) -> bool:
        """Params, stdin and (for a filter) data have all arrived."""
        return self.raw_params is not None and self.stdin_done and self.data_done

    def gather(self, event: Event) -> bool:
        """Take one input event of this request; whether the request is now whole."""
        if isinstance(event, Params):
            params = self.raw_params = event.params
            if self.decode_params:
                # _decoded() inline: the call is 0.4% of a small WSGI request.
                try:
                    self.params = {k.decode(): v.decode() for k, v in params.items()}
                except UnicodeDecodeError:
                    self.params = _decoded(params)
        elif isinstance(event, StdinData):
            self.input_left -= len(event.data)
            if self.input_left >= 0:
                self.stdin.append(event.data)
            else:
                self.stdin = self.data = []  # refused: hold none of it
        elif isinstance(event, StdinEnd):
            self.stdin_done = True
        elif isinstance(event, FilterData):
            self.input_left -= len(event.data)
            if self.input_left >= 0:
                self.data.append(event.data)
            else:
                self.stdin = self.data = []
        elif isinstance(event, FilterDataEnd):
            self.data_done = True
        return self.whole and self.input_left >= 0

    def text_params(self) -> dict[str, str]:
        """The params decoded (as RequestBase.params says), once they have arrived."""
        if self.params is None:
            assert self.raw_params is not None
            self.params = _decoded(self.raw_params)
        return self.params

    def take_input(self) -> tuple[dict[str, str], bytes, bytes]:
        """Params, stdin and data, handed over once the request is whole."""
        stdin, data = b"".join(self.stdin), b"".join(self.data)
        self.stdin = self.data = []
        return self.text_params(), stdin, data


def _decoded(params: Mapping[bytes, bytes]) -> dict[str, str]:
    """Params names and values as UTF-8, with surrogateescape where they are not."""
    # Decoded inline: a function call per name and value costs about 5% of
    # what serving a small WSGI request does (callgrind), and joining them to
    # decode once costs as much. Strict UTF-8 first: where it succeeds it
    # gives what surrogateescape gives, for about a quarter less; bytes that
    # are not UTF-8 raise, and go that way.
    try:
        return {k.decode(): v.decode() for k, v in params.items()}
    except UnicodeDecodeError:
        return {
            k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in params.items()
        }


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
        """The FastCGI request id, unique among the connection's requests in flight."""
        return self._state.request_id

    @property
    def role(self) -> Role:
        """RESPONDER, AUTHORIZER or FILTER."""
        return self._state.role

    @property
    def keep_conn(self) -> bool:
        """Whether the web server keeps the connection open after this request."""
        return self._state.keep_conn

    @property
    def params(self) -> dict[str, str]:
        """The CGI variables the web server sent (decoded as the class says)."""
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


# --- what both servers take, and what they make of an app's result ---

#: Connections at once; past it a server stops accepting and the listen
#: backlog holds the rest. php-fpm's default pm.max_children is 5; a thread or
#: task per connection is cheap enough for 100.
DEFAULT_MAX_CONNECTIONS = 100
#: Requests at once across the whole application, all connections together.
DEFAULT_MAX_REQUESTS = 100
#: Servers do not multiplex unless asked to. nginx, Apache and Caddy never
#: multiplex FastCGI and php-fpm says it does not, so what a web server
#: expects is one request at a time per connection; that is also what lets
#: the blocking server run a handler in its connection's thread instead of a
#: thread per request. A client that multiplexes (Go's, HAProxy, ours) asks
#: with GET_VALUES, is told FCGI_MPXS_CONNS=0, and opens a connection per
#: concurrent request, which it has to do for php-fpm anyway. multiplex=True
#: is for those clients, as Go's server does by default: many requests on a
#: connection, and ABORT_REQUEST acted on at once.
DEFAULT_MULTIPLEX = False
#: A request's stdin and filter data are held in memory until the handler
#: runs. php's post_max_size is 8M by default; nginx's client_max_body_size 1m.
DEFAULT_MAX_BODY_SIZE = 8 << 20
#: From BEGIN_REQUEST to the end of PARAMS. Web servers send both in one
#: write; only a peer holding a request open on purpose needs seconds.
DEFAULT_PARAMS_TIMEOUT = 10.0
#: Silence from the peer while no application runs for it: between requests
#: on a kept connection, or in the middle of a request body. Above nginx's
#: and our client's idle keep-alive times, so they close first.
DEFAULT_IDLE_TIMEOUT = 60.0
#: How long a send may wait on a peer that does not read (nginx's send_timeout is 60 s).
DEFAULT_SEND_TIMEOUT = 30.0
#: Output a connection queues beyond what its socket took: an app's output
#: goes out in pieces of at most this, and what the server answers by itself
#: (GET_VALUES, refusals) stops the reading past it until it is sent.
DEFAULT_MAX_UNSENT_SIZE = 256 * 1024


@dataclass(frozen=True)
class ServerOptions:
    """A server's options, checked, with the defaults both servers share.

    `max_requests` counts requests at once across the application (the
    FastCGI spec's FCGI_MAX_REQS), not per connection: with `multiplex` one
    connection may carry all of them, without it each carries one, and a
    request past the limit ends at once with OVERLOADED.
    `max_params_size` bounds the encoded PARAMS of one request, and of all
    the requests of a multiplexed connection together, and `max_params_pairs`
    their number of name/value pairs; a client sending more loses its
    connection. A request whose stdin and filter data together exceed
    `max_body_size` is answered 413 at once, the rest of its body dropped.
    The timeouts and `max_unsent_size` are described where their defaults
    are defined, and in `Liveness`; `math.inf` turns a timeout off.
    """

    multiplex: bool = DEFAULT_MULTIPLEX
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_params_size: int = DEFAULT_MAX_PARAMS_SIZE
    max_params_pairs: int = DEFAULT_MAX_PARAMS_PAIRS
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    max_unsent_size: int = DEFAULT_MAX_UNSENT_SIZE
    params_timeout: float = DEFAULT_PARAMS_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    roles: Collection[Role] = field(default=ALL_ROLES)
    #: The web servers' IP addresses a TCP connection may come from (the
    #: spec's FCGI_WEB_SERVER_ADDRS); None lets any in. Unix sockets are not checked.
    allowed_peers: Collection[str] | None = None
    #: Whether each request's params are decoded to str as they arrive
    #: (RequestState.params). serve_asgi turns it off: it builds its scope
    #: from the bytes, and decodes the few params the scope has as str.
    decode_params: bool = True

    def __post_init__(self) -> None:
        for name in ("multiplex", "decode_params"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        for name in (
            "max_connections",
            "max_requests",
            "max_params_size",
            "max_params_pairs",
            "max_unsent_size",
        ):
            value = getattr(self, name)
            if type(value) is not int:
                raise TypeError(f"{name} must be an int, not {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if type(self.max_body_size) is not int:
            raise TypeError(f"max_body_size must be an int, not {self.max_body_size!r}")
        if self.max_body_size < 0:
            raise ValueError(f"max_body_size must be at least 0, not {self.max_body_size}")
        for name in ("params_timeout", "idle_timeout", "send_timeout"):
            value = getattr(self, name)
            if type(value) not in (int, float):
                raise TypeError(f"{name} must be a number of seconds, not {value!r}")
            if not value > 0:  # NaN too
                raise ValueError(f"{name} must be more than 0 seconds, not {value}")
            object.__setattr__(self, name, float(value))
        roles = frozenset(Role(role) for role in self.roles)
        if not roles:
            raise ValueError("roles must name at least one role")
        object.__setattr__(self, "roles", roles)
        if self.allowed_peers is not None:
            if isinstance(self.allowed_peers, str):
                raise TypeError("allowed_peers must be a collection of addresses, not a str")
            peers = frozenset(_ip(peer) for peer in self.allowed_peers)
            object.__setattr__(self, "allowed_peers", peers)

    def peer_allowed(self, peer: object) -> bool:
        """Whether an accepted connection's peer (accept()'s address) may be served."""
        if self.allowed_peers is None or not isinstance(peer, tuple):
            return True  # no allowlist, or a Unix socket
        try:
            return _ip(str(peer[0])) in self.allowed_peers
        except ValueError:
            return False

    def values(self) -> dict[str, str]:
        """What GET_VALUES answers: the application's limits, as configured."""
        return {
            "FCGI_MAX_CONNS": str(self.max_connections),
            "FCGI_MAX_REQS": str(self.max_requests),
            "FCGI_MPXS_CONNS": "1" if self.multiplex else "0",
        }

    def connection(self) -> ServerConnection:
        """The protocol state for one accepted connection."""
        proto = ServerConnection(
            roles=self.roles,
            multiplex=self.multiplex,
            max_requests=self.max_requests,
            max_connections=self.max_connections,
            max_params_size=self.max_params_size,
            max_params_pairs=self.max_params_pairs,
            # Without multiplexing, a second request that comes anyway waits
            # for the first to end (as php-fpm has it) instead of being
            # refused: HAProxy sends one even after FCGI_MPXS_CONNS=0. The
            # servers run one request of such a connection at a time.
            serial=not self.multiplex,
        )
        return proto


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address; an IPv4-mapped IPv6 one as the IPv4 address it is."""
    address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def web_server_addrs(value: str | None) -> list[str] | None:
    """FCGI_WEB_SERVER_ADDRS ("127.0.0.1,10.0.0.5") as allowed_peers; None when unset or empty."""
    if not value or not value.strip():
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


#: Why a server closed a connection for which dropped_too_much() was true.
DROPPED_TOO_MUCH = "it kept sending the body of requests that are over"


def dropped_too_much(proto: ServerConnection, options: ServerOptions) -> bool:
    """Whether the peer sent too much for requests already over; servers then close.

    A request answered 413, aborted or refused may still have body on its way
    from a well-behaved web server, so a server reads on and drops it rather
    than close (nginx sends the whole body before it reads the answer). A peer
    that never stops would keep the server busy for nothing: past
    max_body_size of such bytes (at least 1 MiB) on one connection, it goes.
    """
    return proto.dropped_size > max(options.max_body_size, 1 << 20)


class RequestSlots:
    """Requests in progress across the application, against `max_requests`.

    Not thread-safe: a server with threads takes and gives back under a lock.
    """

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def admit(self, proto: ServerConnection, begin: BeginRequest) -> bool:
        """Whether a request the core began may go on; if not, it is ended OVERLOADED.

        Each admitted request must be given back once, when it ends or its
        connection is lost.
        """
        if self.active < self.limit:
            self.active += 1
            return True
        proto.end_request(begin.request_id, 0, ProtocolStatus.OVERLOADED)
        return False

    def give_back(self, count: int = 1) -> None:
        """Requests ended: their slots are free again."""
        self.active -= count
        assert self.active >= 0, "a request was given back twice"


def listen_address(address: AddressInput | Address) -> Address:
    """Where to listen: an address as the clients take it, and port 0 for any free port."""
    return parse_address(address, listening=True)


def output_chunks(
    result: object, accepted: str = "bytes or an iterable of bytes"
) -> Iterable[bytes | bytearray | memoryview]:
    """The non-empty chunks of an app's synchronous result; TypeError for anything else."""
    if isinstance(result, OUTPUT_TYPES):
        return (result,) if result else ()
    if isinstance(result, str) or not isinstance(result, Iterable):
        raise TypeError(f"the app returned {type(result).__name__}, not {accepted}")
    return (chunk for chunk in result if check_output(chunk))


def close_output(result: object) -> None:
    """Close an app's result if it can be closed (a generator, a WSGI-style iterable)."""
    close = getattr(result, "close", None)
    if callable(close):
        close()


def failure_report() -> bytes:
    """The traceback of the exception being handled, for the request's STDERR.

    STDERR goes to the web server's error log, never to the HTTP client, who
    gets INTERNAL_ERROR (or a response cut short, if output had begun).
    """
    return traceback.format_exc().encode("utf-8", "backslashreplace")
