"""Each server limit at its edge, on both servers (and the blocking one multiplexing).

tests/test_attacks.py shows the limits holding, with their defaults, against
the attacks they are for; here each is set small and met exactly, or passed
by one, and what a well-behaved peer does near it still works.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from attacks import (
    PARAMS,
    SLEEP,
    STDIN,
    begin,
    open_socket,
    pair,
    params_records,
    record,
    request,
)
from test_attacks import SERVERS

from fcgiproto import (
    DEFAULT_MAX_PARAMS_PAIRS,
    ReadError,
    RemoteProtocolError,
    ServerConnection,
    WriteError,
)
from fcgiproto.support import ServerOptions
from fcgiproto_socket import Client

SHORT = 0.5  # the timeouts set here
PATIENCE = 15.0  # far beyond them: what a test waits before calling it a hang
ROOMY = 3.0  # where a timeout must not strike: far from what a loaded machine may take


def start(kind: str, listen: str, **options: Any) -> Any:
    return SERVERS[kind](listen, **options)


def closed_after(sock: Any) -> float:
    """Seconds until the server closes `sock`, reading (and dropping) what it sends."""
    started = time.monotonic()
    sock.settimeout(PATIENCE)
    while True:
        try:
            if not sock.recv(1 << 20):
                break
        except ConnectionResetError:
            break
    return time.monotonic() - started


def answer_of(sock: Any, until: bytes) -> bytes:
    sock.settimeout(PATIENCE)
    answer = b""
    while until not in answer:
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    return answer


def get(script: str) -> dict[str, str]:
    return {"SCRIPT_NAME": script, "REQUEST_METHOD": "GET"}


# --- timeouts ---


def test_params_that_do_not_end_in_time_close_the_connection(kind: str, listen: str) -> None:
    with start(kind, listen, params_timeout=SHORT) as address, open_socket(address) as sock:
        sock.sendall(begin() + record(PARAMS, 1, pair(b"SCRIPT_NAME", b"/hello")))
        waited = closed_after(sock)
    assert SHORT * 0.8 < waited < PATIENCE


def test_params_that_end_in_time_are_served(kind: str, listen: str) -> None:
    with start(kind, listen, params_timeout=ROOMY) as address, open_socket(address) as sock:
        wire = request()
        sock.sendall(wire[:20])
        time.sleep(ROOMY / 6)
        sock.sendall(wire[20:])
        assert b"hello" in answer_of(sock, b"hello")


def test_a_silent_connection_is_closed_after_the_idle_timeout(kind: str, listen: str) -> None:
    with start(kind, listen, idle_timeout=SHORT) as address, open_socket(address) as sock:
        sock.sendall(request())
        answer_of(sock, b"hello")  # a request, then silence between requests
        waited = closed_after(sock)
    assert SHORT * 0.8 < waited < PATIENCE


def test_a_body_that_stops_coming_is_closed_after_the_idle_timeout(kind: str, listen: str) -> None:
    with start(kind, listen, idle_timeout=SHORT) as address, open_socket(address) as sock:
        head = begin() + record(PARAMS, 1, pair(b"SCRIPT_NAME", b"/size")) + record(PARAMS, 1)
        sock.sendall(head + record(STDIN, 1, b"part of a body"))
        waited = closed_after(sock)
    assert SHORT * 0.8 < waited < PATIENCE


def test_an_app_running_longer_than_the_idle_timeout_is_not_cut(kind: str, listen: str) -> None:
    assert SLEEP > 1.5 * SHORT
    with start(kind, listen, idle_timeout=SHORT) as address, open_socket(address) as sock:
        sock.sendall(request(b"/sleep"))
        assert b"slept" in answer_of(sock, b"slept")


def test_a_client_that_stops_reading_is_closed_after_the_send_timeout(
    kind: str, listen: str
) -> None:
    with start(kind, listen, send_timeout=SHORT) as address, open_socket(address) as sock:
        sock.sendall(request(b"/big"))
        time.sleep(SHORT * 3 + 0.5)  # not reading: the server's sends wait, then give up
        received = 0
        sock.settimeout(PATIENCE)
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:  # closed with our request's records unread
            pass
    assert received < 40 << 20  # cut short: /big is 50 MiB


def test_a_client_that_reads_slowly_is_not_cut(kind: str, listen: str) -> None:
    """The send timeout is for one send that does not move, not for a whole slow response."""
    send_timeout = 1.0
    with (
        start(kind, listen, send_timeout=send_timeout) as address,
        Client(address, timeout=PATIENCE) as client,
        client.stream(get("/big")) as response,
    ):
        got = 0
        slow_until = time.monotonic() + 2 * send_timeout
        for chunk in response.iter_body():
            got += len(chunk)
            if time.monotonic() < slow_until:
                time.sleep(0.02)  # slower than the server, never a send_timeout behind
        assert got == 50 << 20


# --- sizes ---


@pytest.mark.parametrize("limit", [0, 1000])
def test_max_body_size_at_its_edge(kind: str, listen: str, limit: int) -> None:
    with (
        start(kind, listen, max_body_size=limit) as address,
        Client(address, timeout=PATIENCE) as client,
    ):
        params = {**get("/size"), "REQUEST_METHOD": "POST"}
        assert client.request(params, b"x" * limit).body == b"%d" % limit
        refused = client.request(params, b"x" * (limit + 1))
        assert refused.status == 413
        assert refused.app_status == 1
        assert client.request(params, b"y" * limit).body == b"%d" % limit  # goes on


def test_max_params_pairs_at_its_edge(kind: str, listen: str) -> None:
    with (
        start(kind, listen, max_params_pairs=10) as address,
        Client(address, timeout=PATIENCE) as client,
    ):
        eight = {f"X{n}": "v" for n in range(8)}
        assert client.request({**get("/hello"), **eight}).body == b"hello"
        with pytest.raises((ReadError, WriteError)):  # the connection is closed
            client.request({**get("/hello"), **eight, "X8": "v"})
        assert client.request(get("/hello")).body == b"hello"


def test_max_unsent_size_bounds_the_pieces_of_a_big_chunk(kind: str, listen: str) -> None:
    # /big yields 256 KiB chunks; with a 4 KiB limit they go out in 64 pieces.
    with (
        start(kind, listen, max_unsent_size=4096) as address,
        Client(address, timeout=PATIENCE) as client,
        client.stream(get("/big")) as response,
    ):
        assert sum(len(chunk) for chunk in response.iter_body()) == 50 << 20


def test_max_connections_gives_the_idlest_way(kind: str, listen: str) -> None:
    with (
        start(kind, listen, max_connections=2) as address,
        open_socket(address) as oldest,
        open_socket(address) as newer,
    ):
        for sock in (oldest, newer):  # served, then idle between requests
            sock.sendall(request())
            answer_of(sock, b"hello")
            time.sleep(0.05)
        with open_socket(address) as third:
            third.sendall(request())
            assert b"hello" in answer_of(third, b"hello")  # at once
            assert closed_after(oldest) < PATIENCE  # the idlest gave way
            newer.sendall(request())
            assert b"hello" in answer_of(newer, b"hello")


def test_a_connection_that_gives_way_gives_back_its_request_slots(kind: str, listen: str) -> None:
    """Evicted half-requests free their slots at once: the new request is not OVERLOADED."""
    with start(kind, listen, max_connections=2, max_requests=2) as address:
        half = begin() + record(PARAMS, 1, pair(b"SCRIPT_NAME", b"/hello"))
        with open_socket(address) as first, open_socket(address) as second:
            for sock in (first, second):
                sock.sendall(half)
            time.sleep(0.1)  # both read: every request slot is held
            for _ in range(3):
                with open_socket(address) as newcomer:
                    newcomer.sendall(request())
                    answer = answer_of(newcomer, b"hello")
                    assert b"Status: 5" not in answer.split(b"\r\n\r\n")[0], answer


# --- the options themselves ---


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"params_timeout": 0}, ValueError),
        ({"idle_timeout": -1}, ValueError),
        ({"send_timeout": math.nan}, ValueError),
        ({"send_timeout": "5"}, TypeError),
        ({"max_params_pairs": 0}, ValueError),
        ({"max_unsent_size": 1.5}, TypeError),
        ({"max_body_size": -1}, ValueError),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        ServerOptions(**options)


def test_a_timeout_can_be_turned_off() -> None:
    assert ServerOptions(idle_timeout=math.inf).idle_timeout == math.inf


# --- the core's part ---


def test_the_core_refuses_one_pair_too_many_before_decoding_the_rest() -> None:
    def params(pairs: int) -> bytes:
        return begin() + params_records(1, pair(b"A", b"") * pairs) + record(PARAMS, 1)

    server = ServerConnection()
    assert server.max_params_pairs == DEFAULT_MAX_PARAMS_PAIRS == 1000
    events = server.receive_data(params(1000))
    assert len(events[-1].params) == 1  # type: ignore[attr-defined]  # the same name, kept once
    with pytest.raises(RemoteProtocolError, match="more than 1000 name/value pairs"):
        ServerConnection().receive_data(params(1001))


def test_the_core_bounds_params_held_across_a_multiplexed_connection() -> None:
    server = ServerConnection(multiplex=True, max_params_size=1000)
    half = pair(b"X", b"v" * 480)  # 486 bytes
    server.receive_data(begin(1) + record(PARAMS, 1, half) + begin(2) + record(PARAMS, 2, half))
    with pytest.raises(RemoteProtocolError, match="requests of this connection exceed"):
        server.receive_data(record(PARAMS, 2, pair(b"Y", b"v" * 60)))


def test_the_core_counts_what_it_drops_for_requests_that_are_over() -> None:
    server = ServerConnection(max_params_size=1000)
    server.receive_data(begin(1) + record(PARAMS, 1) + record(STDIN, 1, b"x" * 100))
    server.send_stdout(1, b"Status: 413 Content Too Large\r\n\r\n")
    server.end_request(1, 1)
    assert server.dropped_size == 0
    server.receive_data(record(STDIN, 1, b"y" * 300) + record(STDIN, 1, b"z" * 20))
    assert server.dropped_size == 320
