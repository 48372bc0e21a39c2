"""Micro-benchmarks of the sans-I/O core, each beside a bare-Python reference.

Run:  uv run python benchmarks/bench_core.py        (about 30 s on 2 cores)

Standard library only. Every figure is the best of several repetitions, with
the setup (fresh connections, pre-sliced chunks) outside the timed region.
What each row measures is written in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import platform
import pstats
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

# Measure the checkout this file sits in, whatever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcgiproto import ClientConnection, ServerConnection, StdoutData

_T = TypeVar("_T")

#: A timed body returns how many units (records, events, bytes...) it handled.
Body = Callable[[], int]
#: A setup builds fresh state (outside the timer) and returns the body to time.
Setup = Callable[[], Body]

HEADER = struct.Struct(">BBHHBx")
END_BODY = struct.Struct(">IB3x")
BEGIN_BODY = struct.Struct(">HB5x")
STDOUT, STDERR, END_REQUEST, BEGIN_REQUEST = 6, 7, 3, 1
KIB = 1024
MIB = 1024 * KIB
STREAM_CHUNK = 65528

#: 20 params, as nginx's fastcgi_params (plus SCRIPT_FILENAME and a few headers) send them.
#: (Typed with the key union: Mapping is invariant in its key, so mypy rejects a
#: dict[str, str] where fcgiproto's ParamsInput is expected.)
CGI_PARAMS: dict[str | bytes, str | bytes] = {
    "QUERY_STRING": "page=2&sort=desc",
    "REQUEST_METHOD": "GET",
    "CONTENT_TYPE": "",
    "CONTENT_LENGTH": "",
    "SCRIPT_NAME": "/index.php",
    "SCRIPT_FILENAME": "/srv/www/example.org/public/index.php",
    "REQUEST_URI": "/blog/2024/05/a-post-title?page=2&sort=desc",
    "DOCUMENT_URI": "/index.php",
    "DOCUMENT_ROOT": "/srv/www/example.org/public",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REQUEST_SCHEME": "https",
    "HTTPS": "on",
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SERVER_SOFTWARE": "nginx/1.24.0",
    "REMOTE_ADDR": "203.0.113.45",
    "REMOTE_PORT": "51234",
    "SERVER_ADDR": "192.0.2.10",
    "SERVER_PORT": "443",
    "SERVER_NAME": "example.org",
    "HTTP_USER_AGENT": "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0",
}
assert len(CGI_PARAMS) == 20


# --- timing ---


def best_of(setup: Setup, repeat: int) -> tuple[float, int]:
    """Best wall time of `repeat` runs of a fresh body, and the units it handled."""
    return compare([setup], repeat)[0]


def compare(setups: list[Setup], repeat: int) -> list[tuple[float, int]]:
    """Like best_of for each setup, their runs interleaved so that they share any noise."""
    best = [float("inf")] * len(setups)
    units = [0] * len(setups)
    for _ in range(repeat):
        for index, setup in enumerate(setups):
            body = setup()
            gc.collect()
            start = time.perf_counter()
            units[index] = body()
            best[index] = min(best[index], time.perf_counter() - start)
    return list(zip(best, units, strict=True))


def fixed(function: Callable[[_T], int], argument: _T) -> Setup:
    """A setup whose body is function(argument): nothing to rebuild between runs."""
    return lambda: lambda: function(argument)


def warm_up(seconds: float = 1.5) -> None:
    """Keep the CPU busy first: on the 2-core VM we measured, an idle CPU ran the first
    half-second of work at half speed, which skewed whichever case came first."""
    data = b"".join(HEADER.pack(1, STDOUT, 1, 8, 0) + bytes(8) for _ in range(10_000))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        bare_walk(data)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- wire builders (by hand with struct, independent of the code under test) ---


def rec(rtype: int, rid: int, content: bytes = b"") -> bytes:
    padding = -len(content) & 7
    return HEADER.pack(1, rtype, rid, len(content), padding) + content + bytes(padding)


def client_with_requests(count: int, multiplex: bool = True) -> ClientConnection:
    """A client with requests 1..count in flight, its output drained."""
    client = ClientConnection(multiplex=multiplex)
    for _ in range(count):
        client.send_request(CGI_PARAMS)
    client.data_to_send()
    return client


def feed_all(client: ClientConnection, chunks: Iterable[bytes | bytearray]) -> int:
    receive = client.receive_data
    events = 0
    for chunk in chunks:
        events += len(receive(chunk))
    return events


def bare_walk(data: bytes) -> int:
    """The reference: walk the record headers with struct and nothing else."""
    unpack = HEADER.unpack_from
    pos = 0
    end = len(data)
    count = 0
    while pos < end:
        _version, _rtype, _rid, clen, plen = unpack(data, pos)
        pos += 8 + clen + plen
        count += 1
    return count


def walk_with_join(data: bytes) -> int:
    """The walk, slicing each record's content and joining them per 64 KiB of input."""
    unpack = HEADER.unpack_from
    parts: list[bytes] = []
    pos = 0
    end = len(data)
    count = 0
    while pos < end:
        _version, _rtype, _rid, clen, plen = unpack(data, pos)
        pos += 8
        parts.append(data[pos : pos + clen])
        pos += clen + plen
        if len(parts) == 4096:
            count += len(b"".join(parts)) // clen
            parts = []
    return count + len(parts)


def walk_with_events(data: bytes) -> int:
    """The walk, slicing each record's content into an event: one event per record at best.

    Events are listed in batches of 4096, as a 64 KiB chunk of 16-byte records yields them.
    """
    unpack = HEADER.unpack_from
    events: list[StdoutData] = []
    pos = 0
    end = len(data)
    count = 0
    while pos < end:
        _version, _rtype, rid, clen, plen = unpack(data, pos)
        pos += 8
        events.append(StdoutData(rid, data[pos : pos + clen]))
        pos += clen + plen
        if len(events) == 4096:
            count += 4096
            events = []
    return count + len(events)


def bare_copy(chunks: list[bytes] | list[bytearray]) -> int:
    """The reference: copy every byte once, chunk by chunk."""
    total = 0
    for chunk in chunks:
        total += len(bytes(memoryview(chunk)))
    return total


# --- the table ---


@dataclass
class Row:
    section: str
    name: str
    ours: str
    reference: str = ""
    ratio: float | None = None
    goal: str = ""

    def verdict(self) -> str:
        if not self.goal or self.ratio is None:
            return self.goal
        op, _, value = self.goal.partition(" ")
        target = float(value.rstrip("x"))
        ok = self.ratio >= target if op == ">=" else self.ratio <= target
        return f"{self.goal} {'ok' if ok else 'MISSED'}"


def rate(count: float, seconds: float, unit: str) -> str:
    per_second = count / seconds
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f} M{unit}/s"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f} k{unit}/s"
    return f"{per_second:.0f} {unit}/s"


def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s"


# --- 1. small records ---


def small_records(rows: list[Row], scale: float) -> None:
    count = int(200_000 * scale)
    content = b"abcdefgh"
    variants: list[tuple[str, int, Callable[[int], tuple[int, int]]]] = [
        ("8 B STDOUT, one id (coalesced)", 1, lambda i: (STDOUT, 1)),
        ("8 B STDOUT/STDERR alternating", 1, lambda i: (STDOUT if i & 1 else STDERR, 1)),
        ("8 B STDOUT, 100 ids round robin", 100, lambda i: (STDOUT, 1 + i % 100)),
    ]
    datas: list[bytes] = []
    for name, ids, kind in variants:
        data = b"".join(
            HEADER.pack(1, rtype, rid, len(content), 0) + content
            for rtype, rid in map(kind, range(count))
        )
        chunks = chunked(data, 64 * KIB)

        def setup(ids: int = ids, chunks: list[bytes] = chunks) -> Body:
            client = client_with_requests(ids)
            return lambda: feed_all(client, chunks)

        (seconds, events), (bare_seconds, walked) = compare([setup, fixed(bare_walk, data)], 7)
        assert walked == count
        ours = f"{rate(count, seconds, 'rec')}, {rate(events, seconds, 'ev')}"
        rows.append(
            Row(
                "1. small records, 64 KiB chunks",
                name,
                ours,
                f"{rate(count, bare_seconds, 'rec')} (struct walk)",
                bare_seconds / seconds,
                ">= 0.5x",
            )
        )
        datas.append(data)
    # What a pure-Python reader cannot avoid on top of the walk, as floors to compare with:
    # for one stream, slicing every content and joining them; for records that cannot be
    # coalesced, slicing every content and building an event per record.
    floors: list[tuple[str, Callable[[bytes], int], bytes]] = [
        ("floor: walk + slice + join (one stream)", walk_with_join, datas[0]),
        ("floor: walk + slice + StdoutData() per record", walk_with_events, datas[-1]),
    ]
    for name, floor, data in floors:
        (floor_seconds, handled), (bare_seconds, _) = compare(
            [fixed(floor, data), fixed(bare_walk, data)], 7
        )
        assert handled == count
        rows.append(
            Row(
                "1. small records, 64 KiB chunks",
                name,
                rate(count, floor_seconds, "rec"),
                f"{rate(count, bare_seconds, 'rec')} (struct walk)",
                bare_seconds / floor_seconds,
            )
        )


# --- 2. large records ---


def large_records(rows: list[Row], scale: float) -> None:
    total = int(64 * MIB * scale) // (64 * KIB) * (64 * KIB)
    record = HEADER.pack(1, STDOUT, 1, STREAM_CHUNK, 0) + bytes(range(256)) * (STREAM_CHUNK // 256)
    record += bytes(STREAM_CHUNK + 8 - len(record))
    assert len(record) == 64 * KIB
    aligned = record * (total // len(record))
    # A 16-byte record first, so that chunk and record boundaries no longer line up.
    shifted = rec(STDOUT, 1, b"x" * 8) + aligned
    for label, data in (("aligned", aligned), ("misaligned", shifted)):
        for chunk_size in (256 * KIB, 64 * KIB):
            chunks = chunked(data, chunk_size)

            def setup(chunks: list[bytes] = chunks) -> Body:
                client = client_with_requests(1, multiplex=False)
                return lambda: feed_all(client, chunks)

            (seconds, _), (copy_seconds, copied) = compare([setup, fixed(bare_copy, chunks)], 7)
            assert copied == len(data)
            rows.append(
                Row(
                    "2. large records (65528 B), 64 MiB",
                    f"{chunk_size // KIB} KiB chunks, {label}",
                    mbps(len(data), seconds),
                    f"{mbps(len(data), copy_seconds)} (bytes copy)",
                    copy_seconds / seconds,
                    ">= 0.8x",
                )
            )
            del chunks
    # Chunks handed over as bytearray (as a recv_into() buffer would be).
    arrays = [bytearray(chunk) for chunk in chunked(shifted, 64 * KIB)]

    def array_setup() -> Body:
        client = client_with_requests(1, multiplex=False)
        return lambda: feed_all(client, arrays)

    (seconds, _), (copy_seconds, _) = compare([array_setup, fixed(bare_copy, arrays)], 7)
    rows.append(
        Row(
            "2. large records (65528 B), 64 MiB",
            "64 KiB bytearray chunks, misaligned",
            mbps(len(shifted), seconds),
            f"{mbps(len(shifted), copy_seconds)} (bytes copy)",
            copy_seconds / seconds,
            ">= 0.8x",
        )
    )


# --- 3. one byte at a time ---


def response(size: int, rid: int = 1) -> bytes:
    """STDOUT in 4 KiB records, the STDOUT end and END_REQUEST: about `size` bytes."""
    body = rec(STDOUT, rid, b"Status: 200 OK\r\nContent-Type: text/html\r\n\r\n")
    piece = rec(STDOUT, rid, b"<p>Lorem ipsum dolor sit amet.</p>\n" * 117)
    tail = rec(STDOUT, rid) + rec(END_REQUEST, rid, END_BODY.pack(0, 0))
    return body + piece * max(0, (size - len(body) - len(tail)) // len(piece)) + tail


def one_byte(rows: list[Row], scale: float) -> None:
    # Every measurement feeds about `total` bytes: `total // size` responses of `size` bytes,
    # each to a fresh client, so all sizes see the same amount of work (and noise).
    total = int(1_000_000 * scale)
    sizes = [total // 100, total // 10, total]
    setups: list[Setup] = []
    shapes: list[tuple[int, int]] = []  # (response length, how many responses)
    for size in sizes:
        data = response(size)
        singles = [data[i : i + 1] for i in range(len(data))]
        copies = max(1, round(total / len(data)))
        shapes.append((len(data), copies))

        def setup(singles: list[bytes] = singles, copies: int = copies) -> Body:
            clients = [client_with_requests(1, multiplex=False) for _ in range(copies)]
            return lambda: sum(feed_all(client, singles) for client in clients)

        setups.append(setup)
    results = compare(setups, 3)
    per_byte = [
        seconds / (length * copies)
        for (seconds, _), (length, copies) in zip(results, shapes, strict=True)
    ]
    for cost, (length, copies) in zip(per_byte, shapes, strict=True):
        rows.append(
            Row(
                "3. one byte per receive_data()",
                f"responses of {length:,} B (x{copies})",
                f"{cost * 1e6:.2f} us/byte",
                f"{1 / cost / 1e3:,.0f} kB/s",
            )
        )
    rows.append(
        Row(
            "3. one byte per receive_data()",
            "per-byte cost, largest vs smallest response",
            f"{per_byte[-1] / per_byte[0]:.2f}x",
            "(1.00x = linear)",
            per_byte[-1] / per_byte[0],
            "<= 1.25x",
        )
    )


# --- 4. encoding ---


def encode(rows: list[Row], scale: float) -> None:
    batch, batches = 1000, max(1, int(10 * scale))

    def requests_setup() -> Body:
        def body() -> int:
            for _ in range(batches):
                client = ClientConnection(multiplex=True)
                send, drain = client.send_request, client.data_to_send
                for _ in range(batch):
                    send(CGI_PARAMS)
                    drain()
            return batch * batches

        return body

    seconds, count = best_of(requests_setup, 5)
    wire = len(_one_request_bytes())
    rows.append(
        Row(
            "4. encoding",
            f"client send_request(20 params) + data_to_send ({wire} B)",
            f"{seconds / count * 1e6:.1f} us/req",
            rate(count, seconds, "req"),
        )
    )

    stdin = bytes(range(256)) * (4 * KIB)  # 1 MiB
    big_count = max(4, int(64 * scale))

    def stdin_setup() -> Body:
        def body() -> int:
            client = ClientConnection(multiplex=True)
            for _ in range(big_count):
                client.send_request(CGI_PARAMS, stdin=stdin)
                client.data_to_send()
            return big_count

        return body

    # The reference copies each 1 MiB payload once, whole: what joining it into the wire costs.
    payloads = [stdin] * big_count
    (seconds, _), (copy_seconds, _) = compare([stdin_setup, fixed(bare_copy, payloads)], 7)
    rows.append(
        Row(
            "4. encoding",
            "client send_request(20 params, 1 MiB stdin) + data_to_send",
            mbps(len(stdin) * big_count, seconds),
            f"{mbps(len(stdin) * big_count, copy_seconds)} (bytes copy)",
            copy_seconds / seconds,
            ">= 0.8x",
        )
    )

    def stdin_stream_setup() -> Body:
        client = ClientConnection()
        rid = client.begin_request()
        client.send_params(rid, CGI_PARAMS)
        client.end_params(rid)
        client.data_to_send()

        def body() -> int:
            for _ in range(big_count):
                client.send_stdin(rid, stdin)
                client.data_to_send()
            return big_count

        return body

    (seconds, _), (copy_seconds, _) = compare([stdin_stream_setup, fixed(bare_copy, payloads)], 7)
    rows.append(
        Row(
            "4. encoding",
            "client send_stdin(1 MiB) + data_to_send, request open",
            mbps(len(stdin) * big_count, seconds),
            f"{mbps(len(stdin) * big_count, copy_seconds)} (bytes copy)",
            copy_seconds / seconds,
            ">= 0.8x",
        )
    )

    body16 = b"<p>Lorem ipsum dolor sit amet.</p>\n" * (16 * KIB // 35)
    body16 += b"x" * (16 * KIB - len(body16))
    begins = b"".join(rec(BEGIN_REQUEST, rid, BEGIN_BODY.pack(1, 1)) for rid in range(1, 1001))

    def server_setup() -> Body:
        servers = []
        for _ in range(batches):
            server = ServerConnection(multiplex=True, max_requests=batch)
            server.receive_data(begins)
            servers.append(server)

        def body() -> int:
            for server in servers:
                send, end, drain = server.send_stdout, server.end_request, server.data_to_send
                for rid in range(1, batch + 1):
                    send(rid, body16)
                    end(rid)
                    drain()
            return batch * batches

        return body

    seconds, count = best_of(server_setup, 5)
    rows.append(
        Row(
            "4. encoding",
            "server send_stdout(16 KiB) + end_request + data_to_send",
            f"{seconds / count * 1e6:.1f} us/resp",
            f"{rate(count, seconds, 'resp')}, {mbps(len(body16) * count, seconds)}",
        )
    )


def _one_request_bytes() -> bytes:
    client = ClientConnection()
    client.send_request(CGI_PARAMS)
    return client.data_to_send()


# --- 5. parsing whole exchanges ---


def exchanges(rows: list[Row], scale: float) -> None:
    batch, batches = 1000, max(1, int(10 * scale))
    client = ClientConnection(multiplex=True)
    for _ in range(batch):
        client.send_request(CGI_PARAMS)
    wire = client.data_to_send()
    # One request's bytes per receive_data() call, as a server reading a connection sees them.
    size = len(wire) // batch
    per_request = chunked(wire, size)
    assert len(per_request) == batch

    def server_setup() -> Body:
        servers = [ServerConnection(multiplex=True, max_requests=batch) for _ in range(batches)]

        def body() -> int:
            events = 0
            for server in servers:
                receive = server.receive_data
                for chunk in per_request:
                    events += len(receive(chunk))
            return events

        return body

    seconds, events = best_of(server_setup, 5)
    count = batch * batches
    assert events == 3 * count  # BeginRequest, Params, StdinEnd
    rows.append(
        Row(
            "5. whole exchanges",
            f"server receive_data(one request, 20 params, {size} B)",
            f"{seconds / count * 1e6:.1f} us/req",
            rate(count, seconds, "req"),
        )
    )

    # A keep-alive client doing request after request: encode, then parse the response.
    page = b"<p>Lorem ipsum dolor sit amet.</p>\n" * 30
    answer = (
        rec(STDOUT, 1, b"Status: 200 OK\r\nContent-Type: text/html\r\n\r\n" + page)
        + rec(STDOUT, 1)
        + rec(END_REQUEST, 1, END_BODY.pack(0, 0))
    )

    def round_trip_setup() -> Body:
        client = ClientConnection()

        def body() -> int:
            send, drain, receive = client.send_request, client.data_to_send, client.receive_data
            for _ in range(count):
                send(CGI_PARAMS)
                drain()
                receive(answer)
            return count

        return body

    seconds, _ = best_of(round_trip_setup, 5)
    rows.append(
        Row(
            "5. whole exchanges",
            f"client round trip: send_request + receive_data({len(answer)} B response)",
            f"{seconds / count * 1e6:.1f} us/req",
            rate(count, seconds, "req"),
        )
    )


# --- main ---

SECTIONS: dict[str, Callable[[list[Row], float], None]] = {
    "small": small_records,
    "large": large_records,
    "onebyte": one_byte,
    "encode": encode,
    "exchange": exchanges,
}


def print_table(rows: list[Row]) -> None:
    widths = [
        max(len(row.name) for row in rows),
        max(len(row.ours) for row in rows),
        max(len(row.reference) for row in rows),
    ]
    head = f"{'case':<{widths[0]}}  {'ours':<{widths[1]}}  {'reference':<{widths[2]}}  ratio"
    section = ""
    print(head + "  goal")
    for row in rows:
        if row.section != section:
            section = row.section
            print(f"\n{section}")
        ratio = f"{row.ratio:5.2f}x" if row.ratio is not None else ""
        print(
            f"{row.name:<{widths[0]}}  {row.ours:<{widths[1]}}  {row.reference:<{widths[2]}}"
            f"  {ratio:>6}  {row.verdict()}".rstrip()
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"some of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="work per case (default 1.0)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the run")
    args = parser.parse_args()
    names = args.sections or list(SECTIONS)
    unknown = set(names) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"{python} on {platform.platform()}, {os.cpu_count()} CPUs")
    rows: list[Row] = []
    start = time.perf_counter()
    warm_up()
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    for name in names:
        SECTIONS[name](rows, args.scale)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(f"({time.perf_counter() - start:.1f} s)\n")
    print_table(rows)


if __name__ == "__main__":
    main()
