"""FastCGI on anyio (asyncio and trio): a pooled, multiplexing async client, and a server."""

from fcgiproto import ParamsInput
from fcgiproto.support import Address, AddressInput, Response, Timeout, TimeoutInput

from ._backend import AnyioBackend, AnyioStream
from ._client import AsyncClient, AsyncStreamResponse
from ._interface import AsyncNetworkBackend, AsyncNetworkStream
from ._memory import AsyncMemoryBackend, AsyncMemoryStream
from ._server import App, Request, serve

__all__ = [
    "Address",
    "AddressInput",
    "AnyioBackend",
    "AnyioStream",
    "App",
    "AsyncClient",
    "AsyncMemoryBackend",
    "AsyncMemoryStream",
    "AsyncNetworkBackend",
    "AsyncNetworkStream",
    "AsyncStreamResponse",
    "ParamsInput",
    "Request",
    "Response",
    "Timeout",
    "TimeoutInput",
    "serve",
]
