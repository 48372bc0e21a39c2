"""Test helpers: a client and a server wired back to back, and raw record builders."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcgiproto import (
    ClientConnection,
    Event,
    FilterData,
    ServerConnection,
    StderrData,
    StdinData,
    StdoutData,
)

HEADER = struct.Struct(">BBHHBx")


@contextmanager
def no_new_thread_left() -> Iterator[None]:
    """Fail if a thread started inside the block is still alive at its end.

    Threads are compared by identity, not counted: a daemon thread of an earlier
    test that ends meanwhile is not this block's business.
    """
    before = set(threading.enumerate())
    yield
    left = [thread for thread in threading.enumerate() if thread not in before]
    assert left == [], left


def raw_record(
    rtype: int, rid: int, content: bytes = b"", padding: int = 0, version: int = 1
) -> bytes:
    """A record built by hand, with any padding and version, for the reader's tests."""
    return HEADER.pack(version, rtype, rid, len(content), padding) + content + bytes(padding)


def end_request_body(app_status: int = 0, protocol_status: int = 0) -> bytes:
    return struct.pack(">IB3x", app_status, protocol_status)


def begin_body(role: int = 1, keep_conn: bool = True) -> bytes:
    return struct.pack(">HB5x", role, 1 if keep_conn else 0)


def parse_records(wire: bytes) -> list[tuple[int, int, bytes, int]]:
    """(type, request id, content, padding) of every record in `wire`, which must be whole."""
    out = []
    pos = 0
    while pos < len(wire):
        version, rtype, rid, clen, plen = HEADER.unpack_from(wire, pos)
        assert version == 1
        start = pos + 8
        out.append((rtype, rid, wire[start : start + clen], plen))
        pos = start + clen + plen
    assert pos == len(wire), "trailing bytes after the last record"
    return out


_STREAM_EVENTS = (StdoutData, StderrData, StdinData, FilterData)


def merge_stream_events(events: Iterable[Event]) -> list[Event]:
    """Join adjacent data events of one stream: chunking may split them anywhere."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, _STREAM_EVENTS) and merged:
            last = merged[-1]
            if type(last) is type(event) and last.request_id == event.request_id:  # type: ignore[attr-defined]
                merged[-1] = type(event)(event.request_id, last.data + event.data)  # type: ignore[attr-defined]
                continue
        merged.append(event)
    return merged


def feed(
    conn: ClientConnection | ServerConnection, wire: bytes, chunks: Sequence[int] = ()
) -> list[Event]:
    """Feed `wire` cut at the given sizes (the rest whole); events merged per stream."""
    events: list[Event] = []
    pos = 0
    for size in chunks:
        if pos >= len(wire):
            break
        events += conn.receive_data(wire[pos : pos + size])
        pos += size
    if pos < len(wire):
        events += conn.receive_data(wire[pos:])
    return merge_stream_events(events)


def feed_bytewise(conn: ClientConnection | ServerConnection, wire: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(wire)):
        events += conn.receive_data(wire[i : i + 1])
    return merge_stream_events(events)


class ConnectionPair:
    """A ClientConnection and a ServerConnection back to back."""

    def __init__(self, multiplex: bool = False, **server_options: object) -> None:
        self.client = ClientConnection(multiplex=multiplex)
        self.server = ServerConnection(multiplex=multiplex, **server_options)  # type: ignore[arg-type]

    def to_server(self) -> list[Event]:
        """Deliver what the client queued; the server's events, merged per stream."""
        wire = self.client.data_to_send()
        return merge_stream_events(self.server.receive_data(wire)) if wire else []

    def to_client(self) -> list[Event]:
        wire = self.server.data_to_send()
        return merge_stream_events(self.client.receive_data(wire)) if wire else []


@contextmanager
def serving_blocking(app: Any, address: str, **options: Any) -> Iterator[Any]:
    """fcgiproto_socket's Server running `app` for the block; its bound address."""
    from fcgiproto_socket import Server

    with Server(app, address, **options) as server:
        yield server.address


@contextmanager
def serving_wsgi(app: Any, address: str, **options: Any) -> Iterator[Any]:
    """fcgiproto_socket's serve_wsgi running `app` in a thread for the block; its bound address."""
    from fcgiproto_socket import serve_wsgi

    bound: list[Any] = []
    ready = threading.Event()
    stop = threading.Event()

    def on_ready(address: Any) -> None:
        bound.append(address)
        ready.set()

    thread = threading.Thread(
        target=serve_wsgi,
        args=(app, address),
        kwargs={"ready": on_ready, "stop": stop, "graceful_timeout": 1.0, **options},
        name="serve_wsgi",
    )
    thread.start()
    try:
        assert ready.wait(30), "serve_wsgi did not start"
        yield bound[0]
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


@contextmanager
def serving_anyio(app: Any, address: str, **options: Any) -> Iterator[Any]:
    """fcgiproto_anyio's serve running `app` on asyncio in a portal; its bound address."""
    import functools

    from anyio.from_thread import start_blocking_portal

    from fcgiproto_anyio import serve

    with start_blocking_portal("asyncio") as portal:
        future, bound = portal.start_task(functools.partial(serve, app, address, **options))
        try:
            yield bound
        finally:
            future.cancel()


def mypy_strict(blocks: Sequence[str], directory: Path, name: str) -> tuple[int, str]:
    """mypy --strict over code blocks written as files in `directory`: (status, report).

    Incremental, with a cache of its own per caller in the checkout's
    .mypy_cache (two test workers may run two callers at once): the standard
    library's and the packages' stubs are checked once, not on every run.
    """
    from mypy import api

    files = []
    for index, block in enumerate(blocks):
        path = directory / f"{name}_block{index}.py"
        path.write_text(block, encoding="utf-8")
        files.append(str(path))
    cache = Path(__file__).resolve().parent.parent / ".mypy_cache" / f"tests-{name}"
    out, err, status = api.run(["--strict", "--cache-dir", str(cache), *files])
    return status, out + err
