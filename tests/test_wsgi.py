"""serve_wsgi: PEP 3333 (checked by wsgiref.validate), streaming both ways, aborts, limits."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
from helpers import no_new_thread_left, serving_wsgi
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attacks import settled
from test_socket_server import Raw

from fcgiproto import BeginRequest, Params, ProtocolStatus, Role
from fcgiproto.cgi import build_params
from fcgiproto.support import Address, RequestState, ServerOptions, cgi_head, wsgi_environ
from fcgiproto.support._environ import _native
from fcgiproto_socket import Client, serve_wsgi

WAIT = 10.0
#: serve_wsgi's `threads` for the test that runs (wsgi_server's default).
serving = {"threads": None}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs on both ways of serving, unless marked for one.

    A thread per connection (the default) and one thread (`threads=1`: the
    listener's thread reads every connection and runs every app).
    """
    marker = metafunc.definition.get_closest_marker("threads")
    modes = marker.args if marker else (None, 1)
    metafunc.parametrize(
        "threads",
        modes,
        ids=["thread-per-connection" if mode is None else f"threads={mode}" for mode in modes],
        indirect=True,
    )


@pytest.fixture(autouse=True)
def threads(request: pytest.FixtureRequest) -> Iterator[int | None]:
    serving["threads"] = request.param
    try:
        yield request.param
    finally:
        serving["threads"] = None


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    with no_new_thread_left():
        yield


@contextlib.contextmanager
def wsgi_server(app: Any, address: str = "127.0.0.1:0", **options: Any) -> Iterator[Address]:
    """serve_wsgi in a thread for the block; stopped (drained briefly) after it."""
    options.setdefault("threads", serving["threads"])
    with serving_wsgi(app, address, **options) as bound:
        yield bound


def at_once(count: int, work: Callable[[], object]) -> None:
    """Run `work` in `count` threads at once, and wait for them all."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)


def slow_reader(bound: Address) -> Raw:
    """A raw client over TCP whose socket takes in little (64 KiB) before it is read."""
    sock = socket.create_connection((bound.host, bound.port), timeout=WAIT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw = Raw(bound)
    raw.sock.close()
    raw.sock = sock
    return raw


def params(method: str = "GET", path: str = "/", **options: Any) -> dict[str, str]:
    return build_params(method, path, script_filename="/srv" + path, **options)


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello ", environ["PATH_INFO"].encode("latin-1")]


# --- compliance ---


def validated_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """Uses every part of the interface wsgiref.validate checks."""
    body = environ["wsgi.input"]
    first = body.readline()
    rest = body.read(int(environ.get("CONTENT_LENGTH") or 0))
    environ["wsgi.errors"].write("to the error log\n")
    environ["wsgi.errors"].flush()
    write = start_response("201 Created", [("Content-Type", "text/plain"), ("X-A", "b")])
    write(b"written ")
    yield first
    yield b""
    yield rest
    yield environ["REQUEST_METHOD"].encode()


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD"])
def test_wsgiref_validate_finds_nothing_wrong(method: str) -> None:
    errors: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            return validator(validated_app)(environ, start_response)
        except BaseException as exc:  # an AssertionError from the validator
            errors.append(exc)
            raise

    body = b"line one\nthe rest" if method == "POST" else b""
    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params(method, "/v", content_length=len(body) or None), body)
    assert errors == []
    assert r.status == 201
    assert r.header("x-a") == "b"
    expected = (
        b"written line one\nthe rest" + method.encode() if body else b"written " + method.encode()
    )
    assert r.body == (b"" if method == "HEAD" else expected)
    assert r.stderr == b"to the error log\n"


def test_a_head_response_keeps_the_headers_and_loses_the_body() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x" * 100_000
            yield b"y" * 10

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100010")])
        return Body()

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params("HEAD", "/"))
        assert (r.status, r.header("content-length"), r.body) == (200, "100010", b"")
        r = client.request(params("GET", "/"))
        assert (r.status, len(r.body)) == (200, 100_010)
    assert closed == [True, True]


@pytest.mark.parametrize("kind", [list, tuple])
def test_a_list_body_ends_with_its_last_piece_and_head_loses_it(kind: type) -> None:
    """A list's last piece goes out with END_REQUEST: every piece arrives, none for HEAD.

    Its last piece is bigger than max_unsent_size: all but the last such
    piece go out first, as any output.
    """
    pieces = [b"a" * 10, b"", b"b" * 5, b"c" * 300_000]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "300015")])
        return kind(pieces)

    with wsgi_server(app, max_unsent_size=64 * 1024) as bound, Client(bound, timeout=WAIT) as c:
        r = c.request(params("GET", "/"))
        assert (r.status, r.body, r.app_status) == (200, b"".join(pieces), 0)
        r = c.request(params("HEAD", "/"))
        assert (r.status, r.header("content-length"), r.body) == (200, "300015", b"")
        r = c.request(params("GET", "/"))  # the connection carries on
        assert len(r.body) == 300_015


def test_environ_from_nginx_params() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("200 OK", [])
        return []

    p = params(
        "POST",
        "/app/caf\u00e9/x",
        query="a=1&b=%20",
        headers=[("Content-Type", "text/plain"), ("X-Thing", "v"), ("Cookie", "c=1")],
        content_length=3,
        https=True,
        server_port=8443,
    )
    with wsgi_server(app, root_path="/app") as bound, Client(bound, timeout=WAIT) as client:
        assert client.request(p, b"abc").status == 200
    assert seen["SCRIPT_NAME"] == "/app"
    assert seen["PATH_INFO"] == "/caf\u00e9/x".encode().decode("latin-1")  # PEP 3333's native str
    assert seen["QUERY_STRING"] == "a=1&b=%20"
    assert seen["CONTENT_TYPE"] == "text/plain"
    assert seen["CONTENT_LENGTH"] == "3"
    assert seen["HTTP_X_THING"] == "v"
    assert seen["HTTP_COOKIE"] == "c=1"
    assert seen["wsgi.url_scheme"] == "https"
    assert seen["SERVER_PORT"] == "8443"
    assert seen["wsgi.version"] == (1, 0)
    assert seen["wsgi.multithread"] is True
    assert seen["wsgi.run_once"] is False
    assert "HTTP_CONTENT_TYPE" not in seen


# Names and values of any bytes, UTF-8 or not, NULs and cut sequences too.
_param_bytes = st.binary(max_size=6) | st.sampled_from(
    [b"", b"GET", b"caf\xc3\xa9", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xff", b"a\0b"]
)


@pytest.mark.threads(None)
@given(st.dictionaries(_param_bytes, _param_bytes, max_size=6))
@settings(max_examples=500, deadline=None)
def test_every_param_is_in_the_environ_as_a_native_string(raw: dict[bytes, bytes]) -> None:
    decoded = {
        k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
        for k, v in raw.items()
    }
    # As the servers decode them (strict UTF-8 first, which must not show).
    state = RequestState(BeginRequest(1, Role.RESPONDER, True), ServerOptions(), 0.0)
    state.gather(Params(1, raw))
    assert state.params == decoded
    # serve_asgi's: the bytes kept, decoded only when asked, to the same.
    lazy = RequestState(
        BeginRequest(1, Role.RESPONDER, True), ServerOptions(decode_params=False), 0.0
    )
    lazy.gather(Params(1, raw))
    assert (lazy.params, lazy.raw_params) == (None, raw)
    assert lazy.text_params() == decoded
    environ = wsgi_environ(decoded, input=None, errors=None, multithread=False, multiprocess=False)
    for name, value in decoded.items():  # every param as PEP 3333's native str
        assert environ[name] == _native(value)  # (none is a name the environ sets itself)


_header_text = st.text(st.sampled_from("aZ-: \t\r\n\u00e9\u0100\x7f"), max_size=5)


@pytest.mark.threads(None)
@given(
    st.sampled_from(["200 OK", "404 Not Found", "200 \u00e9", "200 \u0100", "200 A\r\nB"]),
    st.lists(st.tuples(_header_text, _header_text), max_size=4),
)
@settings(max_examples=500, deadline=None)
def test_a_head_of_str_is_what_it_is_as_bytes(status: str, headers: list[tuple[str, str]]) -> None:
    """WSGI's str head takes its own way; what it makes, or refuses, is the general way's."""

    def head(status: str, headers: Any) -> bytes | type[Exception]:
        try:
            return cgi_head(status, headers)
        except (ValueError, UnicodeError) as exc:
            return ValueError if type(exc) is ValueError else UnicodeError

    # A tuple of them, or bytes, go the general way.
    expected = head(status, tuple(headers))
    assert head(status, headers) == expected
    if all(f"{n}{v}".isascii() for n, v in headers) and status.isascii():
        raw = [(n.encode(), v.encode()) for n, v in headers]
        assert head(status, raw) == expected


@pytest.mark.threads(None)
def test_environ_split_by_the_web_server_is_kept() -> None:
    """Apache and lighttpd send SCRIPT_NAME and PATH_INFO apart."""
    environ = wsgi_environ(
        {"SCRIPT_NAME": "/mount", "PATH_INFO": "/page", "REQUEST_SCHEME": "https"},
        input=None,
        errors=None,
        multithread=False,
        multiprocess=False,
    )
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/mount", "/page")
    assert environ["wsgi.url_scheme"] == "https"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("localhost", "443")
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["QUERY_STRING"] == ""


@pytest.mark.threads(None)
@pytest.mark.parametrize("multiplex", [False, True])
def test_the_body_streams_in_as_it_arrives(multiplex: bool) -> None:
    """The app runs before the body is all there, and reads it piece by piece.

    A slow reader: the server reads no further ahead than a bound meanwhile
    (pulled by the app itself, or pushed by the reading thread when the
    connection multiplexes).
    """
    pieces: list[bytes] = []
    app_started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        app_started.set()
        while chunk := environ["wsgi.input"].read(65536):
            pieces.append(chunk)
            time.sleep(0.001)
        start_response("200 OK", [])
        return [str(sum(map(len, pieces))).encode()]

    def body() -> Iterator[bytes]:
        yield b"x" * 1000
        assert app_started.wait(WAIT)  # the app runs while the body is still coming
        for _ in range(100):
            yield b"y" * 100_000

    with (
        wsgi_server(app, max_body_size=64 << 20, multiplex=multiplex) as bound,
        Client(bound, timeout=WAIT) as c,
    ):
        r = c.request(params("POST"), body())
    assert r.body == b"10001000"
    assert len(pieces) > 1


def test_a_body_declared_too_large_is_a_413_and_the_app_never_runs() -> None:
    ran = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ran.append(1)
        start_response("200 OK", [])
        return []

    with wsgi_server(app, max_body_size=1000) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params("POST", content_length=5000), b"x" * 5000)
        assert r.status == 413
        r = client.request(params("POST", content_length=1000), b"x" * 1000)
        assert r.status == 200
    assert ran == [1]


def test_a_body_that_grows_too_large_is_a_413() -> None:
    """No CONTENT_LENGTH (a chunked upload): the app reads, and the server answers 413."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b"read it all"]

    with wsgi_server(app, max_body_size=100_000) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params("POST"), iter([b"x" * 60_000] * 3))
    assert r.status == 413


def test_an_exception_is_a_plain_500_with_the_traceback_on_stderr() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/fail":
            raise ValueError("the secret")
        return hello(environ, start_response)

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params("GET", "/fail"))
        assert r.status == 500
        assert b"secret" not in r.body and b"Traceback" not in r.body
        assert b"ValueError: the secret" in r.stderr
        assert client.request(params("GET", "/after")).body == b"hello /after"


def test_the_apps_log_records_go_to_stderr_too(caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        logging.getLogger("an.app").warning("careful: %s", environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"ok"]

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params("GET", "/logged"))
    assert r.stderr == b"careful: /logged\n"
    assert "careful: /logged" in caplog.text


def test_a_second_request_on_a_busy_plain_connection_is_answered_after_the_first() -> None:
    """What HAProxy does with max-reqs even after FCGI_MPXS_CONNS=0."""
    release = threading.Event()
    running: list[str] = []
    overlapped = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        overlapped.append(bool(running))
        running.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/first":
            release.wait(WAIT)
        running.remove(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    with wsgi_server(app) as bound, Raw(bound, multiplex=True) as raw:
        raw.conn.get_values(["FCGI_MPXS_CONNS"])
        first = raw.conn.send_request(params("GET", "/first"))
        second = raw.conn.send_request(params("GET", "/second"))
        raw.send()
        while raw.values is None:
            raw.read()
        time.sleep(0.1)
        assert second not in raw.ends
        release.set()
        raw.until_ended(first, second)
    assert raw.values == {"FCGI_MPXS_CONNS": "0"}
    assert overlapped == [False, False]
    assert raw.ends[second].protocol_status is ProtocolStatus.REQUEST_COMPLETE
    assert raw.stdout[first].endswith(b"/first") and raw.stdout[second].endswith(b"/second")


class Endless:
    """A WSGI iterable of 16 KiB chunks that notes how far it got and whether it was closed."""

    def __init__(self) -> None:
        self.produced = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        while self.produced < 10_000:
            self.produced += 1
            time.sleep(0.001)
            yield b"z" * 16384

    def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("multiplex", [False, True])
def test_abort_request_ends_the_iterable_and_calls_close(multiplex: bool) -> None:
    endless = Endless()

    def app(environ: dict[str, Any], start_response: Any) -> Endless:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return endless

    with wsgi_server(app, multiplex=multiplex) as bound, Raw(bound, multiplex=True) as raw:
        rid = raw.conn.send_request(params())
        raw.send()
        while len(raw.stdout.get(rid, b"")) < 100_000:
            raw.read()
        raw.conn.abort_request(rid)
        raw.send()
        assert endless.closed.wait(WAIT)
        raw.until_ended(rid)
    assert raw.ends[rid].app_status == 1
    assert endless.produced < 10_000


def test_a_dropped_connection_ends_the_iterable_and_calls_close() -> None:
    endless = Endless()

    def app(environ: dict[str, Any], start_response: Any) -> Endless:
        start_response("200 OK", [])
        return endless

    with wsgi_server(app) as bound:
        raw = Raw(bound)
        rid = raw.conn.send_request(params())
        raw.send()
        while len(raw.stdout.get(rid, b"")) < 50_000:
            raw.read()
        raw.sock.close()
        assert endless.closed.wait(WAIT)
    assert endless.produced < 10_000


def test_output_waits_for_a_slow_client() -> None:
    """Backpressure: the app is never more than a bounded amount ahead of what the client read."""
    endless = Endless()

    def app(environ: dict[str, Any], start_response: Any) -> Endless:
        start_response("200 OK", [])
        return endless

    with wsgi_server(app, "127.0.0.1:0", max_unsent_size=64 * 1024) as bound:
        raw = slow_reader(bound)
        sock = raw.sock
        rid = raw.conn.send_request(params())
        raw.send()
        time.sleep(0.5)  # the client reads nothing meanwhile
        ahead = endless.produced * 16384
        # Kernel buffers on both sides, and max_unsent_size: a few MiB at most,
        # never the 160 MiB the app would produce unchecked.
        assert ahead < 8 << 20, ahead
        raw.conn.abort_request(rid)
        sock.close()
        assert endless.closed.wait(WAIT)


@pytest.mark.threads(None)
def test_threads_caps_the_apps_running_at_once() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        start_response("200 OK", [])
        return [b"ok"]

    with wsgi_server(app, threads=2) as bound, Client(bound, timeout=WAIT) as client:
        results: list[int] = []
        at_once(6, lambda: results.append(client.request(params()).status))
    assert results == [200] * 6
    assert most == 2


@pytest.mark.parametrize(("allowed", "served"), [(["127.0.0.1"], True), (["10.9.8.7"], False)])
def test_allowed_peers(allowed: list[str], served: bool) -> None:
    with wsgi_server(hello, allowed_peers=allowed) as bound, Raw(bound) as raw:
        raw.conn.send_request(params())
        raw.send()
        if served:
            raw.until_ended(1)
        else:
            assert raw.closed_by_peer()


def test_a_stop_drains_requests_in_progress() -> None:
    started = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        started.set()
        for i in range(10):
            time.sleep(0.05)
            yield b"%d" % i

    result: list[bytes] = []
    with wsgi_server(app, graceful_timeout=WAIT) as bound:
        client = Client(bound, timeout=WAIT)
        asking = threading.Thread(target=lambda: result.append(client.request(params()).body))
        asking.start()
        assert started.wait(WAIT)
    # Left: stopped, which waited for the request in progress, as the answer shows.
    asking.join(WAIT)
    client.close()
    assert result == [b"0123456789"]
    with pytest.raises(OSError):
        socket.create_connection((bound.host, bound.port), timeout=1).close()


@pytest.mark.threads(None)
def test_a_body_that_stops_coming_hits_idle_timeout() -> None:
    """An app waiting for body waits on the client: idle_timeout closes the connection."""
    got: list[bytes] = []
    done = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got.append(environ["wsgi.input"].read(10_000))
        done.set()
        start_response("200 OK", [])
        return [b"late"]

    with wsgi_server(app, idle_timeout=0.5) as bound, Raw(bound) as raw:
        rid = raw.conn.begin_request()
        raw.conn.send_params(rid, params("POST", content_length=10_000))
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"x" * 100)
        raw.send()
        started = time.monotonic()
        assert raw.closed_by_peer()
        assert time.monotonic() - started < 5
        assert done.wait(WAIT)
    assert got == [b"x" * 100]


@pytest.mark.threads(1)
def test_one_thread_runs_every_app_in_the_serving_thread_one_at_a_time() -> None:
    running = 0
    most = 0
    idents: set[int] = set()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        idents.add(threading.get_ident())
        time.sleep(0.01)
        running -= 1
        start_response("200 OK", [])
        return [b"ok"]

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT, max_connections=4) as client:
        results: list[int] = []

        def ask() -> None:
            for _ in range(5):
                results.append(client.request(params()).status)

        at_once(4, ask)
    assert results == [200] * 20
    assert most == 1
    assert len(idents) == 1
    assert threading.get_ident() not in idents


@pytest.mark.threads(1)
def test_one_thread_runs_an_app_once_its_body_is_in() -> None:
    """Every other connection waits while an app runs: it does not wait on a body still coming."""
    started = []
    body_was_in = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        started.append(True)
        body = environ["wsgi.input"].read()
        body_was_in.append(len(body))
        start_response("200 OK", [])
        return [b"%d" % len(body)]

    with wsgi_server(app) as bound, Raw(bound) as raw:
        rid = raw.conn.begin_request()
        raw.conn.send_params(rid, params("POST", content_length=2000))
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"x" * 1000)
        raw.send()
        time.sleep(0.3)
        assert started == []  # not on half a body
        raw.conn.send_stdin(rid, b"y" * 1000)
        raw.conn.end_stdin(rid)
        raw.send()
        raw.until_ended(rid)
    assert raw.stdout[rid].endswith(b"2000")
    assert body_was_in == [2000]


@pytest.mark.threads(1)
def test_one_thread_runs_an_app_once_its_whole_long_body_is_in() -> None:
    """The body is gathered, not pulled by the app: a slow sender holds up nobody."""
    sizes: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        while chunk := environ["wsgi.input"].read(65536):
            sizes.append(len(chunk))
        start_response("200 OK", [])
        return [b"%d" % sum(sizes)]

    def body() -> Iterator[bytes]:
        for _ in range(50):
            yield b"z" * 100_000

    with (
        wsgi_server(app, max_body_size=64 << 20) as bound,
        Client(bound, timeout=WAIT) as client,
    ):
        response = client.request(params("POST"), body())
    assert response.body == b"5000000"


@pytest.mark.threads(1)
def test_one_thread_serves_others_while_a_body_comes_slowly() -> None:
    """A body that trickles, and then stops, holds up no one; idle_timeout closes it."""
    got: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got.append(len(environ["wsgi.input"].read()))
        start_response("200 OK", [])
        return [b"ok"]

    with wsgi_server(app, idle_timeout=1.0, max_body_size=64 << 20) as bound, Raw(bound) as raw:
        rid = raw.conn.begin_request()
        raw.conn.send_params(rid, params("POST", content_length=10_000_000))
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"x" * 400_000)
        raw.send()
        with Client(bound, timeout=WAIT) as client:
            for _ in range(3):  # served at once, while the body waits
                assert client.request(params()).body == b"ok"
                raw.conn.send_stdin(rid, b"x")
                raw.send()
        started = time.monotonic()
        assert raw.closed_by_peer()  # once it stops for idle_timeout
        assert time.monotonic() - started < 5
    assert got == [0, 0, 0]  # the trickled body's app never ran


@pytest.mark.threads(1)
def test_one_thread_pauses_an_app_whose_client_does_not_read_and_serves_the_others() -> None:
    """The app is asked for nothing more meanwhile; send_timeout closes the connection."""
    endless = Endless()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        return endless if environ["PATH_INFO"] == "/endless" else [b"ok"]

    with wsgi_server(app, "127.0.0.1:0", send_timeout=2.0) as bound, slow_reader(bound) as raw:
        raw.conn.send_request(params(path="/endless"))
        raw.send()  # and reads nothing
        assert settled(lambda: endless.produced > 0)
        started = time.monotonic()
        with Client(bound, timeout=WAIT) as client:
            for _ in range(3):
                assert client.request(params()).body == b"ok"
        assert time.monotonic() - started < 1.5  # not behind the non-reader's send_timeout
        time.sleep(0.5)
        # Kernel buffers and max_unsent_size ahead at most (TCP widens its
        # buffers a few times), never the 160 MiB the app would make unchecked.
        assert endless.produced * 16384 < 8 << 20, endless.produced
        assert endless.closed.wait(WAIT)


# --- the rest of PEP 3333: wsgi.input as a file, wsgi.errors, write(), exc_info, bad output ---


def test_wsgi_input_reads_lines_as_a_file_does() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"]
        seen["first"] = body.readline()
        seen["capped"] = body.readline(3)
        seen["rest_of_it"] = body.readline(None)
        seen["two"] = body.readlines(1)
        seen["iterated"] = list(body)
        seen["after"] = body.read(10)
        start_response("200 OK", [])
        return [b"ok"]

    lines = b"one\ntwo\nthree\nfour\nfive\nsix"
    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        assert client.request(params("POST"), lines).body == b"ok"
    assert seen == {
        "first": b"one\n",
        "capped": b"two",
        "rest_of_it": b"\n",
        "two": [b"three\n"],
        "iterated": [b"four\n", b"five\n", b"six"],
        "after": b"",
    }


def test_wsgi_input_lines_longer_than_a_read() -> None:
    """A line that spans many of the server's reads comes whole; a size caps it."""
    long_line = b"x" * 200_000 + b"\n"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"]
        capped = body.readline(70_000)
        rest = body.readline()
        last = body.readline()
        start_response("200 OK", [])
        return [b"%d %d %s" % (len(capped), len(rest), last)]

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params("POST"), long_line + b"end")
    assert r.body == b"70000 130001 end"


def test_wsgi_errors_writelines_and_flush_reach_stderr() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        errors = environ["wsgi.errors"]
        errors.writelines(["first line\n", "second line\n"])
        errors.write("")
        errors.flush()
        start_response("200 OK", [])
        return [b"ok"]

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params())
    assert r.body == b"ok"
    assert r.stderr == b"first line\nsecond line\n"


def test_the_write_callable_sends_before_the_iterable() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written, ")
        write(b"")
        return [b"then returned"]

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params())
    assert r.status == 200
    assert r.body == b"written, then returned"


def test_start_response_again_with_exc_info_replaces_the_head_until_it_is_sent() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("X-First", "1")])
        try:
            raise KeyError("missing")
        except KeyError:
            start_response("404 Not Found", [("X-Second", "2")], sys.exc_info())
        yield b"not here"

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params())
    assert r.status == 404
    names = {name.lower(): value for name, value in r.headers}
    assert names.get("x-second") == "2"
    assert "x-first" not in names
    assert r.body == b"not here"


def test_exc_info_after_the_head_went_out_re_raises_and_cuts_the_response() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"begun "
        try:
            raise KeyError("late")
        except KeyError:
            start_response("500 Oops", [], sys.exc_info())  # raises the KeyError again
        yield b"never"

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params())
        assert r.status == 200
        assert r.body == b"begun "
        assert b"KeyError: 'late'" in r.stderr
        assert client.request(params()).body == b"begun "  # the server goes on


@pytest.mark.parametrize(
    ("case", "complaint"),
    [
        ("twice", b"start_response was called twice"),
        ("bad-status", b"the WSGI status must be like"),
        ("bad-header", b"a WSGI header must be a (name, value) tuple"),
        ("body-first", b"the app sent body before calling start_response"),
        ("str-chunk", b"the app yielded str, not bytes"),
        ("str-last", b"the app yielded str, not bytes"),
    ],
)
def test_an_app_breaking_pep_3333_gets_a_500_and_the_reason_on_stderr(
    case: str, complaint: bytes
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if case == "twice":
            start_response("200 OK", [])
            start_response("200 OK", [])
        elif case == "bad-status":
            start_response("OK", [])
        elif case == "bad-header":
            start_response("200 OK", [["Content-Type", "text/plain"]])
        elif case == "body-first":
            return iter([b"body"])
        elif case == "str-chunk":
            start_response("200 OK", [])
            return iter(["text"])
        else:
            start_response("200 OK", [])
            return ["text"]
        return [b"unreached"]

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params())
    assert r.status == 500
    assert complaint in r.stderr


def test_a_close_that_raises_is_logged_and_the_response_stands() -> None:
    class Closing:
        def __iter__(self) -> Iterator[bytes]:
            yield b"whole"

        def close(self) -> None:
            raise RuntimeError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return Closing()

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params())
        assert r.body == b"whole"
        assert b"RuntimeError: close failed" in r.stderr
        assert client.request(params()).body == b"whole"


def test_an_app_that_sends_nothing_still_sends_its_head() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("204 No Content", [("X-Empty", "yes")])
        yield from ()

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        r = client.request(params())
    assert r.status == 204
    assert ("X-Empty", "yes") in [(name, value) for name, value in r.headers]
    assert r.body == b""


@pytest.mark.threads(None)
@pytest.mark.parametrize("value", [0, -1, 1.5, "2"])
def test_threads_must_be_a_whole_number_of_at_least_one(value: object) -> None:
    with pytest.raises(ValueError, match="threads must be an int of at least 1"):
        serve_wsgi(hello, "127.0.0.1:0", threads=value)  # type: ignore[arg-type]


@pytest.mark.threads(None)
def test_serve_wsgi_takes_an_address_or_a_socket_not_both() -> None:
    with pytest.raises(TypeError, match="an address or a listening sock"):
        serve_wsgi(hello)
    with socket.socket() as sock, pytest.raises(TypeError, match="an address or a listening sock"):
        serve_wsgi(hello, "127.0.0.1:0", sock=sock)


@pytest.mark.threads(1)
def test_one_thread_write_callable_waits_for_its_client_send_timeout_at_most() -> None:
    """write() cannot pause: it waits in a send, which the kernel cuts at send_timeout."""
    outcome: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        if environ["PATH_INFO"] == "/written":
            try:
                for _ in range(2000):  # 32 MiB, far past what the sockets hold
                    write(b"w" * 16384)
            except OSError:
                outcome.append("cut")
                raise
            outcome.append("whole")
        return [b"ok"]

    with wsgi_server(app, "127.0.0.1:0", send_timeout=0.5) as bound, slow_reader(bound) as raw:
        raw.conn.send_request(params(path="/written"))
        raw.send()  # and reads nothing
        started = time.monotonic()
        assert settled(lambda: outcome == ["cut"])
        assert time.monotonic() - started < 5
        with Client(bound, timeout=WAIT) as client:  # the thread serves on
            assert client.request(params()).body == b"ok"
        with contextlib.suppress(ConnectionResetError):  # what was sent, then the end
            while raw.sock.recv(1 << 20):
                pass


@pytest.mark.threads(1)
def test_one_thread_gives_others_their_turn_during_a_long_response() -> None:
    """An app whose client keeps up pauses every APP_TURN all the same: others are served."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        if environ["PATH_INFO"] != "/long":
            return [b"ok"]

        def chunks() -> Iterator[bytes]:
            for _ in range(400):  # 4 s of output, taken as it comes
                time.sleep(0.01)
                yield b"x" * 1024

        return chunks()

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        long: list[int] = []
        reader = threading.Thread(
            target=lambda: long.append(len(client.request(params(path="/long")).body))
        )
        reader.start()
        time.sleep(0.3)  # the long response under way
        started = time.monotonic()
        for _ in range(3):
            assert client.request(params()).body == b"ok"
        assert time.monotonic() - started < 2.0  # not after the long response's 4 s
        reader.join(WAIT)
    assert long == [409600]


def _unread(sock: socket.socket) -> int:
    """Bytes a Unix socket sent that its peer has not read yet (SIOCOUTQ)."""
    import fcntl
    import struct
    import termios

    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


@pytest.mark.threads(1)
def test_one_thread_reads_every_request_that_came_together_before_running_their_apps(
    tmp_path: Any,
) -> None:
    """Requests ready at once are all taken, then answered: none waits unread behind an app."""
    first_running, release = threading.Event(), threading.Event()
    others: dict[str, Raw] = {}
    unread_then: dict[str, int] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/first":
            first_running.set()
            release.wait(WAIT)  # meanwhile the two others send theirs
        elif path != "/warm" and not unread_then:  # the first of the two: was the other read?
            other = "/c" if path == "/b" else "/b"
            unread_then[other] = _unread(others[other].sock)
        start_response("200 OK", [])
        return [b"ok"]

    with (
        wsgi_server(app, f"unix:{tmp_path}/app.sock") as bound,
        Raw(bound) as first,
        Raw(bound) as b,
        Raw(bound) as c,
    ):
        others.update({"/b": b, "/c": c})
        for raw in (b, c):  # accepted and kept, as a web server's connections are
            raw.conn.send_request(params(path="/warm"))
            raw.send()
            raw.until_ended(1)
            raw.ends.clear()
            raw.stdout.clear()
        first.conn.send_request(params(path="/first"))
        first.send()
        assert first_running.wait(WAIT)
        for path, raw in others.items():
            raw.conn.send_request(params(path=path))
            raw.send()
        assert settled(lambda: _unread(b.sock) > 0 and _unread(c.sock) > 0)
        release.set()
        for raw in (first, b, c):
            raw.until_ended(1)
            assert raw.stdout[1].endswith(b"ok")
    assert list(unread_then.values()) == [0]


@pytest.mark.threads(1)
def test_one_thread_serves_on_poll_where_there_is_no_epoll(monkeypatch: Any) -> None:
    """poll() where epoll is missing (not Linux): the same waits, reads and a slow client's."""
    import select

    monkeypatch.delattr(select, "epoll")
    big = b"x" * (8 << 20)  # more than the kernel holds: its rest waits for POLLOUT

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [big] if environ["PATH_INFO"] == "/big" else [b"ok"]

    results: list[bytes] = []
    with (
        wsgi_server(app) as bound,
        Client(bound, timeout=WAIT, max_connections=4) as client,
        slow_reader(bound) as raw,
    ):
        raw.conn.send_request(params(path="/big"))
        raw.send()

        def ask() -> None:
            for _ in range(5):
                results.append(client.request(params()).body)

        at_once(4, ask)  # while the big response waits on its client
        raw.until_ended(1)
    assert results == [b"ok"] * 20
    assert raw.stdout[1].endswith(big)


@pytest.mark.threads(1)
def test_one_thread_sends_many_small_pieces_to_a_slow_client_in_order() -> None:
    """Thousands of chunks wait for a client that reads late: sent 64 pieces at a time."""
    chunks = [b"%07d" % number * 128 for number in range(8_000)]  # 896 bytes each, 7 MB

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        return iter(chunks)

    with wsgi_server(app) as bound, slow_reader(bound) as raw:
        raw.conn.send_request(params())
        raw.send()
        time.sleep(0.3)  # the socket fills; the rest waits in pieces
        raw.until_ended(1)
    assert raw.stdout[1].endswith(b"".join(chunks))


@pytest.mark.threads(1)
def test_one_thread_pauses_between_the_items_of_a_list_for_a_slow_client() -> None:
    """A list's items wait for the client as an iterator's do; a client gone meanwhile ends it."""
    items = [b"%03d" % number * 21_846 for number in range(120)]  # 64 KiB each, 7.5 MiB

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return items if environ["PATH_INFO"] == "/list" else [b"ok"]

    with wsgi_server(app) as bound, Client(bound, timeout=WAIT) as client:
        with slow_reader(bound) as raw:
            raw.conn.send_request(params(path="/list"))
            raw.send()
            time.sleep(0.3)  # paused between two items, its client full
            assert client.request(params()).body == b"ok"
            raw.until_ended(1)
        assert raw.stdout[1].endswith(b"".join(items))
        with slow_reader(bound) as gone:
            gone.conn.send_request(params(path="/list"))
            gone.send()
            time.sleep(0.3)
        # Closed while its list was paused: the rest of the list is dropped, others go on.
        for _ in range(3):
            assert client.request(params()).body == b"ok"
