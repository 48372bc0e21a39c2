"""I/O-free support for adapters: addresses, timeouts, pool bookkeeping, answers, server options.

The protocol modules of ``fcgiproto`` never import this package. The adapters
(``fcgiproto_socket``, ``fcgiproto_anyio``, and any written outside the
project) build on these names; nothing here opens a socket, starts a thread or
reads a clock of its own.
"""

from ._address import Address, AddressInput, parse_address
from ._application import (
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
    OUTPUT_TYPES,
    RequestBase,
    RequestSlots,
    RequestState,
    ServerOptions,
    check_output,
    close_output,
    dropped_too_much,
    failure_report,
    listen_address,
    log_bytes,
    output_chunks,
    web_server_addrs,
)
from ._gateway import ASGI_VERSION, asgi_scope, cgi_head, request_path, url_scheme, wsgi_environ
from ._liveness import Liveness
from ._memory import ApplicationPeer, MemoryPeer, PeerAnswer
from ._pool import PoolState
from ._response import (
    DEFAULT_MAX_RESPONSE_SIZE,
    Response,
    ResponseState,
    WholeAnswer,
    raise_for_protocol_status,
    receive_from,
    recipient,
    response_too_large,
)
from ._timeout import PROBE_WAIT, Deadline, Timeout, TimeoutInput, probe_wait

__all__ = [
    "ALL_ROLES",
    "ASGI_VERSION",
    "BODY_TOO_LARGE",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_MAX_RESPONSE_SIZE",
    "DEFAULT_MAX_UNSENT_SIZE",
    "DEFAULT_MULTIPLEX",
    "DEFAULT_PARAMS_TIMEOUT",
    "DEFAULT_SEND_TIMEOUT",
    "DROPPED_TOO_MUCH",
    "ERROR_STATUS",
    "INTERNAL_ERROR",
    "OUTPUT_TYPES",
    "PROBE_WAIT",
    "Address",
    "AddressInput",
    "ApplicationPeer",
    "Deadline",
    "Liveness",
    "MemoryPeer",
    "PeerAnswer",
    "PoolState",
    "RequestBase",
    "RequestSlots",
    "RequestState",
    "Response",
    "ResponseState",
    "ServerOptions",
    "Timeout",
    "TimeoutInput",
    "WholeAnswer",
    "asgi_scope",
    "cgi_head",
    "check_output",
    "close_output",
    "dropped_too_much",
    "failure_report",
    "listen_address",
    "log_bytes",
    "output_chunks",
    "parse_address",
    "probe_wait",
    "raise_for_protocol_status",
    "receive_from",
    "recipient",
    "request_path",
    "response_too_large",
    "url_scheme",
    "web_server_addrs",
    "wsgi_environ",
]
