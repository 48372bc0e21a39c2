"""The AsyncClient against the real peers (php-fpm and Go's net/http/fcgi), on asyncio and trio.

Every test runs on both anyio backends and talks to a real application over a
Unix socket and over TCP; two known bugs are shown against small servers of
our own that answer as php-fpm or Go can, but on cue. Time bounds are generous
and only prove that a call ends; nothing here measures speed. Connections are
counted from our side, as the sockets this process has open (/proc/self/fd),
and the pool's bookkeeping (``client._pool``) is checked after cancellations,
where a leak would hide. Checks that have to wait run on the four targets at
once (``on_each``), to keep the file quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import random
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.abc
import peers
import pytest

import fcgiproto
from fcgiproto import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    PoolTimeout,
    ProtocolStatus,
    ReadTimeout,
    TimeoutException,
)
from fcgiproto_anyio import AsyncClient, AsyncStreamResponse, Response, Timeout
from tests import targets as peer_targets
from tests.targets import KiB, MiB, echo_check, fd_count, md5, open_sockets, payload

pytestmark = [pytest.mark.anyio, pytest.mark.peer]


#: Limits for calls that must simply succeed: far above anything a healthy
#: peer needs, low enough that a hang fails the test instead of the suite.
#: (pool is lower: a waiter that missed a release would sit out its pool
#: timeout before taking the free connection.)
SAFE = Timeout(connect=10, read=20, write=20, pool=8, total=60)
#: How long one test may take before we call it a hang or a deadlock.
BOUND = 60.0

PHP = ["php-unix", "php-tcp"]
GO = ["go-unix", "go-tcp"]
ALL = PHP + GO

P = ParamSpec("P")
T = TypeVar("T")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bounded(seconds: float = BOUND) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Any]]:
    """The test fails (TimeoutError) instead of hanging when it runs longer than that."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Any]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            with anyio.fail_after(seconds):
                return await fn(*args, **kwargs)

        return run

    return wrap


# --- peers and helpers ---


class Target(peer_targets.Target):
    """A peer on a transport, and an AsyncClient for it."""

    def client(self, **kwargs: Any) -> AsyncClient:
        kwargs.setdefault("timeout", SAFE)
        return AsyncClient(self.address, **kwargs)


def _target(request: pytest.FixtureRequest, name: str) -> Target:
    return peer_targets.make_target(request, name, Target)


@pytest.fixture
def target(request: pytest.FixtureRequest) -> Target:
    return _target(request, request.param)


@pytest.fixture
def targets(request: pytest.FixtureRequest) -> list[Target]:
    """Every peer on every transport, for the slow checks, which run on all of them at once."""
    return [_target(request, name) for name in ALL]


async def on_each(targets: list[Target], check: Callable[[Target], Awaitable[None]]) -> None:
    """check(target) on every target at once, so a check that waits costs its time once.

    php-unix and php-tcp are separate pools of 4 workers each, and Go takes
    anything, so running them side by side changes nothing for each of them.
    """
    failures: dict[str, Exception] = {}

    async def run(target: Target) -> None:
        try:
            await check(target)
        except Exception as exc:
            failures[target.name] = exc

    async with anyio.create_task_group() as tasks:
        for target in targets:
            tasks.start_soon(run, target)
    if failures:
        report = "; ".join(f"{name}: {exc!r}" for name, exc in sorted(failures.items()))
        raise AssertionError(f"failed on {sorted(failures)}: {report}") from next(
            iter(failures.values())
        )


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether condition() holds, now or within that many seconds."""
    with anyio.move_on_after(within):
        while not condition():
            await anyio.sleep(0.01)
        return True
    return condition()


def unique_payload(i: int, n: int) -> bytes:
    """n bytes (at least 16) no other request of a test carries: its index, then noise."""
    head = b"#%014d#" % i
    return head + payload(max(0, n - len(head)), seed=i)


async def hello_works(client: AsyncClient, target: Target, **kwargs: Any) -> None:
    r = await client.request(target.params("hello"), **kwargs)
    assert r.status == 200
    assert r.body == peers.HELLO_BODY


def pool_is_clean(client: AsyncClient) -> None:
    """Nothing is counted as in use: every open connection is idle in the pool."""
    pool = client._pool
    in_use = pool.open - len(pool.idle)
    assert in_use == 0, f"{in_use} connections still counted as in use"
    assert pool.open <= client.max_connections


@contextlib.contextmanager
def unraisables() -> Iterator[list[str]]:
    """What gets cleaned up unraisably in the block (unclosed sockets, ...), garbage included.

    Caught here rather than by pytest, which would report it in some later
    test, or in this one's teardown.
    """
    found: list[str] = []
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        found.append(f"{unraisable.exc_value!r} in {unraisable.object!r}")

    sys.unraisablehook = hook
    try:
        yield found
    finally:
        try:
            gc.collect()
        finally:
            sys.unraisablehook = previous


Chunk = bytes | bytearray | memoryview


def chunked(body: bytes, sizes: list[int]) -> Iterator[Chunk]:
    """body cut into pieces of those sizes (then the rest), with empty and odd buffers."""
    pos = 0
    for i, size in enumerate(sizes):
        piece = body[pos : pos + size]
        pos += size
        if i % 3 == 1:
            yield bytearray(piece)
        elif i % 3 == 2:
            yield memoryview(piece)
        else:
            yield piece
        yield b""
    yield body[pos:]


CHUNK_SIZES = [1, 0, 7, 65535, 65536, 65537, 100_000, 3, 300_000, 1]


async def async_chunks(pieces: Iterator[Chunk]) -> AsyncIterator[Chunk]:
    """The pieces as an async iterable, with a checkpoint between them."""
    for piece in pieces:
        yield piece
        await anyio.sleep(0)


def header(r: Response | AsyncStreamResponse, name: str) -> str | None:
    for key, value in r.headers:
        if key.lower() == name.lower():
            return value
    return None


# --- a plain GET ---


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_get_parses_status_headers_and_body(target: Target) -> None:
    async with target.client() as client:
        r = await client.request(target.params("hello"))
    assert r.status == 200
    assert r.reason == "OK"
    assert r.body == peers.HELLO_BODY
    assert (r.header("content-type") or "").startswith("text/plain")
    assert r.header("CONTENT-TYPE") == r.header("Content-Type")
    assert r.app_status == 0
    assert r.protocol_status is ProtocolStatus.REQUEST_COMPLETE
    assert r.stderr == b""
    # stdout is the raw CGI response, head included; body is what follows it.
    assert r.stdout != r.body
    head, sep, rest = r.stdout.partition(b"\r\n\r\n")
    assert sep and rest == peers.HELLO_BODY
    assert b"content-type: text/plain" in head.lower()
    for name, value in r.headers:
        assert f"{name}: {value}".encode() in head


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_stream_gives_head_first_then_body_and_raw_stdout(target: Target) -> None:
    async with target.client() as client:
        async with client.stream(target.params("hello")) as r:
            assert r.status == 200
            assert r.reason == "OK"
            assert (header(r, "content-type") or "").startswith("text/plain")
            assert await r.aread() == peers.HELLO_BODY
            with pytest.raises(LocalProtocolError):
                await r.aiter_stdout().__anext__()
        assert r.app_status == 0
        assert r.protocol_status is ProtocolStatus.REQUEST_COMPLETE
        assert r.stderr == b""
        async with client.stream(target.params("hello")) as r:
            raw = b"".join([chunk async for chunk in r.aiter_stdout()])
            with pytest.raises(LocalProtocolError):
                await r.aiter_body().__anext__()
        assert raw.endswith(b"\r\n\r\n" + peers.HELLO_BODY)
        assert raw.lower().count(b"content-type:") == 1


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("code", [404, 503])
@bounded()
async def test_status_line_from_the_application(target: Target, code: int) -> None:
    async with target.client() as client:
        r = await client.request(target.params("status", query=f"code={code}"))
        assert r.status == code
        assert r.reason == {404: "Not Found", 503: "Service Unavailable"}[code]
        assert r.body == f"status {code}".encode()
        async with client.stream(target.params("status", query=f"code={code}")) as s:
            assert s.status == code
            assert await s.aread() == f"status {code}".encode()


# --- request bodies ---


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("size", [0, 64 * KiB, 10 * MiB], ids=["0", "64K", "10M"])
@bounded()
async def test_post_body_arrives_byte_exact(target: Target, size: int) -> None:
    body = payload(size)
    async with target.client() as client:
        echo_check(await client.request(target.echo(body), stdin=body), body)
        if size > 64 * KiB:
            return
        # The same through stream(), and from a bytearray.
        async with client.stream(target.echo(body), stdin=bytearray(body)) as s:
            assert s.status == 200
            assert header(s, "X-Body-Md5") == md5(body)
            assert await s.aread() == body


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("via", ["request", "stream"])
@pytest.mark.parametrize("kind", ["async-iterable", "sync-iterable"])
@bounded()
async def test_iterable_stdin_arrives_byte_exact(target: Target, via: str, kind: str) -> None:
    body = payload(sum(CHUNK_SIZES) + 12345, seed=7)
    consumed: list[int] = []

    def counted() -> Iterator[Chunk]:
        for piece in chunked(body, CHUNK_SIZES):
            consumed.append(len(piece))
            yield piece

    stdin: Any = async_chunks(counted()) if kind == "async-iterable" else counted()
    async with target.client() as client:
        if via == "stream":
            async with client.stream(target.echo(body), stdin=stdin) as s:
                assert s.status == 200
                assert header(s, "X-Body-Md5") == md5(body)  # parsed before the body is read
                received = await s.aread()
            assert received == body
        else:
            echo_check(await client.request(target.echo(body), stdin=stdin), body)
        assert sum(consumed) == len(body)
        # The connection (or the multiplexed one) is fine for the next request.
        await hello_works(client, target)


# --- a large response, streamed ---


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_16_mib_response_is_streamed_in_chunks(target: Target) -> None:
    size = 16 * MiB
    expected = peers.big_body(size)
    total = chunks = biggest = 0
    async with target.client() as client:
        async with client.stream(target.params("big", query=f"n={size}")) as r:
            assert r.status == 200
            assert header(r, "x-body-length") == str(size)
            async for chunk in r.aiter_body():
                assert chunk == expected[total : total + len(chunk)], f"wrong bytes at {total}"
                total += len(chunk)
                chunks += 1
                biggest = max(biggest, len(chunk))
        assert r.app_status == 0
        await hello_works(client, target)
    assert total == size
    assert chunks > 16  # it came as it arrived, not gathered
    assert biggest < size


# --- php-fpm specifics: stderr, cookies ---


@pytest.mark.parametrize("target", PHP, indirect=True)
@bounded()
async def test_stderr_is_kept_apart_from_stdout(target: Target) -> None:
    async with target.client() as client:
        r = await client.request(target.params("stderr"))
        assert r.status == 200
        assert r.body == b"to stdout"
        assert b"to stderr" in r.stderr
        assert b"to stderr" not in r.stdout
        assert b"to stdout" not in r.stderr
        async with client.stream(target.params("stderr")) as s:
            assert await s.aread() == b"to stdout"
        assert b"to stderr" in s.stderr
        async with client.stream(target.params("stderr")) as s:
            err = b"".join([chunk async for chunk in s.aiter_stderr()])
            assert await s.aread() == b"to stdout"  # kept meanwhile
        assert b"to stderr" in err


@pytest.mark.parametrize("target", PHP, indirect=True)
@bounded()
async def test_set_cookie_headers_in_order_and_location_302(target: Target) -> None:
    async with target.client() as client:
        r = await client.request(target.params("cookies"))
    assert r.status == 302
    assert r.header("Location") == "/elsewhere"
    cookies = [value for name, value in r.headers if name.lower() == "set-cookie"]
    assert cookies == ["first=one", "second=two; path=/; HttpOnly"]
    assert r.body == b"moved"


# --- management records ---


@pytest.mark.parametrize("target", PHP, indirect=True)
@bounded()
async def test_get_values_from_php_fpm(target: Target) -> None:
    before = open_sockets()
    async with target.client() as client:
        for _ in range(3):
            # php-fpm answers only FCGI_MPXS_CONNS, whatever is asked.
            assert await client.get_values() == {"FCGI_MPXS_CONNS": "0"}
            await hello_works(client, target)
        assert await client.get_values(["FCGI_MPXS_CONNS"]) == {"FCGI_MPXS_CONNS": "0"}
        assert client.multiplex is False
        assert len(open_sockets() - before) == 1  # one kept-alive connection throughout
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", GO, indirect=True)
@bounded()
async def test_get_values_from_go_tolerates_its_extra_empty_record(target: Target) -> None:
    # Before any request (nothing decided yet), and after (multiplexing).
    async with target.client() as client:
        for _ in range(3):
            assert (await client.get_values())["FCGI_MPXS_CONNS"] == "1"
            assert await client.get_values(["FCGI_MPXS_CONNS"]) == {"FCGI_MPXS_CONNS": "1"}
            await hello_works(client, target)
        assert client.multiplex is True
        # Concurrent questions on the shared connection each get an answer.
        results: list[dict[str, str]] = []

        async def ask() -> None:
            results.append(await client.get_values(["FCGI_MPXS_CONNS"]))

        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                tasks.start_soon(ask)
        assert results == [{"FCGI_MPXS_CONNS": "1"}] * 20
        await hello_works(client, target)


# --- many requests at once ---


class SocketWatch:
    """Samples this process's new sockets while a block runs; the most seen at once."""

    def __init__(self, before: set[str]) -> None:
        self.before = before
        self.most = 0
        self.seen: set[str] = set()

    def sample(self) -> None:
        now = open_sockets() - self.before
        self.seen |= now
        self.most = max(self.most, len(now))

    async def run(self) -> None:
        while True:
            self.sample()
            await anyio.sleep(0.005)


def mux_size(rng: random.Random) -> int:
    """Sizes up to 1 MiB, mostly small: inline bodies, 64 KiB edges, and sent-apart ones."""
    kind = rng.random()
    if kind < 0.3:
        return rng.randint(16, 2000)
    if kind < 0.9:
        return rng.randint(2000, 70 * KiB)
    return rng.randint(70 * KiB, MiB)


@pytest.mark.parametrize("target", GO, indirect=True)
@bounded()
async def test_500_concurrent_requests_share_one_multiplexed_connection(target: Target) -> None:
    rng = random.Random(500)
    bodies = {i: unique_payload(i, mux_size(rng)) for i in range(500)}
    got: dict[int, bytes] = {}
    before = open_sockets()
    watch = SocketWatch(before)

    async def one(i: int) -> None:
        r = await client.request(target.echo(bodies[i]), stdin=bodies[i])
        echo_check(r, bodies[i])
        got[i] = r.body

    async with target.client(max_connections=2) as client:
        async with anyio.create_task_group() as outer:
            outer.start_soon(watch.run)
            async with anyio.create_task_group() as tasks:
                for i in range(500):
                    tasks.start_soon(one, i)
            outer.cancel_scope.cancel()
        watch.sample()
        assert client.multiplex is True
        assert client._mux is not None and client._mux.usable
        assert client._mux._inboxes == {}  # every request let go of its id
        assert client._mux.proto.active_requests == frozenset()
        assert client._pool.open == 0  # the GET_VALUES probe's connection is gone
    assert got == bodies  # each got exactly its own body
    # Never more than one socket at a time, and one for all 500 requests (the
    # probe's connection closes before the shared one opens).
    assert watch.most == 1
    assert len(watch.seen) <= 2
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", PHP, indirect=True)
@bounded()
async def test_concurrent_requests_through_a_pool_smaller_than_the_workers(
    target: Target,
) -> None:
    # php-fpm has 4 workers per pool: a pool of 3 never waits for a worker.
    before = open_sockets()
    watch = SocketWatch(before)
    bodies = {i: unique_payload(i, 1000 + 1997 * i) for i in range(40)}
    got: dict[int, bytes] = {}

    async def work(i: int) -> None:
        for _ in range(2):
            r = await client.request(target.echo(bodies[i]), stdin=bodies[i])
            echo_check(r, bodies[i])
            got[i] = r.body
            watch.sample()
        async with client.stream(target.params("pid")) as s:
            assert s.status == 200
            assert (await s.aread()).isdigit()

    async with target.client(max_connections=3) as client:
        async with anyio.create_task_group() as tasks:
            for i in range(40):
                tasks.start_soon(work, i)
        assert client.multiplex is False
        pool_is_clean(client)
        assert 1 <= client._pool.open <= 3
    assert got == bodies
    assert 1 <= watch.most <= 3
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", PHP, indirect=True)
@bounded()
async def test_a_waiter_gets_the_connection_when_it_is_released(target: Target) -> None:
    before = open_sockets()
    got: list[Response] = []
    async with (
        target.client(max_connections=1) as client,
        anyio.create_task_group() as tasks,
        client.stream(target.params("hello")) as r,
    ):
        assert r.status == 200

        async def wait_for_pool() -> None:
            got.append(await client.request(target.params("pid")))

        tasks.start_soon(wait_for_pool)
        await anyio.sleep(0.3)
        assert not got  # it waits for the only connection
        assert await r.aread() == peers.HELLO_BODY
    assert len(got) == 1 and got[0].status == 200
    assert open_sockets() - before == set()


# --- timeouts ---
#
# These wait for real: each runs on the four targets at once. php-fpm keeps
# running a script after the client gave up on it (it notices only when it
# writes), so the sleeps are short and php's 4 workers per pool are enough.


@bounded()
async def test_slow_application_trips_the_timeout_then_the_client_recovers(
    targets: list[Target],
) -> None:
    async def check(target: Target) -> None:
        async with target.client() as client:
            await hello_works(client, target)  # multiplexing decided, a connection kept
            started = anyio.current_time()
            with pytest.raises(ReadTimeout) as info:
                await client.request(target.params("sleep", query="s=2"), timeout=1)
            elapsed = anyio.current_time() - started
            assert elapsed < 2.5
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value, TimeoutException)
            assert target.shown in str(info.value)
            await hello_works(client, target)
            pool_is_clean(client)

    await on_each(targets, check)


@bounded()
async def test_a_trickle_cannot_outlive_the_total_timeout(targets: list[Target]) -> None:
    # One byte every 0.3 s: each read is well within read=1, the whole is not.
    limits = Timeout(read=1, total=2)

    async def by_request(client: AsyncClient, target: Target) -> None:
        params = target.params("trickle", query="n=20&interval=0.3")
        started = anyio.current_time()
        with pytest.raises(ReadTimeout) as info:
            await client.request(params, timeout=limits)
        elapsed = anyio.current_time() - started
        # The read timeout did not fire (bytes kept coming); the total did, on time.
        assert 1.0 < elapsed < 3.0
        assert "total" in str(info.value)
        assert target.shown in str(info.value)

    async def by_stream(client: AsyncClient, target: Target) -> None:
        params = target.params("trickle", query="n=20&interval=0.3")
        got = bytearray()
        started = anyio.current_time()
        with pytest.raises(ReadTimeout) as info:
            async with client.stream(params, timeout=limits) as r:
                assert r.status == 200
                async for chunk in r.aiter_body():
                    got.extend(chunk)
        elapsed = anyio.current_time() - started
        assert 1.0 < elapsed < 3.0
        assert 0 < len(got) < 20 and set(got) == {ord("x")}
        assert "total" in str(info.value)
        assert target.shown in str(info.value)

    async def check(target: Target) -> None:
        async with target.client() as client:
            await hello_works(client, target)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(by_request, client, target)
                tasks.start_soon(by_stream, client, target)
            await hello_works(client, target)
            pool_is_clean(client)

    await on_each(targets, check)


def cancel_count() -> int:
    """asyncio: how many cancellations of this task are pending; a scope must leave none.

    Python 3.10's tasks do not count them (``Task.cancelling()`` came in 3.11):
    there only the checkpoint after each scope shows that none was left.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio
        return 0
    if task is None or sys.version_info < (3, 11):
        return 0
    return task.cancelling()


async def slow_call(client: AsyncClient, target: Target, via: str) -> None:
    """A call that takes 2.5 s unless something cuts it short."""
    params = target.params("sleep", query="s=2.5")
    if via == "stream":
        async with client.stream(params) as r:
            await r.aread()
    else:
        await client.request(params)


@bounded()
async def test_fail_after_and_move_on_after_around_a_call(targets: list[Target]) -> None:
    async def under_fail_after(client: AsyncClient, target: Target, via: str) -> None:
        pending = cancel_count()
        started = anyio.current_time()
        with pytest.raises(TimeoutError) as info:
            with anyio.fail_after(1):
                await slow_call(client, target, via)
        assert anyio.current_time() - started < 2.4
        # anyio's own TimeoutError, not one of the client's timeouts.
        assert type(info.value) is TimeoutError, repr(info.value)
        assert cancel_count() == pending
        await anyio.sleep(0)  # a checkpoint: no stray cancellation is left for us

    async def under_move_on_after(client: AsyncClient, target: Target, via: str) -> None:
        pending = cancel_count()
        reached = False
        started = anyio.current_time()
        with anyio.move_on_after(1) as scope:
            await slow_call(client, target, via)
            reached = True
        assert scope.cancelled_caught
        assert not reached
        assert anyio.current_time() - started < 2.4
        assert cancel_count() == pending
        await anyio.sleep(0)

    async def check(target: Target) -> None:
        async with target.client() as client:
            await hello_works(client, target)
            async with anyio.create_task_group() as tasks:
                for via in ("request", "stream"):
                    tasks.start_soon(under_fail_after, client, target, via)
                    tasks.start_soon(under_move_on_after, client, target, via)
            await hello_works(client, target)
            pool_is_clean(client)

    await on_each(targets, check)


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_pool_timeout_when_every_connection_is_busy(target: Target) -> None:
    # Go multiplexes request()s; forced off, it has a pool like php-fpm's.
    async with target.client(max_connections=1, multiplex=False) as client:
        async with client.stream(target.params("hello")) as held:
            assert held.status == 200
            started = anyio.current_time()
            with pytest.raises(PoolTimeout) as info:
                await client.request(
                    target.params("hello"), timeout=Timeout(connect=5, read=5, write=5, pool=0.1)
                )
            assert anyio.current_time() - started < 2.5
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value, TimeoutException)
            assert target.shown in str(info.value)
            with pytest.raises(PoolTimeout):
                async with client.stream(target.params("hello"), timeout=Timeout(pool=0.1)):
                    pass  # pragma: no cover
            assert await held.aread() == peers.HELLO_BODY
        # The slot is free again.
        await hello_works(client, target, timeout=Timeout(pool=5))
        pool_is_clean(client)


@pytest.mark.parametrize("target", GO, indirect=True)
@bounded()
async def test_go_request_does_not_wait_for_a_held_stream(target: Target) -> None:
    before = open_sockets()
    async with target.client(max_connections=1) as client:
        await hello_works(client, target)  # now multiplexing
        async with client.stream(target.params("hello")) as held:
            assert held.status == 200
            # With a plain pool of one this would wait for `held`; Go multiplexes.
            await hello_works(client, target, timeout=Timeout(pool=0.2, read=5))
            assert await held.aread() == peers.HELLO_BODY
            assert len(open_sockets() - before) == 2  # stream() has its own
    assert open_sockets() - before == set()


# --- cancellation at any point ---


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_cancelled_while_waiting_for_the_pool(target: Target) -> None:
    before = open_sockets()
    async with target.client(max_connections=1, multiplex=False) as client:
        async with client.stream(target.params("hello")) as held:
            assert held.status == 200
            with anyio.move_on_after(0.15) as scope:
                await client.request(target.params("hello"))
            assert scope.cancelled_caught
            assert client._pool.open == 1  # only `held`: the waiter took nothing
            assert await held.aread() == peers.HELLO_BODY
        pool_is_clean(client)
        await hello_works(client, target, timeout=Timeout(pool=2, read=10))
        assert len(open_sockets() - before) == 1
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_a_waiter_cancelled_as_the_connection_is_released_does_not_strand_the_next(
    target: Target,
) -> None:
    # Two tasks wait for the only connection; the first is cancelled in the very
    # step that the connection comes back (it was told, but never takes it).
    # The second must get the connection, not sit until its pool timeout.
    got: list[Response] = []
    async with target.client(max_connections=1, multiplex=False) as client:
        first = anyio.CancelScope()

        async def first_waiter() -> None:
            with first:
                await client.request(target.params("hello"))

        async def second_waiter() -> None:
            got.append(await client.request(target.params("hello"), timeout=Timeout(pool=5)))

        async with anyio.create_task_group() as tasks:
            async with client.stream(target.params("hello")) as held:
                tasks.start_soon(first_waiter)
                await anyio.sleep(0.1)
                tasks.start_soon(second_waiter)
                await anyio.sleep(0.1)
                assert client._pool.open == 1
                assert await held.aread() == peers.HELLO_BODY
            first.cancel()  # no checkpoint since the release
        assert len(got) == 1 and got[0].status == 200
        pool_is_clean(client)
        await hello_works(client, target)


@pytest.mark.parametrize("target", ["php-unix"], indirect=True)
@bounded()
async def test_a_connection_released_as_a_waiter_arrives_reaches_it(target: Target) -> None:
    # The release falls at different points of the waiter's way into the pool
    # (trio runs ready tasks in a random order, so several tries).
    stalls: list[int] = []
    async with target.client(max_connections=1, multiplex=False) as client:
        await hello_works(client, target)
        for attempt in range(60):
            done = anyio.Event()

            async def waiter(done: anyio.Event) -> None:
                await client.request(target.params("hello"), timeout=Timeout(pool=10, read=10))
                done.set()

            async with anyio.create_task_group() as tasks:
                async with client.stream(target.params("hello")) as held:
                    assert await held.aread() == peers.HELLO_BODY
                    tasks.start_soon(waiter, done)
                    for _ in range(attempt % 4):
                        await anyio.sleep(0)
                # The connection is back in the pool: the waiter takes it at once.
                with anyio.move_on_after(1):
                    await done.wait()
                if not done.is_set():
                    stalls.append(attempt)
                    tasks.cancel_scope.cancel()
            pool_is_clean(client)
            if stalls:
                break
    assert stalls == [], f"the waiter sat idle for 1 s beside a free connection: try {stalls}"


@contextlib.contextmanager
def silent_tcp_listener() -> Iterator[str]:
    """A TCP address whose listener never accepts, its queue full: a connect there hangs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):  # Linux queues backlog + 1; then it drops SYNs
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield f"127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("multiplex", [None, False], ids=["probing", "not-probing"])
@bounded()
async def test_cancelled_while_connecting(multiplex: bool | None) -> None:
    with silent_tcp_listener() as address:
        fds = fd_count()
        async with AsyncClient(address, max_connections=1, multiplex=multiplex) as client:
            for _ in range(2):
                with anyio.move_on_after(0.2) as scope:
                    await client.request({"REQUEST_METHOD": "GET"})
                assert scope.cancelled_caught
                assert client._pool.open == 0  # the slot came back
                assert fd_count() == fds  # the half-open socket was closed
            assert client.multiplex is multiplex  # nothing decided by a cancelled probe
            # The slot is free: a connect timeout, not a wait for the pool.
            with pytest.raises(ConnectTimeout) as info:
                await client.request(
                    {"REQUEST_METHOD": "GET"}, timeout=Timeout(connect=0.2, pool=0.2)
                )
            assert address in str(info.value)
            assert isinstance(info.value, TimeoutError)
        assert fd_count() == fds


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_cancelled_before_anything_happens(target: Target) -> None:
    before = open_sockets()
    async with target.client() as client:
        for round_ in range(2):  # before and after multiplexing is decided
            with anyio.CancelScope() as scope:
                scope.cancel()
                await client.request(target.params("hello"))
            assert scope.cancelled_caught
            with anyio.move_on_after(0) as scope:
                async with client.stream(target.params("hello")):
                    pass  # pragma: no cover
            assert scope.cancelled_caught
            with anyio.move_on_after(0) as scope:
                await client.get_values()
            assert scope.cancelled_caught
            pool_is_clean(client)
            await hello_works(client, target)
            assert round_ == 1 or client.multiplex is (target.kind == "go")
        assert len(open_sockets() - before) == 1
    assert open_sockets() - before == set()


@pytest.mark.parametrize("via", ["request", "stream"])
@bounded()
async def test_cancelled_halfway_through_sending_the_body(targets: list[Target], via: str) -> None:
    async def check(target: Target) -> None:
        body = payload(200 * 64 * KiB, seed=11)
        consumed: list[int] = []
        sent_some = anyio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            # Like a body read from another stream: a pause between chunks,
            # and a cleanup that takes a moment (closing that stream).
            try:
                for start in range(0, len(body), 64 * KiB):
                    consumed.append(start)
                    if len(consumed) == 5:
                        sent_some.set()
                    yield body[start : start + 64 * KiB]
                    await anyio.sleep(0.02)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.05)

        async with target.client() as client:
            await hello_works(client, target)
            scope = anyio.CancelScope()

            async def upload() -> None:
                with scope:
                    if via == "stream":
                        async with client.stream(target.echo(body), stdin=slow_body()) as r:
                            await r.aread()
                    else:
                        await client.request(target.echo(body), stdin=slow_body())
                    pytest.fail("the upload was not cancelled")

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(upload)
                await sent_some.wait()
                scope.cancel()
            assert scope.cancelled_caught
            pulled = len(consumed)
            assert 5 <= pulled < 200
            await anyio.sleep(0.1)
            assert len(consumed) == pulled  # nobody reads the body any more
            pool_is_clean(client)
            if client._mux is not None:
                assert client._mux.usable  # an abort, not a lost connection
                assert client._mux._inboxes == {}
            # The next requests, with a body sent apart too, are fine.
            await hello_works(client, target)
            again = payload(300 * KiB, seed=12)
            echo_check(await client.request(target.echo(again), stdin=again), again)
            # One connection kept; Go's sockets also count the other targets'.
            if target.kind == "php":
                assert client._pool.open == 1

    before = open_sockets()
    with unraisables() as garbage:
        await on_each(targets, check)
    assert garbage == []  # nothing was left for the garbage collector to close
    assert open_sockets() - before == set()


@bounded()
async def test_cancelled_halfway_through_the_response(targets: list[Target]) -> None:
    size = 16 * MiB
    expected = peers.big_body(size)

    async def check(target: Target) -> None:
        async with target.client() as client:
            await hello_works(client, target)
            # In stream(), after the first chunk.
            got = 0
            with anyio.CancelScope() as scope:
                async with client.stream(target.params("big", query=f"n={size}")) as r:
                    async for chunk in r.aiter_body():
                        assert chunk == expected[got : got + len(chunk)]
                        got += len(chunk)
                        scope.cancel()
            assert scope.cancelled_caught
            assert 0 < got < size
            pool_is_clean(client)
            await hello_works(client, target)
            # In request(), while the application is still answering.
            started = anyio.current_time()
            with anyio.move_on_after(0.5) as scope:
                await client.request(target.params("trickle", query="n=20&interval=0.1"))
            assert scope.cancelled_caught
            assert anyio.current_time() - started < 1.5
            pool_is_clean(client)
            if client._mux is not None:
                assert client._mux.usable  # an abort, not a lost connection
                assert client._mux._inboxes == {}
            await hello_works(client, target)
            r2 = await client.request(target.params("big", query=f"n={MiB}"))
            assert r2.body == expected[:MiB]
            assert client._pool.open == (1 if target.kind == "php" else 0)

    before = open_sockets()
    await on_each(targets, check)
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_leaving_a_stream_early_drops_its_connection(target: Target) -> None:
    before = open_sockets()
    async with target.client(max_connections=1) as client:
        await hello_works(client, target)
        kept = open_sockets() - before
        # After the first chunk of a big body.
        async with client.stream(target.params("big", query=f"n={16 * MiB}")) as r:
            async for chunk in r.aiter_body():
                assert chunk
                break
        if target.kind == "php":
            # Not multiplexed: that connection was closed, not given back to the pool.
            assert open_sockets() - before == set()
        else:
            assert open_sockets() - before == kept  # the shared one stays
        pool_is_clean(client)
        # Before reading any of the body; and by an exception, which goes through as it is.
        async with client.stream(target.params("big", query=f"n={4 * MiB}")) as r:
            assert r.status == 200
        with pytest.raises(ZeroDivisionError):
            async with client.stream(target.params("big", query=f"n={4 * MiB}")) as r:
                _ = 1 / 0
        pool_is_clean(client)
        r2 = await client.request(target.params("hello"), timeout=Timeout(pool=2, read=10))
        assert r2.status == 200 and r2.body == peers.HELLO_BODY
        # A stream read to its end gives its connection back.
        async with client.stream(target.params("hello")) as r:
            assert await r.aread() == peers.HELLO_BODY
        assert len(open_sockets() - before) == (1 if target.kind == "php" else 2)
    assert open_sockets() - before == set()


class BodySourceFailed(Exception):
    pass


@bounded()
async def test_an_exception_from_the_body_iterable_reaches_the_caller(
    targets: list[Target],
) -> None:
    async def failing_body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await anyio.sleep(0.05)
        raise BodySourceFailed("the upload broke")

    async def call(client: AsyncClient, target: Target, via: str) -> None:
        params = target.params("echo", "POST", content_length=100_000)
        with pytest.raises(BodySourceFailed), anyio.fail_after(1):
            if via == "stream":
                async with client.stream(params, stdin=failing_body()) as r:
                    await r.aread()
            else:
                await client.request(params, stdin=failing_body())

    async def check(target: Target) -> None:
        async with target.client(timeout=Timeout(read=5, total=10)) as client:
            await hello_works(client, target)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call, client, target, "request")
                tasks.start_soon(call, client, target, "stream")
            pool_is_clean(client)
            await hello_works(client, target)

    await on_each(targets, check)


# --- a connection that dies the moment it is reused ---


@contextlib.asynccontextmanager
async def worker_that_exits_after_one_request() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An application like php-fpm with pm.max_requests = 1, where the client wins the race.

    Each connection answers one request (an echo of its body) and is kept
    open; when a second request's params arrive on it, it closes, as a worker
    that reached pm.max_requests does, before the client could see it go.
    Yields the address and the bodies that arrived whole.
    """
    bodies: list[bytes] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        conn = fcgiproto.ServerConnection()
        served = 0
        body = bytearray()
        async with stream:
            while True:
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, fcgiproto.Params) and served:
                        return  # the worker exits
                    if isinstance(event, fcgiproto.StdinData):
                        body += event.data
                    elif isinstance(event, fcgiproto.StdinEnd):
                        bodies.append(bytes(body))
                        head = b"Content-Type: application/octet-stream\r\n\r\n"
                        conn.send_stdout(event.request_id, head + body)
                        conn.end_request(event.request_id)
                        served += 1
                        body.clear()
                await stream.send(conn.data_to_send())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handle)
        try:
            yield f"127.0.0.1:{port}", bodies
        finally:
            tasks.cancel_scope.cancel()


def slow_start_body(data: bytes) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        await anyio.sleep(0.2)  # the first chunk takes a moment (read from elsewhere)
        yield data[:1000]
        yield data[1000:]

    return gen()


@pytest.mark.parametrize(
    "body_kind",
    [
        "small-bytes",
        "big-bytes",
        "slow-async-iterable",
    ],
)
@pytest.mark.parametrize("via", ["request", "stream"])
@bounded()
async def test_a_kept_connection_that_dies_when_reused(body_kind: str, via: str) -> None:
    body = payload(1000 if body_kind == "small-bytes" else 200 * KiB, seed=21)
    async with worker_that_exits_after_one_request() as (address, bodies):
        fds = fd_count()
        async with AsyncClient(
            address, multiplex=False, timeout=Timeout(read=0.5, total=5)
        ) as client:
            first = await client.request({"REQUEST_METHOD": "POST"}, stdin=b"first")
            assert first.body == b"first"
            stdin: Any = slow_start_body(body) if body_kind == "slow-async-iterable" else body
            # Either the request is sent again on a fresh connection (it got no
            # byte of response, and its body was not consumed) or it fails at
            # once with the transport error; never a hang, never a lost body.
            try:
                if via == "stream":
                    async with client.stream({"REQUEST_METHOD": "POST"}, stdin=stdin) as r:
                        received = await r.aread()
                else:
                    received = (await client.request({"REQUEST_METHOD": "POST"}, stdin=stdin)).body
            except (fcgiproto.ReadError, fcgiproto.WriteError):
                assert "bytes" not in body_kind, "a body in memory can always be sent again"
            else:
                assert received == body
                assert bodies[-1] == body
            pool_is_clean(client)
            # The client goes on.
            again = await client.request({"REQUEST_METHOD": "POST"}, stdin=b"again")
            assert again.body == b"again"
        # The server's ends of the connections close as it sees ours close.
        assert await eventually(lambda: fd_count() == fds), (fd_count(), fds)


# --- a cancellation storm ---


class Storm:
    """Requests cancelled at random moments; what happened to them."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.completed = 0
        self.cancelled = 0
        self.next_id = 0

    def deadline(self) -> float:
        """When to cancel: at once, within the exchange, or not at all.

        Not at all rather than late: on a loaded machine a late deadline
        still cut every exchange, leaving no completions to check.
        """
        kind = self.rng.random()
        if kind < 0.15:
            return 0.0
        if kind < 0.85:
            return self.rng.uniform(0.0, 0.006)
        return 30.0

    async def run(
        self, workers: int, per_worker: int, one: Callable[[int], Awaitable[None]]
    ) -> None:
        async def worker() -> None:
            for _ in range(per_worker):
                i, self.next_id = self.next_id, self.next_id + 1
                with anyio.move_on_after(self.deadline()) as scope:
                    await one(i)
                if scope.cancelled_caught:
                    self.cancelled += 1
                else:
                    self.completed += 1

        async with anyio.create_task_group() as tasks:
            for _ in range(workers):
                tasks.start_soon(worker)


@pytest.mark.parametrize("target", PHP, indirect=True)
@bounded()
async def test_cancellation_storm_on_a_php_fpm_pool(target: Target) -> None:
    before = open_sockets()
    storm = Storm(seed=1000)
    big = peers.big_body(128 * KiB)

    async def one(i: int) -> None:
        kind = i % 4
        if kind == 0:
            await hello_works(client, target)
        elif kind == 1:
            body = unique_payload(i, 16 + (i * 7919) % (60 * KiB))
            echo_check(await client.request(target.echo(body), stdin=body), body)
        elif kind == 2:
            async with client.stream(target.params("big", query=f"n={len(big)}")) as r:
                assert await r.aread() == big
        else:
            async with client.stream(target.params("hello")) as r:
                pass  # left before reading the body

    with unraisables() as garbage:
        async with target.client(max_connections=3) as client:
            await storm.run(workers=8, per_worker=125, one=one)
            assert storm.completed + storm.cancelled == 1000
            assert storm.completed > 20 and storm.cancelled > 20, vars(storm)
            pool_is_clean(client)
            assert client._pool.open <= 3
            # Every connection left in the pool works: as many at once as there
            # are idle ones (each takes one of them), then more.
            for _ in range(3):
                async with anyio.create_task_group() as tasks:
                    for _ in range(3):
                        tasks.start_soon(hello_works, client, target)
            for i in range(5):
                body = unique_payload(10_000 + i, 50 * KiB)
                echo_check(await client.request(target.echo(body), stdin=body), body)
            async with client.stream(target.params("big", query=f"n={len(big)}")) as r:
                assert await r.aread() == big
            pool_is_clean(client)
            assert 1 <= client._pool.open <= 3
            assert len(open_sockets() - before) == client._pool.open
    assert garbage == []
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", GO, indirect=True)
@bounded()
async def test_cancellation_storm_on_a_multiplexed_connection(target: Target) -> None:
    before = open_sockets()
    storm = Storm(seed=2000)

    # No get_values() in this storm: with questions left outstanding by
    # cancelled callers, Go's answers shift (see VALUES_TERMINATOR_SHIFT).
    async def one(i: int) -> None:
        if i % 10 == 9:
            async with client.stream(target.params("big", query=f"n={40 * KiB}")) as r:
                assert await r.aread() == peers.big_body(40 * KiB)
        else:
            # Every body is unique: a byte of another's response would show.
            body = unique_payload(i, 16 + (i * 7919) % (60 * KiB))
            echo_check(await client.request(target.echo(body), stdin=body), body)

    with unraisables() as garbage:
        async with target.client() as client:
            await hello_works(client, target)  # multiplexing decided
            mux = client._mux
            assert mux is not None
            await storm.run(workers=40, per_worker=25, one=one)
            assert storm.completed + storm.cancelled == 1000
            assert storm.completed > 20 and storm.cancelled > 20, vars(storm)
            assert client._mux is mux and mux.usable  # aborts, not a lost connection
            assert mux._inboxes == {}
            # Go answers each abort with END_REQUEST: nothing stays in flight.
            assert await eventually(lambda: not mux.proto.active_requests)
            pool_is_clean(client)
            bodies = {i: unique_payload(20_000 + i, 1000 + 313 * i) for i in range(50)}

            async def fresh(i: int) -> None:
                r = await client.request(target.echo(bodies[i]), stdin=bodies[i])
                echo_check(r, bodies[i])

            async with anyio.create_task_group() as tasks:
                for i in bodies:
                    tasks.start_soon(fresh, i)
            await hello_works(client, target)
            assert client._mux is mux
    assert garbage == []
    assert open_sockets() - before == set()


# --- connections that die, or never open ---


@pytest.mark.parametrize("target", ALL, indirect=True)
@bounded()
async def test_restarted_application_next_request_succeeds(target: Target) -> None:
    before = open_sockets()
    async with target.client(max_connections=1) as client:
        await hello_works(client, target)
        old = open_sockets() - before
        assert len(old) == 1
        await anyio.to_thread.run_sync(target.server.restart)
        await hello_works(client, target)
        # A body that cannot be sent twice goes through too: the dead
        # connection was not tried first.
        body = payload(200 * KiB, seed=3)
        stdin: Any = async_chunks(iter([body[:1000], body[1000:]]))
        echo_check(await client.request(target.echo(body), stdin=stdin), body)
        async with client.stream(target.params("hello")) as r:
            assert await r.aread() == peers.HELLO_BODY
        pool_is_clean(client)
        now = open_sockets() - before
        # The connection that died was closed; new ones are kept.
        assert now and not now & old
        assert len(now) == (1 if target.kind == "php" else 2)  # Go: shared + stream()'s
    assert open_sockets() - before == set()


@bounded()
async def test_refused_connection_is_a_connect_error_naming_the_address(tmp_path: Path) -> None:
    port = peers.free_port()
    path = str(peers.socket_dir(tmp_path) / "nobody-listens.sock")
    cases: list[tuple[Any, str]] = [
        (f"127.0.0.1:{port}", f"127.0.0.1:{port}"),
        (("127.0.0.1", port), f"127.0.0.1:{port}"),
        (path, f"unix:{path}"),
        (f"unix:{path}", f"unix:{path}"),
    ]
    fds = fd_count()
    for address, shown in cases:
        for multiplex in (None, False, True):
            async with AsyncClient(address, max_connections=1, multiplex=multiplex) as client:
                # Twice: a failed connect gives its pool slot back.
                for _ in range(2):
                    with pytest.raises(ConnectError) as info:
                        await client.request({"REQUEST_METHOD": "GET"}, timeout=Timeout(pool=0.5))
                    assert shown in str(info.value)
                    assert not isinstance(info.value, TimeoutError)
                with pytest.raises(ConnectError):
                    async with client.stream({"REQUEST_METHOD": "GET"}):
                        pass  # pragma: no cover
                with pytest.raises(ConnectError):
                    await client.get_values()
                assert client._pool.open == 0
    assert fd_count() == fds


@bounded()
async def test_an_application_that_never_answers_cannot_hold_up_the_first_request(
    tmp_path: Path,
) -> None:
    # Connections are queued by the kernel but never accepted: neither the
    # GET_VALUES that asks about multiplexing nor the request gets an answer.
    path = str(peers.socket_dir(tmp_path) / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)
        async with AsyncClient(path) as client:
            started = anyio.current_time()
            with pytest.raises(ReadTimeout) as info:
                await client.request({"REQUEST_METHOD": "GET"}, timeout=1)
            assert anyio.current_time() - started < 2.5
            assert f"unix:{path}" in str(info.value)
            pool_is_clean(client)


# --- misuse ---


@pytest.mark.parametrize("target", ["php-unix", "go-unix"], indirect=True)
@bounded()
async def test_a_client_outside_async_with_or_closed_refuses_calls(target: Target) -> None:
    fds = fd_count()
    client = target.client()
    for _ in range(2):
        with pytest.raises(LocalProtocolError) as info:
            await client.request(target.params("hello"))
        assert "async with" in str(info.value)
        with pytest.raises(LocalProtocolError):
            async with client.stream(target.params("hello")):
                pass  # pragma: no cover
        with pytest.raises(LocalProtocolError):
            await client.get_values()
        assert fd_count() == fds  # nothing was opened
        async with client:
            await hello_works(client, target)
        for _ in range(2):
            with pytest.raises(LocalProtocolError) as info:
                await client.request(target.params("hello"))
            assert "closed" in str(info.value)
            with pytest.raises(LocalProtocolError):
                async with client.stream(target.params("hello")):
                    pass  # pragma: no cover
            with pytest.raises(LocalProtocolError):
                await client.get_values()
        assert fd_count() == fds
        client = target.client()  # and the same again with a fresh one
    assert fd_count() == fds


@pytest.mark.parametrize("target", ["php-unix", "go-unix"], indirect=True)
@bounded()
async def test_a_call_in_flight_when_the_client_closes(target: Target) -> None:
    # aclose() closes the idle connections at once; a stream in progress
    # keeps its own, which closes as it ends.
    before = open_sockets()
    async with target.client(max_connections=1) as client:
        await hello_works(client, target)
        async with client.stream(target.params("big", query=f"n={MiB}")) as r:
            await client.aclose()
            assert await r.aread() == peers.big_body(MiB)
        with pytest.raises(LocalProtocolError):
            await client.request(target.params("hello"))
    assert open_sockets() - before == set()


# --- nothing left behind ---


def live_tasks() -> int:
    return len(anyio.get_running_tasks())


@bounded()
async def test_nothing_left_behind_after_async_with(targets: list[Target]) -> None:
    async def workload(target: Target) -> None:
        async with target.client(max_connections=3) as client:
            for _ in range(5):
                await hello_works(client, target)
            await client.get_values()
            async with client.stream(target.params("big", query=f"n={4 * MiB}")) as r:
                async for chunk in r.aiter_body():
                    assert chunk
                    break
            with pytest.raises(ReadTimeout):
                await client.request(
                    target.params("trickle", query="n=5&interval=0.4"), timeout=0.5
                )
            with anyio.move_on_after(0.05):
                await client.request(target.params("sleep", query="s=1"))

            async def work(i: int) -> None:
                body = payload(5000 + 1000 * i, seed=i)
                stdin: Any = body if i % 2 else async_chunks(iter([body[:100], body[100:]]))
                echo_check(await client.request(target.echo(body), stdin=stdin), body)

            async with anyio.create_task_group() as group:
                for i in range(8):
                    group.start_soon(work, i)
            async with client.stream(target.params("hello")) as s:
                assert await s.aread() == peers.HELLO_BODY

    fds, tasks = fd_count(), live_tasks()
    await on_each(targets, workload)
    assert live_tasks() == tasks
    assert fd_count() == fds
    with contextlib.suppress(RuntimeError):  # trio has no asyncio loop; anyio's count covers it
        assert len(asyncio.all_tasks()) == tasks


# --- GET_VALUES on a multiplexed connection, Go's way ---


def _record(rtype: int, rid: int, content: bytes = b"") -> bytes:
    return struct.pack(">BBHHBx", 1, rtype, rid, len(content), 0) + content


@bounded()
async def test_get_values_answers_stay_with_their_questions_when_records_interleave() -> None:
    # A server that multiplexes and answers as Go's net/http/fcgi does: each
    # GET_VALUES_RESULT followed by an empty one, written apart, so that a
    # record of another request (here an END_REQUEST) can fall in between.
    mpxs = _record(10, 0, bytes([15, 1]) + b"FCGI_MPXS_CONNS1")
    terminator = _record(10, 0)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        buffer = b""
        questions = 0
        request_done = False
        rid_of_request = 0
        async with stream:
            while questions < 2 or not request_done:
                try:
                    buffer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                while len(buffer) >= 8:
                    _, rtype, rid, clen, plen = struct.unpack_from(">BBHHBx", buffer)
                    if len(buffer) < 8 + clen + plen:
                        break
                    buffer = buffer[8 + clen + plen :]
                    questions += rtype == 9  # GET_VALUES
                    request_done = request_done or (rtype == 5 and clen == 0)  # end of STDIN
                    if rtype == 1:  # BEGIN_REQUEST
                        rid_of_request = rid
            head = b"Content-Type: text/plain\r\n\r\nok"
            await stream.send(
                mpxs
                + _record(6, rid_of_request, head)
                + _record(6, rid_of_request)
                + _record(3, rid_of_request, struct.pack(">IB3x", 0, 0))
                + terminator
                + mpxs
                + terminator
            )
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await stream.receive()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    answers: list[dict[str, str]] = []
    bodies: list[bytes] = []
    async with listener, anyio.create_task_group() as server:
        server.start_soon(listener.serve, handle)
        async with AsyncClient(f"127.0.0.1:{port}", multiplex=True, timeout=3) as client:

            async def ask() -> None:
                answers.append(await client.get_values(["FCGI_MPXS_CONNS"]))

            async def get() -> None:
                bodies.append((await client.request({"REQUEST_METHOD": "GET"})).body)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(get)
                await anyio.sleep(0.05)
                tasks.start_soon(ask)
                await anyio.sleep(0.05)
                tasks.start_soon(ask)
        server.cancel_scope.cancel()
    assert bodies == [b"ok"]
    assert answers == [{"FCGI_MPXS_CONNS": "1"}] * 2
