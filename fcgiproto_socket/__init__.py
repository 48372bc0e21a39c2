"""Blocking FastCGI on sockets: a pooled keep-alive client, and the `fcgi` command."""

from fcgiproto._adapter import Response, Timeout

from ._client import Client, StreamResponse

__all__ = ["Client", "Response", "StreamResponse", "Timeout"]
