"""Each attack of tests/attacks.py against each server, with default options.

The servers: fcgiproto_socket's Server without and with multiplexing, and
fcgiproto_anyio's serve on asyncio, on TCP loopback and a Unix socket. While
an attack runs, a well-behaved client keeps making requests on fresh
connections and every one must succeed; the server's memory must stay within
what its limits allow; once the attack is over, its file descriptors and
threads are back where they were. How fast the good client is served during
each attack is measured by benchmarks/attacks.py, not here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from attacks import (
    EndlessStdin,
    GoodClient,
    HalfRequests,
    HeaderSitters,
    ManyPairs,
    MiB,
    MultiplexedParams,
    NonReaders,
    Tricklers,
    ValuesFlood,
    async_app,
    blocking_app,
    open_socket,
    request,
    rss,
    wsgi_app,
)
from helpers import serving_anyio, serving_blocking, serving_wsgi

from fcgiproto_socket import Address

#: How long each attack holds while the good client makes its requests (one
#: every 50 ms): the attack is in full force from the first request on, which
#: waited behind it; benchmarks/attacks.py holds longer to measure latencies.
HOLD = 0.5
#: How long the first request, behind a thousand connections in the backlog, may take.
BACKLOG_PATIENCE = 30.0
#: Far longer than anything here takes: what a test waits before calling it a hang.
PATIENCE = 10.0


SERVERS = {
    "blocking": functools.partial(serving_blocking, blocking_app, multiplex=False),
    "blocking-mux": functools.partial(serving_blocking, blocking_app, multiplex=True),
    "anyio": functools.partial(serving_anyio, async_app),
    # serve_wsgi with one thread: every connection read, every app run, by one thread.
    "wsgi-one-thread": functools.partial(serving_wsgi, wsgi_app, threads=1),
}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled(condition: Any, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> None:
    """A thousand attackers and the server's side of them: 2,000 descriptors and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
def server(kind: str, listen: str) -> Iterator[Address]:
    """A server with default options, warmed up; checks fds and threads come back after."""
    with SERVERS[kind](listen) as address:
        GoodClient(address).one()  # warm: imports, first thread, first connection
        fds = open_fds()
        threads = set(threading.enumerate())
        yield address
        assert settled(lambda: open_fds() <= fds), (open_fds(), fds)
        assert settled(lambda: not set(threading.enumerate()) - threads), (
            set(threading.enumerate()) - threads
        )


def good_client_during(address: Address, attack: Any, hold: float = HOLD) -> GoodClient:
    good = GoodClient(address)
    with attack:
        # Behind the attack's connections in the listen backlog: served once
        # the server has been through them (about 0.5 s; benchmarks/attacks.py
        # measures it), which a loaded machine may take far longer to do.
        good.one(timeout=BACKLOG_PATIENCE)
        with good.running():
            time.sleep(hold)
    assert good.failures == [], good.failures
    assert len(good.latencies) >= 2  # it did make requests, behind the backlog and after
    return good


@pytest.mark.parametrize(
    "attack",
    [
        functools.partial(HeaderSitters, count=1000),
        functools.partial(Tricklers, count=1000),
        functools.partial(HalfRequests, count=1000),
    ],
    ids=["header-sitters", "tricklers", "half-requests"],
)
def test_a_thousand_connections_that_hold_a_request_open(server: Address, attack: Any) -> None:
    before = rss()
    good = good_client_during(server, attack(server))
    # The cap holds: 100 connections at most, each a thread or a task and a socket.
    assert good.peak_rss - before < 64 * MiB


def test_clients_that_never_read_their_responses(server: Address) -> None:
    before = rss()
    good = good_client_during(server, NonReaders(server, count=100))
    # 100 streams of 50 MB: the server holds a piece of each, not the responses.
    assert good.peak_rss - before < 128 * MiB


def test_answers_stop_the_reading_when_the_client_does_not_read_them(
    server: Address, kind: str
) -> None:
    flood = ValuesFlood(server)
    good = GoodClient(server)
    with flood, good.running():
        assert flood.blocked.wait(30)
        time.sleep(0.5)
        # The server stopped reading; over TCP the kernel may still widen the
        # flood's buffers a few times, so what counts is how much it took.
        taken = flood.sent
    assert good.failures == []
    # What the kernel buffers on both sides, plus max_unsent_size of answers:
    # far below the 64 MiB the flood would send to a server that read on.
    assert taken < 24 * MiB, taken


def test_params_made_of_many_tiny_pairs_are_refused(server: Address) -> None:
    before = rss()
    attack = ManyPairs(server, count=50)
    good = GoodClient(server)
    with attack, good.running():
        time.sleep(HOLD)
        assert settled(lambda: attack.closed_by_server() == 50)
    assert good.failures == [], good.failures
    # Each connection held at most 1 MiB of PARAMS, then was closed without
    # decoding 150,000 pairs (which cost about 26 MB each).
    assert good.peak_rss - before < 96 * MiB


def test_a_body_that_never_ends_is_refused_then_dropped_then_closed(server: Address) -> None:
    before = rss()
    attack = EndlessStdin(server, count=1)
    good = GoodClient(server)
    with attack, good.running():
        (sock,) = attack.socks
        answer = b""
        while b"Content Too Large" not in answer:  # at max_body_size, at once
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert b"Status: 413 Content Too Large" in answer
        # The server reads on and drops what comes, as a web server may still
        # be sending the body; past another max_body_size it closes.
        assert attack.cut.wait(PATIENCE)
        sock.settimeout(PATIENCE)
        with contextlib.suppress(ConnectionResetError):  # closed with our records unread
            assert sock.recv(65536) == b""  # closed, not merely slow to read
        time.sleep(HOLD)
    assert 16 * MiB <= attack.sent < 32 * MiB, attack.sent  # 8 MiB held, 8 dropped, buffers
    assert good.failures == [], good.failures
    assert good.peak_rss - before < 48 * MiB


def test_a_multiplexed_connection_cannot_hold_params_for_many_requests(
    server: Address, kind: str
) -> None:
    before = rss()
    attack = MultiplexedParams(server, count=1, ids=100)
    good = good_client_during(server, attack)
    if kind == "blocking-mux":  # closed once its requests hold more than 1 MiB together
        assert attack.sent <= 8 * MiB, attack.sent
    # Without multiplexing the second request is refused and its PARAMS dropped.
    assert good.peak_rss - before < 48 * MiB


def test_a_request_is_served_on_a_connection_that_waited_before_it(server: Address) -> None:
    # Being idle is allowed below the cap: a connection that sat a while still works.
    sock = open_socket(server)
    with sock:
        time.sleep(0.3)
        sock.sendall(request())
        answer = b""
        while b"hello" not in answer:
            chunk = sock.recv(65536)
            assert chunk
            answer += chunk
