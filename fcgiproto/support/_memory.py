"""Applications that live in memory, for the in-memory backends that tests use.

A peer is the application side of one connection with no I/O: the bytes the
client writes go in, the bytes the application answers come out at once. The
in-memory backends (fcgiproto_socket.MemoryBackend,
fcgiproto_anyio.AsyncMemoryBackend) carry those bytes; the client's control
flow (pool, probe, retries, deadlines) runs as it would on sockets, without a
socket, a thread of the application's, or a sleep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fcgiproto import (
    DEFAULT_MAX_PARAMS_SIZE,
    BeginRequest,
    Params,
    ServerConnection,
    StdinData,
    StdinEnd,
)

__all__ = ["ApplicationPeer", "MemoryPeer", "PeerAnswer"]

#: What a peer does with a write: the bytes it answers (b"": nothing yet),
#: and whether it closes its end after them.
PeerAnswer = tuple[bytes, bool]


class MemoryPeer(Protocol):
    """The application side of one in-memory connection."""

    def receive(self, data: bytes) -> PeerAnswer:
        """Take what the client wrote; (the answer, whether to close after it)."""
        ...


class ApplicationPeer:
    """A FastCGI responder in memory: the core's ServerConnection and a handler.

    handler(params, stdin) -> the STDOUT of the answer (a CGI response). With
    close_after set, the connection closes after every answer, as php-fpm's
    does after pm.max_requests.
    """

    def __init__(
        self,
        handler: Callable[[dict[bytes, bytes], bytes], bytes],
        *,
        multiplex: bool = False,
        max_requests: int = 1,
        close_after: bool = False,
    ) -> None:
        self._handler = handler
        self._close_after = close_after
        self._conn = ServerConnection(
            multiplex=multiplex,
            max_requests=max_requests,
            max_connections=1,
            max_params_size=DEFAULT_MAX_PARAMS_SIZE,
        )
        self._params: dict[int, dict[bytes, bytes]] = {}
        self._stdin: dict[int, list[bytes]] = {}
        self.requests = 0

    def receive(self, data: bytes) -> PeerAnswer:
        """Take what the client wrote; (the answer, whether to close after it)."""
        close = False
        for event in self._conn.receive_data(data):
            if isinstance(event, BeginRequest):
                self._stdin[event.request_id] = []
            elif isinstance(event, Params):
                self._params[event.request_id] = dict(event.params)
            elif isinstance(event, StdinData):
                self._stdin[event.request_id].append(event.data)
            elif isinstance(event, StdinEnd):
                rid = event.request_id
                answer = self._handler(self._params.pop(rid), b"".join(self._stdin.pop(rid)))
                self.requests += 1
                if answer:
                    self._conn.send_stdout(rid, answer)
                self._conn.end_request(rid)
                close = close or self._close_after
        return self._conn.data_to_send(), close or self._conn.closed
