"""Peers that try to hold a FastCGI server down, a well-behaved client beside them, and the app.

`blocking_app` and `async_app` are what the attacked servers run (the same
application for fcgiproto_socket and fcgiproto_anyio).

Plain sockets and hand-packed records, so that each attack sends exactly what
it says. Each attack is a context manager: entering opens its connections and
starts what it keeps doing in a thread of its own; leaving stops that thread
and closes every socket it opened. `GoodClient` makes one request on a fresh
`Client` every `every` seconds meanwhile and records how each went, and
`rss()` reads the process's resident memory: the tests run the servers in
their own process, so that is the servers' memory (and the attackers', which
hold almost nothing).

Used by tests/test_attacks.py (what must hold) and benchmarks/attacks.py (the
good client's latency during each attack, measured).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

import anyio

from fcgiproto import FastCGIError
from fcgiproto_anyio import Request as AsyncRequest
from fcgiproto_socket import Address, Client, Request

HEADER = struct.Struct(">BBHHBx")
BEGIN, ABORT, END, PARAMS, STDIN, STDOUT, STDERR, DATA, GET_VALUES = 1, 2, 3, 4, 5, 6, 7, 8, 9
MiB = 1 << 20


# --- what the servers run: the same application, blocking and async ---

HEAD = b"Content-Type: text/plain\r\n\r\n"
#: What /big streams: far more than any socket buffer holds.
BIG = 50 * MiB
PIECE = b"x" * (256 * 1024)


#: How long /sleep takes: longer than the short timeouts tests/test_server_limits.py sets.
SLEEP = 1.0


def blocking_app(request: Request) -> Iterator[bytes]:
    """/big streams BIG bytes, /sleep answers after SLEEP, /size the body's size; else hello."""
    yield HEAD
    yield from _answer(request.params.get("SCRIPT_NAME", ""), lambda: request.stdin)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """blocking_app as a WSGI app."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    script = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return _answer(script, environ["wsgi.input"].read)


def _answer(script: str, body: Callable[[], bytes]) -> Iterator[bytes]:
    """The body of blocking_app's answer."""
    if script == "/big":
        for _ in range(BIG // len(PIECE)):
            yield PIECE
    elif script == "/sleep":
        time.sleep(SLEEP)
        yield b"slept"
    elif script == "/size":
        yield b"%d" % len(body())
    else:
        yield b"hello"


async def async_app(request: AsyncRequest) -> AsyncIterator[bytes]:
    """blocking_app's twin."""
    yield HEAD
    script = request.params.get("SCRIPT_NAME")
    if script == "/big":
        for _ in range(BIG // len(PIECE)):
            yield PIECE
    elif script == "/sleep":
        await anyio.sleep(SLEEP)
        yield b"slept"
    elif script == "/size":
        yield b"%d" % len(request.stdin)
    else:
        yield b"hello"


# --- records, packed by hand ---


def record(rtype: int, rid: int, content: bytes = b"") -> bytes:
    return HEADER.pack(1, rtype, rid, len(content), 0) + content


def pair(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:
        return bytes((n,)) if n < 128 else struct.pack(">I", n | 0x80000000)

    return length(len(name)) + length(len(value)) + name + value


def begin(rid: int = 1, keep_conn: bool = True) -> bytes:
    return record(BEGIN, rid, struct.pack(">HB5x", 1, int(keep_conn)))


def params_records(rid: int, content: bytes) -> bytes:
    """PARAMS carrying `content`, in records of at most 65,535 bytes (no terminator)."""
    return b"".join(
        record(PARAMS, rid, content[start : start + 0xFFFF])
        for start in range(0, len(content), 0xFFFF)
    )


def request(script: bytes = b"/hello", rid: int = 1, keep_conn: bool = True) -> bytes:
    """A whole GET: BEGIN_REQUEST, PARAMS, empty STDIN."""
    content = pair(b"SCRIPT_NAME", script) + pair(b"REQUEST_METHOD", b"GET")
    return (
        begin(rid, keep_conn)
        + record(PARAMS, rid, content)
        + record(PARAMS, rid)
        + record(STDIN, rid)
    )


def rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_socket(address: Address, timeout: float = 5.0) -> socket.socket:
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((address.host, address.port), timeout=timeout)


class Attack:
    """Opens `count` connections, sends each `opening`, then runs `keep_going` until stopped."""

    opening = b""

    def __init__(self, address: Address, count: int) -> None:
        self.address = address
        self.count = count
        self.socks: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        #: Bytes the server took from the attack.
        self.sent = 0

    def __enter__(self) -> Attack:
        for _ in range(self.count):
            sock = open_socket(self.address)
            self.socks.append(sock)
            if self.opening:
                with contextlib.suppress(OSError):  # the server may have closed it already
                    sock.sendall(self.opening)
                    self.sent += len(self.opening)
        self.thread = threading.Thread(target=self.keep_going, name=type(self).__name__)
        self.thread.start()
        return self

    def keep_going(self) -> None:
        """What the attack does until `stopping` is set; by default, sit."""
        self.stopping.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        self.close()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()

    def closed_by_server(self) -> int:
        """How many of the attack's connections the server has closed."""
        closed = 0
        for sock in self.socks:
            try:
                sock.setblocking(False)
                while True:
                    data = sock.recv(1 << 20)
                    if not data:
                        closed += 1
                        break
            except BlockingIOError:
                pass
            except OSError:  # reset
                closed += 1
        return closed


class HeaderSitters(Attack):
    """Three bytes of a record header, then nothing."""

    opening = begin()[:3]


class Tricklers(Attack):
    """A valid request, one byte per connection every `interval` seconds."""

    def __init__(self, address: Address, count: int, interval: float = 1.0) -> None:
        super().__init__(address, count)
        self.interval = interval

    def keep_going(self) -> None:
        wire = request()
        position = 0
        while not self.stopping.wait(self.interval):
            byte = wire[position % len(wire) : position % len(wire) + 1]
            position += 1
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    self.sent += sock.send(byte)


class HalfRequests(Attack):
    """BEGIN_REQUEST and part of PARAMS, never finished."""

    opening = begin() + record(PARAMS, 1, pair(b"SCRIPT_NAME", b"/hello"))


class NonReaders(Attack):
    """A request for a big response, which is never read."""

    opening = request(b"/big")


class ManyPairs(Attack):
    """PARAMS of 1 MiB made of seven-byte pairs, whole, and the request left there."""

    opening = begin() + params_records(1, pair(b"ABCDE", b"") * (MiB // 7)) + record(PARAMS, 1)


class MultiplexedParams(Attack):
    """On each connection, many requests each holding just under 1 MiB of PARAMS."""

    def __init__(self, address: Address, count: int = 1, ids: int = 100) -> None:
        super().__init__(address, count)
        self.ids = ids

    def keep_going(self) -> None:
        chunk = pair(b"X", b"v" * (MiB - 16))
        for sock in self.socks:
            sock.settimeout(0.5)
            for rid in range(1, self.ids + 1):
                if self.stopping.is_set():
                    return
                try:
                    sock.sendall(begin(rid) + params_records(rid, chunk))
                except OSError:  # refused: closed, or it stopped reading
                    break
                self.sent += MiB
        self.stopping.wait()


class EndlessStdin(Attack):
    """A request whose body never ends: 64 KiB STDIN records as fast as they are taken."""

    opening = begin() + record(PARAMS, 1, pair(b"SCRIPT_NAME", b"/hello")) + record(PARAMS, 1)

    def __init__(self, address: Address, count: int) -> None:
        super().__init__(address, count)
        #: Set once a send failed: the server closed a connection, or stopped reading.
        self.cut = threading.Event()

    def keep_going(self) -> None:
        piece = record(STDIN, 1, bytes(0xFFF8)) * 4
        for sock in self.socks:
            sock.settimeout(2.0)
        while not self.stopping.is_set():
            for sock in self.socks:
                try:
                    sock.sendall(piece)  # whole records, or the stream is garbage
                except OSError:  # closed, or no longer read: stop
                    self.cut.set()
                    self.stopping.wait()
                    return
                self.sent += len(piece)


class ValuesFlood(Attack):
    """A big response left unread on a multiplexed connection, and GET_VALUES without end.

    `sent` stops growing once the server stops reading; `blocked` is set then.
    """

    opening = request(b"/big")
    FLOOD = record(GET_VALUES, 0, pair(b"FCGI_MAX_CONNS", b"")) * 2730  # ~64 KiB

    def __init__(self, address: Address, count: int = 1, limit: int = 64 * MiB) -> None:
        super().__init__(address, count)
        self.limit = limit
        self.blocked = threading.Event()

    def keep_going(self) -> None:
        (sock,) = self.socks
        sock.settimeout(1.0)
        view = memoryview(self.FLOOD)
        while self.sent < self.limit and not self.stopping.is_set():
            try:
                self.sent += sock.send(view)
            except TimeoutError:
                self.blocked.set()
            except OSError:
                break
        self.blocked.set()
        self.stopping.wait()


class GoodClient:
    """One GET on a fresh Client every `every` seconds, until stopped; how each went."""

    def __init__(self, address: Address, every: float = 0.05, timeout: float = 5.0) -> None:
        self.address = address
        self.every = every
        self.timeout = timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.peak_rss = rss()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="good-client")

    def one(self, timeout: float | None = None) -> None:
        started = time.monotonic()
        try:
            with Client(self.address, timeout=timeout or self.timeout) as client:
                response = client.request({"SCRIPT_NAME": "/hello", "REQUEST_METHOD": "GET"})
            if response.body != b"hello":
                self.failures.append(f"answered {response.body[:40]!r}")
                return
        except FastCGIError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.peak_rss = max(self.peak_rss, rss())
        self.latencies.append(time.monotonic() - started)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.one()
            self.stopping.wait(self.every)

    @contextlib.contextmanager
    def running(self) -> Iterator[GoodClient]:
        self.thread.start()
        try:
            yield self
        finally:
            self.stopping.set()
            self.thread.join()

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
