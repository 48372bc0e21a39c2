"""FastCGI on anyio (asyncio and trio): a pooled, multiplexing async client."""

from fcgiproto._adapter import Response, Timeout

from ._client import AsyncClient, AsyncStreamResponse

__all__ = ["AsyncClient", "AsyncStreamResponse", "Response", "Timeout"]
