"""serve_asgi on asyncio and trio: each message checked against the ASGI spec, streaming, aborts."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_anyio_server import Raw

from fcgiproto import ProtocolStatus
from fcgiproto.cgi import build_params
from fcgiproto.support import Address, asgi_scope, asgi_scope_from_bytes, cgi_head
from fcgiproto_anyio import AsyncClient, serve_asgi
from fcgiproto_anyio._asgi import LifespanFailed

pytestmark = pytest.mark.anyio

WAIT = 10.0
Scope = MutableMapping[str, Any]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def params(method: str = "GET", path: str = "/", **options: Any) -> dict[str, str]:
    return build_params(method, path, script_filename="/srv" + path, **options)


# --- the spec's required keys and types, for every event the server sends ---


def _is_host_port(value: object, port_may_be_none: bool = False) -> bool:
    if value is None:
        return True
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return False
    host, port = value
    return isinstance(host, str) and (isinstance(port, int) or (port_may_be_none and port is None))


def check_http_scope(scope: Scope) -> list[str]:
    problems = []
    asgi = scope.get("asgi")
    if not (isinstance(asgi, dict) and asgi.get("version") == "3.0"):
        problems.append(f"asgi {asgi!r}")
    elif not isinstance(asgi.get("spec_version", "2.0"), str):
        problems.append("asgi.spec_version")
    if scope.get("http_version") not in ("1.0", "1.1", "2"):
        problems.append(f"http_version {scope.get('http_version')!r}")
    method = scope.get("method")
    if not (isinstance(method, str) and method == method.upper()):
        problems.append(f"method {method!r}")
    if scope.get("scheme") not in ("http", "https"):
        problems.append(f"scheme {scope.get('scheme')!r}")
    if not isinstance(scope.get("path"), str):
        problems.append("path")
    if not (scope.get("raw_path") is None or isinstance(scope.get("raw_path"), bytes)):
        problems.append("raw_path")
    if not isinstance(scope.get("query_string"), bytes):
        problems.append("query_string")
    if not isinstance(scope.get("root_path", ""), str):
        problems.append("root_path")
    headers = scope.get("headers")
    if not isinstance(headers, (list, tuple)):
        problems.append("headers")
    else:
        for pair in headers:
            if not (
                len(pair) == 2
                and isinstance(pair[0], bytes)
                and isinstance(pair[1], bytes)
                and pair[0] == pair[0].lower()
            ):
                problems.append(f"header {pair!r}")
    if not _is_host_port(scope.get("client")):
        problems.append(f"client {scope.get('client')!r}")
    if not _is_host_port(scope.get("server"), port_may_be_none=True):
        problems.append(f"server {scope.get('server')!r}")
    if "state" in scope and not isinstance(scope["state"], dict):
        problems.append("state")
    return problems


def check_message(message: Any) -> list[str]:
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return [f"message {message!r}"]
    kind = message["type"]
    if kind == "http.request":
        problems = []
        if not isinstance(message.get("body", b""), bytes):
            problems.append("http.request body")
        if not isinstance(message.get("more_body", False), bool):
            problems.append("http.request more_body")
        return problems
    if kind in ("http.disconnect", "lifespan.startup", "lifespan.shutdown"):
        return []
    return [f"unknown message type {kind!r}"]


class Checked:
    """An ASGI app wrapped so that every scope and message it is given is checked."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.problems: list[str] = []
        self.received: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.problems += check_http_scope(scope)
        elif scope["type"] == "lifespan":
            if not isinstance(scope.get("state", {}), dict):
                self.problems.append("lifespan state")
        else:
            self.problems.append(f"scope type {scope['type']!r}")

        async def checked_receive() -> Any:
            message = await receive()
            self.problems += check_message(message)
            self.received.append(message)
            return message

        await self.app(scope, checked_receive, send)


@asynccontextmanager
async def asgi_server(app: Any, **options: Any) -> AsyncIterator[Address]:
    async with anyio.create_task_group() as tasks:
        bound: Address = await tasks.start(
            functools.partial(serve_asgi, app, "127.0.0.1:0", **options)
        )
        try:
            with anyio.fail_after(WAIT):
                yield bound
        finally:
            tasks.cancel_scope.cancel()


async def echo(scope: Scope, receive: Any, send: Any) -> None:
    """Reads the whole body, answers with its size and the request line."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    line = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} {size}"
    await send({"type": "http.response.body", "body": line.encode()})


async def test_every_event_follows_the_spec() -> None:
    app = Checked(echo)
    async with asgi_server(app) as bound, AsyncClient(bound, timeout=WAIT) as client:
        r = await client.request(
            params("POST", "/x", query="a=1", headers=[("X-Y", "z")], content_length=5000),
            b"b" * 5000,
        )
        assert r.body == b"POST /x a=1 5000"
        r = await client.request(params("GET", "/"))
        assert r.body == b"GET /  0"
    assert app.problems == []
    assert {m["type"] for m in app.received} >= {"lifespan.startup", "http.request"}


async def test_a_head_response_keeps_the_headers_and_loses_the_body() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"100010")],
            }
        )
        await send({"type": "http.response.body", "body": b"x" * 100_000, "more_body": True})
        await send({"type": "http.response.body", "body": b"y" * 10})

    async with asgi_server(app) as bound, AsyncClient(bound, timeout=WAIT) as client:
        r = await client.request(params("HEAD", "/"))
        assert (r.status, r.header("content-length"), r.body) == (200, "100010", b"")
        r = await client.request(params("HEAD", "/"))  # the connection is still good
        assert r.body == b""
        r = await client.request(params("GET", "/"))
        assert (r.status, len(r.body)) == (200, 100_010)


# Any bytes, UTF-8 or not (cut sequences, NULs, what str.upper/lower/isdigit
# treat apart from ASCII), among values the scope reads for a meaning.
_scope_bytes = st.binary(max_size=6) | st.sampled_from(
    [
        b"",
        b"/",
        b"/app",
        b"/app/x",
        b"/a%2Fb?q=1",
        b"80",
        b"8080",
        b"\xd9\xa3",  # an Arabic-Indic digit, str.isdigit()
        b"\xc2\xb2",  # a superscript two: isdigit(), not int()
        b"on",
        b"OFF",
        b"https",
        b"HTTPS",
        b"HTTP/2.0",
        b"http/1.0",
        b"get",
        b"HEAD",
        b"stra\xc3\x9fe",  # upper() makes it longer
        b"caf\xc3\xa9",
        b"\xc3",
        b"\xff",
        b"a\0b",
        b"10.0.0.1",
    ]
)
_scope_names = (
    st.sampled_from(
        [
            b"SCRIPT_NAME",
            b"PATH_INFO",
            b"REQUEST_URI",
            b"QUERY_STRING",
            b"REQUEST_METHOD",
            b"SERVER_PROTOCOL",
            b"HTTPS",
            b"REQUEST_SCHEME",
            b"REMOTE_ADDR",
            b"REMOTE_PORT",
            b"SERVER_ADDR",
            b"SERVER_NAME",
            b"SERVER_PORT",
            b"CONTENT_TYPE",
            b"CONTENT_LENGTH",
            b"HTTP_CONTENT_TYPE",
            b"HTTP_CONTENT_LENGTH",
            b"HTTP_HOST",
            b"HTTP_X_A_B",
            b"HTTP_Accept",
            b"HTTP_caf\xc3\xa9",  # not ASCII: its bytes as sent
            b"HTTP_\xc4\x80",  # not latin-1 either
            b"HTTP_\xff",  # not UTF-8
            b"HTTP_",
        ]
    )
    | st.binary(max_size=8).map(lambda name: b"HTTP_" + name)
    | st.binary(max_size=6)
)


@given(
    st.dictionaries(_scope_names, _scope_bytes, max_size=10),
    st.sampled_from(["", "/", "/app", "/app/", "/caf\u00e9"]),
    st.sampled_from([None, {}, {"k": 1}]),
)
@settings(max_examples=300, deadline=None)
def test_the_scope_from_bytes_is_the_scope_from_text(
    raw: dict[bytes, bytes], root_path: str, state: dict[str, Any] | None
) -> None:
    """serve_asgi's builder from the params' bytes gives asgi_scope's scope, or its error."""
    decoded = {
        k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
        for k, v in raw.items()
    }

    def scope(build: Any, params: Any) -> Any:
        try:
            return build(params, root_path=root_path, state=state)
        except Exception as exc:  # the same error type, where the text builder fails
            return type(exc)

    expected = scope(asgi_scope, decoded)
    got = scope(asgi_scope_from_bytes, raw)
    assert got == expected
    if isinstance(got, dict):
        assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]
        assert check_http_scope(got) == check_http_scope(expected)


_header_part = st.one_of(
    st.binary(max_size=4),
    st.sampled_from([b"content-type", b"a\r\nb", b"\n", b"\r"]),
    st.binary(max_size=3).map(bytearray),
    st.text(st.sampled_from("aZ:\r\n\u00e9\u0100"), max_size=3),
    st.integers(0, 3),
)


@given(
    st.sampled_from([200, 404, 599, 299]),
    st.lists(
        st.tuples(_header_part, _header_part)
        | st.tuples(_header_part, _header_part, _header_part)
        | st.builds(lambda n, v: [n, v], _header_part, _header_part),
        max_size=4,
    ),
)
@settings(max_examples=300, deadline=None)
def test_a_head_of_bytes_is_what_the_general_way_makes(status: int, headers: list[Any]) -> None:
    """ASGI's list of byte pairs takes its own way, to what the general way makes or refuses."""

    def head(headers: Any) -> bytes | type[Exception]:
        try:
            return cgi_head(status, headers)
        except (ValueError, TypeError, UnicodeError) as exc:
            return type(exc)

    expected = head(iter(headers))  # an iterator goes the general way
    cgi_head(status, ())  # its status line known, as after a first response
    assert head(headers) == expected


def test_the_scope_from_nginx_params() -> None:
    scope = asgi_scope(
        params(
            "get",
            "/app/caf\u00e9",
            query="q=%C3%A9",
            headers=[("Cookie", "a=b"), ("Content-Type", "text/html")],
            https=True,
            remote_addr="10.0.0.1",
            remote_port=5555,
            server_port=443,
            extra={"REQUEST_URI": "/app/caf%C3%A9?q=%C3%A9"},
        ),
        root_path="/app",
    )
    assert check_http_scope(scope) == []
    assert scope["method"] == "GET"
    assert scope["scheme"] == "https"
    assert scope["path"] == "/app/caf\u00e9"  # root_path included, as the spec has it
    assert scope["root_path"] == "/app"
    assert scope["raw_path"] == b"/app/caf%C3%A9"
    assert scope["query_string"] == b"q=%C3%A9"
    assert (b"cookie", b"a=b") in scope["headers"]
    assert (b"content-type", b"text/html") in scope["headers"]
    assert scope["client"] == ["10.0.0.1", 5555]
    assert scope["server"] == ["127.0.0.1", 443]
    assert scope["http_version"] == "1.1"


async def test_a_header_name_that_is_not_ascii_comes_as_it_was_sent() -> None:
    """No HTTP header name is, but one from a web server must not fail the request."""
    raw_name = b"HTTP_X_\xc4\x80_\xe2\x82\xac"  # not even latin-1 once decoded
    seen: list[list[Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async with asgi_server(app) as bound, AsyncClient(bound, timeout=WAIT) as client:
        request = {k.encode(): v.encode() for k, v in params("GET", "/").items()}
        request[raw_name] = b"value"
        r = await client.request(request)
    assert (r.status, r.body) == (200, b"ok")
    assert (b"x-\xc4\x80-\xe2\x82\xac", b"value") in seen[0]
    text = {k.decode("utf-8", "surrogateescape"): v.decode() for k, v in request.items()}
    assert (b"x-\xc4\x80-\xe2\x82\xac", b"value") in asgi_scope(text)["headers"]


async def test_the_body_streams_in_several_messages() -> None:
    messages: list[int] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            messages.append(len(message["body"]))
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    body = [b"a" * 100_000 for _ in range(30)]
    async with (
        asgi_server(app, lifespan="off", max_body_size=8 << 20) as bound,
        AsyncClient(bound, timeout=WAIT) as client,
    ):
        r = await client.request(params("POST"), iter(body))
    assert r.status == 204
    assert sum(messages) == 3_000_000
    assert len(messages) > 2


async def test_abort_request_is_http_disconnect_and_send_then_raises() -> None:
    seen: list[str] = []
    send_raised = anyio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        seen.append((await receive())["type"])
        try:
            await send({"type": "http.response.body", "body": b"more", "more_body": True})
        except OSError:
            send_raised.set()

    async with (
        asgi_server(app, lifespan="off", multiplex=True) as bound,
        Raw.connect(bound, multiplex=True) as raw,
    ):
        rid = raw.conn.send_request(params())
        await raw.send()
        while b"first" not in raw.stdout.get(rid, b""):
            await raw.read()
        raw.conn.abort_request(rid)
        await raw.send()
        await raw.until_ended(rid)
        await send_raised.wait()
    assert seen == ["http.disconnect"]
    assert raw.ends[rid].app_status == 1


async def test_a_dropped_connection_is_http_disconnect() -> None:
    seen: list[str] = []
    done = anyio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        seen.append((await receive())["type"])
        done.set()

    async with asgi_server(app, lifespan="off") as bound:
        raw = await Raw.open(bound)
        rid = raw.conn.send_request(params())
        await raw.send()
        while b"first" not in raw.stdout.get(rid, b""):
            await raw.read()
        await raw.stream.aclose()
        await done.wait()
    assert seen == ["http.disconnect"]


async def test_send_waits_for_a_slow_client() -> None:
    """What an app may send() ahead of a client that does not read is bounded."""
    sent = 0

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal sent
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200})
        chunk = b"s" * 65536
        while sent < 200 << 20:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)

    async with asgi_server(app, lifespan="off", max_unsent_size=64 * 1024) as bound:
        raw = await Raw.open(bound)
        raw.conn.send_request(params())
        await raw.send()
        await anyio.sleep(0.5)  # the client reads nothing meanwhile
        # The kernel's buffers on both sides and max_unsent_size: a few MiB at
        # most, never the 200 MiB the app would send unchecked.
        assert 0 < sent < 8 << 20, sent
        await raw.stream.aclose()


async def test_lifespan_startup_state_and_shutdown() -> None:
    events: list[str] = []
    states: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            scope["state"]["db"] = "connected"
            events.append("startup")
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            events.append("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
        states.append(scope["state"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    async with asgi_server(app) as bound, AsyncClient(bound, timeout=WAIT) as client:
        assert events == ["startup"]
        assert (await client.request(params())).body == b"ok"
    assert events == ["startup", "shutdown"]
    assert states == [{"db": "connected"}]


async def test_lifespan_auto_goes_on_without_an_app_that_has_none() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"no lifespan"})

    async with asgi_server(app) as bound, AsyncClient(bound, timeout=WAIT) as client:
        assert (await client.request(params())).body == b"no lifespan"


async def test_lifespan_startup_failed_stops_the_server() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    with anyio.fail_after(WAIT), pytest.raises(LifespanFailed, match="no database"):
        await serve_asgi(app, "127.0.0.1:0")


@pytest.mark.parametrize("where", ["before the response", "without a response"])
async def test_a_failing_app_is_a_plain_500(where: str) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if where == "before the response":
            raise KeyError("the secret")

    async with (
        asgi_server(app, lifespan="off") as bound,
        AsyncClient(bound, timeout=WAIT) as client,
    ):
        r = await client.request(params())
    assert r.status == 500
    assert b"secret" not in r.body and b"Traceback" not in r.body
    if where == "before the response":
        assert b"KeyError: 'the secret'" in r.stderr


async def test_the_request_ends_before_background_work_after_the_response() -> None:
    background_done = anyio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})
        await anyio.sleep(1.0)  # a background task
        background_done.set()

    async with (
        asgi_server(app, lifespan="off") as bound,
        AsyncClient(bound, timeout=WAIT) as client,
    ):
        with anyio.fail_after(0.8):
            assert (await client.request(params())).body == b"done"
        assert not background_done.is_set()


async def test_log_records_of_a_request_go_to_its_stderr() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        logging.getLogger("an.app").warning("noted %s", scope["path"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    async with (
        asgi_server(app, lifespan="off") as bound,
        AsyncClient(bound, timeout=WAIT) as client,
    ):
        r = await client.request(params("GET", "/here"))
    assert r.stderr == b"noted /here\n"


async def test_a_second_request_on_a_busy_plain_connection_waits_for_the_first() -> None:
    release = anyio.Event()
    order: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        order.append("start " + scope["path"])
        if scope["path"] == "/first":
            await release.wait()
        order.append("end " + scope["path"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    async with (
        asgi_server(app, lifespan="off") as bound,
        Raw.connect(bound, multiplex=True) as raw,
    ):
        first = raw.conn.send_request(params("GET", "/first"))
        second = raw.conn.send_request(params("GET", "/second"))
        await raw.send()
        await anyio.sleep(0.1)
        assert order == ["start /first"]
        release.set()
        await raw.until_ended(first, second)
    assert order == ["start /first", "end /first", "start /second", "end /second"]
    assert raw.ends[second].protocol_status is ProtocolStatus.REQUEST_COMPLETE


async def test_two_requests_sent_together_on_a_plain_connection_are_both_answered() -> None:
    """The second waits for the first; an app that answers at once (its first step,
    run in the read's callback) hands over to the next without a turn of the loop."""
    order: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        order.append(scope["path"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    async with (
        asgi_server(app, lifespan="off") as bound,
        Raw.connect(bound, multiplex=True) as raw,
    ):
        for _ in range(3):  # the first read of a connection may go another way
            order.clear()
            first = raw.conn.send_request(params("GET", "/first"))
            second = raw.conn.send_request(params("GET", "/second"))
            await raw.send()
            with anyio.fail_after(WAIT):
                await raw.until_ended(first, second)
            assert order == ["/first", "/second"]
            assert raw.stdout[first].endswith(b"/first")
            assert raw.stdout[second].endswith(b"/second")
            raw.ends.clear()
            raw.stdout.clear()


async def test_a_stop_drains_requests_in_progress() -> None:
    started = anyio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started.set()
        await send({"type": "http.response.start", "status": 200})
        for i in range(10):
            await anyio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
        await send({"type": "http.response.body"})

    stop = anyio.Event()
    async with anyio.create_task_group() as tasks:
        bound: Address = await tasks.start(
            functools.partial(
                serve_asgi, app, "127.0.0.1:0", stop=stop, lifespan="off", graceful_timeout=WAIT
            )
        )
        async with AsyncClient(bound, timeout=WAIT) as client:
            bodies: list[bytes] = []

            async def ask() -> None:
                bodies.append((await client.request(params())).body)

            async with anyio.create_task_group() as asking:
                asking.start_soon(ask)
                await started.wait()
                stop.set()
        assert bodies == [b"0123456789"]
    # serve_asgi returned by itself: the task group ended without a cancel.


async def test_a_body_that_stops_coming_hits_idle_timeout() -> None:
    """An app waiting for body waits on the client: idle_timeout closes the connection."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    async with (
        asgi_server(app, lifespan="off", idle_timeout=0.5) as bound,
        Raw.connect(bound) as raw,
    ):
        rid = raw.conn.begin_request()
        raw.conn.send_params(rid, params("POST", content_length=10_000))
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"x" * 100)
        await raw.send()
        with anyio.fail_after(5):
            assert await raw.closed_by_peer()
    assert seen == ["http.request", "http.disconnect"]
