"""The floor for serve_asgi at c1: the least an ASGI request over FastCGI costs with this core.

Run:  uv run python benchmarks/ab_wsgi.py flup serve_asgi floor=benchmarks/floor_asgi.py --cases c1

Not a server to use: bench_wsgi.py's ASGI app behind the core, the ASGI
scope builder and the CGI head, on asyncio's own transport, with one task a
request whose first step runs at once (as serve_asgi's does), and nothing
else: no limits, timeouts or request slots, no backpressure (it writes and
forgets), no request body, no disconnects, no checks of what the app sends,
one request at a time per connection. What serve_asgi costs above this is
the price of what it has and this has not; what this costs against flup is
how far ahead an ASGI server on asyncio can be at all (benchmarks/README.md,
"The floor at c1").

Serves as bench_wsgi.py does: ``floor_asgi.py --serve KIND ADDRESS`` (KIND is
ignored), on a Unix socket.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package, whatever is installed
sys.path.insert(0, str(HERE))

from bench_wsgi import asgi_app  # noqa: E402

from fcgiproto import Params, ServerConnection, StdinEnd  # noqa: E402
from fcgiproto.support import asgi_scope_from_bytes, cgi_head  # noqa: E402


class FloorProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proto = ServerConnection()
        self.params: dict[int, Mapping[bytes, bytes]] = {}
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        for event in self.proto.receive_data(data):
            if type(event) is Params:
                self.params[event.request_id] = event.params
            elif type(event) is StdinEnd:
                params = self.params.pop(event.request_id)
                task = self.loop.create_task(self.respond(event.request_id, params))
                ready = self.loop._ready  # type: ignore[attr-defined]
                if len(ready) == 1 and ready[0]._callback.__self__ is task:
                    ready.pop()._run()  # its first step now, as serve_asgi's read callback does
        out = self.proto.data_to_send()
        if out:
            self.transport.write(out)

    async def respond(self, request_id: int, params: Mapping[bytes, bytes]) -> None:
        proto, transport = self.proto, self.transport
        head = b""

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal head
            if message["type"] == "http.response.start":
                head = cgi_head(message["status"], message.get("headers", ()))
                return
            proto.send_stdout(request_id, head + message.get("body", b""))
            head = b""
            if not message.get("more_body", False):
                proto.end_request(request_id)
            transport.write(proto.data_to_send())

        await asgi_app(asgi_scope_from_bytes(params), receive, send)


async def serve(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(FloorProtocol, path)
    await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--serve":
        sys.exit(__doc__)
    asyncio.run(serve(sys.argv[3].removeprefix("unix:")))
