"""Blocking FastCGI on sockets: a pooled keep-alive client, a server, and the `fcgi` command."""

from fcgiproto import ParamsInput
from fcgiproto.support import Address, AddressInput, Response, Timeout, TimeoutInput

from ._client import Client, StreamResponse
from ._server import Handler, Request, Server, serve

__all__ = [
    "Address",
    "AddressInput",
    "Client",
    "Handler",
    "ParamsInput",
    "Request",
    "Response",
    "Server",
    "StreamResponse",
    "Timeout",
    "TimeoutInput",
    "serve",
]
