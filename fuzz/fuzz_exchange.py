#!/usr/bin/env python3
"""Fuzz the client's exchange: pool, probe, multiplexing, streams, aborts, retries, timeouts.

    uv run --group fuzz python fuzz/fuzz_exchange.py fuzz/corpus/exchange -max_total_time=600

The client's control flow is written once, in fcgiproto_anyio, and generated
into fcgiproto_socket. This target drives the async copy, AsyncClient, over
the in-memory backend on trio with a MockClock: every wait (read, write and
pool timeouts, keep-alive expiry, the probe, delays of the application) costs
no real time and happens in the same order on every run of an input, and
concurrent callers need no threads. The scheduler's random choices are seeded
from the input, so they are one more thing the fuzzer picks. (The blocking
copy would need a reader thread per shared connection, a reaper thread, and
real waits.)

Input: 4 setup bytes, then a byte ``n``, then ``n & 31`` client operations of
4 bytes, then the application's script, read as the application needs it.

- byte 0: bits 0-1 ``multiplex=`` (None: probe, False, True, None); bits
  2-4 ``max_connections - 1``; bits 5-6 ``max_keepalive`` (None, 0, 1, 2);
  bit 7 unused.
- byte 1: bits 0-1 read timeout (2, 0.5, 30, 5 s), bits 2-3 total (None, 3,
  60, 10 s), bits 4-5 pool timeout (10, 0, 1, 3 s), bits 6-7 keep-alive
  expiry (5, 0.5, 60, 1 s). Connect and write timeouts are 5 s.
- byte 2: the seed of trio's scheduler.
- byte 3: spare (kept so inputs line up with the other targets).
- client operation ``kind a b c``: kind bits 0-2 what (see ``CLIENT_OPS``),
  bit 3 run concurrently (start after ``c & 63`` quarter seconds, not
  waited for), bit 4 the body is given as pieces and its source raises
  ``BodyFailure`` half-way, bits 5-6 the body as bytes, a list, a generator,
  an async generator. ``a``: body size (``a * 37`` bytes) or a count; ``b``:
  how a stream is read (see ``Run.stream``); ``c``: delays.
- the application's script: each connection takes one byte of behaviour
  when it opens (``PEER_*`` bits); each request, once its body ended (or at
  its PARAMS, with ``PEER_EARLY``), runs answer operations ``op arg`` (see
  ``ScriptedPeer.run_answer``) until one ends it. Once the script runs out the application is
  well-behaved: a CGI head, then END_REQUEST.

Checks: client calls raise nothing but fcgiproto's errors (or the body
source's own failure), LocalProtocolError only from a closed client or a
misuse the input asks for; every byte the client writes parses as FastCGI
an application accepts (the application side is fcgiproto's
ServerConnection), or, once the application sent it odd bytes (a second
END_REQUEST can mislead it), at least as whole records of a client's
types; a request or stream that
succeeds on a connection the application wrote nothing odd to gets exactly
the STDOUT, STDERR and app status the application sent; a stream holds at
most a read or two of stdout; nothing hangs (a virtual-time limit, and a
bound on reads and writes). Afterwards, with nothing in flight: the pool
counts exactly its idle connections, no caller waits, no replaced shared
connection is left, and every connection the client did not close is idle
in the pool or the shared one; once the application turns well-behaved a
new request succeeds; after close every connection is closed and the pool
counts none. With FCGIPROTO_FUZZ_TRACEMALLOC=1 the run's peak allocation is
bounded by the bytes exchanged.
"""

from __future__ import annotations

import struct
import sys
import tracemalloc
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

try:
    import atheris
except ImportError:  # replaying inputs (tests/test_fuzz_corpus.py) needs no atheris
    atheris = None

with (
    atheris.instrument_imports(include=["fcgiproto", "fcgiproto_anyio"])
    if atheris is not None and __name__ == "__main__"
    else nullcontext()
):
    from fcgiproto import (
        AbortRequest,
        BeginRequest,
        FastCGIError,
        LocalProtocolError,
        Params,
        ProtocolStatus,
        ReadError,
        ReadTimeout,
        RemoteProtocolError,
        ServerConnection,
        StdinEnd,
        WriteTimeout,
    )
    from fcgiproto.support import Address, PeerAnswer, Timeout
    from fcgiproto_anyio import AsyncClient, AsyncMemoryBackend, AsyncMemoryStream

import anyio
import anyio.lowlevel
import trio
import trio.testing

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if __package__:
    from . import _harness as h
else:  # run as a script: fuzz/ is sys.path[0]
    import _harness as h

ADDRESS = "unix:/fuzz.sock"
MAX_CLIENT_OPS = 31
#: Virtual seconds a whole input may take: far more than any legitimate run.
VIRTUAL_LIMIT = 10_000_000.0
#: Reads and writes on all streams of one input; past it the client is looping.
MAX_STREAM_CALLS = 200_000
#: Reads split small and writes cut short, per stream, after which the peer
#: stops splitting and cutting: 250 KB read a byte at a time proves no more
#: than half a KB does, and costs seconds.
MAX_SMALL_CALLS = 512
#: Answer operations one request may run.
MAX_ANSWER_OPS = 64
#: Made-up STDOUT an input may ask for in all (``BIG`` operations).
MAX_BIG = 1024 * 1024
#: The run's peak allocation (with tracemalloc) beyond what is exchanged.
ALLOC_FIXED = 8 * 1024 * 1024
ALLOC_PER_BYTE = 16
#: What a stream may hold of stdout at once: what one read brought, twice.
STREAM_HOLD = 2 * 256 * 1024 + 64 * 1024

HEAD = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n"
GOOD_BODY = b"all is well"

# The peer's behaviour, one byte per connection.
PEER_MULTIPLEX = 0x01  # its ServerConnection multiplexes (and says so)
PEER_IGNORE_VALUES = 0x02  # it never answers GET_VALUES
PEER_EARLY = 0x04  # it answers at the end of PARAMS, before the body
PEER_CLOSE_AFTER = 0x08  # it closes after each answer
PEER_STOP_READING = 0x80  # it stops reading after 256 bytes: writes block
#: Bits 4-6: the most a write_some() takes at once.
WRITE_CAPS = (None, 1, 3, 8, 9, 100, 4096, 65536)

READ_TIMEOUTS = (2.0, 0.5, 30.0, 5.0)
TOTAL_TIMEOUTS = (None, 3.0, 60.0, 10.0)
POOL_TIMEOUTS = (10.0, 0.0, 1.0, 3.0)
EXPIRIES = (5.0, 0.5, 60.0, 1.0)

# Client operations (kind & 7).
REQUEST, STREAM, GET_VALUES, SLEEP, CANCELLED, STREAM_CANCELLED, CHECK, CLOSE = range(8)
CLIENT_OPS = (
    "request",
    "stream",
    "get_values",
    "sleep",
    "cancelled request",
    "cancelled stream",
    "check",
    "close",
)

# Answer operations (op & 15).
(
    STDOUT,
    STDERR,
    END,
    END_ABNORMAL,
    RAW,
    CLOSE_CONN,
    DELAY,
    SPLIT,
    STALL,
    BIG,
    STRAY,
    END_TWICE,
    PADDED,
    WAIT_INPUT,
    VALUES_RESULT,
    RESET,
) = range(16)

_HEADER = struct.Struct(">BBHHBx")
#: BEGIN_REQUEST, ABORT_REQUEST, PARAMS, STDIN, DATA, GET_VALUES.
CLIENT_RECORD_TYPES = frozenset({1, 2, 4, 5, 8, 9})


def record(rtype: int, rid: int, content: bytes = b"", padding: int = 0) -> bytes:
    return _HEADER.pack(1, rtype, rid, len(content), padding) + content + b"\0" * padding


class BodyFailure(Exception):
    """What a request body's source raises half-way, when the input says so."""


class Violation(AssertionError):
    pass


class Script:
    """The application's side of the input, read byte by byte; zeros once it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


@dataclass
class Sent:
    """What the application sent for one request (its latest attempt), kept for the checks."""

    conn: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    app_status: int | None = None
    protocol_status: ProtocolStatus | None = None


@dataclass
class World:
    """Everything one input shares: the script, the clock's bounds, what was sent."""

    script: Script
    good: bool = False  # the application behaves from now on
    calls: int = 0
    big: int = 0
    exchanged: int = 0
    sent: dict[bytes, Sent] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)  # connections with odd bytes on them
    peers: list[ScriptedPeer] = field(default_factory=list)

    def count_call(self) -> None:
        self.calls += 1
        if self.calls > MAX_STREAM_CALLS:
            raise Violation(f"more than {MAX_STREAM_CALLS} reads and writes: the client loops")


class ScriptedPeer:
    """An application on one connection: fcgiproto's ServerConnection, answering as scripted.

    Everything the client writes goes through a ServerConnection, so bytes
    that are not valid FastCGI from a client fail the run. Answers are
    scheduled on the stream (`ScriptedStream.schedule`), each with the time
    it arrives.
    """

    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.index = index
        behaviour = 0 if world.good else world.script.byte()
        self.multiplex = bool(behaviour & PEER_MULTIPLEX)
        self.ignore_values = bool(behaviour & PEER_IGNORE_VALUES)
        self.early = bool(behaviour & PEER_EARLY)
        self.close_after = bool(behaviour & PEER_CLOSE_AFTER)
        self.stop_reading = bool(behaviour & PEER_STOP_READING)
        self.write_cap = WRITE_CAPS[(behaviour >> 4) & 7]
        self.conn = ServerConnection(multiplex=self.multiplex, max_requests=4)
        self.stream: ScriptedStream | None = None
        # Set once the client, misled by odd bytes this application sent (a
        # second END_REQUEST, say), writes what its ServerConnection refuses:
        # from then on only the framing of what it writes is checked
        # (check_framing, which reads every connection independently).
        self.lost = False
        self.framing = bytearray()
        self.tags: dict[int, bytes] = {}
        self.waiting: deque[int] = deque()  # requests to go on with at the next write
        self.stalled: set[int] = set()
        self.delay = 0.0
        self.read_bytes = 0

    # --- what the client wrote ---

    def receive(self, data: bytes) -> PeerAnswer:
        """Take what the client wrote; the answers go on the stream's schedule."""
        self.read_bytes += len(data)
        self.check_framing(data)
        if self.lost:
            return b"", False
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError as exc:
            if self.index not in self.world.dirty:
                raise Violation(f"the client wrote what an application refuses: {exc}") from exc
            self.lose()
            return b"", False
        self.flush()  # GET_VALUES answers, refusals
        due: list[int] = []
        for event in events:
            rid = getattr(event, "request_id", 0)
            if isinstance(event, BeginRequest):
                # A new request on a reused id: nothing of the last one carries over.
                self.stalled.discard(rid)
                if rid in self.waiting:
                    self.waiting.remove(rid)
            elif isinstance(event, Params):
                tag = event.params.get(b"TAG", b"?")
                self.tags[rid] = tag
                self.world.sent[tag] = Sent(self.index)
                if self.early:
                    due.append(rid)
            elif isinstance(event, StdinEnd) or (
                isinstance(event, AbortRequest) and rid not in self.stalled
            ):
                due.append(rid)
        # Requests waiting for more input go on first, each answer once per write.
        resume, self.waiting = list(self.waiting), deque()
        for rid in dict.fromkeys(resume + due):
            self.answer(rid)
        return b"", False

    def lose(self) -> None:
        """The application lost track of the connection: it reads on, and answers nothing."""
        self.lost = True
        if self.world.good:
            self.schedule(None)

    def check_framing(self, data: bytes) -> None:
        """What a client writes is records of a client's types, whatever it believes."""
        self.framing += data
        while len(self.framing) >= 8:
            version, rtype, _, clen, plen = _HEADER.unpack_from(self.framing)
            if version != 1 or rtype not in CLIENT_RECORD_TYPES:
                raise Violation(f"the client wrote a record of version {version}, type {rtype}")
            if len(self.framing) < 8 + clen + plen:
                return
            del self.framing[: 8 + clen + plen]

    # --- what it answers ---

    def answer(self, rid: int) -> None:
        """Run the script's answer for request rid until it ends, stalls or waits."""
        if self.lost or rid not in self.conn.active_requests or rid in self.stalled:
            return
        try:
            self.run_answer(rid)
        except LocalProtocolError:
            # The request is not in a state to be answered (its PARAMS have
            # not ended): the application cannot answer it, the client waits.
            self.stalled.add(rid)

    def run_answer(self, rid: int) -> None:
        script, world = self.world.script, self.world
        sent = world.sent.setdefault(self.tags.get(rid, b"?"), Sent(self.index))
        for _ in range(MAX_ANSWER_OPS):
            if world.good or script.exhausted:
                if not sent.stdout:
                    self.stdout(rid, HEAD + GOOD_BODY, sent)
                self.end(rid, 0, ProtocolStatus.REQUEST_COMPLETE, sent)
                return
            op, arg = script.byte() & 15, script.byte()
            if op == STDOUT:
                self.stdout(rid, script.take(arg) if arg else HEAD, sent)
            elif op == STDERR:
                self.stderr(rid, script.take(arg) if arg else b"warning\n", sent)
            elif op == END:
                self.end(rid, arg, ProtocolStatus.REQUEST_COMPLETE, sent)
                return
            elif op == END_ABNORMAL:
                self.end(rid, 0, ProtocolStatus(1 + arg % 3), sent)
                return
            elif op == RAW:
                self.raw(script.take(arg))
            elif op == CLOSE_CONN:
                self.schedule(None)
                return
            elif op == DELAY:
                self.delay = arg / 8
            elif op == SPLIT:
                assert self.stream is not None
                self.stream.split = None if arg == 255 else arg + 1
            elif op == STALL:
                self.stalled.add(rid)
                return
            elif op == BIG:
                size = min((arg + 1) * 1024, MAX_BIG - world.big)
                world.big += size
                body = (HEAD if not sent.stdout else b"") + bytes(range(256)) * (size // 256)
                self.stdout(rid, body, sent)
            elif op == STRAY:
                self.raw(record(6, rid + 1 + arg % 3, b"stray"))
            elif op == END_TWICE:
                self.end(rid, arg, ProtocolStatus.REQUEST_COMPLETE, sent)
                self.raw(record(3, rid, bytes(8)))
                return
            elif op == PADDED:
                data = script.take(arg & 15) or b"p"
                # A valid record, padded: the client must read it like any other.
                self.flush()
                self.schedule(record(6, rid, data, arg >> 4))
                sent.stdout += data
            elif op == WAIT_INPUT:
                self.waiting.append(rid)
                return
            elif op == VALUES_RESULT:
                self.raw(record(10, 0, b"\x0f\x01FCGI_MPXS_CONNS1"))
            else:  # RESET: the connection drops, what is on its way with it
                assert self.stream is not None
                self.stream.schedule.clear()
                self.stream.peer_closed = True
                return
        self.stalled.add(rid)  # out of operations: it never ends

    def stdout(self, rid: int, data: bytes, sent: Sent) -> None:
        if data:
            self.conn.send_stdout(rid, data)
            sent.stdout += data
            self.flush()

    def stderr(self, rid: int, data: bytes, sent: Sent) -> None:
        if data:
            self.conn.send_stderr(rid, data)
            sent.stderr += data
            self.flush()

    def end(self, rid: int, app_status: int, status: ProtocolStatus, sent: Sent) -> None:
        self.conn.end_request(rid, app_status, status)
        sent.app_status, sent.protocol_status = app_status, status
        self.flush()
        if self.close_after:
            self.schedule(None)

    def raw(self, data: bytes) -> None:
        self.flush()
        if data:
            self.world.dirty.add(self.index)
            self.schedule(data)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.ignore_values and not self.world.good:
            data = strip_values_results(data)
        if data:
            self.schedule(data)

    def schedule(self, data: bytes | None) -> None:
        """Send data (None: close), arriving after the current delay, never before earlier data."""
        stream = self.stream
        assert stream is not None
        now = trio.current_time()
        at = max(now + self.delay, stream.schedule[-1][0] if stream.schedule else now)
        stream.schedule.append((at, data))
        if data:
            self.world.exchanged += len(data)
        stream.wake()

    # --- turning well-behaved ---

    def behave(self) -> None:
        """From now on answer at once and in full; end what was left hanging."""
        self.delay = 0.0
        self.stop_reading = False
        self.write_cap = None
        self.close_after = False
        self.ignore_values = False
        if self.lost:
            self.schedule(None)  # an application that lost track closes
        if self.stream is not None:
            self.stream.split = None
            for at, data in self.stream.schedule:
                del at
                self.stream.arrived(data)
            self.stream.schedule.clear()
            self.stream.wake()
        if self.conn.closed:
            return
        self.stalled.clear()
        self.waiting.clear()
        for rid in sorted(self.conn.active_requests):
            self.answer(rid)


def strip_values_results(data: bytes) -> bytes:
    return b"".join(
        record(rtype, rid, content) for rtype, rid, content in h.parse_wire(data) if rtype != 10
    )


class ScriptedStream(AsyncMemoryStream):
    """An in-memory stream whose answers arrive when scheduled, split as scripted.

    Writes go to the peer through the base class; reads take what has
    arrived by the (mock) clock, at most `split` bytes at once.
    """

    def __init__(self, peer: ScriptedPeer, address: Address) -> None:
        super().__init__(peer, address)  # type: ignore[arg-type]
        self.scripted = peer
        self.world = peer.world
        self.schedule: deque[tuple[float, bytes | None]] = deque()
        self.split: int | None = None
        self.small_calls = 0  # reads split and writes cut so far
        peer.stream = self

    def wake(self) -> None:
        self._ready.set()

    def arrived(self, data: bytes | None) -> None:
        if data is None:
            self.peer_closed = True
        elif not self.peer_closed:
            self._inbound += data

    def _arrive(self) -> float | None:
        """Move what is due to the inbound buffer; when the next piece is due."""
        now = trio.current_time()
        while self.schedule and self.schedule[0][0] <= now:
            self.arrived(self.schedule.popleft()[1])
        return self.schedule[0][0] if self.schedule else None

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        self.world.count_call()
        give_up = None if timeout is None else trio.current_time() + timeout
        while True:
            if self.closed:
                raise read_error(self.address)
            due = self._arrive()
            if self._inbound or self.peer_closed:
                size = max_bytes
                if self.split is not None and self.small_calls < MAX_SMALL_CALLS:
                    self.small_calls += 1
                    size = min(max_bytes, self.split)
                data = bytes(self._inbound[:size])
                del self._inbound[:size]
                await anyio.lowlevel.checkpoint()
                return data
            now = trio.current_time()
            if give_up is not None and now >= give_up:
                raise read_timeout(self.address, timeout)
            limits = [t - now for t in (give_up, due) if t is not None]
            self._ready.clear()
            await self._ready.wait(min(limits) if limits else None)

    async def write_some(self, data: memoryview, timeout: float | None) -> int:
        self.world.count_call()
        self._arrive()
        peer = self.scripted
        if not self.closed and not self.peer_closed and peer.stop_reading:
            if peer.read_bytes >= 256:
                if timeout is None:
                    await anyio.sleep_forever()
                await anyio.sleep(timeout)
                raise write_timeout(self.address, timeout)
            data = data[: 256 - peer.read_bytes]
        if peer.write_cap is not None and self.small_calls < MAX_SMALL_CALLS:
            self.small_calls += 1
            data = data[: peer.write_cap]
        self.world.exchanged += len(data)
        return await super().write_some(data, timeout)

    async def write_or_read(
        self, data: memoryview, max_bytes: int, timeout: float | None
    ) -> tuple[int, bytes | None]:
        self._arrive()
        peer = self.scripted
        blocked = peer.stop_reading and peer.read_bytes >= 256
        if blocked and (self._inbound or self.peer_closed):
            return 0, await self.read(max_bytes, timeout)
        return await self.write_some(data, timeout), None

    def looks_alive(self) -> bool:
        self._arrive()
        return super().looks_alive()


def read_error(address: Address) -> FastCGIError:
    return ReadError(f"the connection to {address} was closed")


def read_timeout(address: Address, timeout: float | None) -> FastCGIError:
    return ReadTimeout(f"{address} did not send anything within {timeout}s")


def write_timeout(address: Address, timeout: float | None) -> FastCGIError:
    return WriteTimeout(f"{address} took nothing more within {timeout}s")


class ScriptedBackend(AsyncMemoryBackend):
    def __init__(self, world: World) -> None:
        super().__init__(lambda: ScriptedPeer(world, len(world.peers)))
        self.world = world

    async def connect(self, address: Address, timeout: float | None) -> AsyncMemoryStream:
        await anyio.lowlevel.checkpoint()
        peer = ScriptedPeer(self.world, len(self.world.peers))
        self.world.peers.append(peer)
        stream = ScriptedStream(peer, address)
        self.streams.append(stream)
        return stream


# --- the client's side ---


@dataclass(frozen=True)
class ClientSetup:
    multiplex: bool | None
    max_connections: int
    max_keepalive: int | None
    timeout: Timeout
    expiry: float
    seed: int

    @classmethod
    def decode(cls, setup: bytes) -> ClientSetup:
        b0, b1, b2, _ = setup
        return cls(
            multiplex=(None, False, True, None)[b0 & 3],
            max_connections=((b0 >> 2) & 7) + 1,
            max_keepalive=(None, 0, 1, 2)[(b0 >> 5) & 3],
            timeout=Timeout(
                connect=5.0,
                read=READ_TIMEOUTS[b1 & 3],
                write=5.0,
                pool=POOL_TIMEOUTS[(b1 >> 4) & 3],
                total=TOTAL_TIMEOUTS[(b1 >> 2) & 3],
            ),
            expiry=EXPIRIES[b1 >> 6],
            seed=b2,
        )


@dataclass(frozen=True)
class ClientOp:
    kind: int
    a: int
    b: int
    c: int

    @property
    def what(self) -> int:
        return self.kind & 7

    @property
    def concurrent(self) -> bool:
        return bool(self.kind & 8)

    @property
    def failing_body(self) -> bool:
        return bool(self.kind & 16)

    @property
    def body_form(self) -> int:
        return (self.kind >> 5) & 3


class Run:
    """One input's client operations against its application."""

    def __init__(self, setup: ClientSetup, ops: list[ClientOp], world: World) -> None:
        self.setup = setup
        self.ops = ops
        self.world = world
        self.backend = ScriptedBackend(world)
        self.client = AsyncClient(
            ADDRESS,
            max_connections=setup.max_connections,
            max_keepalive=setup.max_keepalive,
            keepalive_expiry=setup.expiry,
            multiplex=setup.multiplex,
            timeout=setup.timeout,
            backend=self.backend,
        )
        self.closed = False  # the client was closed by an operation
        self.failures: list[BaseException] = []
        self.tags = 0

    def tag(self) -> bytes:
        self.tags += 1
        return b"t%d" % self.tags

    # --- bodies ---

    def body(self, op: ClientOp) -> object:
        size = op.a * 37
        data = bytes(i & 0xFF for i in range(size))
        pieces = [data[i : i + 1000] for i in range(0, size, 1000)] or [b""]
        form = op.body_form if not op.failing_body else max(op.body_form, 2)
        if form == 0:
            return data
        if form == 1:
            return pieces

        def failing() -> None:
            if op.failing_body:
                raise BodyFailure("the body's source failed")

        if form == 2:

            def gen() -> Iterator[bytes]:
                for i, piece in enumerate(pieces):
                    if i == len(pieces) // 2:
                        failing()
                    yield piece
                failing()

            return gen()

        async def agen() -> AsyncIterator[bytes]:
            for i, piece in enumerate(pieces):
                if i == len(pieces) // 2:
                    failing()
                await anyio.sleep((op.c >> 6) / 4)
                yield piece
            failing()

        return agen()

    # --- operations ---

    async def run_op(self, op: ClientOp) -> None:
        try:
            await self.dispatch(op)
        except BodyFailure:
            if not op.failing_body:
                raise
        except LocalProtocolError as exc:
            if not self.closed and not self.local_error_expected(op, exc):
                raise Violation(f"{CLIENT_OPS[op.what]} of an open client: {exc!r}") from exc
        except FastCGIError:
            pass

    @staticmethod
    def local_error_expected(op: ClientOp, exc: LocalProtocolError) -> bool:
        # Reading the body after raw stdout began (or the other way round) is a misuse.
        return op.what in (STREAM, STREAM_CANCELLED) and (op.b & 7) == 7 and "body" in str(exc)

    async def guarded(self, op: ClientOp) -> None:
        try:
            await self.run_op(op)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            self.failures.append(exc)
            raise

    async def dispatch(self, op: ClientOp) -> None:
        client, what = self.client, op.what
        if what == REQUEST:
            tag = self.tag()
            r = await client.request({"TAG": tag}, self.body(op))
            self.check_response(tag, r.stdout, r.stderr, r.app_status)
            if op.b & 1:
                # The CGI head may be refused: RemoteProtocolError.
                _ = (r.status, r.headers, r.body)
        elif what == STREAM:
            await self.stream(op)
        elif what == GET_VALUES:
            values = await client.get_values()
            assert all(type(k) is str and type(v) is str for k, v in values.items()), values
        elif what == SLEEP:
            await anyio.sleep(op.a / 4)
        elif what == CANCELLED:
            with anyio.move_on_after(op.b / 8):
                tag = self.tag()
                r = await client.request({"TAG": tag}, self.body(op))
                self.check_response(tag, r.stdout, r.stderr, r.app_status)
        elif what == STREAM_CANCELLED:
            with anyio.move_on_after(op.a / 8):
                await self.stream(op)
        elif what == CHECK:
            self.check_pool_bounds()
        else:
            self.closed = True
            await client.aclose()

    async def stream(self, op: ClientOp) -> None:
        tag = self.tag()
        mode = op.b & 7
        async with self.client.stream({"TAG": tag}, self.body(op)) as s:
            _ = (s.status, s.headers)
            self.check_held(s)
            if mode == 0:
                await s.aread()
            elif mode == 1:
                async for _chunk in s.aiter_body():
                    break
            elif mode == 2:
                stdout = bytearray()
                async for chunk in s.aiter_stdout():
                    stdout += chunk
                    self.check_held(s)
                assert s.app_status is not None
                self.check_response(tag, bytes(stdout), bytes(s.stderr), s.app_status)
            elif mode == 3:
                # stdout waits in memory meanwhile, as documented: no check_held here.
                async for _chunk in s.aiter_stderr():
                    pass
                await s.aread()
            elif mode == 4:
                pass  # leave after the head
            elif mode == 5:
                n = 0
                async for _chunk in s.aiter_body():
                    self.check_held(s)
                    n += 1
                    if n > (op.a & 7):
                        break
            elif mode == 6:
                async for _chunk in s.aiter_stdout():
                    break
            else:
                async for _chunk in s.aiter_body():
                    break
                async for _chunk in s.aiter_stdout():
                    break

    # --- checks ---

    def check_response(self, tag: bytes, stdout: bytes, stderr: bytes, app_status: int) -> None:
        sent = self.world.sent.get(tag)
        assert sent is not None, f"a response for {tag!r}, which the application never saw"
        if sent.conn in self.world.dirty:
            return
        assert stdout == sent.stdout, f"{tag!r}: stdout {stdout[:80]!r}, sent {sent.stdout[:80]!r}"
        assert stderr == sent.stderr, f"{tag!r}: stderr {stderr[:80]!r}, sent {sent.stderr[:80]!r}"
        assert app_status == sent.app_status, f"{tag!r}: app_status {app_status} != {sent}"

    def check_held(self, s: object) -> None:
        held = sum(len(c) for c in getattr(s, "_stdout", ()))
        held += sum(len(c) for c in getattr(s, "_body", ()))
        held += sum(len(c) for c in getattr(s, "_replay", ()))
        assert held <= STREAM_HOLD, f"a stream holds {held} bytes of stdout"

    def check_pool_bounds(self) -> None:
        pool = self.client._pool
        assert 0 <= pool.open <= self.setup.max_connections, f"{pool.open} connections open"
        assert len(pool.idle) <= pool.max_keepalive, f"{len(pool.idle)} idle"

    def check_quiet(self) -> None:
        """With nothing in flight: the pool counts its idle connections, nothing else is open."""
        client = self.client
        pool = client._pool
        self.check_pool_bounds()
        assert pool.open == len(pool.idle), (
            f"the pool counts {pool.open} connections open with {len(pool.idle)} idle "
            "and nothing in flight"
        )
        assert not client._queue, f"{len(client._queue)} callers still queued for the pool"
        assert not client._retired, f"{len(client._retired)} replaced shared connections left"
        kept = {id(conn.stream) for conn, _ in pool.idle}
        if client._mux is not None:
            kept.add(id(client._mux.conn.stream))
        leaked = [
            i for i, s in enumerate(self.backend.streams) if not s.closed and id(s) not in kept
        ]
        assert not leaked, f"connections {leaked} are open, neither idle nor shared"

    def check_closed(self) -> None:
        assert self.client._pool.open == 0, f"{self.client._pool.open} open after close"
        left = [i for i, s in enumerate(self.backend.streams) if not s.closed]
        assert not left, f"connections {left} are still open after the client closed"

    # --- the whole input ---

    async def main(self) -> None:
        with anyio.fail_after(VIRTUAL_LIMIT):
            async with self.client:
                async with anyio.create_task_group() as tasks:
                    for op in self.ops:
                        if op.concurrent:
                            tasks.start_soon(self.later, op)
                        else:
                            await self.guarded(op)
                if not self.closed:
                    await trio.testing.wait_all_tasks_blocked()
                    self.check_quiet()
                    await self.final_request()
            self.check_closed()

    async def later(self, op: ClientOp) -> None:
        await anyio.sleep((op.c & 63) / 4)
        await self.guarded(op)

    async def final_request(self) -> None:
        """Once the application behaves, a request succeeds: nothing stuck in the client."""
        self.world.good = True
        for peer in self.world.peers:
            peer.behave()
        await trio.testing.wait_all_tasks_blocked()
        tag = b"final"
        try:
            r = await self.client.request({"TAG": tag}, b"final body")
        except FastCGIError as exc:
            raise Violation(f"a request to a now well-behaved application failed: {exc!r}") from exc
        assert r.body == GOOD_BODY, r
        self.check_response(tag, r.stdout, r.stderr, r.app_status)


def decode(data: bytes) -> tuple[ClientSetup, list[ClientOp], bytes]:
    setup, payload = h.split_input(data)
    count = (payload[0] if payload else 0) & 31
    raw = payload[1 : 1 + 4 * count]
    ops = [ClientOp(*raw[i : i + 4]) for i in range(0, len(raw) - 3, 4)]
    return ClientSetup.decode(setup), ops, payload[1 + 4 * count :]


def execute(data: bytes) -> World:
    setup, ops, script = decode(data)
    world = World(Script(script))
    run = Run(setup, ops, world)
    seed_scheduler(setup.seed)
    try:
        trio.run(run.main, clock=trio.testing.MockClock(autojump_threshold=0))
    except TimeoutError as exc:
        if isinstance(exc, FastCGIError):
            raise
        raise Violation(f"the exchange did not end within {VIRTUAL_LIMIT} virtual seconds") from exc
    except BaseExceptionGroup as group:
        raise first_failure(group, run.failures)  # noqa: B904 (its own cause is the story)
    if run.failures:
        raise run.failures[0]
    return world


def first_failure(group: BaseExceptionGroup, failures: list[BaseException]) -> BaseException:
    if failures:
        return failures[0]
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if leaves else group


def seed_scheduler(seed: int) -> None:
    """trio picks the order of tasks ready together at random: make it the input's."""
    rng = getattr(getattr(trio, "_core", None), "_run", None)
    rng = getattr(rng, "_r", None)
    if rng is not None:
        rng.seed(seed)


def one_input(data: bytes) -> None:
    if not h.TRACE_MEMORY:
        execute(data)
        return
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    world = execute(data)
    grew = tracemalloc.get_traced_memory()[1] - before
    limit = ALLOC_FIXED + ALLOC_PER_BYTE * world.exchanged
    assert grew <= limit, f"the run allocated {grew} bytes at its peak (limit {limit})"


# --- seeds ---


def encode_setup(
    multiplex: bool | None = False,
    max_connections: int = 2,
    max_keepalive: int | None = None,
    read: float = 2.0,
    total: float | None = None,
    pool: float = 10.0,
    expiry: float = 5.0,
    seed: int = 0,
) -> bytes:
    b0 = {None: 0, False: 1, True: 2}[multiplex] | (max_connections - 1) << 2
    b0 |= (None, 0, 1, 2).index(max_keepalive) << 5
    b1 = READ_TIMEOUTS.index(read) | TOTAL_TIMEOUTS.index(total) << 2
    b1 |= POOL_TIMEOUTS.index(pool) << 4 | EXPIRIES.index(expiry) << 6
    return bytes((b0, b1, seed, 0))


def op(
    what: int,
    a: int = 0,
    b: int = 0,
    c: int = 0,
    *,
    concurrent: bool = False,
    failing: bool = False,
    form: int = 0,
) -> bytes:
    kind = what | concurrent << 3 | failing << 4 | form << 5
    return bytes((kind, a, b, c))


def answer(*ops: tuple[int, int] | bytes) -> bytes:
    """Answer operations; bytes stand for the data an operation takes from the script."""
    return b"".join(bytes(o) if isinstance(o, tuple) else o for o in ops)


def encode(setup: bytes, ops: list[bytes], script: bytes = b"") -> bytes:
    return setup + bytes((len(ops),)) + b"".join(ops) + script


def seeds() -> dict[str, bytes]:
    """The seed corpus: each a client and an application doing one thing of note."""
    req, stream, values = REQUEST, STREAM, GET_VALUES
    ok = (STDOUT, 0)  # the standard CGI head
    hello = answer(ok, (STDOUT, 5), b"hello", (END, 0))
    mux_peer, close_peer, early_peer = bytes((PEER_MULTIPLEX,)), bytes((PEER_CLOSE_AFTER,)), b"\4"
    return {
        "request-well-behaved": encode(encode_setup(), [op(req, 3)]),
        "request-probe-says-no": encode(encode_setup(None), [op(req), op(req)], b"\0" + hello),
        "requests-multiplexed-concurrently": encode(
            encode_setup(None, seed=7),
            [op(req, 1, c=1, concurrent=True), op(req, 2, c=1, concurrent=True), op(req, 3)],
            mux_peer + mux_peer + hello + hello + hello,  # the probe's connection, the shared one
        ),
        "request-keepalive-reused-then-expired": encode(
            encode_setup(expiry=1.0), [op(req), op(req), op(SLEEP, 8), op(req)]
        ),
        "request-idle-connection-closed-retried": encode(
            encode_setup(), [op(req, 2), op(req, 2, form=1)], close_peer + hello
        ),
        "request-stderr-before-stdout": encode(
            encode_setup(),
            [op(req, 1, 1)],
            b"\0" + answer((STDERR, 4), b"oops", ok, (STDOUT, 2), b"hi", (END, 3)),
        ),
        "request-answered-early-streamed-body": encode(
            encode_setup(), [op(req, 60, form=2)], early_peer + hello
        ),
        "request-mux-answered-early-streamed-body": encode(
            encode_setup(True), [op(req, 60, form=3)], bytes((PEER_MULTIPLEX | PEER_EARLY,)) + hello
        ),
        "request-mux-overloaded-while-sending-body": encode(
            encode_setup(True),
            [op(req, 60, form=2)],
            bytes((PEER_MULTIPLEX | PEER_EARLY,)) + answer((END_ABNORMAL, 1)),
        ),
        "request-read-timeout-application-stalls": encode(
            encode_setup(read=0.5), [op(req), op(req)], b"\0" + answer((STALL, 0))
        ),
        "request-total-timeout-trickle": encode(
            encode_setup(read=2.0, total=3.0),
            [op(req)],
            b"\0" + answer(ok, *[(DELAY, 8), (STDOUT, 1), b"."] * 8, (END, 0)),
        ),
        "request-cancelled-mux-aborted": encode(
            encode_setup(True, seed=3),
            [op(CANCELLED, 1, 8), op(req)],
            mux_peer + answer(ok, (WAIT_INPUT, 0), (END, 0)) + hello,
        ),
        "request-cancelled-solo-discarded": encode(
            encode_setup(), [op(CANCELLED, 1, 4), op(req)], b"\0" + answer((STALL, 0))
        ),
        "request-end-request-twice": encode(
            encode_setup(), [op(req), op(req)], b"\0" + answer(ok, (END_TWICE, 0))
        ),
        "request-stray-record-other-id": encode(
            encode_setup(True), [op(req)], mux_peer + answer(ok, (STRAY, 0), (END, 0))
        ),
        "request-garbage-after-answer": encode(
            encode_setup(), [op(req), op(req)], b"\0" + answer(ok, (END, 0), (RAW, 4), b"junk")
        ),
        "request-padded-records": encode(
            encode_setup(), [op(req)], b"\0" + answer((PADDED, 0x75), b"abcde", (END, 0))
        ),
        "request-read-one-byte-at-a-time": encode(
            encode_setup(), [op(req)], b"\0" + answer((SPLIT, 0)) + hello
        ),
        "request-writes-taken-one-byte-at-a-time": encode(
            encode_setup(), [op(req, 20)], bytes((1 << 4,)) + hello
        ),
        "request-application-stops-reading": encode(
            encode_setup(), [op(req, 200, form=1), op(req)], bytes((PEER_STOP_READING,)) + hello
        ),
        "request-application-resets": encode(
            encode_setup(), [op(req), op(req)], b"\0" + answer(ok, (RESET, 0))
        ),
        "request-connection-closed-mid-answer": encode(
            encode_setup(), [op(req)], b"\0" + answer(ok, (CLOSE_CONN, 0))
        ),
        "request-protocol-status-unknown-role": encode(
            encode_setup(), [op(req)], b"\0" + answer((END_ABNORMAL, 2))
        ),
        "request-body-source-fails": encode(
            encode_setup(), [op(req, 60, failing=True, form=2), op(req)]
        ),
        "stream-read-whole": encode(
            encode_setup(), [op(stream, 1)], b"\0" + answer(ok, (BIG, 80), (END, 0))
        ),
        "stream-left-after-first-chunk": encode(
            encode_setup(), [op(stream, 1, 1), op(req)], b"\0" + answer(ok, (BIG, 200), (END, 0))
        ),
        "stream-raw-stdout-checked": encode(encode_setup(), [op(stream, 1, 2)], b"\0" + hello),
        "stream-stderr-iterated": encode(
            encode_setup(),
            [op(stream, 1, 3)],
            b"\0" + answer(ok, (STDERR, 3), b"err", (STDOUT, 2), b"ok", (END, 0)),
        ),
        "stream-cancelled-while-reading": encode(
            encode_setup(),
            [op(STREAM_CANCELLED, 8, 0)],
            b"\0" + answer(ok, (DELAY, 32), (STDOUT, 1), b"x", (END, 0)),
        ),
        "stream-body-then-raw-misuse": encode(encode_setup(), [op(stream, 0, 7)]),
        "pool-timeout-while-stream-held": encode(
            encode_setup(max_connections=1, pool=0.0),
            [op(STREAM_CANCELLED, 40, 0, concurrent=True), op(req, c=1, concurrent=True)],
            b"\0" + answer(ok, (DELAY, 80), (END, 0)),
        ),
        "pool-waiters-served-in-order": encode(
            encode_setup(max_connections=1, pool=3.0, seed=5),
            [op(req, i, c=i, concurrent=True) for i in range(4)] + [op(CHECK)],
            b"\0" + answer(ok, (DELAY, 4), (END, 0)),
        ),
        "get-values-ignored-by-the-application": encode(
            encode_setup(None), [op(req), op(values)], bytes((PEER_IGNORE_VALUES,)) + hello
        ),
        "get-values-unsolicited-result": encode(
            encode_setup(True), [op(values), op(req)], mux_peer + answer((VALUES_RESULT, 0), ok)
        ),
        "client-closed-then-used": encode(encode_setup(), [op(req), op(CLOSE), op(req)]),
    }


def write_seeds(directory: str) -> None:
    import pathlib

    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (path / name).write_bytes(data)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(sys.argv[2])
    else:
        h.fuzz(one_input)
