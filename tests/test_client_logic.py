"""The client's own logic on the in-memory backend: pool, probe, retry, deadlines, expiry.

Fast and deterministic: no socket, no peer process, and on trio a MockClock
that jumps over every wait, so a 5 s expiry or a 2 s probe costs nothing. The
blocking client is generated from the same source; its share here runs the
paths that need no waiting. The real peers in the other test files stay the
proof of behaviour on the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

import fcgiproto
from fcgiproto.support import ApplicationPeer, PeerAnswer
from fcgiproto_anyio import AsyncClient, AsyncMemoryBackend, Timeout
from fcgiproto_socket import Client, MemoryBackend

ADDRESS = "unix:/in-memory.sock"
OK = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n"


def echo(params: dict[bytes, bytes], body: bytes) -> bytes:
    return OK + params.get(b"NAME", b"") + body


class DiesWhenReused:
    """An application that answers one request, then closes when the next arrives.

    As php-fpm after pm.max_requests, seen from a client that cannot tell the
    idle connection is gone until it writes.
    """

    def __init__(self) -> None:
        self.app = ApplicationPeer(echo, max_requests=1)

    def receive(self, data: bytes) -> PeerAnswer:
        if self.app.requests:
            return b"", True
        return self.app.receive(data)


class Silent:
    """An application that reads everything and never answers."""

    def receive(self, data: bytes) -> PeerAnswer:
        return b"", False


class IgnoresGetValues:
    """Answers requests, but never a GET_VALUES (as some libfcgi programs)."""

    def __init__(self) -> None:
        self.app = ApplicationPeer(echo, max_requests=1)

    def receive(self, data: bytes) -> PeerAnswer:
        if data[1] == fcgiproto.RecordType.GET_VALUES:
            return b"", False
        return self.app.receive(data)


# --- the blocking client: paths that do not wait ---


def test_blocking_client_keeps_one_connection_alive_across_requests() -> None:
    backend = MemoryBackend(lambda: ApplicationPeer(echo))
    with Client(ADDRESS, backend=backend) as client:
        for n in range(5):
            r = client.request({"NAME": f"n{n}"}, stdin=b"!")
            assert (r.status, r.body) == (200, f"n{n}!".encode())
    assert len(backend.streams) == 1
    assert backend.streams[0].closed  # closed with the client


def test_blocking_client_retries_once_on_a_kept_connection_that_died() -> None:
    backend = MemoryBackend(DiesWhenReused)
    with Client(ADDRESS, backend=backend, multiplex=False) as client:
        assert client.request({"NAME": "a"}).body == b"a"
        # The kept connection closes as the second request arrives: no byte
        # of an answer came, the body is in memory, so it goes again, fresh.
        assert client.request({"NAME": "b"}, stdin=b"body").body == b"bbody"
    assert len(backend.streams) == 2


def test_blocking_client_does_not_retry_a_body_it_has_consumed() -> None:
    backend = MemoryBackend(DiesWhenReused)
    with Client(ADDRESS, backend=backend, multiplex=False) as client:
        client.request({})
        with pytest.raises((fcgiproto.ReadError, fcgiproto.WriteError), match=r"in-memory\.sock"):
            client.request({}, stdin=iter([b"once", b"only"]))
        assert client.request({"NAME": "again"}).body == b"again"


def test_blocking_stream_reads_the_head_on_entry_and_replays_raw_stdout() -> None:
    backend = MemoryBackend(lambda: ApplicationPeer(echo))
    with (
        Client(ADDRESS, backend=backend) as client,
        client.stream({"NAME": "x"}, stdin=iter([b"1", b"2"])) as s,
    ):
        assert s.status == 200 and s.header("content-type") == "text/plain"
        assert b"".join(s.iter_stdout()) == OK + b"x12"


def test_blocking_client_sees_a_multiplexing_application() -> None:
    backend = MemoryBackend(lambda: ApplicationPeer(echo, multiplex=True, max_requests=10))
    with Client(ADDRESS, backend=backend) as client:
        assert client.request({"NAME": "m"}).body == b"m"
        assert client.multiplex is True
        assert client.get_values()["FCGI_MPXS_CONNS"] == "1"
    # The probe's connection, then the shared one.
    assert len(backend.streams) == 2


# --- the async client, on trio's MockClock: waits cost nothing ---


def run_with_mock_clock(test: Callable[[], object]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def test_idle_connections_expire_and_are_closed_by_the_reaper() -> None:
    async def main() -> None:
        backend = AsyncMemoryBackend(lambda: ApplicationPeer(echo))
        async with AsyncClient(ADDRESS, backend=backend, keepalive_expiry=5.0) as client:
            await client.request({})
            assert not backend.streams[0].closed
            await trio.sleep(4.9)
            assert not backend.streams[0].closed
            await trio.sleep(0.2)
            assert backend.streams[0].closed  # the worker it pinned is free again
            await client.request({})
            assert len(backend.streams) == 2

    run_with_mock_clock(main)


def test_a_silent_application_meets_the_read_timeout_with_the_address_named() -> None:
    async def main() -> None:
        backend = AsyncMemoryBackend(Silent)
        async with AsyncClient(ADDRESS, backend=backend, multiplex=False) as client:
            started = trio.current_time()
            with pytest.raises(fcgiproto.ReadTimeout, match=r"in-memory\.sock did not send"):
                await client.request({}, timeout=Timeout(read=3.0))
            assert trio.current_time() - started == pytest.approx(3.0)
            assert backend.streams[0].closed  # never back to the pool unanswered

    run_with_mock_clock(main)


def test_the_total_deadline_bounds_the_whole_request() -> None:
    async def main() -> None:
        backend = AsyncMemoryBackend(Silent)
        async with AsyncClient(ADDRESS, backend=backend, multiplex=False) as client:
            started = trio.current_time()
            with pytest.raises(fcgiproto.ReadTimeout, match=r"total timeout of 1\.5s"):
                await client.request({}, timeout=Timeout(read=10.0, total=1.5))
            assert trio.current_time() - started == pytest.approx(1.5)

    run_with_mock_clock(main)


def test_a_full_pool_times_out_waiting_and_recovers() -> None:
    async def main() -> None:
        backend = AsyncMemoryBackend(lambda: ApplicationPeer(echo))
        limits = Timeout(pool=2.0)
        async with AsyncClient(
            ADDRESS, backend=backend, max_connections=1, multiplex=False, timeout=limits
        ) as client:
            async with client.stream({"NAME": "held"}) as held:
                started = trio.current_time()
                with pytest.raises(fcgiproto.PoolTimeout, match="1 in use"):
                    await client.request({})
                assert trio.current_time() - started == pytest.approx(2.0)
                assert await held.aread() == b"held"
            assert (await client.request({"NAME": "after"})).body == b"after"
            assert client._pool.open == 1

    run_with_mock_clock(main)


def test_waiters_for_a_full_pool_are_served_first_come_first_served() -> None:
    async def main() -> None:
        backend = AsyncMemoryBackend(lambda: ApplicationPeer(echo))
        order: list[int] = []
        async with AsyncClient(
            ADDRESS, backend=backend, max_connections=1, multiplex=False
        ) as client:
            async with client.stream({}) as held:

                async def wait_turn(n: int) -> None:
                    await trio.sleep(n)  # arrive in order 0, 1, 2, ...
                    await client.request({})
                    order.append(n)

                async with trio.open_nursery() as nursery:
                    for n in range(5):
                        nursery.start_soon(wait_turn, n)
                    await trio.sleep(5)  # all five are waiting by now
                    await held.aread()
                    await held.aclose()
            assert order == [0, 1, 2, 3, 4]

    run_with_mock_clock(main)


def test_an_application_that_ignores_get_values_costs_the_probe_wait_once() -> None:
    async def main() -> None:
        backend = AsyncMemoryBackend(IgnoresGetValues)
        async with AsyncClient(ADDRESS, backend=backend) as client:
            started = trio.current_time()
            assert (await client.request({"NAME": "first"})).body == b"first"
            assert trio.current_time() - started == pytest.approx(2.0)  # PROBE_WAIT
            assert client.multiplex is False
            started = trio.current_time()
            await client.request({})
            assert trio.current_time() - started == 0

    run_with_mock_clock(main)


def test_cancelled_while_waiting_for_the_pool_gives_the_turn_on() -> None:
    async def main() -> None:
        backend = AsyncMemoryBackend(lambda: ApplicationPeer(echo))
        async with AsyncClient(
            ADDRESS, backend=backend, max_connections=1, multiplex=False
        ) as client:
            async with client.stream({}) as held:
                with trio.move_on_after(1):
                    await client.request({})
                assert list(client._queue) == []  # the cancelled waiter left the queue
                await held.aread()
            assert (await client.request({"NAME": "next"})).body == b"next"

    run_with_mock_clock(main)


class AnswersAtParams:
    """A multiplexing application that answers each request once its PARAMS end, body unread.

    As an application that refuses a request (OVERLOADED) or knows its answer
    without the body: its END_REQUEST can reach the client's reader while the
    client is still sending the body.
    """

    def __init__(self) -> None:
        self.conn = fcgiproto.ServerConnection(multiplex=True, max_requests=10)

    def receive(self, data: bytes) -> PeerAnswer:
        for event in self.conn.receive_data(data):
            if isinstance(event, fcgiproto.Params):
                self.conn.send_stdout(event.request_id, OK + b"early")
                self.conn.end_request(event.request_id)
        return self.conn.data_to_send(), False


def endless_body() -> Iterator[bytes]:
    while True:
        yield b"x" * 100


def test_a_shared_connection_stops_sending_a_body_the_application_no_longer_wants() -> None:
    # Found by fuzz/fuzz_exchange.py: the body went on after the END_REQUEST,
    # and the next piece raised LocalProtocolError("request 1 is not active").
    async def main() -> None:
        backend = AsyncMemoryBackend(AnswersAtParams)
        async with AsyncClient(ADDRESS, backend=backend, multiplex=True) as client:
            r = await client.request({}, stdin=endless_body())
            assert r.body == b"early"
            assert (await client.request({}, stdin=[b"a", b"b"])).body == b"early"
            assert len(backend.streams) == 1

    run_with_mock_clock(main)


def test_blocking_shared_connection_stops_sending_a_body_the_application_no_longer_wants() -> None:
    backend = MemoryBackend(AnswersAtParams)
    with Client(ADDRESS, backend=backend, multiplex=True) as client:
        assert client.request({}, stdin=endless_body()).body == b"early"
        assert client.request({}, stdin=[b"a", b"b"]).body == b"early"
    assert len(backend.streams) == 1
