"""I/O-free support for adapters: addresses, timeouts, pool bookkeeping, answers, server options.

The protocol modules of ``fcgiproto`` never import this package. The adapters
(``fcgiproto_socket``, ``fcgiproto_anyio``, and any written outside the
project) build on these names; nothing here opens a socket, starts a thread or
reads a clock of its own. Names load on first use (PEP 562): a client need not
import the server's options.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._address import (
        Address,
        AddressInput,
        parse_address,
    )
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
        OUTPUT_PIECE,
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
    from ._balancer import (
        IDEMPOTENT_METHODS,
        BackendState,
        Balancer,
        Policy,
        may_retry,
    )
    from ._environ import (
        ASGI_VERSION,
        asgi_scope,
        asgi_scope_from_bytes,
        cgi_head,
        request_path,
        url_scheme,
        wsgi_environ,
    )
    from ._liveness import (
        Liveness,
    )
    from ._memory import (
        ApplicationPeer,
        MemoryPeer,
        PeerAnswer,
    )
    from ._phproute import (
        DEFAULT_TRY_FILES,
        FileKind,
        FileSystem,
        PhpRouter,
        Redirect,
        Refusal,
        Route,
        Script,
        StaticFile,
    )
    from ._pool import (
        PoolState,
    )
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
    from ._status import (
        PROCESS_STATES,
        PoolScrape,
        PoolStatus,
        ProcessStatus,
        StatusPageError,
        parse_status,
        prometheus_text,
        status_params,
    )
    from ._timeout import (
        PROBE_WAIT,
        Deadline,
        Timeout,
        TimeoutInput,
        probe_wait,
    )

#: Where each public name lives.
_SOURCES = {
    "web_server_addrs": "_application",
    "ASGI_VERSION": "_environ",
    "asgi_scope": "_environ",
    "asgi_scope_from_bytes": "_environ",
    "cgi_head": "_environ",
    "request_path": "_environ",
    "url_scheme": "_environ",
    "wsgi_environ": "_environ",
    "ALL_ROLES": "_application",
    "BODY_TOO_LARGE": "_application",
    "DEFAULT_IDLE_TIMEOUT": "_application",
    "DEFAULT_MAX_BODY_SIZE": "_application",
    "DEFAULT_MAX_CONNECTIONS": "_application",
    "DEFAULT_MAX_REQUESTS": "_application",
    "DEFAULT_MAX_RESPONSE_SIZE": "_response",
    "DEFAULT_MAX_UNSENT_SIZE": "_application",
    "DEFAULT_MULTIPLEX": "_application",
    "DEFAULT_PARAMS_TIMEOUT": "_application",
    "DEFAULT_SEND_TIMEOUT": "_application",
    "DEFAULT_TRY_FILES": "_phproute",
    "DROPPED_TOO_MUCH": "_application",
    "ERROR_STATUS": "_application",
    "IDEMPOTENT_METHODS": "_balancer",
    "INTERNAL_ERROR": "_application",
    "OUTPUT_PIECE": "_application",
    "OUTPUT_TYPES": "_application",
    "PROBE_WAIT": "_timeout",
    "PROCESS_STATES": "_status",
    "Address": "_address",
    "AddressInput": "_address",
    "ApplicationPeer": "_memory",
    "BackendState": "_balancer",
    "Balancer": "_balancer",
    "Deadline": "_timeout",
    "FileKind": "_phproute",
    "FileSystem": "_phproute",
    "Liveness": "_liveness",
    "MemoryPeer": "_memory",
    "PeerAnswer": "_memory",
    "PhpRouter": "_phproute",
    "Policy": "_balancer",
    "PoolScrape": "_status",
    "PoolState": "_pool",
    "PoolStatus": "_status",
    "ProcessStatus": "_status",
    "Redirect": "_phproute",
    "Refusal": "_phproute",
    "RequestBase": "_application",
    "RequestSlots": "_application",
    "RequestState": "_application",
    "Response": "_response",
    "ResponseState": "_response",
    "Route": "_phproute",
    "Script": "_phproute",
    "ServerOptions": "_application",
    "StaticFile": "_phproute",
    "StatusPageError": "_status",
    "Timeout": "_timeout",
    "TimeoutInput": "_timeout",
    "WholeAnswer": "_response",
    "check_output": "_application",
    "close_output": "_application",
    "dropped_too_much": "_application",
    "failure_report": "_application",
    "listen_address": "_application",
    "log_bytes": "_application",
    "may_retry": "_balancer",
    "output_chunks": "_application",
    "parse_address": "_address",
    "parse_status": "_status",
    "probe_wait": "_timeout",
    "prometheus_text": "_status",
    "raise_for_protocol_status": "_response",
    "receive_from": "_response",
    "recipient": "_response",
    "response_too_large": "_response",
    "status_params": "_status",
}

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
    "DEFAULT_TRY_FILES",
    "DROPPED_TOO_MUCH",
    "ERROR_STATUS",
    "IDEMPOTENT_METHODS",
    "INTERNAL_ERROR",
    "OUTPUT_PIECE",
    "OUTPUT_TYPES",
    "PROBE_WAIT",
    "PROCESS_STATES",
    "Address",
    "AddressInput",
    "ApplicationPeer",
    "BackendState",
    "Balancer",
    "Deadline",
    "FileKind",
    "FileSystem",
    "Liveness",
    "MemoryPeer",
    "PeerAnswer",
    "PhpRouter",
    "Policy",
    "PoolScrape",
    "PoolState",
    "PoolStatus",
    "ProcessStatus",
    "Redirect",
    "Refusal",
    "RequestBase",
    "RequestSlots",
    "RequestState",
    "Response",
    "ResponseState",
    "Route",
    "Script",
    "ServerOptions",
    "StaticFile",
    "StatusPageError",
    "Timeout",
    "TimeoutInput",
    "WholeAnswer",
    "asgi_scope",
    "asgi_scope_from_bytes",
    "cgi_head",
    "check_output",
    "close_output",
    "dropped_too_much",
    "failure_report",
    "listen_address",
    "log_bytes",
    "may_retry",
    "output_chunks",
    "parse_address",
    "parse_status",
    "probe_wait",
    "prometheus_text",
    "raise_for_protocol_status",
    "receive_from",
    "recipient",
    "request_path",
    "response_too_large",
    "status_params",
    "url_scheme",
    "web_server_addrs",
    "wsgi_environ",
]


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
