"""Blocking FastCGI on sockets: a pooled keep-alive client, a server, and the `fcgi` command."""

from fcgiproto import ParamsInput
from fcgiproto.support import (
    DEFAULT_MAX_RESPONSE_SIZE,
    Address,
    AddressInput,
    Response,
    Timeout,
    TimeoutInput,
)

from ._backend import SocketBackend, SocketStream
from ._balanced import BalancedClient, BalancedStream, NoBackendAvailable
from ._client import Client, StreamResponse
from ._interface import NetworkBackend, NetworkStream
from ._memory import MemoryBackend, MemoryStream
from ._server import Handler, Request, Server, serve
from ._wsgi import WSGIApp, serve_wsgi

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
    "Request",
    "Response",
    "Server",
    "SocketBackend",
    "SocketStream",
    "StreamResponse",
    "Timeout",
    "TimeoutInput",
    "WSGIApp",
    "serve",
    "serve_wsgi",
]
