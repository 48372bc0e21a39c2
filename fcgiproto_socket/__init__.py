"""Blocking FastCGI on sockets: a pooled keep-alive client, a server, and the `fcgi` command."""

from fcgiproto._adapter import Response, Timeout

from ._client import Client, StreamResponse
from ._server import Handler, Request, Server, serve

__all__ = [
    "Client",
    "Handler",
    "Request",
    "Response",
    "Server",
    "StreamResponse",
    "Timeout",
    "serve",
]
