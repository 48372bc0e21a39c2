"""A Flask app and a Starlette app with the same pages, for the WSGI and ASGI tests.

`fcgi serve tests.python_apps:flask_app` (or :starlette_app) serves them in
a process of their own; the tests import them too. Pages:

- /hello?name=   greets, echoes the X-Test header, the method, path and scheme
- /upload        POST: the body's length and sha256, read as it streams in
- /download?size=&chunk=   that many bytes, streamed in chunks (generated, never held)
- /slow?n=&marker=  n chunks 0.05 s apart; writes "closed" (WSGI close() /
                  ASGI disconnect or cancellation) to the marker file at the end
- /set-cookie, /get-cookie, /redirect, /boom (raises), /log (logs, to stderr)
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
from flask import Flask, Response, make_response, redirect, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)
from starlette.routing import Route

DOWNLOAD_CHUNK = 64 * 1024
app_logger = logging.getLogger("python_apps")

# --- Flask (WSGI) ---

flask_app = Flask("python_apps")


@flask_app.route("/hello", methods=["GET", "HEAD"])
def flask_hello() -> dict[str, str]:
    return {
        "greeting": f"hello {request.args.get('name', '')}",
        "x_test": request.headers.get("X-Test", ""),
        "method": request.method,
        "path": request.path,
        "script_root": request.script_root,
        "scheme": request.scheme,
        "pid": str(os.getpid()),
    }


@flask_app.route("/upload", methods=["POST"])
def flask_upload() -> dict[str, object]:
    digest = hashlib.sha256()
    size = 0
    stream = request.stream
    while chunk := stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _pattern(size: int, chunk: int) -> Iterator[bytes]:
    block = bytes(range(256)) * (chunk // 256 + 1)
    left = size
    while left > 0:
        piece = min(chunk, left)
        yield block[:piece]
        left -= piece


@flask_app.route("/download")
def flask_download() -> Response:
    size = int(request.args.get("size", "0"))
    chunk = int(request.args.get("chunk", str(DOWNLOAD_CHUNK)))
    return Response(
        _pattern(size, chunk),
        mimetype="application/octet-stream",
        headers={"Content-Length": str(size)},
    )


class _Slow:
    """A WSGI iterable that notes close() in a marker file."""

    def __init__(self, n: int, marker: str) -> None:
        self.n = n
        self.marker = marker

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self.n):
            time.sleep(0.05)
            yield f"chunk {i}\n".encode() + b"." * 16384

    def close(self) -> None:
        if self.marker:
            Path(self.marker).write_text("closed")


@flask_app.route("/slow")
def flask_slow() -> Response:
    slow = _Slow(int(request.args.get("n", "10")), request.args.get("marker", ""))
    return Response(slow, mimetype="text/plain")


@flask_app.route("/set-cookie")
def flask_set_cookie() -> Response:
    response = make_response("set")
    response.set_cookie("flavour", "oatmeal")
    return response


@flask_app.route("/get-cookie")
def flask_get_cookie() -> str:
    return f"flavour={request.cookies.get('flavour', '')}"


@flask_app.route("/redirect")
def flask_redirect() -> Response:
    return redirect("/hello?name=redirected")  # type: ignore[return-value]


@flask_app.route("/boom")
def flask_boom() -> str:
    raise RuntimeError("secret detail that must not reach the client")


@flask_app.route("/log")
def flask_log() -> str:
    app_logger.warning("a record from the flask app")
    return "logged"


# --- Starlette (ASGI) ---


async def star_hello(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "greeting": f"hello {request.query_params.get('name', '')}",
            "x_test": request.headers.get("x-test", ""),
            "method": request.method,
            "path": request.url.path,
            "script_root": request.scope.get("root_path", ""),
            "scheme": request.url.scheme,
            "pid": str(os.getpid()),
        }
    )


async def star_upload(request: Request) -> JSONResponse:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse({"size": size, "sha256": digest.hexdigest()})


async def star_download(request: Request) -> StreamingResponse:
    size = int(request.query_params.get("size", "0"))
    chunk = int(request.query_params.get("chunk", str(DOWNLOAD_CHUNK)))

    async def body() -> AsyncIterator[bytes]:
        for piece in _pattern(size, chunk):
            yield piece

    return StreamingResponse(
        body(), media_type="application/octet-stream", headers={"Content-Length": str(size)}
    )


async def star_slow(request: Request) -> StreamingResponse:
    n = int(request.query_params.get("n", "10"))
    marker = request.query_params.get("marker", "")

    async def body() -> AsyncIterator[bytes]:
        try:
            for i in range(n):
                await anyio.sleep(0.05)
                yield f"chunk {i}\n".encode() + b"." * 16384
        finally:
            if marker:
                Path(marker).write_text("closed")

    return StreamingResponse(body(), media_type="text/plain")


async def star_set_cookie(request: Request) -> PlainTextResponse:
    response = PlainTextResponse("set")
    response.set_cookie("flavour", "oatmeal")
    return response


async def star_get_cookie(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"flavour={request.cookies.get('flavour', '')}")


async def star_redirect(request: Request) -> RedirectResponse:
    return RedirectResponse("/hello?name=redirected", status_code=302)


async def star_boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("secret detail that must not reach the client")


async def star_log(request: Request) -> PlainTextResponse:
    app_logger.warning("a record from the starlette app")
    return PlainTextResponse("logged")


starlette_app = Starlette(
    routes=[
        Route("/hello", star_hello, methods=["GET", "HEAD"]),
        Route("/upload", star_upload, methods=["POST"]),
        Route("/download", star_download),
        Route("/slow", star_slow),
        Route("/set-cookie", star_set_cookie),
        Route("/get-cookie", star_get_cookie),
        Route("/redirect", star_redirect),
        Route("/boom", star_boom),
        Route("/log", star_log),
    ]
)
