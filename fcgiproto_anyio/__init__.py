"""FastCGI on anyio (asyncio and trio): a pooled, multiplexing async client, and a server."""

from fcgiproto import ParamsInput
from fcgiproto.support import Address, AddressInput, Response, Timeout, TimeoutInput

from ._client import AsyncClient, AsyncStreamResponse
from ._server import App, Request, serve

__all__ = [
    "Address",
    "AddressInput",
    "App",
    "AsyncClient",
    "AsyncStreamResponse",
    "ParamsInput",
    "Request",
    "Response",
    "Timeout",
    "TimeoutInput",
    "serve",
]
