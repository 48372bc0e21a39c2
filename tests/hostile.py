"""A FastCGI application that misbehaves on purpose, for the clients' failure tests.

Plain threads, sockets and hand-packed records: no fcgiproto code runs on this
side, so what goes on the wire is exactly what the mode says, byte for byte.

``HostileServer`` listens on TCP 127.0.0.1 (a free port) and on a Unix socket
in a temporary directory. What it does is a ``Mode``: set globally with
``set_mode()`` (read again at every request and every GET_VALUES, so a
connection kept alive by the client follows the switch), or pinned to the next
accepted connections with ``pin()``. Each connection has a thread of its own
that reads records and plays a schedule of timed writes, closes and resets;
``stop()`` (or leaving the ``with`` block) shuts every socket down and joins
every thread. ``wait_quiet()`` waits until every connection has ended, which
happens once the client has closed its side: a client that leaks a
connection keeps it open.

The modes (``Mode.kind``):

- ``healthy``: a valid response (``RESPONSE``; with the PARAMS variable
  HOSTILE_TAG, its body is "hello <tag>"), GET_VALUES answered (FCGI_MPXS_CONNS
  from ``Mode.mpxs``), ABORT_REQUEST of a request not answered yet answered
  with END_REQUEST. Requests are answered as they complete, several at once
  on one connection if the client multiplexes.
- ``close_at``: the first ``offset`` bytes of the valid response, then close.
- ``trickle``: the valid response one byte every ``interval`` seconds.
- ``silent``: accept, read everything, never answer anything.
- ``http``: answer requests and GET_VALUES with an HTTP 400 response.
- ``garbage_after_end``: the valid response and garbage, in one write;
  ``garbage_later``: the garbage ``interval`` seconds after the response.
- ``wrong_id``: the valid response with every record for ``request_id``.
- ``duplicate_end``: the valid response and a second END_REQUEST, in one
  write; ``duplicate_end_later``: the second one ``interval`` seconds later.
- ``stdout_after_end``: STDOUT data, its empty terminator, more STDOUT, END_REQUEST.
- ``values_huge``: GET_VALUES_RESULT with a name declaring 2**31 - 1 bytes.
- ``big_padding``: a 65535-byte STDOUT record with 255 bytes of padding (valid).
- ``values_empty``, ``values_duplicated`` (two result records),
  ``values_dup_keys`` (FCGI_MPXS_CONNS twice in one record),
  ``values_non_numeric`` (FCGI_MPXS_CONNS=yes), ``values_silent`` (no answer):
  requests are answered as ``healthy`` does.
- ``ignore_abort``: the head, then a STDOUT record every ``interval`` seconds
  for ``duration`` seconds, then END_REQUEST, whatever ABORT_REQUEST says.
- ``reset_on_accept``: accept and reset at once (SO_LINGER 0, then close).
- ``reset_after_request``: read the request, then reset.
- ``refuse``: nothing listens (TCP: the port is bound, not listening; Unix:
  the socket file is gone); ``refuse_stale``: the same, but the Unix socket
  file stays (ECONNREFUSED rather than ENOENT). Any other mode listens again,
  on the same port and path.

For GET_VALUES every mode not about it answers as ``healthy`` does, except
``silent`` and ``http``.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "BOUNDARIES",
    "HTTP_RESPONSE",
    "KINDS",
    "RESPONSE",
    "STDOUT_BODY",
    "STDOUT_CONTENT",
    "HostileServer",
    "Mode",
    "decode_pairs",
    "healthy_content",
    "hostile_server",
    "record",
    "response",
]

HEADER = struct.Struct(">BBHHBx")
END_BODY = struct.Struct(">IB3x")
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT = 1, 2, 3, 4, 5, 6
GET_VALUES, GET_VALUES_RESULT = 9, 10

STDOUT_BODY = b"hello"
#: The CGI response every healthy request gets: 49 bytes, so 7 of padding.
STDOUT_CONTENT = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n" + STDOUT_BODY
HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
    b"Connection: close\r\n\r\nBad Request"
)
GARBAGE = b"\xde\xad\xbe\xef this is not FastCGI\r\n"
#: The name/value pair of a GET_VALUES_RESULT whose name declares 2**31 - 1 bytes.
HUGE_PAIR = struct.pack(">IB", 0x80000000 | 0x7FFFFFFF, 1) + b"FCGI_MPXS_CONNS1"

KINDS = frozenset(
    {
        "healthy",
        "close_at",
        "trickle",
        "silent",
        "http",
        "garbage_after_end",
        "garbage_later",
        "wrong_id",
        "duplicate_end",
        "duplicate_end_later",
        "stdout_after_end",
        "values_huge",
        "big_padding",
        "values_empty",
        "values_duplicated",
        "values_dup_keys",
        "values_non_numeric",
        "values_silent",
        "ignore_abort",
        "reset_on_accept",
        "reset_after_request",
        "refuse",
        "refuse_stale",
    }
)


def record(rtype: int, rid: int, content: bytes = b"", padding: int | None = None) -> bytes:
    """One record; the padding aligns it to 8 bytes unless given."""
    if padding is None:
        padding = -len(content) % 8
    return HEADER.pack(1, rtype, rid, len(content), padding) + content + bytes(padding)


def end_request(rid: int, app_status: int = 0, protocol_status: int = 0) -> bytes:
    return record(END_REQUEST, rid, END_BODY.pack(app_status, protocol_status))


def pair(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:
        return bytes([n]) if n < 128 else struct.pack(">I", 0x80000000 | n)

    return length(len(name)) + length(len(value)) + name + value


def response(rid: int = 1, content: bytes = STDOUT_CONTENT) -> bytes:
    """STDOUT with the content, the empty STDOUT, END_REQUEST(0, REQUEST_COMPLETE)."""
    return record(STDOUT, rid, content) + record(STDOUT, rid) + end_request(rid)


def healthy_content(tag: bytes | None) -> bytes:
    """What a healthy request gets on STDOUT: the body says "hello", and the tag if it sent
    one (PARAMS HOSTILE_TAG), so that a test can tell whose response it got."""
    return STDOUT_CONTENT if tag is None else STDOUT_CONTENT + b" " + tag


#: The valid response of a request with id 1: 88 bytes.
RESPONSE = response()
#: Offsets into RESPONSE worth closing at, by what they cut.
BOUNDARIES = {
    "nothing": 0,
    "header-1-byte": 1,
    "header-7-bytes": 7,
    "header-no-content": 8,
    "mid-content": 30,
    "content-no-padding": 57,
    "mid-padding": 60,
    "first-record-whole": 64,
    "mid-empty-stdout": 68,
    "between-stdout-end-and-end-request": 72,
    "mid-end-request-header": 76,
    "end-request-no-body": 80,
    "mid-end-request-body": 84,
    "one-byte-short": len(RESPONSE) - 1,
}


@dataclass(frozen=True)
class Mode:
    kind: str = "healthy"
    offset: int = 0  # close_at
    interval: float = 0.1  # trickle, garbage_later, duplicate_end_later, ignore_abort
    duration: float = 1.0  # ignore_abort
    request_id: int = 2  # wrong_id
    mpxs: bool = False  # what GET_VALUES says of FCGI_MPXS_CONNS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mode {self.kind!r}")

    def __str__(self) -> str:
        extra = {
            "close_at": f"@{self.offset}",
            "trickle": f"/{self.interval}s",
            "wrong_id": f"#{self.request_id}",
        }.get(self.kind, "")
        return self.kind + extra + ("+mpxs" if self.mpxs else "")


HEALTHY = Mode()


@dataclass
class Stats:
    accepted: int = 0
    requests: int = 0
    values: int = 0
    aborts: int = 0
    records: list[tuple[int, int]] = field(default_factory=list)  # (type, request id)


# A schedule entry's action: bytes to send, or one of these.
_CLOSE, _RESET = "close", "reset"
_Action = bytes | str


class _Connection:
    """One accepted connection: its socket, its thread, its pending writes."""

    def __init__(self, server: HostileServer, sock: socket.socket, pinned: Mode | None) -> None:
        self.server = server
        self.sock = sock
        self.pinned = pinned
        self.lock = threading.Lock()
        self.closed = False
        self.buffer = bytearray()
        self.requests: dict[int, bytearray] = {}  # id -> PARAMS so far, until answered
        self.schedule: list[tuple[float, int, int, _Action]] = []  # (at, seq, rid, action)
        self.seq = itertools.count()
        self.thread = threading.Thread(target=self.run, name="hostile conn", daemon=True)

    @property
    def mode(self) -> Mode:
        return self.pinned or self.server.mode

    # --- the thread ---

    def run(self) -> None:
        try:
            if self.mode.kind == "reset_on_accept":
                self.reset()
                return
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            while not self.closed:
                wait = None
                if self.schedule:
                    wait = max(0.0, self.schedule[0][0] - time.monotonic())
                if poller.poll(None if wait is None else wait * 1000):
                    data = self.sock.recv(65536)
                    if not data:
                        return  # the client closed (or stop() shut us down)
                    self.receive(data)
                while self.schedule and self.schedule[0][0] <= time.monotonic():
                    _, _, _, action = heapq.heappop(self.schedule)
                    if action == _CLOSE:
                        return
                    if action == _RESET:
                        self.reset()
                        return
                    assert isinstance(action, bytes)
                    self.sock.sendall(action)
        except OSError:
            return  # the client went away (EPIPE, ECONNRESET) or stop() shut us down
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.sock.close()

    def reset(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                self.sock.close()

    def shut_down(self) -> None:
        """From another thread: wake the connection's thread, which then closes."""
        with self.lock:
            if not self.closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    # --- what arrives ---

    def receive(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= 8:
            _, rtype, rid, clen, plen = HEADER.unpack_from(buf)
            if len(buf) < 8 + clen + plen:
                break
            content = bytes(buf[8 : 8 + clen])
            del buf[: 8 + clen + plen]
            self.on_record(rtype, rid, content)

    def on_record(self, rtype: int, rid: int, content: bytes) -> None:
        stats = self.server.stats
        with self.server.lock:
            stats.records.append((rtype, rid))
        if rtype == BEGIN_REQUEST:
            self.requests[rid] = bytearray()
        elif rtype == PARAMS and rid in self.requests:
            self.requests[rid] += content
        elif rtype == STDIN and not content and rid in self.requests:
            with self.server.lock:
                stats.requests += 1
            params = dict(decode_pairs(bytes(self.requests.pop(rid))))
            self.answer(rid, self.mode, params.get(b"HOSTILE_TAG"))
        elif rtype == GET_VALUES:
            with self.server.lock:
                stats.values += 1
            self.answer_values(content, self.mode)
        elif rtype == ABORT_REQUEST:
            with self.server.lock:
                stats.aborts += 1
            # A request not answered yet is ended (unless the mode ignores
            # aborts); one being answered finishes as its mode says, since an
            # answer cut short mid-record would corrupt the connection.
            if rid in self.requests and self.mode.kind != "ignore_abort":
                self.later(0, rid, end_request(rid))
                del self.requests[rid]

    # --- what goes out ---

    def later(self, delay: float, rid: int, action: _Action) -> None:
        heapq.heappush(self.schedule, (time.monotonic() + delay, next(self.seq), rid, action))

    def answer(self, rid: int, mode: Mode, tag: bytes | None) -> None:
        kind = mode.kind
        good = response(rid)  # the same bytes whatever the tag: offsets count into it
        if kind == "silent":
            return
        if kind == "close_at":
            self.later(0, rid, good[: mode.offset])
            self.later(0, rid, _CLOSE)
        elif kind == "trickle":
            for i, byte in enumerate(good):
                self.later(i * mode.interval, rid, bytes([byte]))
        elif kind == "http":
            self.later(0, rid, HTTP_RESPONSE)
        elif kind == "garbage_after_end":
            self.later(0, rid, good + GARBAGE)
        elif kind == "garbage_later":
            self.later(0, rid, good)
            self.later(mode.interval, rid, GARBAGE)
        elif kind == "wrong_id":
            self.later(0, rid, response(mode.request_id))
        elif kind == "duplicate_end":
            self.later(0, rid, good + end_request(rid))
        elif kind == "duplicate_end_later":
            self.later(0, rid, good)
            self.later(mode.interval, rid, end_request(rid))
        elif kind == "stdout_after_end":
            wire = record(STDOUT, rid, STDOUT_CONTENT) + record(STDOUT, rid)
            self.later(0, rid, wire + record(STDOUT, rid, b"more") + end_request(rid))
        elif kind == "big_padding":
            content = STDOUT_CONTENT.ljust(65535, b"x")
            wire = record(STDOUT, rid, content, padding=255) + record(STDOUT, rid)
            self.later(0, rid, wire + end_request(rid))
        elif kind == "ignore_abort":
            self.later(0, rid, record(STDOUT, rid, STDOUT_CONTENT))
            ticks = max(1, int(mode.duration / mode.interval))
            for i in range(1, ticks + 1):
                self.later(i * mode.interval, rid, record(STDOUT, rid, b"."))
            self.later(ticks * mode.interval, rid, record(STDOUT, rid) + end_request(rid))
        elif kind == "reset_after_request":
            self.later(0, rid, _RESET)
        else:  # healthy, values_*, and reset_on_accept on a connection accepted before
            self.later(0, rid, response(rid, healthy_content(tag)))

    def answer_values(self, content: bytes, mode: Mode) -> None:
        kind = mode.kind
        mpxs = b"1" if mode.mpxs else b"0"
        if kind in ("silent", "values_silent"):
            return
        if kind == "http":
            self.later(0, 0, HTTP_RESPONSE)
        elif kind == "values_huge":
            self.later(0, 0, record(GET_VALUES_RESULT, 0, HUGE_PAIR))
        elif kind == "values_empty":
            self.later(0, 0, record(GET_VALUES_RESULT, 0))
        elif kind == "values_duplicated":
            one = record(GET_VALUES_RESULT, 0, pair(b"FCGI_MPXS_CONNS", mpxs))
            self.later(0, 0, one + one)
        elif kind == "values_dup_keys":
            both = pair(b"FCGI_MPXS_CONNS", b"1") + pair(b"FCGI_MPXS_CONNS", mpxs)
            self.later(0, 0, record(GET_VALUES_RESULT, 0, both))
        elif kind == "values_non_numeric":
            self.later(0, 0, record(GET_VALUES_RESULT, 0, pair(b"FCGI_MPXS_CONNS", b"yes")))
        else:
            known = {b"FCGI_MAX_CONNS": b"10", b"FCGI_MAX_REQS": b"10", b"FCGI_MPXS_CONNS": mpxs}
            answer = b"".join(
                pair(name, known[name]) for name, _ in decode_pairs(content) if name in known
            )
            self.later(0, 0, record(GET_VALUES_RESULT, 0, answer))


def decode_pairs(content: bytes) -> list[tuple[bytes, bytes]]:
    """The name/value pairs of a PARAMS stream or a GET_VALUES body (trusted: our client's)."""
    pairs, pos = [], 0
    while pos < len(content):
        lengths = []
        for _ in range(2):
            if content[pos] < 128:
                lengths.append(content[pos])
                pos += 1
            else:
                lengths.append(struct.unpack_from(">I", content, pos)[0] & 0x7FFFFFFF)
                pos += 4
        name_end = pos + lengths[0]
        pairs.append((content[pos:name_end], content[name_end : name_end + lengths[1]]))
        pos = name_end + lengths[1]
    return pairs


class HostileServer:
    """The misbehaving application; use it as a context manager."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mode: Mode = HEALTHY
        self.stats = Stats()
        self._pinned: list[Mode] = []
        self._dir = tempfile.TemporaryDirectory(prefix="hostile-")
        self.unix_path = os.path.join(self._dir.name, "app.sock")
        #: A Unix socket path where nothing ever listens.
        self.missing_path = os.path.join(self._dir.name, "missing.sock")
        self._tcp: socket.socket | None = None  # listening, or only bound while refusing
        self._unix: socket.socket | None = None
        self._listening = False
        self._connections: list[_Connection] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._applied = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="hostile accept")
        self.port = 0

    # --- life ---

    def start(self) -> HostileServer:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", 0))
        self.port = tcp.getsockname()[1]
        self._tcp = tcp
        self._listen()
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close every socket and join every thread."""
        with self.lock:
            self._stopping = True
            connections = list(self._connections)
        self._wake()
        if self._acceptor.is_alive():
            self._acceptor.join(5)
        for conn in connections:
            conn.shut_down()
        for conn in connections:
            conn.thread.join(5)
        for sock in (self._tcp, self._unix):
            if sock is not None:
                sock.close()
        self._tcp = self._unix = None
        self._wake_r.close()
        self._wake_w.close()
        self._dir.cleanup()
        alive = [conn for conn in connections if conn.thread.is_alive()]
        assert not alive, f"{len(alive)} connection threads did not stop"
        assert not self._acceptor.is_alive(), "the accept thread did not stop"

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what the tests use ---

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def unix_address(self) -> str:
        return f"unix:{self.unix_path}"

    def address(self, transport: str) -> str:
        return self.tcp_address if transport == "tcp" else self.unix_address

    def set_mode(self, mode: Mode | str) -> None:
        """What every connection does from now on (but those pinned)."""
        mode = Mode(mode) if isinstance(mode, str) else mode
        with self.lock:
            self.mode = mode
            changed = self._wants_listening() != self._listening
            if changed:
                self._applied.clear()
        if changed:
            # The accept thread swaps its own listeners: a socket closed
            # under another thread's select() would not wake it.
            self._wake()
            assert self._applied.wait(5), "the accept thread did not switch listeners"

    def pin(self, mode: Mode | str, count: int = 1) -> None:
        """What the next `count` connections accepted do, whatever the global mode."""
        mode = Mode(mode) if isinstance(mode, str) else mode
        with self.lock:
            self._pinned.extend([mode] * count)

    def live_connections(self) -> int:
        with self.lock:
            return sum(1 for conn in self._connections if conn.thread.is_alive())

    def wait_quiet(self, timeout: float = 5.0) -> bool:
        """Whether every connection has ended (the client closed them all), within timeout."""
        give_up = time.monotonic() + timeout
        while True:
            with self.lock:
                alive = [conn for conn in self._connections if conn.thread.is_alive()]
                self._connections = alive
            if not alive:
                return True
            left = give_up - time.monotonic()
            if left <= 0:
                return False
            alive[0].thread.join(min(left, 0.05))

    def kill_connections(self) -> None:
        """Shut every connection down: the watchdog's way to unblock a hung client."""
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            conn.shut_down()

    # --- listening ---

    def _listen(self) -> None:
        assert self._tcp is not None
        self._tcp.listen(64)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(self.unix_path)
        unix.listen(64)
        self._unix = unix
        self._listening = True

    def _refuse(self, stale: bool) -> None:
        """Nothing listens any more: the port stays bound (so connecting is refused), the
        Unix socket file is removed, or left behind when stale."""
        assert self._tcp is not None and self._unix is not None
        self._tcp.close()
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", self.port))
        self._tcp = tcp
        self._unix.close()
        self._unix = None
        if not stale:
            os.unlink(self.unix_path)
        self._listening = False

    def _wants_listening(self) -> bool:
        return self.mode.kind not in ("refuse", "refuse_stale")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"!")

    def _accept_loop(self) -> None:
        while True:
            with self.lock:
                if self._stopping:
                    return
                if self._wants_listening() != self._listening:
                    if self._listening:
                        self._refuse(stale=self.mode.kind == "refuse_stale")
                    else:
                        self._listen()
                    self._applied.set()
                listeners = [s for s in (self._tcp, self._unix) if s is not None]
                listening = self._listening
            watched = [self._wake_r, *listeners] if listening else [self._wake_r]
            ready, _, _ = select.select(watched, [], [])
            if self._wake_r in ready:
                self._wake_r.recv(4096)
                continue
            for listener in ready:
                with self.lock:
                    if listener not in (self._tcp, self._unix) or not self._listening:
                        continue  # replaced meanwhile
                    try:
                        sock, _ = listener.accept()
                    except OSError:
                        continue
                    if listener.family == socket.AF_INET:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.settimeout(5.0)
                    pinned = self._pinned.pop(0) if self._pinned else None
                    conn = _Connection(self, sock, pinned)
                    self._connections.append(conn)
                    self.stats.accepted += 1
                    conn.thread.start()


@contextlib.contextmanager
def hostile_server() -> Iterator[HostileServer]:
    with HostileServer() as server:
        yield server
