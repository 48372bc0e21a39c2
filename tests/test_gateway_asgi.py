"""PhpGateway called as an ASGI application in-process, on asyncio and on trio.

The end-to-end tests run it under uvicorn (asyncio). Here receive and send
are ours, so a client that leaves can be made to leave at a chosen moment,
and the disconnect watcher is tested on both kinds of event loop (asyncio
starts it from a timer, other loops from a task).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from gateway_peers import FpmPool, copy_app
from peers import find_php_fpm, require_peer

from fcgiproto_anyio import PhpGateway

pytestmark = [pytest.mark.anyio, pytest.mark.peer]

Message = dict[str, Any]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Site:
    def __init__(self, base: Path) -> None:
        self.root = copy_app(base / "www")
        self.state = base / "state"
        self.state.mkdir(exist_ok=True)
        self.env = {"STATE_DIR": str(self.state), "SESSION_DIR": str(self.state)}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("gateway-asgi"))


@pytest.fixture(scope="module")
def pool(site: Site) -> Iterator[FpmPool]:
    binary = find_php_fpm()
    require_peer("php-fpm", binary is not None)
    assert binary is not None
    # Cut requests keep a worker until their script writes (a /slow one: at
    # its end): enough workers that the next test still finds one.
    pool = FpmPool(binary, site.root.parent, "asgi", env=site.env, workers=8)
    pool.start()
    yield pool
    pool.stop()


class Client:
    """An HTTP client as an ASGI server shows it: body messages, then a disconnect.

    receive() gives http.disconnect once the response is complete (as the
    ASGI spec says), or when `leave` is set.
    """

    def __init__(self, path: str, query: bytes = b"", method: str = "GET", body: bytes = b""):
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8080),
            "client": ("127.0.0.1", 50000),
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "headers": [(b"host", b"localhost")]
            + ([(b"content-length", str(len(body)).encode())] if method == "POST" else []),
        }
        # The body in two messages, as a server hands on what arrives.
        half = len(body) // 2
        self._messages = [
            {"type": "http.request", "body": body[:half], "more_body": True},
            {"type": "http.request", "body": body[half:], "more_body": False},
        ]
        self.leave = anyio.Event()
        self.sent: list[Message] = []
        self.head_sent = anyio.Event()

    async def receive(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.start":
            self.head_sent.set()
        elif not message.get("more_body", False):
            self.leave.set()  # the response is complete

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


async def test_request_with_a_body(site: Site, pool: FpmPool) -> None:
    body = bytes(range(256)) * 4096
    client = Client("/input", method="POST", body=body)
    async with PhpGateway(site.root, [pool.address]) as gateway:
        with anyio.fail_after(30):
            await gateway(client.scope, client.receive, client.send)
    assert client.status == 200
    length, digest, content_length, _ = client.body.decode().split(" ")
    assert (int(length), digest, content_length) == (
        len(body),
        hashlib.sha256(body).hexdigest(),
        str(len(body)),
    )


@pytest.mark.parametrize("leave_after", [0.02, 0.3])
async def test_client_that_leaves_before_the_head_stops_the_request(
    site: Site, pool: FpmPool, leave_after: float
) -> None:
    """Before and after the watcher would start (a timer, on asyncio)."""
    client = Client("/slow", b"s=8")

    async def leave() -> None:
        await anyio.sleep(leave_after)
        client.leave.set()

    async with (
        PhpGateway(site.root, [pool.address], read_timeout=60) as gateway,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(leave)
        # The request ends at once, long before the script would answer.
        with anyio.fail_after(4):
            await gateway(client.scope, client.receive, client.send)
    assert client.sent == []  # nobody to answer


async def test_client_that_leaves_mid_body_stops_the_script(site: Site, pool: FpmPool) -> None:
    tick = site.state / "tick-asgi"
    client = Client("/tick", b"id=asgi")
    async with PhpGateway(site.root, [pool.address]) as gateway:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(gateway, client.scope, client.receive, client.send)
                await client.head_sent.wait()
                client.leave.set()
    # The gateway returned: the FastCGI connection is closed, and php-fpm
    # stops the script at its next write (one a second).
    stopped_at = int(tick.read_text())
    await anyio.sleep(2.5)
    assert int(tick.read_text()) <= stopped_at + 1
    assert stopped_at < 5
