"""FastCGI on anyio (asyncio and trio): a pooled, multiplexing async client, and a server."""

from fcgiproto._adapter import Response, Timeout

from ._client import AsyncClient, AsyncStreamResponse
from ._server import App, Request, serve

__all__ = ["App", "AsyncClient", "AsyncStreamResponse", "Request", "Response", "Timeout", "serve"]
