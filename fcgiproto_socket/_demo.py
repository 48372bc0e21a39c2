"""The example application behind `fcgi demo`, and the tour that talks to it.

Routes, by SCRIPT_NAME (or DOCUMENT_URI):

    /hello?name=you   a greeting; also writes a line to the request's STDERR
    /echo             the request body back, with its Content-Type
    /ping             "pong", as php-fpm's ping.path answers
    /stream?n=5       n lines, sent one by one as they are produced
    /fail             raises: the server answers 500 and logs the traceback

Every answer carries X-Connection: the number of the connection it came on.
Run it in the foreground with ``fcgi demo --serve ADDRESS``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs

from fcgiproto import Role
from fcgiproto.support import Address

from ._client import Client
from ._server import Request

__all__ = ["app", "tour"]

_TEXT = "text/plain; charset=utf-8"


def app(request: Request) -> bytes | Iterator[bytes]:
    """The demo application: a handler for `serve`."""
    params = request.params
    path = params.get("SCRIPT_NAME") or params.get("DOCUMENT_URI") or "/"
    query = parse_qs(params.get("QUERY_STRING", ""))
    if request.role is not Role.RESPONDER:
        return _answer(request, "403 Forbidden", _TEXT, b"only the responder role is served\n")
    if path == "/hello":
        name = query.get("name", ["world"])[0]
        request.log(f"demo: said hello to {name}\n")
        return _answer(request, "200 OK", _TEXT, f"Hello, {name}!\n".encode())
    if path == "/echo":
        kind = params.get("CONTENT_TYPE") or "application/octet-stream"
        return _answer(request, "200 OK", kind, request.stdin)
    if path == "/ping":
        return _answer(request, "200 OK", _TEXT, b"pong\n")
    if path == "/stream":
        return _stream(request, int(query.get("n", ["5"])[0]))
    if path == "/fail":
        raise RuntimeError("the demo application fails on purpose at /fail")
    return _answer(request, "404 Not Found", _TEXT, f"no page at {path}\n".encode())


def _head(request: Request, status: str, content_type: str) -> bytes:
    return (
        f"Status: {status}\r\nContent-Type: {content_type}\r\n"
        f"X-Connection: {request.connection_id}\r\n\r\n"
    ).encode()


def _answer(request: Request, status: str, content_type: str, body: bytes) -> bytes:
    return _head(request, status, content_type) + body


def _stream(request: Request, lines: int) -> Iterator[bytes]:
    yield _head(request, "200 OK", _TEXT)
    for number in range(1, lines + 1):
        yield f"line {number} of {lines}\n".encode()
        time.sleep(0.01)


def tour(address: Address, say: Callable[[str], object]) -> None:
    """Talk to the demo application at `address` with the blocking client, saying what happens."""
    where = str(address)
    hello = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_FILENAME": "/demo/hello",
        "SCRIPT_NAME": "/hello",
    }
    with Client(where, max_connections=1) as client:
        response = client.request({**hello, "QUERY_STRING": "name=FastCGI"})
        say("GET /hello?name=FastCGI")
        say(f"  {response.status} {response.reason}")
        for name, value in response.headers:
            say(f"  {name}: {value}")
        say(f"  body:   {_text(response.body)}")
        say(f"  stderr: {_text(response.stderr)}  (a stream of its own, not in the body)")

        body = b'{"greeting": "hello over FastCGI"}'
        post = {
            "REQUEST_METHOD": "POST",
            "SCRIPT_FILENAME": "/demo/echo",
            "SCRIPT_NAME": "/echo",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
        }
        echoed = client.request(post, body)
        same = "byte for byte" if echoed.body == body else "CHANGED"
        say("")
        say(f"POST /echo with {len(body)} bytes of JSON")
        say(f"  {echoed.status} {echoed.reason}, echoed back {same}: {_text(echoed.body)}")

        values = client.get_values()
        say("")
        say("GET_VALUES")
        say("  " + "  ".join(f"{name}={value}" for name, value in values.items()))

    with Client(where, max_connections=1) as client:
        seen = [
            client.request({**hello, "QUERY_STRING": f"name={n}"}).header("X-Connection") or "?"
            for n in range(3)
        ]
    connections = sorted(set(seen))
    say("")
    say("Keep-alive: a new client sends 3 requests")
    if len(connections) == 1:
        say(f"  all 3 answered on connection #{connections[0]}: one connection, reused")
    else:
        say(f"  answered on connections {', '.join(f'#{n}' for n in seen)}: NOT reused")


def _text(data: bytes) -> str:
    return repr(data.decode("utf-8", "backslashreplace"))
