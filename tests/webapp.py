"""The application behind every web server of tests/test_webservers.py.

Standard library only, and no import of the project: the same ``respond``
runs inside the test process (wrapped for fcgiproto_socket.Server) and in
tests/spawned_app.py, which mod_fcgid and lighttpd start as another user from
a copy of these files.

Routes, by the path of REQUEST_URI (every web server here sends it):

- ``/params`` (and any path below it): JSON with the params as received, the
  body's length, and the uid and pid of the process that answered.
- ``/echo``: the body back, with X-Body-Length and X-Body-Sha256.
- ``/big?n=N``: N bytes of BIG_PATTERN with a Content-Length, in 64 KiB chunks.
- anything else: 404.

``wsgi_app`` and ``asgi_app`` are the same kind of report as WSGI and ASGI
applications, for ``fcgi serve``.

A HEAD request gets the headers of a GET and no body, as RFC 3875 (4.3.2)
requires of the application: HAProxy 2.6 answers 502 to a HEAD whose
response has a body, where the RFC asks the web server to discard it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs

BIG_PATTERN = b"0123456789abcdef"
CHUNK = 64 * 1024


def big_body(n: int) -> bytes:
    """What /big?n=N answers with."""
    repeats, rest = divmod(n, len(BIG_PATTERN))
    return BIG_PATTERN * repeats + BIG_PATTERN[:rest]


def path_and_query(params: Mapping[str, str]) -> tuple[str, str]:
    path, _, query = params.get("REQUEST_URI", "").partition("?")
    return path, params.get("QUERY_STRING", query)


def respond(params: Mapping[str, str], body: bytes) -> Iterator[bytes]:
    """The CGI response (headers, blank line, body) to one request, in chunks."""
    if params.get("REQUEST_METHOD") == "HEAD":
        # Every route's first chunk holds all of its headers.
        first = next(respond({**params, "REQUEST_METHOD": "GET"}, body))
        yield first.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        return
    path, query = path_and_query(params)
    if path == "/params" or path.startswith("/params/"):
        document = {
            "params": dict(params),
            "body_length": len(body),
            "uid": os.getuid(),
            "pid": os.getpid(),
        }
        yield b"Content-Type: application/json\r\n\r\n" + json.dumps(document).encode()
    elif path == "/echo":
        digest = hashlib.sha256(body).hexdigest()
        yield (
            b"Content-Type: application/octet-stream\r\n"
            b"X-Body-Length: %d\r\nX-Body-Sha256: %s\r\n\r\n" % (len(body), digest.encode())
        )
        yield body
    elif path == "/big":
        size = int(parse_qs(query).get("n", ["0"])[0])
        yield b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size
        block = big_body(CHUNK)  # CHUNK is a multiple of the pattern's length
        for start in range(0, size, CHUNK):
            yield block[: min(CHUNK, size - start)]
    else:
        yield b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nno such page\n"


# --- the same, as WSGI and ASGI applications (for fcgi serve) ---


def _report(path: str, query: str, method: str, header: str | None, body_length: int) -> bytes:
    document = {
        "path": path,
        "query": query,
        "method": method,
        "x_custom": header,
        "body_length": body_length,
        "uid": os.getuid(),
    }
    return json.dumps(document).encode()


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """JSON of what the request was: path (SCRIPT_NAME + PATH_INFO), query, method, X-Custom."""
    body = environ["wsgi.input"].read()
    answer = _report(
        environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
        environ.get("QUERY_STRING", ""),
        environ["REQUEST_METHOD"],
        environ.get("HTTP_X_CUSTOM"),
        len(body),
    )
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))]
    )
    return [answer]


async def asgi_app(
    scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
) -> None:
    """wsgi_app's answer, from an ASGI application (with lifespan)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    length = 0
    while True:
        message = await receive()
        length += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    header = headers.get(b"x-custom")
    answer = _report(
        scope["root_path"] + scope["path"],
        scope["query_string"].decode("latin-1"),
        scope["method"],
        header.decode("latin-1") if header is not None else None,
        length,
    )
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    await send({"type": "http.response.body", "body": answer})
