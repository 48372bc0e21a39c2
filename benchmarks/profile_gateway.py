"""The gateway's CPU per request in-process, with no HTTP server: where it goes.

    uv run python benchmarks/profile_gateway.py [--requests 2000] [--rounds 5] [--profile]

One php-fpm pool (opcache on, a Unix socket) serves hello.php and a front
controller. On uvloop (what uvicorn runs on with the ``php`` extra), each
row calls one thing sequentially and reports the process CPU time per call,
the best and the median of the rounds:

- ``client.request``: the balanced client's whole-answer call, alone;
- ``client.stream``: the balanced client's streamed call, head and body;
- ``gateway /hello.php`` and ``gateway /blog/post``: the ASGI call, with a
  receive and a send that behave as uvicorn's (receive gives the request,
  then ``http.disconnect`` once the response is complete).

``--profile`` prints cProfile's top functions for the gateway row. For
instruction counts, which other jobs on the machine disturb far less, run
one row under callgrind twice and take the difference::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python benchmarks/profile_gateway.py --only "gateway /hello.php" \
        --rounds 1 --warmup 100 --requests N          # N = 200, then 1200
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers
import uvloop
from bench_gateway import start_pool, write_docroot

from fcgiproto.support import Script
from fcgiproto_anyio import PhpGateway


def scope_for(path: bytes) -> dict[str, Any]:
    """What uvicorn gives for wrk's request line and Host header."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path.decode(),
        "raw_path": path,
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080")],
        "state": {},
    }


async def call_gateway(gateway: PhpGateway, path: bytes) -> None:
    done = asyncio.Event()
    first = True
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await gateway(scope_for(path), receive, send)
    assert sent[0]["status"] in (200, 400), sent


async def rounds(
    name: str, call: Callable[[], Awaitable[None]], requests: int, count: int, warmup: int
) -> None:
    for _ in range(warmup):
        await call()
    per_call = []
    for _ in range(count):
        started = time.process_time()
        for _ in range(requests):
            await call()
        per_call.append((time.process_time() - started) / requests * 1e6)
    print(
        f"{name:22} best {min(per_call):6.1f} us  median {statistics.median(per_call):6.1f} us",
        flush=True,
    )


async def run(root: Path, socket: str, args: argparse.Namespace) -> None:
    async with PhpGateway(root, [f"unix:{socket}"], max_connections=8) as gateway:
        client = gateway.client
        # The params the gateway would send for /hello.php.
        route = gateway.router.route(b"/hello.php")
        assert isinstance(route, Script)
        hello = gateway._params(scope_for(b"/hello.php"), route, b"/hello.php", b"")

        async def request() -> None:
            response = await client.request(hello)
            assert response.status == 200

        async def stream() -> None:
            async with client.stream(hello) as response:
                async for _ in response.aiter_body():
                    pass

        rows: dict[str, Callable[[], Awaitable[None]]] = {
            "client.request": request,
            "client.stream": stream,
            "gateway /hello.php": lambda: call_gateway(gateway, b"/hello.php"),
            "gateway /blog/post": lambda: call_gateway(gateway, b"/blog/post"),
        }
        for name, call in rows.items():
            if args.only is None or name in args.only.split(","):
                await rounds(name, call, args.requests, args.rounds, args.warmup)
        if args.profile:
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            for _ in range(args.requests):
                await call_gateway(gateway, b"/hello.php")
            profiler.disable()
            stats = pstats.Stats(profiler).sort_stats(args.sort)
            stats.print_stats(args.top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--only", help="rows to run, by name, comma-separated")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="cProfile order: tottime, cumulative")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    binary = peers.find_php_fpm()
    assert binary, "php-fpm is not installed"
    with tempfile.TemporaryDirectory(prefix="profile-gateway-") as scratch:
        base = Path(scratch)
        root = write_docroot(base)
        fpm = start_pool(binary, base, "bench")
        try:
            uvloop.run(run(root, fpm.socket, args))
        finally:
            fpm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
