"""Soak with faults: both clients against php-fpm and Go while connections break under them.

Run:  uv run python benchmarks/soak.py [--requests N] [--seconds LIMIT]

For every combination of client (blocking ``fcgiproto_socket.Client`` on
threads, ``fcgiproto_anyio.AsyncClient`` on asyncio tasks), peer (php-fpm,
the tests' Go server) and concurrency (1, 8, 64), N requests (default 100,000)
or LIMIT seconds (default 300), whichever comes first. Every request POSTs a
unique body (its number and 0..64 KiB of random bytes) to echo.php or /echo,
through a fault-injecting TCP proxy on 127.0.0.1 in front of the peer's Unix
socket, and the answer must come back byte for byte. Meanwhile:

- the proxy, at random, resets a connection (SO_LINGER 0, so an RST), closes
  one in the middle of a response (FIN after a random prefix of a read),
  trickles the start of a read byte by byte, and, rarely, stalls a read for
  longer than the read timeout;
- during the php-fpm runs, a thread sends SIGKILL to a random worker of the
  pool in use (found through /proc) every ~2 s.

Each combination runs in a process of its own (so RSS, file descriptors and
threads are that client's alone); the proxy is a process of its own too.
Counted: requests completed, errors by type (all must be in the
fcgiproto.FastCGIError tree: anything else is a bug, printed), wrong bodies
(must be 0), hung requests (over the deadline by more than 2 s, measured by
the caller; must be 0), peak RSS, file descriptors at start, peak and end
(after the client is closed; must equal the start), threads at start and end.
Everything listens on loopback or a Unix socket under /tmp/fcgi-soak-*, and
is stopped and removed at the end. See benchmarks/README.md, "Soak with faults".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Soak the checkout this file sits in, whatever is installed; reuse the tests' peers.
# The runs of the combinations import a copy of the packages taken at the start
# (FCGI_SOAK_SRC), so that one soak tests one version even while the tree is edited.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, os.environ.get("FCGI_SOAK_SRC") or str(Path(__file__).resolve().parent.parent))

import anyio
import peers

from fcgiproto import FastCGIError
from fcgiproto_anyio import AsyncClient
from fcgiproto_socket import Client, Response, Timeout

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fcgiproto", "fcgiproto_socket", "fcgiproto_anyio")
CLIENTS = ("blocking", "async")
PEERS = ("php-fpm", "go")
CONCURRENCY = (1, 8, 64)

#: Every request's limits; `total` is its deadline.
TIMEOUT = Timeout(connect=2, read=5, write=5, pool=10, total=10)
DEADLINE = 10.0
#: A request that takes longer than its deadline plus this (caller's clock) is hung.
HUNG_MARGIN = 2.0
#: A request still running this long after it became hung is given up on, so the run ends.
ABANDON_AFTER = 20.0
#: Bodies are the request number, a colon, and 0..MAX_BODY random bytes.
MAX_BODY = 64 * 1024
#: php-fpm's workers per pool (tests/peers.py); max_connections is min(concurrency, this).
PHP_WORKERS = 4
#: php-fpm runs with -n (no php.ini); opcache as a production setup would have it.
OPCACHE = ["-d", "zend_extension=opcache", "-d", "opcache.enable=1"]

Params = dict[str | bytes, str | bytes]


# --- /proc ---


def proc_status(field_name: str) -> int:
    """A number field of /proc/self/status (VmRSS and VmHWM in kB, Threads)."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(field_name.encode() + b":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    return proc_status("Threads")


def children_of(pid: int, cmdline_has: bytes = b"") -> list[int]:
    """Pids of the live direct children of `pid` whose command line holds `cmdline_has`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
            if int(fields[1]) != pid or fields[0] == b"Z":
                continue
            if cmdline_has and cmdline_has not in Path(entry.path, "cmdline").read_bytes():
                continue
        except (OSError, ValueError):
            continue
        found.append(int(entry.name))
    return found


# --- the fault proxy (a process of its own: soak.py --proxy CONFIG) ---


@dataclass
class FaultRates:
    """Per read (of up to 64 KiB) the proxy forwards; see the module docstring."""

    reset: float = 0.002  # either direction: RST to the client, upstream closed
    close: float = 0.002  # response direction: a random prefix, then FIN both ways
    slow: float = 0.01  # response direction: the first 1..64 bytes one at a time, 1 ms apart
    stall: float = 0.00005  # response direction: hold the read for STALL seconds
    stall_seconds: float = 6.0  # longer than TIMEOUT.read


@dataclass
class ProxyConfig:
    listen_port: int
    upstream: str  # a Unix socket path
    stats_path: str
    seed: int
    faults: FaultRates


SLOW_BYTES = 64
SLOW_GAP = 0.001
PROXY_READ = 256 * 1024


class FaultProxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.seed)
        self.stats: Counter[str] = Counter()

    async def serve(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = await asyncio.start_server(
            self.handle, "127.0.0.1", self.config.listen_port, backlog=1024
        )
        async with server:
            await stop.wait()
        Path(self.config.stats_path).write_text(json.dumps(dict(self.stats)))

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        try:
            ureader, uwriter = await asyncio.open_unix_connection(self.config.upstream)
        except OSError:
            self.stats["upstream refused"] += 1
            cwriter.transport.abort()
            return
        pair = (cwriter, uwriter)
        down = asyncio.ensure_future(self.pump(ureader, cwriter, pair, response=True))
        up = asyncio.ensure_future(self.pump(creader, uwriter, pair, response=False))
        try:
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (down, up):
                task.cancel()
            await asyncio.gather(down, up, return_exceptions=True)
            for writer in pair:
                writer.close()  # flushes what was written, then FIN (no-op after abort)

    def pick(self, response: bool) -> str:
        f, x = self.faults, self.rng.random()
        if x < f.reset:
            return "reset"
        if not response:
            return ""
        x -= f.reset
        for name, rate in (("close", f.close), ("slow", f.slow), ("stall", f.stall)):
            if x < rate:
                return name
            x -= rate
        return ""

    async def pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        response: bool,
    ) -> None:
        rng = self.rng
        with contextlib.suppress(OSError):
            while data := await reader.read(PROXY_READ):
                fault = self.pick(response)
                if fault:
                    self.stats[fault if response or fault != "reset" else "reset (request)"] += 1
                if fault == "reset":
                    cwriter = pair[0]
                    sock = cwriter.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    cwriter.transport.abort()
                    pair[1].transport.abort()
                    return
                if fault == "close":
                    writer.write(data[: rng.randrange(len(data))])
                    await writer.drain()
                    return
                if fault == "slow":
                    count = min(len(data), rng.randint(1, SLOW_BYTES))
                    for i in range(count):
                        writer.write(data[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(SLOW_GAP)
                    data = data[count:]
                elif fault == "stall":
                    await asyncio.sleep(self.faults.stall_seconds)
                writer.write(data)
                await writer.drain()


def run_proxy(config: ProxyConfig) -> None:
    asyncio.run(FaultProxy(config).serve())


class WorkerKiller:
    """SIGKILLs a random php-fpm worker of one pool every `mean` seconds on average."""

    def __init__(self, master_pid: int, pool: str, mean: float, seed: int) -> None:
        self.master_pid = master_pid
        self.marker = f"pool {pool}".encode()
        self.mean = mean
        self.rng = random.Random(seed)
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak worker killer", daemon=True)

    def __enter__(self) -> WorkerKiller:
        if self.mean > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.rng.expovariate(1 / self.mean)):
            workers = children_of(self.master_pid, self.marker)
            if workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.rng.choice(workers), signal.SIGKILL)
                    self.kills += 1


# --- one combination (a process of its own: soak.py --combo CONFIG) ---


@dataclass
class ComboConfig:
    client: str
    peer: str
    concurrency: int
    address: str
    params: dict[str, str]
    max_connections: int
    requests: int
    seconds: float
    seed: int


@dataclass
class Result:
    client: str
    peer: str
    concurrency: int
    max_connections: int = 0
    completed: int = 0  # requests that returned (a response or an error)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)
    bugs: dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    wrong_samples: list[str] = field(default_factory=list)
    hung: int = 0  # over the deadline by more than HUNG_MARGIN, returned or not
    abandoned: int = 0  # never returned at all
    slowest: float = 0.0
    wall: float = 0.0
    rss_start_kb: int = 0
    rss_peak_kb: int = 0
    fds_start: int = 0
    fds_peak: int = 0
    fds_end: int = 0
    threads_start: int = 0
    threads_end: int = 0
    # Filled in by the orchestrator.
    faults: dict[str, int] = field(default_factory=dict)
    note: str = ""


class Tally:
    """What the requests of one combination came to; shared by its threads or tasks."""

    def __init__(self, result: Result) -> None:
        self.result = result
        self.lock = threading.Lock()
        self.errors: Counter[str] = Counter()
        self.bugs: Counter[str] = Counter()
        self.inflight: dict[int, float] = {}  # worker -> when its request started

    def outcome(
        self, n: int, body: bytes, response: Response | None, exc: BaseException | None, took: float
    ) -> None:
        r = self.result
        problem = ""
        if response is not None:
            try:
                status, got = response.status, response.body
            except FastCGIError as err:  # a malformed CGI head
                response, exc = None, err
            else:
                if status != 200 or got != body:
                    problem = describe_wrong(n, body, status, got, response.stderr)
        with self.lock:
            r.completed += 1
            r.slowest = max(r.slowest, took)
            if took > DEADLINE + HUNG_MARGIN:
                r.hung += 1
                print(f"soak: request {n} took {took:.1f} s (hung)", file=sys.stderr)
            if problem:
                r.wrong += 1
                if len(r.wrong_samples) < 5:
                    r.wrong_samples.append(problem)
                print(f"soak: WRONG BODY: {problem}", file=sys.stderr)
            elif response is not None:
                r.ok += 1
            elif isinstance(exc, FastCGIError):
                kind = type(exc).__name__
                self.errors[kind] += 1
                r.error_samples.setdefault(kind, str(exc)[:200])
            elif exc is not None:
                kind = type(exc).__name__
                self.bugs[kind] += 1
                if self.bugs[kind] <= 3:
                    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                    print(f"soak: BUG, not a FastCGIError (request {n}):\n{text}", file=sys.stderr)

    def finish(self) -> None:
        self.result.errors = dict(self.errors.most_common())
        self.result.bugs = dict(self.bugs.most_common())


def describe_wrong(n: int, body: bytes, status: int, got: bytes, stderr: bytes) -> str:
    same = next(
        (i for i, (a, b) in enumerate(zip(body, got, strict=False)) if a != b),
        min(len(body), len(got)),
    )
    return (
        f"request {n}: status {status}, expected {len(body)} bytes, got {len(got)}, "
        f"first difference at byte {same}, got starts {got[:40]!r}, stderr {stderr[:200]!r}"
    )


class Bodies:
    """Unique bodies: the request number, then a random slice of a random pool."""

    def __init__(self, seed: int) -> None:
        self.pool = random.Random(seed).randbytes(4 * MAX_BODY)

    def make(self, rng: random.Random, n: int) -> bytes:
        size = rng.randint(0, MAX_BODY)
        start = rng.randrange(len(self.pool) - size + 1)
        return b"%d:" % n + self.pool[start : start + size]


class Sampler:
    """A thread sampling open fds every 10 ms, and printing progress every 10 s."""

    def __init__(self, tally: Tally, label: str) -> None:
        self.tally = tally
        self.label = label
        self.fds_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = last = time.monotonic()
        while not self._stop.wait(0.01):
            self.fds_peak = max(self.fds_peak, open_fds())
            now = time.monotonic()
            if now - last >= 10:
                last = now
                r = self.tally.result
                print(
                    f"soak:   {self.label}: {now - started:5.0f} s, {r.completed:,} done, "
                    f"{r.ok:,} ok, {sum(self.tally.errors.values()):,} errors, "
                    f"{r.wrong} wrong, {r.hung} hung",
                    file=sys.stderr,
                    flush=True,
                )


def request_params(base: Mapping[str, str], body: bytes) -> Params:
    params: Params = {name: value for name, value in base.items()}
    params["CONTENT_LENGTH"] = str(len(body))
    return params


def settle(start: int, measure: Callable[[], int], wait: float = 1.0) -> int:
    """`measure()` once it is back to `start`, or after `wait` seconds."""
    give_up = time.monotonic() + wait
    value = measure()
    while value != start and time.monotonic() < give_up:
        time.sleep(0.02)
        value = measure()
    return value


def run_blocking(config: ComboConfig, tally: Tally, bodies: Bodies) -> None:
    r = tally.result
    numbers = itertools.count()
    stop_at = time.monotonic() + config.seconds
    client = Client(config.address, max_connections=config.max_connections, timeout=TIMEOUT)

    def worker(k: int) -> None:
        rng = random.Random(config.seed * 1000 + k)
        while (n := next(numbers)) < config.requests and time.monotonic() < stop_at:
            body = bodies.make(rng, n)
            params = request_params(config.params, body)
            response: Response | None = None
            error: BaseException | None = None
            started = tally.inflight[k] = time.monotonic()
            try:
                response = client.request(params, body)
            except Exception as exc:
                error = exc
            tally.inflight.pop(k, None)
            tally.outcome(n, body, response, error, time.monotonic() - started)

    threads = [
        threading.Thread(target=worker, args=(k,), name=f"soak {k}", daemon=True)
        for k in range(config.concurrency)
    ]
    for thread in threads:
        thread.start()
    abandon = DEADLINE + HUNG_MARGIN + ABANDON_AFTER
    while alive := [t for t in threads if t.is_alive()]:
        oldest = min(tally.inflight.values(), default=time.monotonic())
        if time.monotonic() - oldest > abandon:
            r.abandoned = len(tally.inflight)
            r.hung += r.abandoned
            print(f"soak: {r.abandoned} requests never returned; abandoned", file=sys.stderr)
            break
        alive[0].join(0.1)
    client.close()


async def run_async(config: ComboConfig, tally: Tally, bodies: Bodies) -> None:
    r = tally.result
    numbers = itertools.count()
    stop_at = time.monotonic() + config.seconds
    abandon = DEADLINE + HUNG_MARGIN + ABANDON_AFTER

    async with AsyncClient(
        config.address, max_connections=config.max_connections, timeout=TIMEOUT
    ) as client:

        async def worker(k: int) -> None:
            rng = random.Random(config.seed * 1000 + k)
            while (n := next(numbers)) < config.requests and time.monotonic() < stop_at:
                body = bodies.make(rng, n)
                params = request_params(config.params, body)
                response: Response | None = None
                error: BaseException | None = None
                started = time.monotonic()
                with anyio.move_on_after(abandon) as scope:
                    try:
                        response = await client.request(params, body)
                    except Exception as exc:
                        error = exc
                if scope.cancelled_caught:
                    with tally.lock:
                        r.abandoned += 1
                        r.hung += 1
                    print(f"soak: request {n} never returned; cancelled", file=sys.stderr)
                    continue
                tally.outcome(n, body, response, error, time.monotonic() - started)

        async with anyio.create_task_group() as tasks:
            for k in range(config.concurrency):
                tasks.start_soon(worker, k)


def run_combo(config: ComboConfig) -> Result:
    result = Result(config.client, config.peer, config.concurrency, config.max_connections)
    tally = Tally(result)
    bodies = Bodies(config.seed)
    label = f"{config.client} {config.peer} x{config.concurrency}"
    result.fds_start, result.threads_start = open_fds(), os_threads()
    result.rss_start_kb = proc_status("VmRSS")
    started = time.monotonic()
    with Sampler(tally, label) as sampler:
        if config.client == "async":
            # The end counts come after anyio.run has returned: the event loop's
            # own descriptors (epoll, self-pipe) and its default executor's
            # thread (anyio.getaddrinfo runs there) are gone by then.
            anyio.run(run_async, config, tally, bodies, backend="asyncio")
        else:
            run_blocking(config, tally, bodies)
    result.wall = time.monotonic() - started
    result.fds_peak = max(sampler.fds_peak, result.fds_start)
    result.fds_end = settle(result.fds_start, open_fds)
    result.threads_end = settle(result.threads_start, os_threads)
    result.rss_peak_kb = proc_status("VmHWM")
    tally.finish()
    return result


def combo_main(config: ComboConfig) -> None:
    result = run_combo(config)
    print("RESULT " + json.dumps(asdict(result)), flush=True)
    # Threads given up on may still be blocked in the client: do not wait for them.
    os._exit(0)


# --- the orchestrator ---


class PhpFpm(peers.PhpFpm):
    """The tests' php-fpm (pools "tcp" and "unix", 4 static workers each), with opcache."""

    def __init__(self, binary: str, base: Path) -> None:
        super().__init__(binary, base)
        self._proc.argv[1:1] = OPCACHE

    def master_pid(self) -> int:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError, ValueError):
                return int(self.pid_file.read_text().strip())
            if time.monotonic() > deadline:
                raise peers.PeerError(f"no pid in {self.pid_file}")
            time.sleep(0.01)


@dataclass
class Peer:
    name: str
    unix_path: str  # what the proxy connects to
    params: dict[str, str]
    health_params: dict[str, str]
    ensure_running: Callable[[], None]
    php: PhpFpm | None = None


@contextlib.contextmanager
def started_peers(base: Path, wanted: list[str]) -> Iterator[dict[str, Peer]]:
    found: dict[str, Peer] = {}
    with contextlib.ExitStack() as stack:
        if "php-fpm" in wanted:
            binary = peers.find_php_fpm()
            if binary is None:
                print("soak: php-fpm is not installed; its rows are skipped", file=sys.stderr)
            else:
                (base / "php").mkdir()
                fpm = PhpFpm(binary, base / "php")
                fpm.start()
                stack.callback(fpm.stop)
                found["php-fpm"] = Peer(
                    "php-fpm",
                    fpm.unix_path,
                    fpm.params("echo.php", "POST", content_length=0),
                    fpm.params("hello.php"),
                    fpm.ensure_running,
                    fpm,
                )
        if "go" in wanted:
            go = peers.find_go()
            if go is None:
                print("soak: go is not installed; its rows are skipped", file=sys.stderr)
            else:
                (base / "go").mkdir()
                server = peers.GoServer(peers.build_go_server(go), base / "go")
                server.start()
                stack.callback(server.stop)
                found["go"] = Peer(
                    "go",
                    server.unix_path,
                    peers.go_params("/echo", "POST", content_length=0),
                    peers.go_params("/hello"),
                    server.ensure_running,
                )
        yield found


@contextlib.contextmanager
def fault_proxy(base: Path, upstream: str, faults: FaultRates, seed: int) -> Iterator[ProxyConfig]:
    port = peers.free_port()
    config = ProxyConfig(port, upstream, str(base / f"proxy-{port}.json"), seed, faults)
    proc = peers.ManagedProcess(
        "fault proxy",
        [sys.executable, __file__, "--proxy", json.dumps(asdict(config))],
        output_log=base / f"proxy-{port}.out",
    )
    proc.start()
    try:
        peers.wait_until_ready(proc, [f"127.0.0.1:{port}"], logs=[])
        yield config
    finally:
        proc.stop()
        output = proc.read_output().strip()
        if output:
            print(f"soak: fault proxy said:\n{output}", file=sys.stderr)


def healthy(peer: Peer) -> str:
    """An empty string when the peer answers a request directly (no proxy), else what went wrong."""
    try:
        with Client(f"unix:{peer.unix_path}", timeout=5) as client:
            body = client.request(peer.health_params).body
    except FastCGIError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "" if body == peers.HELLO_BODY else f"answered {body[:60]!r}"


def run_one(
    args: argparse.Namespace, base: Path, peer: Peer, client: str, concurrency: int, seed: int
) -> Result:
    faults = FaultRates(args.reset, args.close, args.slow, args.stall, args.stall_seconds)
    with fault_proxy(base, peer.unix_path, faults, seed) as proxy:
        config = ComboConfig(
            client=client,
            peer=peer.name,
            concurrency=concurrency,
            address=f"127.0.0.1:{proxy.listen_port}",
            params=peer.params,
            # php-fpm: never more connections than workers (each pins one). Go
            # multiplexes, so its requests share one connection; the same cap
            # then bounds the probe and catches a client that opens more.
            max_connections=min(concurrency, PHP_WORKERS),
            requests=args.requests,
            seconds=args.seconds,
            seed=seed,
        )
        killer = (
            WorkerKiller(peer.php.master_pid(), "unix", args.kill_every, seed)
            if peer.php is not None
            else None
        )
        bound = args.seconds + DEADLINE + HUNG_MARGIN + ABANDON_AFTER + 60
        with killer if killer is not None else contextlib.nullcontext():
            try:
                child = subprocess.run(
                    [sys.executable, __file__, "--combo", json.dumps(asdict(config))],
                    env={**os.environ, "FCGI_SOAK_SRC": str(base / "src")},
                    stdout=subprocess.PIPE,
                    timeout=bound,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                child = None
    line = b""
    if child is not None:
        line = next((x for x in child.stdout.splitlines() if x.startswith(b"RESULT ")), b"")
    if line:
        result = Result(**json.loads(line[len(b"RESULT ") :]))
    else:
        result = Result(client, peer.name, concurrency)
        result.note = (
            f"the run did not finish within {bound:.0f} s"
            if child is None
            else f"the run died with status {child.returncode}"
        )
    with contextlib.suppress(OSError, ValueError):
        result.faults = json.loads(Path(proxy.stats_path).read_text())
    if killer is not None:
        result.faults["worker kills"] = killer.kills
    time.sleep(0.5)  # php-fpm respawns a killed worker within a few ms
    problem = healthy(peer)
    if problem:
        result.note = (result.note + "; " if result.note else "") + f"peer unhealthy: {problem}"
        peer.ensure_running()
    return result


# --- the table ---

SHORT = {
    "ReadError": "Read",
    "WriteError": "Write",
    "ReadTimeout": "RTimeout",
    "WriteTimeout": "WTimeout",
    "ConnectError": "Connect",
    "ConnectTimeout": "CTimeout",
    "PoolTimeout": "PTimeout",
    "RemoteProtocolError": "Remote",
}
FAULT_SHORT = {
    "connections": "conns",
    "worker kills": "kill",
    "reset": "rst",
    "reset (request)": "rst-req",
    "close": "fin",
    "slow": "slow",
    "stall": "stall",
}


def table(results: list[Result]) -> str:
    head = (
        f"{'client':8} {'peer':7} {'conc':>4} {'done':>7} {'ok':>7} {'req/s':>6} "
        f"{'wrong':>5} {'hung':>4} {'bugs':>4} {'RSS MB':>11} {'fds s/pk/e':>10} "
        f"{'thr s/e':>7}  errors by type | faults injected"
    )
    lines = [head]
    for r in results:
        rate = r.completed / r.wall if r.wall else 0.0
        errors = " ".join(f"{SHORT.get(k, k)} {v}" for k, v in r.errors.items()) or "-"
        faults = " ".join(f"{FAULT_SHORT[k]} {r.faults[k]}" for k in FAULT_SHORT if r.faults.get(k))
        rss = f"{r.rss_start_kb / 1024:.0f}->{r.rss_peak_kb / 1024:.0f}"
        lines.append(
            f"{r.client:8} {r.peer:7} {r.concurrency:>4} {r.completed:>7,} {r.ok:>7,} "
            f"{rate:>6,.0f} {r.wrong:>5} {r.hung:>4} {sum(r.bugs.values()):>4} {rss:>11} "
            f"{f'{r.fds_start}/{r.fds_peak}/{r.fds_end}':>10} "
            f"{f'{r.threads_start}/{r.threads_end}':>7}  {errors} | {faults or '-'}"
        )
        if r.bugs:
            lines.append(f"{'':28}bugs: {r.bugs}")
        if r.note:
            lines.append(f"{'':28}note: {r.note}")
    return "\n".join(lines)


def verdict(results: list[Result]) -> list[str]:
    problems = []
    for r in results:
        name = f"{r.client} {r.peer} x{r.concurrency}"
        if r.note:
            problems.append(f"{name}: {r.note}")
        if r.wrong:
            problems.append(f"{name}: {r.wrong} wrong bodies: {r.wrong_samples}")
        if r.hung:
            problems.append(f"{name}: {r.hung} hung ({r.abandoned} never returned)")
        if r.bugs:
            problems.append(f"{name}: errors outside FastCGIError: {r.bugs}")
        # The event loop holds 3 descriptors of its own (epoll, self-pipe); a
        # replaced connection may overlap its successor by one.
        sockets = r.fds_peak - r.fds_start - (3 if r.client == "async" else 0)
        if r.max_connections and sockets > r.max_connections + 1:
            problems.append(
                f"{name}: up to {sockets} descriptors open at once with max_connections="
                f"{r.max_connections}"
            )
        if r.fds_end != r.fds_start:
            problems.append(f"{name}: fds {r.fds_start} at start, {r.fds_end} at end")
        if r.threads_end != r.threads_start:
            problems.append(f"{name}: threads {r.threads_start} at start, {r.threads_end} at end")
    return problems


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
        return "code: not a git checkout"
    return f"code: {commit}" + (" with uncommitted changes to the packages" if dirty else "")


def csv(text: str, allowed: tuple[Any, ...], kind: Callable[[str], Any] = str) -> list[Any]:
    values = [kind(x) for x in text.split(",") if x]
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose among {allowed}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=100_000, help="per combination (default 100,000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=300, help="time limit per combination (default 300)"
    )
    parser.add_argument("--clients", default=",".join(CLIENTS), help="blocking,async")
    parser.add_argument("--peers", default=",".join(PEERS), help="php-fpm,go")
    parser.add_argument("--concurrency", default="1,8,64", help="1,8,64")
    parser.add_argument("--seed", type=int, default=1)
    defaults = FaultRates()
    parser.add_argument("--reset", type=float, default=defaults.reset, help="per proxy read")
    parser.add_argument("--close", type=float, default=defaults.close, help="per response read")
    parser.add_argument("--slow", type=float, default=defaults.slow, help="per response read")
    parser.add_argument("--stall", type=float, default=defaults.stall, help="per response read")
    parser.add_argument("--stall-seconds", type=float, default=defaults.stall_seconds)
    parser.add_argument(
        "--kill-every", type=float, default=2.0, help="mean seconds between worker kills (0: off)"
    )
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    parser.add_argument("--combo", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.proxy:
        config = json.loads(args.proxy)
        config["faults"] = FaultRates(**config["faults"])
        run_proxy(ProxyConfig(**config))
        return
    if args.combo:
        combo_main(ComboConfig(**json.loads(args.combo)))
        return

    clients = csv(args.clients, CLIENTS)
    wanted = csv(args.peers, PEERS)
    levels = csv(args.concurrency, CONCURRENCY + tuple(range(1, 1025)), int)
    print(
        f"soak: {args.requests:,} requests or {args.seconds:g} s per combination; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    results: list[Result] = []
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="fcgi-soak-", dir="/tmp"))
    try:
        version = snapshot(base / "src")
        with started_peers(base, wanted) as found:
            seeds = itertools.count(args.seed * 1000)
            for peer_name in wanted:
                if peer_name not in found:
                    continue
                for client in clients:
                    for concurrency in levels:
                        label = f"{client} {peer_name} x{concurrency}"
                        print(f"soak: {label} ...", file=sys.stderr, flush=True)
                        result = run_one(
                            args, base, found[peer_name], client, concurrency, next(seeds)
                        )
                        results.append(result)
                        print(table([result]).splitlines()[1], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nsoak with faults, {time.monotonic() - started:.0f} s in all; {version}")
    print(table(results))
    problems = verdict(results)
    print("\n" + ("\n".join(f"PROBLEM {p}" for p in problems) if problems else "no problems"))
    samples: dict[str, str] = {}
    for r in results:
        for kind, text in r.error_samples.items():
            samples.setdefault(kind, text)
    if samples:
        print("\nan example of each error type:")
        for kind, text in samples.items():
            print(f"  {kind}: {text}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
