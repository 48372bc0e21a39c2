"""The blocking Client against the real peers: php-fpm and Go's net/http/fcgi.

Every test talks to a real application over a Unix socket and over TCP. Time
bounds are generous and only prove that a call ends; nothing here measures
speed. Connections are counted from our side, as the sockets this process has
open (/proc/self/fd), so the tests do not depend on the client's internals.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest

from fcgiproto import (
    ConnectError,
    FastCGIError,
    LocalProtocolError,
    PoolTimeout,
    ProtocolStatus,
    ReadTimeout,
    TimeoutException,
)
from fcgiproto_socket import Client, Response, Timeout
from tests.targets import (
    KiB,
    MiB,
    Target,
    echo_check,
    fd_count,
    make_target,
    md5,
    open_sockets,
    payload,
)

pytestmark = pytest.mark.peer


#: Limits for calls that must simply succeed: far above anything a healthy
#: peer needs, low enough that a hang fails the test instead of the suite.
SAFE = Timeout(connect=10, read=20, write=20, pool=20, total=60)
#: How long a group of threads may take before we call it a deadlock.
JOIN_BOUND = 45.0

PHP = ["php-unix", "php-tcp"]
GO = ["go-unix", "go-tcp"]
ALL = PHP + GO


# --- peers and helpers ---


def _target(request: pytest.FixtureRequest, name: str) -> Target:
    return make_target(request, name, Target)


@pytest.fixture
def target(request: pytest.FixtureRequest) -> Target:
    return _target(request, request.param)


@pytest.fixture
def make_client() -> Iterator[Callable[..., Client]]:
    """Clients that are closed after the test even when it fails.

    An idle kept-alive connection pins a php-fpm worker (4 per pool here), so
    a client left open by a failed test would starve the tests after it.
    """
    clients: list[Client] = []

    def make(address: Any, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout", SAFE)
        client = Client(address, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process stopped (every thread of it) for the duration; continued after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        # SIGSTOP is asynchronous: a thread may still run for a moment.
        deadline = time.monotonic() + 10
        while True:
            states = set()
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
                    states.add(stat.rpartition(")")[2].split()[0])
            if states <= {"T", "t"}:
                break
            assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
            time.sleep(0.005)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def run_threads(target_fn: Callable[[int], None], n: int) -> list[BaseException]:
    """Run target_fn(i) in n threads; the exceptions they raised. Fails on a hang."""
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            target_fn(i)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_BOUND
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [thread for thread in threads if thread.is_alive()]
    assert not alive, f"{len(alive)} of {n} threads still running after {JOIN_BOUND}s: deadlock?"
    return errors


# --- a plain GET ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_get_parses_status_headers_and_body(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    r = client.request(target.params("hello"))
    assert r.status == 200
    assert r.body == peers.HELLO_BODY
    assert r.header("content-type", "").startswith("text/plain")
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
def test_stream_gives_head_first_then_body_and_raw_stdout(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    with client.stream(target.params("hello")) as r:
        assert r.status == 200
        assert r.reason == "OK"
        assert any(name.lower() == "content-type" for name, _ in r.headers)
        assert r.read() == peers.HELLO_BODY
        with pytest.raises(LocalProtocolError):
            next(r.iter_stdout())
    assert r.app_status == 0
    assert r.protocol_status is ProtocolStatus.REQUEST_COMPLETE
    with client.stream(target.params("hello")) as r:
        raw = b"".join(r.iter_stdout())
    assert raw.endswith(b"\r\n\r\n" + peers.HELLO_BODY)
    assert raw.lower().count(b"content-type:") == 1


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("code", [404, 503])
def test_status_line_from_the_application(target: Target, make_client: Any, code: int) -> None:
    client = make_client(target.address)
    r = client.request(target.params("status", query=f"code={code}"))
    assert r.status == code
    assert r.reason == {404: "Not Found", 503: "Service Unavailable"}[code]
    assert r.body == f"status {code}".encode()
    assert r.app_status == 0


# --- request bodies ---


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("size", [0, 64 * KiB, 1 * MiB, 10 * MiB], ids=["0", "64K", "1M", "10M"])
def test_post_body_arrives_byte_exact(target: Target, make_client: Any, size: int) -> None:
    client = make_client(target.address)
    body = payload(size)
    r = client.request(target.params("echo", "POST", content_length=size), stdin=body)
    echo_check(r, body)


def chunked(body: bytes, sizes: list[int]) -> Iterator[bytes]:
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


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("via", ["stream", "request"])
def test_iterable_stdin_arrives_byte_exact(target: Target, make_client: Any, via: str) -> None:
    client = make_client(target.address)
    body = payload(sum(CHUNK_SIZES) + 12345, seed=7)
    params = target.params("echo", "POST", content_length=len(body))
    consumed: list[int] = []

    def chunks() -> Iterator[bytes]:
        for piece in chunked(body, CHUNK_SIZES):
            consumed.append(len(piece))
            yield piece

    if via == "stream":
        with client.stream(params, stdin=chunks()) as s:
            assert s.status == 200
            assert s.headers  # parsed before the body is read
            received = s.read()
            assert dict(s.headers)["X-Body-Md5"] == md5(body)
        assert received == body
    else:
        echo_check(client.request(params, stdin=chunks()), body)
    assert sum(consumed) == len(body)


# --- a large response, streamed ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_16_mib_response_is_streamed_in_chunks(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    size = 16 * MiB
    expected = peers.big_body(size)
    total = chunks = biggest = 0
    with client.stream(target.params("big", query=f"n={size}")) as r:
        assert r.status == 200
        assert dict((k.lower(), v) for k, v in r.headers)["x-body-length"] == str(size)
        for chunk in r.iter_body():
            assert chunk == expected[total : total + len(chunk)], f"wrong bytes at {total}"
            total += len(chunk)
            chunks += 1
            biggest = max(biggest, len(chunk))
    assert total == size
    assert chunks > 1
    assert biggest < size  # no chunk is the whole body: it streamed


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_streaming_a_response_holds_little_memory(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    client.request(target.params("hello"))  # connected, and multiplexing decided
    size = 32 * MiB
    tracemalloc.start()
    try:
        with client.stream(target.params("big", query=f"n={size}")) as r:
            first = next(r.iter_body())
            assert first
            time.sleep(1.0)  # a slow consumer: the application could send it all meanwhile
            held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 8 * MiB, f"{held / MiB:.1f} MiB held while the consumer waited"


# --- params ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_100_kib_of_params_arrive(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    extra = {f"X_TEST_{i:03d}": f"{i:03d}" + chr(65 + i % 26) * (KiB - 3) for i in range(100)}
    r = client.request(target.params("params", extra=extra))
    assert r.status == 200
    seen = json.loads(r.body)
    env = seen if target.kind == "php" else seen["env"]
    for name in ("X_TEST_000", "X_TEST_001", "X_TEST_050", "X_TEST_099"):
        assert env[name] == extra[name]
    assert all(env.get(name) == value for name, value in extra.items())


@pytest.mark.parametrize("target", PHP, indirect=True)
def test_params_as_bytes_round_trip_to_php(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    params: dict[Any, Any] = target.server.params("params.php", query="b64=1")
    params[b"X_BYTES"] = b"\xff\xfe caf\xc3\xa9 \x80"
    params["X_TEXT"] = "caf\u00e9 \u2603"
    r = client.request(params)
    seen = {
        base64.b64decode(k): base64.b64decode(v) if isinstance(v, str) else v
        for k, v in json.loads(r.body).items()
    }
    assert seen[b"X_BYTES"] == b"\xff\xfe caf\xc3\xa9 \x80"
    assert seen[b"X_TEXT"] == "caf\u00e9 \u2603".encode()


# --- php-fpm specifics: stderr, exit status, cookies ---


@pytest.mark.parametrize("target", PHP, indirect=True)
def test_stderr_is_kept_apart_from_stdout(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    r = client.request(target.params("stderr"))
    assert r.status == 200
    assert r.body == b"to stdout"
    assert b"to stderr" in r.stderr
    assert b"to stderr" not in r.stdout
    assert b"to stdout" not in r.stderr
    with client.stream(target.params("stderr")) as s:
        assert s.read() == b"to stdout"
    assert b"to stderr" in s.stderr


@pytest.mark.parametrize("target", PHP, indirect=True)
def test_exit_code_is_not_the_app_status_with_php_fpm(target: Target, make_client: Any) -> None:
    # exit(3) in a script: php-fpm still ends the request with app_status 0.
    client = make_client(target.address)
    r = client.request(target.params("exit"))
    assert r.status == 200
    assert r.body == b"exiting"
    assert r.app_status == 0
    assert r.protocol_status is ProtocolStatus.REQUEST_COMPLETE


@pytest.mark.parametrize("target", PHP, indirect=True)
def test_set_cookie_headers_in_order_and_location_302(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    r = client.request(target.params("cookies"))
    assert r.status == 302
    assert r.header("Location") == "/elsewhere"
    cookies = [value for name, value in r.headers if name.lower() == "set-cookie"]
    assert cookies == ["first=one", "second=two; path=/; HttpOnly"]
    assert r.body == b"moved"


# --- keep-alive and the pool ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_keep_alive_reuses_one_connection(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=1)
    seen: set[str] = set()
    pids = set()
    for _ in range(20):
        if target.kind == "php":
            r = client.request(target.params("pid"))
            pids.add(r.body)
        else:
            r = client.request(target.params("hello"))
            assert r.body == peers.HELLO_BODY
        assert r.status == 200
        now = open_sockets() - before
        assert len(now) == 1, f"{len(now)} connections open after a request"
        seen |= now
    assert len(seen) == 1, f"{len(seen)} different connections for 20 requests"
    if target.kind == "php":
        # One kept-alive connection is served by one worker throughout.
        assert len(pids) == 1
    client.close()
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_keepalive_expiry_replaces_an_idle_connection(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=1, keepalive_expiry=0.3)
    assert client.request(target.params("hello")).body == peers.HELLO_BODY
    first = open_sockets() - before
    assert len(first) == 1
    time.sleep(0.8)
    assert client.request(target.params("hello")).body == peers.HELLO_BODY
    second = open_sockets() - before
    assert len(second) == 1
    assert second != first, "the expired connection was used again"


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_an_expired_idle_connection_is_closed_without_another_call(
    target: Target, make_client: Any
) -> None:
    before = open_sockets()
    client = make_client(target.address, keepalive_expiry=0.2)
    assert client.request(target.params("hello")).status == 200
    assert len(open_sockets() - before) == 1
    time.sleep(1.0)
    assert open_sockets() - before == set()


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_a_slow_end_of_body_does_not_cost_the_connection(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=1)
    body = payload(10 * KiB, seed=5)
    seen: set[str] = set()

    def slow_eof() -> Iterator[bytes]:
        yield body
        time.sleep(0.3)  # the producer takes a moment to see its end (a file, an upload)

    for _ in range(3):
        params = target.params("echo", "POST", content_length=len(body))
        echo_check(client.request(params, stdin=slow_eof()), body)
        now = open_sockets() - before
        assert len(now) == 1, "the connection was not kept for the next request"
        seen |= now
    assert len(seen) == 1, f"{len(seen)} connections for 3 requests"


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_max_keepalive_zero_keeps_nothing_open(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_keepalive=0, multiplex=False)
    for _ in range(3):
        assert client.request(target.params("hello")).body == peers.HELLO_BODY
        assert open_sockets() - before == set()


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_50_threads_on_a_pool_of_3_all_get_their_own_answer(
    target: Target, make_client: Any
) -> None:
    # php-fpm has 4 workers per pool: a pool of 3 never waits for a worker.
    before = open_sockets()
    client = make_client(target.address, max_connections=3)
    results: dict[int, bytes] = {}
    bodies = {i: payload(1000 + 97 * i, seed=i) for i in range(50)}

    def work(i: int) -> None:
        for _ in range(2):
            body = bodies[i]
            r = client.request(target.params("echo", "POST", content_length=len(body)), body)
            echo_check(r, body)
            results[i] = r.body

    errors = run_threads(work, 50)
    assert errors == []
    assert results == bodies
    opened = open_sockets() - before
    if target.kind == "php":
        assert 1 <= len(opened) <= 3
    else:
        assert len(opened) == 1  # Go multiplexes: everything shared one connection


@pytest.mark.parametrize("target", PHP, indirect=True)
def test_pool_timeout_when_every_connection_is_busy(target: Target, make_client: Any) -> None:
    client = make_client(target.address, max_connections=1)
    held = threading.Event()
    release = threading.Event()
    holder_errors = []

    def hold() -> None:
        try:
            with client.stream(target.params("hello")) as r:
                assert r.status == 200
                held.set()
                release.wait(JOIN_BOUND)
        except BaseException as exc:  # pragma: no cover - reported below
            holder_errors.append(exc)
            held.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        assert held.wait(JOIN_BOUND)
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            client.request(
                target.params("hello"), timeout=Timeout(connect=5, read=5, write=5, pool=0.2)
            )
        elapsed = time.monotonic() - started
    finally:
        release.set()
        thread.join(JOIN_BOUND)
    assert holder_errors == []
    assert elapsed < 2.5
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, TimeoutException)
    assert target.shown in str(info.value)
    # The slot is free again.
    r = client.request(target.params("hello"), timeout=Timeout(pool=5))
    assert r.body == peers.HELLO_BODY


@pytest.mark.parametrize("target", PHP, indirect=True)
def test_a_waiter_gets_the_connection_when_it_is_released(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=1)
    got: list[Response] = []
    with client.stream(target.params("hello")) as r:
        assert r.status == 200
        waiter = threading.Thread(
            target=lambda: got.append(client.request(target.params("pid"))), daemon=True
        )
        waiter.start()
        time.sleep(0.3)
        assert not got  # it waits for the only connection
    waiter.join(JOIN_BOUND)
    assert len(got) == 1 and got[0].status == 200
    assert len(open_sockets() - before) == 1


@pytest.mark.parametrize("target", GO, indirect=True)
def test_go_requests_share_one_multiplexed_connection(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=1)
    assert client.request(target.params("hello")).status == 200  # multiplexing decided

    def work(i: int) -> None:
        # On a pool of one plain connection, all but one of these would wait
        # half a second for it, longer than their pool limit allows.
        limits = Timeout(connect=5, read=10, write=10, pool=0.2, total=30)
        assert client.request(target.params("sleep", query="s=0.5"), timeout=limits).body == (
            b"slept"
        )

    assert run_threads(work, 5) == []
    assert len(open_sockets() - before) == 1


@pytest.mark.parametrize("target", GO, indirect=True)
def test_a_stream_gets_a_connection_of_its_own_beside_the_shared_one(
    target: Target, make_client: Any
) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=2)
    assert client.request(target.params("hello")).status == 200  # the shared connection
    with client.stream(target.params("hello")) as held:
        assert held.status == 200
        assert client.request(target.params("hello")).body == peers.HELLO_BODY
        assert len(open_sockets() - before) == 2
        assert held.read() == peers.HELLO_BODY


# --- timeouts ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_slow_application_trips_the_timeout_then_the_client_recovers(
    target: Target, make_client: Any
) -> None:
    client = make_client(target.address)
    started = time.monotonic()
    with pytest.raises(ReadTimeout) as info:
        client.request(target.params("sleep", query="s=3"), timeout=1)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5
    assert isinstance(info.value, TimeoutError)
    assert target.shown in str(info.value)
    r = client.request(target.params("hello"))
    assert r.body == peers.HELLO_BODY


@pytest.mark.parametrize(
    ("target", "via"),
    [*((name, "stream") for name in ALL), *((name, "request") for name in GO)],
    indirect=["target"],
)
def test_a_trickle_cannot_outlive_the_total_timeout(
    target: Target, make_client: Any, via: str
) -> None:
    # One byte every 0.3 s: each read is well within read=1, the whole is not.
    # (request() on Go goes through the shared multiplexed connection.)
    client = make_client(target.address)
    client.request(target.params("hello"))
    params = target.params("trickle", query="n=20&interval=0.3")
    limits = Timeout(read=1, total=2)
    got = bytearray()
    started = time.monotonic()
    with pytest.raises(ReadTimeout) as info:
        if via == "stream":
            with client.stream(params, timeout=limits) as r:
                assert r.status == 200
                for chunk in r.iter_body():
                    got += chunk
        else:
            client.request(params, timeout=limits)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5
    assert elapsed > 1.0  # the read timeout did not fire: bytes kept coming
    if via == "stream":
        assert 0 < len(got) < 20 and set(got) == {ord("x")}
    assert "total" in str(info.value)
    assert target.shown in str(info.value)
    assert client.request(target.params("hello")).body == peers.HELLO_BODY


# --- connections that die, or never open ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_restarted_application_next_request_succeeds(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=1)
    assert client.request(target.params("hello")).body == peers.HELLO_BODY
    old = open_sockets() - before
    target.server.restart()
    assert client.request(target.params("hello")).body == peers.HELLO_BODY
    # A body that cannot be sent twice also goes through: the dead connection
    # was not tried first.
    body = payload(200 * KiB, seed=3)
    r = client.request(
        target.params("echo", "POST", content_length=len(body)),
        stdin=iter([body[:1000], body[1000:]]),
    )
    echo_check(r, body)
    now = open_sockets() - before
    # The connection that died was closed, and one new one is kept.
    assert len(now) == 1 and not now & old


def test_missing_unix_socket_is_a_connect_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody-listens.sock")
    for address in (path, f"unix:{path}"):
        with Client(address, max_connections=1) as client:
            # Twice: a failed connect gives its pool slot back.
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(ConnectError) as info:
                    client.request({"REQUEST_METHOD": "GET"}, timeout=Timeout(pool=0.5))
                assert time.monotonic() - started < 5
                assert f"unix:{path}" in str(info.value)
                assert not isinstance(info.value, TimeoutError)
            with pytest.raises(ConnectError):
                client.get_values()


def test_refused_tcp_connection_is_a_connect_error() -> None:
    port = peers.free_port()
    for address in (f"127.0.0.1:{port}", ("127.0.0.1", port)):
        with Client(address, max_connections=1) as client:
            for _ in range(2):
                with pytest.raises(ConnectError) as info:
                    client.request({"REQUEST_METHOD": "GET"}, timeout=Timeout(pool=0.5))
                assert f"127.0.0.1:{port}" in str(info.value)


def test_an_application_that_never_answers_cannot_hold_up_the_first_request(
    tmp_path: Path,
) -> None:
    # Connections are queued by the kernel but never accepted: neither the
    # GET_VALUES that asks about multiplexing nor the request gets an answer.
    path = str(peers.socket_dir(tmp_path) / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)
        with Client(path) as client:
            started = time.monotonic()
            with pytest.raises(ReadTimeout) as info:
                client.request({"REQUEST_METHOD": "GET"}, timeout=1)
            assert time.monotonic() - started < 2.5
            assert f"unix:{path}" in str(info.value)


# --- management records ---


@pytest.mark.parametrize("target", PHP, indirect=True)
def test_get_values_from_php_fpm(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address)
    for _ in range(3):
        # php-fpm answers only FCGI_MPXS_CONNS, whatever is asked.
        assert client.get_values() == {"FCGI_MPXS_CONNS": "0"}
        assert client.request(target.params("hello")).body == peers.HELLO_BODY
    assert client.get_values(["FCGI_MPXS_CONNS"]) == {"FCGI_MPXS_CONNS": "0"}
    assert len(open_sockets() - before) == 1  # get_values used the kept-alive connection


@pytest.mark.parametrize("target", GO, indirect=True)
def test_get_values_from_go_tolerates_its_extra_empty_record(
    target: Target, make_client: Any
) -> None:
    # Before any request (nothing decided yet), and after (multiplexing).
    client = make_client(target.address)
    for _ in range(3):
        assert client.get_values()["FCGI_MPXS_CONNS"] == "1"
        assert client.get_values(["FCGI_MPXS_CONNS"]) == {"FCGI_MPXS_CONNS": "1"}
        assert client.request(target.params("hello")).body == peers.HELLO_BODY


@pytest.mark.parametrize("target", GO, indirect=True)
def test_concurrent_get_values_on_a_multiplexed_client(target: Target, make_client: Any) -> None:
    client = make_client(target.address)
    client.request(target.params("hello"))  # now multiplexing
    results: list[object] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(client.get_values())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    # Go is paused so that the first GET_VALUES is certainly still waiting
    # when the second is asked.
    with paused(target.server._proc.process.pid):
        for thread in threads:
            thread.start()
            time.sleep(0.3)
    for thread in threads:
        thread.join(JOIN_BOUND)
    assert errors == []
    assert results == [{"FCGI_MPXS_CONNS": "1"}] * 2


# --- leaving a stream early ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_leaving_a_stream_early_drops_that_connection(target: Target, make_client: Any) -> None:
    before = open_sockets()
    client = make_client(target.address, max_connections=1)
    client.request(target.params("hello"))
    with client.stream(target.params("big", query=f"n={16 * MiB}")) as r:
        for chunk in r.iter_body():
            assert chunk
            break
    if target.kind == "php":
        # Not multiplexed: the connection was closed, not given back to the pool.
        assert open_sockets() - before == set()
    r2 = client.request(target.params("hello"), timeout=Timeout(pool=2, read=10))
    assert r2.status == 200 and r2.body == peers.HELLO_BODY
    assert len(open_sockets() - before) == 1


# --- address forms ---

ADDRESS_FORMS: dict[str, Callable[[Any], Any]] = {
    "unix-prefix": lambda s: f"unix:{s.unix_path}",
    "path": lambda s: s.unix_path,
    "pathlike": lambda s: Path(s.unix_path),
    "host-port": lambda s: s.tcp_address,
    "tuple": lambda s: (s.tcp_address.rpartition(":")[0], int(s.tcp_address.rpartition(":")[2])),
}


@pytest.mark.parametrize("kind", ["php", "go"])
@pytest.mark.parametrize("form", list(ADDRESS_FORMS))
def test_every_address_form(
    request: pytest.FixtureRequest, make_client: Any, kind: str, form: str
) -> None:
    target = _target(request, f"{kind}-unix")
    client = make_client(ADDRESS_FORMS[form](target.server))
    assert client.request(target.params("hello")).body == peers.HELLO_BODY


# --- closing ---


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_a_closed_client_refuses_requests_and_opens_nothing(target: Target) -> None:
    before_sockets, before_threads = open_sockets(), set(threading.enumerate())
    client = Client(target.address, timeout=SAFE)
    assert client.request(target.params("hello")).status == 200
    client.close()
    try:
        with pytest.raises(LocalProtocolError):
            client.request(target.params("hello"))
    finally:
        leftover_sockets = open_sockets() - before_sockets
        leftover_threads = set(threading.enumerate()) - before_threads
        client.close()
    assert leftover_sockets == set()
    assert leftover_threads == set()


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_nothing_left_behind_after_close(target: Target) -> None:
    # Threads of earlier tests may still be ending: compare which threads, not how many.
    threads_before = set(threading.enumerate())
    fds_before = fd_count()
    client = Client(target.address, max_connections=3, timeout=SAFE)
    for _ in range(5):
        assert client.request(target.params("hello")).body == peers.HELLO_BODY
    client.get_values()
    with client.stream(target.params("big", query=f"n={4 * MiB}")) as r:
        next(r.iter_body())
    with pytest.raises(ReadTimeout):
        client.request(target.params("trickle", query="n=5&interval=0.4"), timeout=0.5)

    def work(i: int) -> None:
        body = payload(5000 + i, seed=i)
        echo_check(
            client.request(target.params("echo", "POST", content_length=len(body)), body), body
        )

    assert run_threads(work, 8) == []
    with client.stream(target.params("hello")) as s:
        assert s.read() == peers.HELLO_BODY
    client.close()
    assert set(threading.enumerate()) - threads_before == set()
    assert fd_count() == fds_before


def test_error_classes_are_the_documented_tree() -> None:
    assert issubclass(ReadTimeout, TimeoutException)
    assert issubclass(PoolTimeout, TimeoutError)
    assert issubclass(ConnectError, FastCGIError)
    assert not issubclass(ConnectError, TimeoutError)
