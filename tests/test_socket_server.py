"""serve() and Server on blocking sockets, talked to by the blocking Client and by raw sockets."""

from __future__ import annotations

import contextlib
import os
import queue
import random
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import peers
import pytest
from helpers import no_new_thread_left

from fcgiproto import (
    ClientConnection,
    EndRequest,
    Event,
    GetValuesResult,
    ProtocolStatus,
    Role,
    StderrData,
    StdoutData,
    UnknownRole,
)
from fcgiproto.support import Address
from fcgiproto_socket import Client, Request, Server, serve

HEAD = b"Content-Type: text/plain\r\n\r\n"
WAIT = 5.0  # generous: every wait in these tests ends long before, unless something hangs


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    with no_new_thread_left():
        yield


@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where to listen: a short Unix socket path, or a free loopback TCP port."""
    if request.param == "tcp":
        return "127.0.0.1:0"
    path = str(tmp_path / "app.sock")
    assert len(path) < 100, path
    return path


def client_for(server: Server, **options: object) -> Client:
    return Client(str(server.address), timeout=WAIT, **options)  # type: ignore[arg-type]


def get(path: str = "/", **extra: str) -> dict[str, str]:
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": path, "SCRIPT_FILENAME": path, **extra}


class Raw:
    """A ClientConnection on a plain socket, for what the Client does not do."""

    def __init__(self, address: Address, multiplex: bool = False) -> None:
        if address.path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(WAIT)
            self.sock.connect(address.path)
        else:
            self.sock = socket.create_connection((address.host, address.port), timeout=WAIT)
        self.conn = ClientConnection(multiplex=multiplex)
        self.stdout: dict[int, bytes] = {}
        self.stderr: dict[int, bytes] = {}
        self.ends: dict[int, EndRequest] = {}
        self.values: dict[str, str] | None = None

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def read(self) -> list[Event]:
        events = self.conn.receive_data(self.sock.recv(65536))
        for event in events:
            if isinstance(event, StdoutData):
                self.stdout[event.request_id] = self.stdout.get(event.request_id, b"") + event.data
            elif isinstance(event, StderrData):
                self.stderr[event.request_id] = self.stderr.get(event.request_id, b"") + event.data
            elif isinstance(event, EndRequest):
                self.ends[event.request_id] = event
            elif isinstance(event, GetValuesResult):
                self.values = dict(event.values)
        return events

    def until_ended(self, *rids: int) -> None:
        while not all(rid in self.ends for rid in rids):
            self.read()

    def closed_by_peer(self) -> bool:
        """True when the server closes the socket (within WAIT)."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True


# --- requests and responses ---


def test_get_with_the_blocking_client(address: str) -> None:
    seen: list[Request] = []

    def app(request: Request) -> bytes:
        seen.append(request)
        return b"Status: 201 Created\r\nX-Role: " + request.role.name.encode() + b"\r\n\r\nhi"

    with Server(app, address) as server, client_for(server) as client:
        response = client.request(get("/index.php", QUERY_STRING="a=1"))
    assert (response.status, response.reason) == (201, "Created")
    assert response.headers == [("X-Role", "RESPONDER")]
    assert response.body == b"hi"
    assert (response.stderr, response.app_status) == (b"", 0)
    assert response.protocol_status is ProtocolStatus.REQUEST_COMPLETE
    (request,) = seen
    assert (request.request_id, request.role, request.keep_conn) == (1, Role.RESPONDER, True)
    assert request.params["SCRIPT_FILENAME"] == "/index.php"
    assert request.params["QUERY_STRING"] == "a=1"
    assert (request.stdin, request.data, request.aborted) == (b"", b"", False)


@pytest.mark.parametrize("size", [0, 64 * 1024, 8 * 1024 * 1024], ids=["0B", "64KiB", "8MiB"])
def test_post_bodies_arrive_byte_exact(address: str, size: int) -> None:
    body = random.Random(size).randbytes(size)
    lengths: list[int] = []

    def echo(request: Request) -> bytes:
        lengths.append(len(request.stdin))
        return HEAD + request.stdin

    with Server(echo, address) as server, client_for(server) as client:
        response = client.request(get(REQUEST_METHOD="POST"), body)
    assert lengths == [size]
    assert response.body == body


def test_params_keep_any_bytes() -> None:
    raw = b"\xff\xfe caf\xc3\xa9 \x80"
    got: dict[str, str] = {}

    def app(request: Request) -> bytes:
        got.update(request.params)
        return HEAD + request.params["X_RAW"].encode("utf-8", "surrogateescape")

    with Server(app, "127.0.0.1:0") as server, client_for(server) as client:
        params: dict[str | bytes, str | bytes] = {b"X_RAW": raw, "NAME": "café"}
        response = client.request(params)
    assert response.body == raw
    assert got["NAME"] == "café"


def test_streamed_output_is_sent_as_it_is_produced(address: str) -> None:
    gate = threading.Event()
    waited: list[bool] = []

    def app(request: Request) -> Iterator[bytes]:
        yield HEAD + b"first"
        waited.append(gate.wait(WAIT))  # the client has read "first" before this returns
        yield b"second"

    with (
        Server(app, address) as server,
        client_for(server) as client,
        client.stream(get()) as response,
    ):
        chunks = response.iter_body()
        first = next(chunks)
        gate.set()
        rest = b"".join(chunks)
    assert (first, rest) == (b"first", b"second")
    assert waited == [True]


def test_streaming_a_large_response_takes_constant_memory() -> None:
    chunk = b"x" * 65536
    count = 320  # 20 MiB

    def app(request: Request) -> Iterator[bytes]:
        yield HEAD
        for _ in range(count):
            yield chunk

    with Server(app, "127.0.0.1:0") as server, client_for(server) as client:
        tracemalloc.start()
        try:
            received = 0
            with client.stream(get()) as response:
                for part in response.iter_body():
                    received += len(part)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received == count * len(chunk)
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while streaming 20 MiB"


def test_stderr_is_kept_apart_from_stdout(address: str) -> None:
    def app(request: Request) -> bytes:
        request.log("warning: café\n")
        request.log(b"\xff raw bytes\n")
        return HEAD + b"body"

    with Server(app, address) as server, client_for(server) as client:
        response = client.request(get())
    assert response.stderr == "warning: café\n".encode() + b"\xff raw bytes\n"
    assert response.stdout == HEAD + b"body"


def test_app_status_is_sent() -> None:
    def app(request: Request) -> bytes:
        request.app_status = 3
        return HEAD

    with Server(app, "127.0.0.1:0") as server, client_for(server) as client:
        assert client.request(get()).app_status == 3


# --- failures in the handler ---


def test_handler_exception_is_a_500_and_the_server_keeps_working(address: str) -> None:
    def app(request: Request) -> bytes:
        if request.params["SCRIPT_NAME"] == "/boom":
            raise ZeroDivisionError("boom")
        return HEAD + str(request.connection_id).encode()

    with Server(app, address) as server, client_for(server) as client:
        before = client.request(get("/ok")).body
        failed = client.request(get("/boom"))
        after = client.request(get("/ok")).body
    assert failed.status == 500
    assert failed.body == b"Internal Server Error\n"
    assert b"Traceback" in failed.stderr and b"ZeroDivisionError: boom" in failed.stderr
    assert failed.app_status == 1
    assert before == after == b"1"  # the same connection lived on


def test_exception_after_output_started_ends_the_request_with_status_1() -> None:
    def app(request: Request) -> Iterator[bytes]:
        yield HEAD + b"partial"
        raise RuntimeError("late failure")

    with Server(app, "127.0.0.1:0") as server, client_for(server) as client:
        response = client.request(get())
        assert client.request(get()).body == b"partial"  # still serving
    assert (response.status, response.body, response.app_status) == (200, b"partial", 1)
    assert b"RuntimeError: late failure" in response.stderr


@pytest.mark.parametrize(
    ("result", "complaint"),
    [
        ("text", b"returned str"),
        (None, b"returned NoneType"),
        (["text"], b"yielded str"),
    ],
)
def test_output_that_is_not_bytes_is_a_500(result: object, complaint: bytes) -> None:
    with Server(lambda request: result, "127.0.0.1:0") as server, client_for(server) as client:  # type: ignore[arg-type, return-value]
        response = client.request(get())
    assert (response.status, response.app_status) == (500, 1)
    assert complaint in response.stderr


def test_an_invalid_app_status_is_a_500() -> None:
    def app(request: Request) -> bytes:
        request.app_status = -1
        return HEAD

    with Server(app, "127.0.0.1:0") as server, client_for(server) as client:
        response = client.request(get())
    assert (response.status, response.app_status) == (500, 1)
    assert b"app_status must be" in response.stderr


# --- connections ---


def test_keep_conn_reuses_one_connection(address: str) -> None:
    def app(request: Request) -> bytes:
        return HEAD + str(request.connection_id).encode()

    with Server(app, address) as server:
        with client_for(server) as client:
            ids = [client.request(get()).body for _ in range(3)]
        assert len(set(ids)) == 1
        with Raw(server.address) as raw:
            for rid in (1, 1):  # request id 1 twice: the same socket takes a second request
                assert raw.conn.send_request(get(), keep_conn=True) == rid
                raw.send()
                raw.until_ended(rid)
                raw.ends.clear()
            assert raw.stdout[1] == HEAD + b"2" + HEAD + b"2"


def test_keep_conn_false_closes_after_the_request(address: str) -> None:
    with Server(lambda request: HEAD + b"bye", address) as server, Raw(server.address) as raw:
        raw.conn.send_request(get(), keep_conn=False)
        raw.send()
        raw.until_ended(1)
        assert raw.stdout[1] == HEAD + b"bye"
        assert raw.closed_by_peer()


def test_multiplexed_requests_run_concurrently(address: str) -> None:
    barrier = threading.Barrier(3, timeout=WAIT)  # passes only if all three run at once

    def app(request: Request) -> bytes:
        barrier.wait()
        return HEAD + f"request {request.request_id}".encode()

    with (
        Server(app, address, multiplex=True) as server,
        Raw(server.address, multiplex=True) as raw,
    ):
        rids = [raw.conn.send_request(get()) for _ in range(3)]
        raw.send()
        raw.until_ended(*rids)
    assert rids == [1, 2, 3]
    for rid in rids:
        assert raw.stdout[rid] == HEAD + f"request {rid}".encode()
        assert raw.ends[rid].app_status == 0


def test_the_client_multiplexes_on_a_multiplexing_server() -> None:
    barrier = threading.Barrier(5, timeout=WAIT)

    def app(request: Request) -> bytes:
        barrier.wait()
        return HEAD + f"{request.connection_id} {request.request_id}".encode()

    with (
        Server(app, "127.0.0.1:0", multiplex=True) as server,
        client_for(server) as client,
        ThreadPoolExecutor(5) as pool,
    ):
        answers = list(pool.map(lambda _: client.request(get()).body.split(), range(5)))
    assert len({connection for connection, _ in answers}) == 1
    assert sorted(rid for _, rid in answers) == [b"1", b"2", b"3", b"4", b"5"]


def test_multiplexed_output_is_written_whole_records_at_a_time() -> None:
    def app(request: Request) -> Iterator[bytes]:
        yield HEAD
        for _ in range(40):
            yield bytes([request.request_id]) * 50_000

    with (
        Server(app, "127.0.0.1:0", multiplex=True) as server,
        Raw(server.address, multiplex=True) as raw,
    ):
        rids = [raw.conn.send_request(get()) for _ in range(4)]
        raw.send()
        raw.until_ended(*rids)
    for rid in rids:
        assert raw.stdout[rid] == HEAD + bytes([rid]) * 2_000_000


def test_a_client_that_writes_without_reading_does_not_block_the_server() -> None:
    """One request's output fills the socket while the client sends another's large body."""
    big = 8 * 1024 * 1024

    def app(request: Request) -> Iterator[bytes]:
        yield HEAD
        if request.params["SCRIPT_NAME"] == "/out":
            for _ in range(big // 65536):
                yield b"o" * 65536
        else:
            yield str(len(request.stdin)).encode()

    with (
        Server(app, "127.0.0.1:0", multiplex=True) as server,
        Raw(server.address, multiplex=True) as raw,
    ):
        out = raw.conn.send_request(get("/out"))
        raw.send()
        while not raw.stdout.get(out):
            raw.read()
        upload = raw.conn.send_request(get("/in"), stdin=b"i" * big)
        raw.send()  # sendall: times out (WAIT) if the server stopped reading
        raw.until_ended(out, upload)
    assert len(raw.stdout[out]) == len(HEAD) + big
    assert raw.stdout[upload] == HEAD + str(big).encode()


def test_abort_ends_a_running_request() -> None:
    saw_abort = threading.Event()

    def app(request: Request) -> Iterator[bytes]:
        try:
            yield HEAD + b"started"
            if request.params["SCRIPT_NAME"] != "/slow":
                return
            deadline = time.monotonic() + WAIT
            while not request.aborted and time.monotonic() < deadline:
                time.sleep(0.005)
            yield b"dropped"
        finally:  # seen in the loop, or the generator is closed at its next yield
            if request.aborted:
                saw_abort.set()

    with (
        Server(app, "127.0.0.1:0", multiplex=True) as server,
        Raw(server.address, multiplex=True) as raw,
    ):
        rid = raw.conn.send_request(get("/slow"))
        raw.send()
        while raw.stdout.get(rid, b"") != HEAD + b"started":
            raw.read()
        raw.conn.abort_request(rid)
        raw.send()
        raw.until_ended(rid)
        assert saw_abort.wait(WAIT)
        # The connection goes on: the next request takes the next id.
        next_rid = raw.conn.send_request(get())
        raw.send()
        raw.until_ended(next_rid)
    assert raw.ends[rid].app_status == 1
    assert raw.stdout[rid] == HEAD + b"started"
    assert next_rid == 2 and raw.stdout[2] == HEAD + b"started"


def test_abort_before_the_request_is_whole_never_calls_the_handler(address: str) -> None:
    called: list[Request] = []

    def app(request: Request) -> bytes:
        called.append(request)
        return HEAD

    with Server(app, address) as server, Raw(server.address) as raw:
        rid = raw.conn.begin_request()
        raw.conn.send_params(rid, get())
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"half a body")
        raw.conn.abort_request(rid)
        raw.send()
        raw.until_ended(rid)
    assert raw.ends[rid].app_status == 1
    assert called == []


def test_garbage_closes_only_that_connection(address: str) -> None:
    def app(request: Request) -> bytes:
        return HEAD + str(request.connection_id).encode()

    with Server(app, address) as server, client_for(server) as client:
        first = client.request(get()).body
        with Raw(server.address) as raw:
            raw.sock.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
            assert raw.closed_by_peer()
        with Raw(server.address) as raw:  # a client gone in the middle of a record
            raw.sock.sendall(b"\x01\x01\x00\x01\x00\x08")
        assert client.request(get()).body == first  # the idle connection still works
        with client_for(server) as other:
            assert other.request(get()).status == 200


def test_filter_role_gets_stdin_and_data() -> None:
    seen: list[Request] = []

    def app(request: Request) -> bytes:
        seen.append(request)
        return HEAD + request.data.upper()

    with Server(app, "127.0.0.1:0") as server, Raw(server.address) as raw:
        rid = raw.conn.begin_request(Role.FILTER)
        raw.conn.send_params(rid, get(FCGI_DATA_LENGTH="11"))
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"in")
        raw.conn.end_stdin(rid)
        raw.conn.send_data(rid, b"file ")
        raw.conn.send_data(rid, b"body")
        raw.conn.end_data(rid)
        raw.send()
        raw.until_ended(rid)
    assert raw.stdout[rid] == HEAD + b"FILE BODY"
    (request,) = seen
    assert (request.role, request.stdin, request.data) == (Role.FILTER, b"in", b"file body")


def test_roles_not_served_are_refused() -> None:
    with (
        Server(lambda request: HEAD, "127.0.0.1:0", roles=[Role.RESPONDER]) as server,
        client_for(server) as client,
    ):
        with pytest.raises(UnknownRole):
            client.request(get(), role=Role.AUTHORIZER)
        assert client.request(get()).status == 200


def test_get_values_reports_the_configuration() -> None:
    with (
        Server(
            lambda request: HEAD, "127.0.0.1:0", multiplex=True, max_connections=7, max_requests=5
        ) as server,
        client_for(server) as client,
    ):
        values = client.get_values()
    assert values == {"FCGI_MAX_CONNS": "7", "FCGI_MAX_REQS": "5", "FCGI_MPXS_CONNS": "1"}


def test_max_connections_holds_a_new_connection_while_every_app_runs(address: str) -> None:
    running, leave = threading.Event(), threading.Event()

    def slow(request: Request) -> bytes:
        running.set()
        leave.wait(WAIT)
        return HEAD + b"done"

    with (
        Server(slow, address, max_connections=1) as server,
        Raw(server.address) as first,
        contextlib.ExitStack() as later,
    ):
        first.conn.send_request(get())
        first.send()
        assert running.wait(WAIT)
        # waits in the listen backlog: nothing may give way
        second = later.enter_context(Raw(server.address))
        second.conn.get_values(["FCGI_MAX_CONNS"])
        second.send()
        second.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            second.read()
        leave.set()
        first.until_ended(1)
        assert first.stdout[1].endswith(b"done")
        first.sock.close()
        second.sock.settimeout(WAIT)
        second.read()  # served once the first is gone
        assert second.values == {"FCGI_MAX_CONNS": "1"}


# --- starting and stopping ---


@pytest.mark.parametrize("multiplex", [False, True], ids=["plain", "multiplexed"])
def test_stop_leaves_no_thread_and_no_socket(address: str, multiplex: bool) -> None:
    threads, fds = set(threading.enumerate()), open_fds()
    streaming = threading.Event()

    def app(request: Request) -> Iterator[bytes]:
        yield HEAD
        streaming.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until stopped
            yield b"."
            time.sleep(0.005)

    server = Server(app, address, multiplex=multiplex).start()
    path = server.address.path
    client = client_for(server)
    client.get_values()  # leaves an idle kept-alive connection
    idle = Raw(server.address)
    busy = Raw(server.address, multiplex=multiplex)
    busy.conn.send_request(get())
    busy.send()
    assert streaming.wait(WAIT)
    assert set(threading.enumerate()) - threads
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    assert [t.name for t in threading.enumerate() if t.name.startswith("fcgi-")] == []
    assert idle.closed_by_peer()
    while busy.sock.recv(65536):  # the stream is cut, the connection closed
        pass
    for sock in (idle, busy):
        sock.sock.close()
    client.close()
    assert set(threading.enumerate()) - threads == set()
    assert open_fds() == fds
    if path is not None:
        assert not os.path.exists(path)


def test_serve_returns_once_stop_is_set(address: str) -> None:
    ready: queue.Queue[Address] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(lambda request: HEAD + b"served", address),
        kwargs={"ready": ready.put, "stop": stop},
    )
    thread.start()
    try:
        bound = ready.get(timeout=WAIT)
        if bound.path is None:
            assert bound.port != 0  # the real port, not the 0 asked for
        with Client(str(bound), timeout=WAIT) as client:
            assert client.request(get()).body == b"served"
    finally:
        stop.set()
        thread.join(WAIT)
    assert not thread.is_alive()


def test_a_stale_unix_socket_file_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()  # the file stays, nothing listens
    with Server(lambda request: HEAD + b"ok", path) as server, client_for(server) as client:
        assert client.request(get()).body == b"ok"
    assert not os.path.exists(path)


def test_a_live_unix_socket_or_another_file_is_left_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")
    with Server(lambda request: HEAD + b"first", path) as server:
        with pytest.raises(OSError, match="another server is listening"):
            Server(lambda request: HEAD, path).start()
        with client_for(server) as client:
            assert client.request(get()).body == b"first"
    regular = tmp_path / "file.sock"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        Server(lambda request: HEAD, str(regular)).start()
    assert regular.read_text() == "keep me"


def test_tcp_port_0_reports_the_real_port() -> None:
    with Server(lambda request: HEAD, ("127.0.0.1", 0)) as server:
        assert server.address.host == "127.0.0.1" and server.address.port > 0


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = Server(lambda request: HEAD + b"six", "[::1]:0").start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with server, client_for(server) as client:
        assert str(server.address).startswith("[::1]:")
        assert client.request(get()).body == b"six"


# --- behind a real web server ---


@pytest.mark.parametrize("keep_conn", [True, False], ids=["keep_conn", "close"])
def test_behind_nginx(
    make_nginx: peers.NginxFactory, address: str, keep_conn: bool, tmp_path: Path
) -> None:
    def app(request: Request) -> bytes:
        request.log(f"nginx asked for {request.params['REQUEST_URI']}")
        return (
            b"Content-Type: text/plain\r\nX-Connection: "
            + str(request.connection_id).encode()
            + b"\r\n\r\n"
            + request.params["REQUEST_METHOD"].encode()
            + b" "
            + request.stdin
        )

    with Server(app, address) as server:
        nginx = make_nginx(str(server.address), keep_conn=keep_conn, docroot=tmp_path)
        host, port = nginx.http_address.rsplit(":", 1)
        connections = []
        for body in (b"", b"x" * 100_000, b"third"):
            http = HTTPConnection(host, int(port), timeout=WAIT)
            try:
                http.request("POST" if body else "GET", "/page?q=1", body=body or None)
                reply = http.getresponse()
                assert reply.status == 200
                assert reply.read() == (b"POST " + body if body else b"GET ")
                connections.append(reply.getheader("X-Connection"))
            finally:
                http.close()
    assert len(set(connections)) == (1 if keep_conn else 3)
    assert "nginx asked for /page?q=1" in nginx.error_log.read_text()
