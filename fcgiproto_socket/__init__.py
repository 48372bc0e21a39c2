"""Blocking FastCGI on sockets: a pooled keep-alive client, a server, and the `fcgi` command.

Names load on first use (PEP 562), so `fcgi ping` imports the client and
not the server: a health check's start-up time is mostly imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fcgiproto import ParamsInput
    from fcgiproto.support import (
        DEFAULT_MAX_RESPONSE_SIZE,
        Address,
        AddressInput,
        PoolStatus,
        ProcessStatus,
        Response,
        StatusPageError,
        Timeout,
        TimeoutInput,
        parse_status,
    )

    from ._backend import SocketBackend, SocketStream
    from ._balanced import BalancedClient, BalancedStream, NoBackendAvailable
    from ._client import Client, StreamResponse
    from ._interface import NetworkBackend, NetworkStream
    from ._memory import MemoryBackend, MemoryStream
    from ._server import Handler, Request, Server, serve
    from ._status import read_status
    from ._wsgi import WSGIApp, serve_wsgi

#: Where each public name lives.
_SOURCES = {
    "WSGIApp": "._wsgi",
    "serve_wsgi": "._wsgi",
    "ParamsInput": "fcgiproto",
    "DEFAULT_MAX_RESPONSE_SIZE": "fcgiproto.support",
    "Address": "fcgiproto.support",
    "AddressInput": "fcgiproto.support",
    "PoolStatus": "fcgiproto.support",
    "ProcessStatus": "fcgiproto.support",
    "Response": "fcgiproto.support",
    "StatusPageError": "fcgiproto.support",
    "Timeout": "fcgiproto.support",
    "TimeoutInput": "fcgiproto.support",
    "parse_status": "fcgiproto.support",
    "SocketBackend": "._backend",
    "SocketStream": "._backend",
    "BalancedClient": "._balanced",
    "BalancedStream": "._balanced",
    "NoBackendAvailable": "._balanced",
    "Client": "._client",
    "StreamResponse": "._client",
    "NetworkBackend": "._interface",
    "NetworkStream": "._interface",
    "MemoryBackend": "._memory",
    "MemoryStream": "._memory",
    "Handler": "._server",
    "Request": "._server",
    "Server": "._server",
    "serve": "._server",
    "read_status": "._status",
}

__all__ = [
    "DEFAULT_MAX_RESPONSE_SIZE",
    "Address",
    "AddressInput",
    "BalancedClient",
    "BalancedStream",
    "Client",
    "Handler",
    "MemoryBackend",
    "MemoryStream",
    "NetworkBackend",
    "NetworkStream",
    "NoBackendAvailable",
    "ParamsInput",
    "PoolStatus",
    "ProcessStatus",
    "Request",
    "Response",
    "Server",
    "SocketBackend",
    "SocketStream",
    "StatusPageError",
    "StreamResponse",
    "Timeout",
    "TimeoutInput",
    "WSGIApp",
    "parse_status",
    "read_status",
    "serve",
    "serve_wsgi",
]


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source, __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
