"""FastCGI on anyio (asyncio and trio): a pooled, multiplexing async client, and a server."""

try:
    import anyio  # noqa: F401  (only to say which extra brings it)
except ModuleNotFoundError as exc:
    if exc.name != "anyio":
        raise
    raise ModuleNotFoundError(
        "fcgiproto_anyio needs anyio, which fcgiproto-ng installs with its extra: "
        "pip install 'fcgiproto-ng[anyio]' (or 'fcgiproto-ng[trio]' to run on trio too)",
        name="anyio",
    ) from exc

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

from ._asgi import ASGIApp, ClientDisconnected, serve_asgi
from ._backend import AnyioBackend, AnyioStream
from ._balanced import AsyncBalancedClient, AsyncBalancedStream, NoBackendAvailable
from ._client import AsyncClient, AsyncStreamResponse
from ._gateway import LocalFileSystem, PhpGateway
from ._interface import AsyncNetworkBackend, AsyncNetworkStream
from ._memory import AsyncMemoryBackend, AsyncMemoryStream
from ._server import App, Request, serve
from ._status import read_status

__all__ = [
    "DEFAULT_MAX_RESPONSE_SIZE",
    "ASGIApp",
    "Address",
    "AddressInput",
    "AnyioBackend",
    "AnyioStream",
    "App",
    "AsyncBalancedClient",
    "AsyncBalancedStream",
    "AsyncClient",
    "AsyncMemoryBackend",
    "AsyncMemoryStream",
    "AsyncNetworkBackend",
    "AsyncNetworkStream",
    "AsyncStreamResponse",
    "ClientDisconnected",
    "LocalFileSystem",
    "NoBackendAvailable",
    "ParamsInput",
    "PhpGateway",
    "PoolStatus",
    "ProcessStatus",
    "Request",
    "Response",
    "StatusPageError",
    "Timeout",
    "TimeoutInput",
    "parse_status",
    "read_status",
    "serve",
    "serve_asgi",
]
