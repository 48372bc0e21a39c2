"""Soak of both servers: their memory over time under a mixed load with random cancellations.

Run:  uv run python benchmarks/server_soak.py [--kinds KINDS] [--seconds S] [--tracemalloc]
                                              [--malloc-trim] [--out FILE.json]

For each server kind (blocking ``fcgiproto_socket.Server`` without and with
``multiplex``, anyio ``serve`` without and with it), a server process of its
own serves an app on a Unix socket, and a load process of its own drives it
for S seconds (default 1200) with the project's clients: an ``AsyncClient``
shared by asyncio tasks, a blocking ``Client`` shared by threads, and a
blocking ``Client`` with ``max_keepalive=0`` (a connection per request). Both
ask the server whether it multiplexes (GET_VALUES), so on a multiplexing
server their requests share connections. The load mixes small answers, echoed
bodies of 0..64 KiB, responses of 64 KiB..1 MiB, streams read whole or left
early, slow streamed answers, apps that raise, stderr, and GET_VALUES; and it
cancels at random: an asyncio task's request cancelled after 0..30 ms (on a
shared connection that is an ABORT_REQUEST, on a connection of its own the
connection is closed), a blocking request given a total timeout of a few ms,
a stream left after its first chunk. Every answer is checked.

The server process samples itself every `--every` seconds (default 10):
VmRSS and RssAnon from /proc/self/status, glibc's heap (mallinfo2: bytes in
use and free bytes it keeps), pymalloc's arenas (sys._debugmallocstats), live
objects tracked by the gc, threads, descriptors, the server connections alive
and the request ids they remember as ended. Only the server's memory is
measured: the clients run in the other process.

- ``--malloc-trim`` calls ``malloc_trim(0)`` before each sample (the RSS just
  before it is kept too): what it gives back is free heap glibc retained;
  what remains is memory in use.
- ``--tracemalloc`` traces Python allocations from the start; a snapshot after
  the warm-up (`--warmup`, default 120 s) and one just before the load ends
  are compared, and the allocation sites that grew most are printed (and the
  types of live objects that grew). Tracing slows the server down, about 2x.

The samples and the summary go to `--out` (JSON) when given. A run's verdict
on levelling off compares RSS growth per minute over the first and the last
third of the time after the warm-up. See benchmarks/README.md, "Server soak:
memory over time".
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

# The server and the load import the packages from FCGI_SOAK_SRC: a copy of
# the checkout taken at the start (or --code), so that a soak tests one version
# even while the tree is edited. The orchestrator imports none of them.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("FCGI_SOAK_SRC") or str(ROOT))

PACKAGES = ("fcgiproto", "fcgiproto_socket", "fcgiproto_anyio")
KINDS = ("blocking", "blocking-mux", "anyio", "anyio-mux")

HEAD = b"Content-Type: text/plain\r\n\r\n"
HELLO = HEAD + b"Hello, World!"
CHUNK = 16 * 1024
SLOW_CHUNKS = 20  # the slow answer: 20 chunks of 1 KiB, 5 ms apart
SLOW_GAP = 0.005
MAX_BODY = 64 * 1024
BIG_SIZES = (64 * 1024, 256 * 1024, 1024 * 1024)

#: What a load worker does, with weights.
OPS = {
    "hello": 35,
    "echo": 20,
    "big": 8,
    "stream": 10,
    "slow": 15,
    "error": 3,
    "log": 6,
    "values": 3,
}
#: RSS growth (MB/min) that counts as flat: a sample's noise is about 1 MB.
FLAT = 0.1
#: Besides every slow request, this share of the others is cancelled at random too.
CANCEL_RATE = 0.08


# --- the server's side: the apps ---


def _big_chunks(size: int) -> list[bytes]:
    block = bytes(range(256)) * (CHUNK // 256)
    return [block[: min(CHUNK, size - start)] for start in range(0, size, CHUNK)]


class Counts:
    """What the apps did, by mode; bumped from several threads (a race costs a count)."""

    def __init__(self) -> None:
        self.by_mode: Counter[str] = Counter()


def blocking_handler(counts: Counts) -> Any:
    def handler(request: Any) -> Any:
        mode = request.params.get("SOAK_MODE", "hello")
        counts.by_mode[mode] += 1
        if mode == "echo":
            return HEAD + request.stdin
        if mode == "big":
            return [HEAD, *_big_chunks(int(request.params["SOAK_SIZE"]))]
        if mode == "slow":
            return slow_chunks_blocking(request)
        if mode == "error":
            raise RuntimeError(f"the soak's failing app, request {request.request_id}")
        if mode == "log":
            request.log(f"soak: a line for the error log from request {request.request_id}")
        return HELLO

    return handler


def slow_chunks_blocking(request: Any) -> Any:
    yield HEAD
    for _ in range(SLOW_CHUNKS):
        time.sleep(SLOW_GAP)
        if request.aborted:
            return
        yield b"s" * 1024


def async_app(counts: Counts) -> Any:
    import anyio

    async def app(request: Any) -> Any:
        mode = request.params.get("SOAK_MODE", "hello")
        counts.by_mode[mode] += 1
        if mode == "echo":
            return HEAD + request.stdin
        if mode == "big":
            return [HEAD, *_big_chunks(int(request.params["SOAK_SIZE"]))]
        if mode == "slow":
            return slow_chunks_async()
        if mode == "error":
            raise RuntimeError(f"the soak's failing app, request {request.request_id}")
        if mode == "log":
            await request.log(f"soak: a line for the error log from request {request.request_id}")
        return HELLO

    async def slow_chunks_async() -> Any:
        yield HEAD
        for _ in range(SLOW_CHUNKS):
            await anyio.sleep(SLOW_GAP)
            yield b"s" * 1024

    return app


# --- the server's side: measuring itself ---

_libc: Any = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL("libc.so.6")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def mallinfo() -> dict[str, int]:
    """glibc's heap, all arenas: bytes in use (inuse_kb), free but kept (free_kb), mmapped."""
    if _libc is None or not hasattr(_libc, "mallinfo2"):
        return {}
    _libc.mallinfo2.restype = _Mallinfo2
    info = _libc.mallinfo2()
    return {
        "heap_kb": info.arena // 1024,  # sbrk'd and arena heaps
        "mmap_kb": info.hblkhd // 1024,  # blocks mmapped on their own
        "inuse_kb": info.uordblks // 1024,
        "free_kb": info.fordblks // 1024,
    }


def malloc_arenas() -> dict[str, int]:
    """How many malloc arenas there are (threads get arenas of their own) and their size."""
    if _libc is None or not hasattr(_libc, "malloc_info"):
        return {}
    _libc.fopen.restype = ctypes.c_void_p
    _libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    _libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile() as target:
        stream = _libc.fopen(target.name.encode(), b"w")
        if not stream:
            return {}
        _libc.malloc_info(0, stream)
        _libc.fclose(stream)
        xml = Path(target.name).read_bytes()
    # Each <heap nr="N"> ends with its <system type="current" size="..."/>.
    heaps = re.findall(rb'<heap nr="\d+">.*?<system type="current" size="(\d+)"', xml, re.DOTALL)
    return {"arenas": len(heaps), "largest_arena_kb": max(map(int, heaps), default=0) // 1024}


def malloc_trim() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


def proc_status() -> dict[str, int]:
    wanted = {"VmRSS": "rss_kb", "RssAnon": "anon_kb", "VmHWM": "hwm_kb", "Threads": "threads"}
    found = {}
    with open("/proc/self/status", "rb") as status:
        for line in status:
            name, _, rest = line.partition(b":")
            key = wanted.get(name.decode())
            if key:
                found[key] = int(rest.split()[0])
    return found


_PYMALLOC = {
    "arenas": re.compile(rb"# arenas allocated current\s*=\s*([\d,]+)"),
    "allocated": re.compile(rb"# bytes in allocated blocks\s*=\s*([\d,]+)"),
    "total": re.compile(rb"^Total\s*=\s*([\d,]+)", re.MULTILINE),
}


def pymalloc() -> dict[str, int]:
    """pymalloc's arenas (KiB mapped) and the bytes in blocks in use in them."""
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read()
    found = {}
    for key, pattern in _PYMALLOC.items():
        match = pattern.search(text)
        if match:
            found[key] = int(match.group(1).replace(b",", b""))
    return {
        "pymalloc_arenas_kb": found.get("total", 0) // 1024,
        "pymalloc_used_kb": found.get("allocated", 0) // 1024,
    }


class Sampler:
    """Samples the server process every `every` seconds, to a JSON-lines file."""

    def __init__(self, config: dict[str, Any], counts: Counts, stop: threading.Event) -> None:
        self.config = config
        self.counts = counts
        self.stop = stop
        self.out = open(config["samples"], "a", buffering=1)  # noqa: SIM115  (closed in run)
        self.snapshots: dict[str, Any] = {}
        self.types: dict[str, Counter[str]] = {}
        self.cycle_report: dict[str, Any] = {}
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self.run, name="soak sampler", daemon=True)

    def sample(self, phase: str) -> dict[str, Any]:
        from fcgiproto import ServerConnection

        t = time.monotonic() - self.started
        row: dict[str, Any] = {"t": round(t, 1), "phase": phase}
        if self.config["malloc_trim"]:
            row["rss_untrimmed_kb"] = proc_status()["rss_kb"]
            row["free_untrimmed_kb"] = mallinfo().get("free_kb", 0)
            malloc_trim()
        row.update(proc_status())
        row.update(mallinfo())
        row.update(malloc_arenas())
        row.update(pymalloc())
        objects = gc.get_objects()
        row["gc_objects"] = len(objects)
        connections = [o for o in objects if type(o) is ServerConnection]
        del objects
        row["connections"] = len(connections)
        row["ended_ids"] = sum(len(getattr(c, "_ended", ())) for c in connections)
        del connections
        row["gc_collected"] = sum(s["collected"] for s in gc.get_stats())
        row["fds"] = len(os.listdir("/proc/self/fd"))
        row["requests"] = sum(self.counts.by_mode.values())
        if self.config["tracemalloc"]:
            import tracemalloc

            row["traced_kb"] = tracemalloc.get_traced_memory()[0] // 1024
            row["tracemalloc_overhead_kb"] = tracemalloc.get_tracemalloc_memory() // 1024
        self.out.write(json.dumps(row) + "\n")
        return row

    def mark(self, name: str) -> None:
        """A tracemalloc snapshot and the live objects by type, for the comparison at the end."""
        objects = gc.get_objects()
        self.types[name] = Counter(type(o).__qualname__ for o in objects)
        del objects
        if self.config["tracemalloc"]:
            import tracemalloc

            self.snapshots[name] = tracemalloc.take_snapshot().filter_traces(
                [
                    tracemalloc.Filter(False, tracemalloc.__file__),
                    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
                    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
                    tracemalloc.Filter(False, "<unknown>"),
                ]
            )

    def cycles(self, seconds: float) -> None:
        """What the gc found in reference cycles over `seconds`, by type."""
        gc.collect()
        gc.set_debug(0)
        found = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
        gc.garbage.clear()
        self.cycle_report = {
            "seconds": round(seconds, 1),
            "objects": sum(found.values()),
            "types": found.most_common(20),
        }

    def run(self) -> None:
        every = self.config["every"]
        warmup, seconds = self.config["warmup"], self.config["seconds"]
        marked = set()
        cycles_from = 0.0
        tick = 0
        while True:
            tick += 1
            due = self.started + tick * every
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return
            t = time.monotonic() - self.started
            phase = "load" if t <= seconds else "after"
            self.sample(phase)
            if "cycles" in marked and "cycles done" not in marked:
                marked.add("cycles done")
                self.cycles(t - cycles_from)
            if t >= warmup and "warm" not in marked:
                marked.add("warm")
                self.mark("warm")
                if self.config.get("cycles"):
                    # Keep what the gc frees until the next sample, to see what it is.
                    marked.add("cycles")
                    cycles_from = t
                    gc.collect()
                    gc.set_debug(gc.DEBUG_SAVEALL)
            if t >= seconds - every and "end" not in marked and "warm" in marked:
                marked.add("end")
                self.mark("end")

    def summary(self) -> dict[str, Any]:
        report: dict[str, Any] = {"modes": dict(self.counts.by_mode)}
        if self.cycle_report:
            report["cycles"] = self.cycle_report
        if "warm" in self.types and "end" in self.types:
            grown = self.types["end"].copy()
            grown.subtract(self.types["warm"])
            report["types_grown"] = [
                [name, count, self.types["end"][name]] for name, count in grown.most_common(15)
            ]
        if "warm" in self.snapshots and "end" in self.snapshots:
            warm, end = self.snapshots["warm"], self.snapshots["end"]
            report["tracemalloc_lines"] = [
                [_where(stat.traceback[0]), stat.size_diff, stat.count_diff, stat.size]
                for stat in end.compare_to(warm, "lineno")[:20]
            ]
            report["tracemalloc_tracebacks"] = [
                {
                    "size_diff": stat.size_diff,
                    "count_diff": stat.count_diff,
                    "frames": [_where(frame) for frame in stat.traceback],
                }
                for stat in end.compare_to(warm, "traceback")[:5]
            ]
            report["traced_warm_kb"] = sum(s.size for s in warm.statistics("filename")) // 1024
            report["traced_end_kb"] = sum(s.size for s in end.statistics("filename")) // 1024
        return report


def _where(frame: Any) -> str:
    name = frame.filename
    for prefix in (os.environ.get("FCGI_SOAK_SRC", ""), str(ROOT), sys.prefix, sys.base_prefix):
        if prefix and name.startswith(prefix):
            name = name[len(prefix) :].lstrip("/")
            break
    return f"{name}:{frame.lineno}"


class LogCounter:
    """A logging handler that counts the servers' messages by their template, formatting none."""

    def __init__(self) -> None:
        import logging

        class Handler(logging.Handler):
            def __init__(self, counts: Counter[str]) -> None:
                super().__init__(logging.INFO)
                self.counts = counts

            def emit(self, record: logging.LogRecord) -> None:
                # The message with its numbers (connection, request, bytes) left out.
                text = record.getMessage() if record.args else str(record.msg)
                self.counts[re.sub(r"\d+", "N", text)[:100]] += 1

        self.counts: Counter[str] = Counter()
        for name in ("fcgiproto_socket", "fcgiproto_anyio"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO)
            logger.addHandler(Handler(self.counts))
            logger.propagate = False


def serve_main(config: dict[str, Any]) -> None:
    if config["tracemalloc"]:
        import tracemalloc

        tracemalloc.start(config["frames"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logs = LogCounter()
    counts = Counts()
    kind = config["kind"]
    multiplex = kind.endswith("-mux")
    address = config["address"]
    sampler = Sampler(config, counts, stop)
    ready = Path(config["ready"])
    if kind.startswith("blocking"):
        from fcgiproto_socket import Server

        with Server(blocking_handler(counts), address, multiplex=multiplex):
            sampler.sample("start")
            ready.write_text("ready")
            sampler.thread.start()
            stop.wait()
    else:
        import anyio

        from fcgiproto_anyio import serve

        async def main() -> None:
            async with anyio.create_task_group() as tasks:
                await tasks.start(
                    lambda task_status: serve(
                        async_app(counts), address, multiplex=multiplex, task_status=task_status
                    )
                )
                sampler.sample("start")
                ready.write_text("ready")
                sampler.thread.start()
                while not stop.is_set():
                    await anyio.sleep(0.2)
                tasks.cancel_scope.cancel()

        anyio.run(main, backend="asyncio")
    sampler.thread.join()
    gc.collect()
    sampler.sample("stopped")
    report = sampler.summary()
    report["logs"] = dict(logs.counts)
    Path(config["report"]).write_text(json.dumps(report))


# --- the load's side ---


def params_for(mode: str, size: int = 0, length: int = 0) -> dict[str, str]:
    """A request's params: what nginx's fastcgi_params would send, plus the soak's own."""
    return {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "soak",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost",
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "54321",
        "REQUEST_METHOD": "POST" if length else "GET",
        "REQUEST_URI": f"/{mode}",
        "SCRIPT_NAME": f"/{mode}",
        "SCRIPT_FILENAME": f"/srv/{mode}",
        "DOCUMENT_ROOT": "/srv",
        "QUERY_STRING": "",
        "CONTENT_TYPE": "application/octet-stream" if length else "",
        "CONTENT_LENGTH": str(length) if length else "",
        "HTTP_HOST": "localhost",
        "HTTP_USER_AGENT": "server_soak",
        "SOAK_MODE": mode,
        "SOAK_SIZE": str(size),
    }


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.wrong: list[str] = []

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def bad(self, what: str) -> None:
        with self.lock:
            self.counts["wrong"] += 1
            if len(self.wrong) < 5:
                self.wrong.append(what)


def expected_big(size: int) -> bytes:
    return HEAD + b"".join(_big_chunks(size))


def check(tally: Tally, op: str, response: Any, expected: bytes, status: int = 0) -> None:
    if response.stdout != expected or response.app_status != status:
        tally.bad(f"{op}: {len(response.stdout)} bytes, app_status {response.app_status}")
    else:
        tally.add(f"{op} ok")


def pick(rng: random.Random) -> str:
    return rng.choices(list(OPS), weights=list(OPS.values()))[0]


def blocking_op(client: Any, op: str, rng: random.Random, tally: Tally, cancel: bool) -> None:
    from fcgiproto_socket import Timeout

    timeout = Timeout(total=rng.uniform(0.002, 0.03)) if cancel else None
    if op == "hello":
        check(tally, op, client.request(params_for(op), timeout=timeout), HELLO)
    elif op == "echo":
        body = rng.randbytes(rng.randrange(MAX_BODY))
        response = client.request(params_for(op, length=len(body)), body, timeout=timeout)
        check(tally, op, response, HEAD + body)
    elif op == "big":
        size = rng.choice(BIG_SIZES)
        check(tally, op, client.request(params_for(op, size), timeout=timeout), expected_big(size))
    elif op == "stream":
        size = rng.choice(BIG_SIZES)
        early = rng.random() < 0.5
        got = 0
        with client.stream(params_for("big", size), timeout=timeout) as response:
            for chunk in response.iter_body():
                got += len(chunk)
                if early:
                    break
        tally.add("stream left early" if early else "stream ok" if got == size else "wrong")
    elif op == "slow":
        response = client.request(params_for(op), timeout=timeout)
        check(tally, op, response, HEAD + b"s" * 1024 * SLOW_CHUNKS)
    elif op == "error":
        response = client.request(params_for(op), timeout=timeout)
        tally.add("error ok" if response.app_status == 1 else "wrong")
    elif op == "log":
        response = client.request(params_for(op), timeout=timeout)
        tally.add("log ok" if b"soak: a line" in response.stderr else "wrong")
    else:
        values = client.get_values(timeout=timeout)
        tally.add("values ok" if "FCGI_MPXS_CONNS" in values else "wrong")


def blocking_worker(client: Any, seed: int, stop_at: float, tally: Tally) -> None:
    from fcgiproto import FastCGIError

    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        op = pick(rng)
        # A blocking request is cut short by its deadline: a few ms of total time.
        cancel = op == "slow" or rng.random() < CANCEL_RATE
        try:
            blocking_op(client, op, rng, tally, cancel)
        except FastCGIError as exc:
            tally.add(f"{type(exc).__name__}{' (cut short)' if cancel else ''}")
        except Exception as exc:
            tally.bad(f"{op}: {type(exc).__name__}: {exc}")


async def async_op(client: Any, op: str, rng: random.Random, tally: Tally) -> None:
    if op == "hello":
        check(tally, op, await client.request(params_for(op)), HELLO)
    elif op == "echo":
        body = rng.randbytes(rng.randrange(MAX_BODY))
        check(tally, op, await client.request(params_for(op, length=len(body)), body), HEAD + body)
    elif op == "big":
        size = rng.choice(BIG_SIZES)
        check(tally, op, await client.request(params_for(op, size)), expected_big(size))
    elif op == "stream":
        size = rng.choice(BIG_SIZES)
        early = rng.random() < 0.5
        got = 0
        async with client.stream(params_for("big", size)) as response:
            async for chunk in response.aiter_body():
                got += len(chunk)
                if early:
                    break
        tally.add("stream left early" if early else "stream ok" if got == size else "wrong")
    elif op == "slow":
        check(tally, op, await client.request(params_for(op)), HEAD + b"s" * 1024 * SLOW_CHUNKS)
    elif op == "error":
        response = await client.request(params_for(op))
        tally.add("error ok" if response.app_status == 1 else "wrong")
    elif op == "log":
        response = await client.request(params_for(op))
        tally.add("log ok" if b"soak: a line" in response.stderr else "wrong")
    else:
        values = await client.get_values()
        tally.add("values ok" if "FCGI_MPXS_CONNS" in values else "wrong")


async def async_worker(client: Any, seed: int, stop_at: float, tally: Tally) -> None:
    import anyio

    from fcgiproto import FastCGIError

    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        op = pick(rng)
        cancel = op == "slow" or rng.random() < CANCEL_RATE
        delay = rng.uniform(0.0, 0.03) if cancel else None
        try:
            with anyio.move_on_after(delay) as scope:
                await async_op(client, op, rng, tally)
            if scope.cancelled_caught:
                tally.add("cancelled")
        except FastCGIError as exc:
            tally.add(type(exc).__name__)
        except Exception as exc:
            tally.bad(f"{op}: {type(exc).__name__}: {exc}")


def load_main(config: dict[str, Any]) -> None:
    import anyio

    from fcgiproto_anyio import AsyncClient
    from fcgiproto_socket import Client, Timeout

    address = config["address"]
    limits = Timeout(connect=5, read=10, write=10, pool=10, total=15)
    tally = Tally()
    stop_at = time.monotonic() + config["seconds"]
    seeds = iter(range(config["seed"] * 1000, config["seed"] * 1000 + 1000))
    shared = Client(address, max_connections=4, timeout=limits)
    fresh = Client(address, max_connections=1, max_keepalive=0, timeout=limits)
    threads = [
        threading.Thread(target=blocking_worker, args=(client, next(seeds), stop_at, tally))
        for client in [shared] * config["threads"] + [fresh]
    ]
    for thread in threads:
        thread.start()

    async def run_async() -> None:
        async with (
            AsyncClient(address, max_connections=8, timeout=limits) as client,
            anyio.create_task_group() as tasks,
        ):
            for _ in range(config["tasks"]):
                tasks.start_soon(async_worker, client, next(seeds), stop_at, tally)

    started = time.monotonic()
    anyio.run(run_async, backend="asyncio")
    for thread in threads:
        thread.join()
    shared.close()
    fresh.close()
    result = {
        "wall": time.monotonic() - started,
        "counts": dict(tally.counts),
        "wrong": tally.wrong,
    }
    print("RESULT " + json.dumps(result), flush=True)


# --- the orchestrator ---


def snapshot(target: Path) -> str:
    """Copy the packages to `target` for the runs to import; which version that is."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", *PACKAGES],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return commit + (" with uncommitted changes to the packages" if dirty else "")


def run_kind(args: argparse.Namespace, base: Path, kind: str, src: Path, server_src: Path) -> dict:
    work = base / kind
    work.mkdir()
    config = {
        "kind": kind,
        "address": f"unix:{work / 'fcgi.sock'}",
        "seconds": args.seconds,
        "warmup": args.warmup,
        "every": args.every,
        "tracemalloc": args.tracemalloc,
        "frames": args.frames,
        "malloc_trim": args.malloc_trim,
        "cycles": args.cycles,
        "samples": str(work / "samples.jsonl"),
        "report": str(work / "report.json"),
        "ready": str(work / "ready"),
    }
    env = {**os.environ, "FCGI_SOAK_SRC": str(server_src)}
    for assignment in args.server_env:
        name, _, value = assignment.partition("=")
        env[name] = value
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", json.dumps(config)],
        env=env,
        stderr=open(work / "server.err", "wb"),  # noqa: SIM115  (the child holds it)
    )
    try:
        deadline = time.monotonic() + 30
        while not Path(config["ready"]).exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {kind} server did not start:\n{(work / 'server.err').read_text()}"
                )
            time.sleep(0.05)
        load_config = {
            "address": config["address"],
            "seconds": args.seconds,
            "tasks": args.tasks,
            "threads": args.threads,
            "seed": args.seed,
        }
        load = subprocess.run(
            [sys.executable, __file__, "--load", json.dumps(load_config)],
            env={**os.environ, "FCGI_SOAK_SRC": str(src)},
            stdout=subprocess.PIPE,
            timeout=args.seconds + 120,
            check=False,
        )
        line = next((x for x in load.stdout.splitlines() if x.startswith(b"RESULT ")), b"")
        load_result = json.loads(line[len(b"RESULT ") :]) if line else {"died": load.returncode}
        time.sleep(args.cooldown)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    samples = [json.loads(x) for x in Path(config["samples"]).read_text().splitlines()]
    report_path = Path(config["report"])
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    errors = (work / "server.err").read_text().strip()
    return {
        "kind": kind,
        "config": config,
        "server_env": args.server_env,
        "load": load_result,
        "samples": samples,
        "report": report,
        "server_stderr": errors[-2000:],
    }


def at(samples: list[dict], t: float) -> dict:
    """The first sample at or after time t (the last one if none)."""
    return next((s for s in samples if s["t"] >= t), samples[-1])


def slope(samples: list[dict], start: float, end: float, key: str = "rss_kb") -> float:
    """Growth of `key` in MB per minute between two times (least squares over the samples)."""
    points = [(s["t"], s[key] / 1024) for s in samples if start <= s["t"] <= end and key in s]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if not var:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def describe(result: dict, seconds: float, warmup: float) -> str:
    samples = [s for s in result["samples"] if s["phase"] != "stopped"]
    under_load = [s for s in samples if s["phase"] in ("start", "load")]
    stopped = [s for s in result["samples"] if s["phase"] == "stopped"]
    start, warm, end = samples[0], at(samples, warmup), under_load[-1]
    after = samples[-1]
    mb = lambda kb: f"{kb / 1024:.1f}"  # noqa: E731
    lines = [f"== {result['kind']} ({result['config']['address']})"]
    load = result["load"]
    counts = load.get("counts", {})
    done = sum(v for k, v in counts.items() if k != "wrong")
    lines.append(
        f"load: {done:,} operations in {load.get('wall', 0):.0f} s "
        f"({done / max(load.get('wall', 1), 1):,.0f}/s), wrong {counts.get('wrong', 0)}, "
        f"server requests {end.get('requests', 0):,}"
    )
    lines.append("  " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    if load.get("wrong"):
        lines.append(f"  WRONG: {load['wrong']}")
    keys = [
        ("rss_kb", "RSS"),
        ("rss_untrimmed_kb", "RSS before trim"),
        ("anon_kb", "RssAnon"),
        ("inuse_kb", "malloc in use"),
        ("free_kb", "malloc free kept"),
        ("free_untrimmed_kb", "malloc free before trim"),
        ("heap_kb", "malloc heap"),
        ("mmap_kb", "malloc mmapped"),
        ("pymalloc_arenas_kb", "pymalloc arenas"),
        ("pymalloc_used_kb", "pymalloc in use"),
        ("traced_kb", "tracemalloc traced"),
        ("tracemalloc_overhead_kb", "tracemalloc's own"),
    ]
    marks = [("start", start), (f"warm {warm['t']:.0f}s", warm)]
    span = end["t"] - warm["t"]
    for fraction in (1 / 3, 2 / 3):
        point = at(samples, warm["t"] + span * fraction)
        marks.append((f"{point['t']:.0f}s", point))
    marks.append((f"end {end['t']:.0f}s", end))
    marks.append((f"idle {after['t']:.0f}s", after))
    if stopped:
        marks.append(("stopped", stopped[0]))
    lines.append(f"  {'MB':24}" + "".join(f"{name:>12}" for name, _ in marks) + f"{'peak':>10}")
    for key, name in keys:
        if key not in start:
            continue
        row = "".join(f"{mb(s.get(key, 0)):>12}" for _, s in marks)
        peak = max(s.get(key, 0) for s in samples)
        lines.append(f"  {name:24}{row}{mb(peak):>10}")
    for key, name in [
        ("gc_objects", "gc objects"),
        ("arenas", "malloc arenas"),
        ("connections", "server connections"),
        ("ended_ids", "ended ids held"),
        ("threads", "threads"),
        ("fds", "fds"),
        ("gc_collected", "gc collected (total)"),
    ]:
        row = "".join(f"{s.get(key, 0):>12,}" for _, s in marks)
        lines.append(f"  {name:24}{row}")
    first = (warm["t"], warm["t"] + span / 3)
    last = (end["t"] - span / 3, end["t"])
    for key in ("rss_kb", "inuse_kb", "anon_kb"):
        if key not in start:
            continue
        a, b = slope(samples, *first, key), slope(samples, *last, key)
        lines.append(
            f"  {key[:-3]} growth: first third after warm-up {a:+.3f} MB/min, last third "
            f"{b:+.3f} MB/min"
        )
    a, b = slope(samples, *first), slope(samples, *last)
    # Flat within the noise (0.1 MB/min: 2 MB over a 20 minute run), or a quarter of the growth.
    levels = b <= max(0.25 * a, FLAT)
    lines.append(
        f"  levels off: {'yes' if levels else 'NO'} (RSS growth in the last third at most "
        f"{FLAT} MB/min or a quarter of the first third's)"
    )
    report = result["report"]
    if report.get("types_grown"):
        lines.append("  live objects that grew, warm-up -> end (type, growth, count at end):")
        lines += [f"    {n:40} {g:+8,} {c:10,}" for n, g, c in report["types_grown"][:10]]
    if report.get("tracemalloc_lines"):
        lines.append(
            f"  tracemalloc: traced {report['traced_warm_kb'] / 1024:.1f} MB after warm-up, "
            f"{report['traced_end_kb'] / 1024:.1f} MB at the end; top sites by growth:"
        )
        lines += [
            f"    {where:60} {size / 1024:+10.1f} KiB {count:+8,} blocks (now {now / 1024:.1f} KiB)"
            for where, size, count, now in report["tracemalloc_lines"][:12]
        ]
        for entry in report["tracemalloc_tracebacks"][:3]:
            lines.append(
                f"    {entry['size_diff'] / 1024:+.1f} KiB {entry['count_diff']:+,} blocks via "
                + " <- ".join(reversed(entry["frames"][-4:]))
            )
    if report.get("cycles"):
        cycles = report["cycles"]
        lines.append(
            f"  in reference cycles over {cycles['seconds']:.0f} s after the warm-up: "
            f"{cycles['objects']:,} objects; "
            + ", ".join(f"{count:,} {name}" for name, count in cycles["types"][:12])
        )
    if report.get("logs"):
        lines.append(
            "  server log messages: "
            + ", ".join(f"{v:,} x {k!r}" for k, v in sorted(report["logs"].items()))
        )
    if result["server_stderr"]:
        lines.append("  server stderr: " + result["server_stderr"][-500:])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=",".join(KINDS))
    parser.add_argument("--seconds", type=float, default=1200, help="load per kind (1200)")
    parser.add_argument("--warmup", type=float, default=120, help="seconds before the baseline")
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    parser.add_argument("--cooldown", type=float, default=20, help="idle seconds after the load")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--frames", type=int, default=8, help="frames tracemalloc keeps")
    parser.add_argument("--malloc-trim", action="store_true")
    parser.add_argument(
        "--cycles", action="store_true", help="after the warm-up, what falls into reference cycles"
    )
    parser.add_argument("--tasks", type=int, default=12, help="asyncio tasks on one AsyncClient")
    parser.add_argument("--threads", type=int, default=4, help="threads on one shared Client")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--code", help="import the server from this tree (the load: this checkout)")
    parser.add_argument(
        "--server-env", action="append", default=[], help="NAME=VALUE for the server process"
    )
    parser.add_argument("--out", help="write the samples and reports here (JSON)")
    parser.add_argument("--show", help="print the reports of an earlier run's --out file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(json.loads(args.serve))
        return
    if args.load:
        load_main(json.loads(args.load))
        return

    if args.show:
        for result in json.loads(Path(args.show).read_text()):
            config = result["config"]
            print(describe(result, config["seconds"], config["warmup"]))
        return
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose among {KINDS}")
    base = Path(tempfile.mkdtemp(prefix="fcgi-server-soak-", dir="/tmp"))
    results = []
    try:
        version = snapshot(base / "src")
        server_src = base / "src"
        if args.code:
            server_src = Path(args.code).resolve()
            version += f"; server from {server_src}"
        print(
            f"server soak: {args.seconds:g} s per kind, warm-up {args.warmup:g} s, sample every "
            f"{args.every:g} s{', tracemalloc' if args.tracemalloc else ''}"
            f"{', malloc_trim' if args.malloc_trim else ''}"
            f"{', server env ' + ' '.join(args.server_env) if args.server_env else ''}; "
            f"code {version}; Python {platform.python_version()}",
            flush=True,
        )
        for kind in kinds:
            started = time.monotonic()
            result = run_kind(args, base, kind, base / "src", server_src)
            result["version"] = version
            results.append(result)
            print(describe(result, args.seconds, args.warmup), flush=True)
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    wrong = sum(r["load"].get("counts", {}).get("wrong", 0) for r in results)
    sys.exit(1 if wrong or any("died" in r["load"] for r in results) else 0)


if __name__ == "__main__":
    main()
