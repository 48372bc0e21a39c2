"""End to end against php-fpm: our blocking client beside a bare loop, nginx and other clients.

Run:  uv run python benchmarks/bench_e2e.py        (about 2.5 min on 2 cores)

Starts php-fpm (pm = static, 4 workers per pool, opcache on) and, for the HTTP
rows, nginx in front of it; everything listens on loopback or a Unix socket and
is stopped at the end. flup and fcgi-client run as subprocesses of a separate
virtualenv (--peers-python); a peer that is not installed there is skipped and
the table says so. What each row measures is written in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Measure the checkout this file sits in, whatever is installed; reuse the tests' peers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers
from _shared import WRK, children_cpu, read_pid, us, verdict, wrk

from fcgiproto_socket import Client

#: Where the third-party Python clients live (never in the project's environment).
DEFAULT_PEERS_PYTHON = os.environ.get("FCGI_BENCH_PEERS_PYTHON", "/tmp/peers-venv/bin/python")
SCRIPT = "hello.php"
#: php-fpm runs with -n (no php.ini); this loads opcache as a production setup would.
OPCACHE = ["-d", "zend_extension=opcache", "-d", "opcache.enable=1"]
TICKS = os.sysconf("SC_CLK_TCK")
#: PARAMS as Client.request types them (a Mapping is invariant in its key).
Params = dict[str | bytes, str | bytes]

#: Warm-up before every measured run, in seconds (wrk's shortest run is 1 s).
WARM_UP = 0.3
WRK_WARM_UP = 1

# --- the goals (the speed issue's; the first is DESIGN.md's end-to-end budget) ---

GOAL_CPU_VS_PEER = 1 / 3  # our CPU per request <= 1/3 of the best Python peer's
GOAL_VS_NGINX_C1 = 1.0  # sequential requests/s >= nginx + wrk -c1
GOAL_VS_BARE = 0.75  # sequential requests/s >= 0.75x the bare hand-written loop
GOAL_CPU_VS_BARE = 1.5  # sequential client CPU per request <= 1.5x the bare loop's
GOAL_VS_NGINX_C4 = 0.7  # 4 threads on one Client(max_connections=4) >= 0.7x wrk -c4 through nginx


# --- CPU accounting ---


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its direct children (php-fpm's master and workers)."""
    total = proc_cpu(pid)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


# --- the peers ---


class PhpFpm(peers.PhpFpm):
    """The tests' php-fpm (pools "tcp" and "unix", 4 static workers each), with opcache."""

    def __init__(self, binary: str, base: Path) -> None:
        super().__init__(binary, base)
        # The tests run php-fpm without php.ini; a benchmark of PHP should have opcache.
        self._proc.argv[1:1] = OPCACHE

    def cpu(self) -> float:
        return tree_cpu(read_pid(self.pid_file))


@dataclass
class Target:
    """One transport to php-fpm: the address our clients use, and nginx in front of it."""

    name: str  # "TCP" or "Unix"
    address: str  # for fcgiproto_socket.Client: "127.0.0.1:port" or "unix:/path"
    nginx: peers.Nginx | None


# --- one measured run ---


@dataclass
class Run:
    requests: int
    wall: float
    cpu: float  # the client's CPU seconds (for the nginx rows: nginx's process)
    server_cpu: float  # php-fpm's CPU seconds
    server_requests: int  # requests php-fpm served while server_cpu was counted
    wrk_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.wall


@dataclass
class Case:
    key: str
    label: str
    run: Callable[[Target], Run] | None
    skip: str = ""  # why run is None
    note: str = ""
    runs: dict[str, list[Run]] = field(default_factory=dict)


def timed_loop(one: Callable[[], object], seconds: float) -> Run:
    """Call `one` for `seconds` of wall time; wall and process CPU of those calls."""
    count = 0
    start_cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        one()
        count += 1
        now = time.perf_counter()
    return Run(count, now - start, time.process_time() - start_cpu, 0.0, count)


#: Opens a client to an address: (one request, close).
Maker = Callable[[str], tuple[Callable[[], bytes], Callable[[], None]]]


def in_process(fpm: PhpFpm, make: Maker) -> Callable[[Target], Run]:
    """A case run in this process: warm up, then a timed loop; php-fpm's CPU around it."""

    def run(target: Target, seconds: float) -> Run:
        one, close = make(target.address)
        try:
            first = one()
            if peers.HELLO_BODY not in first:
                raise RuntimeError(f"unexpected response: {first!r}")
            timed_loop(one, WARM_UP)
            server = fpm.cpu()
            result = timed_loop(one, seconds)
            result.server_cpu = fpm.cpu() - server
            return result
        finally:
            close()

    return lambda target: run(target, SETTINGS.seconds)


# --- (a) ours ---


def ours(params: Params, max_keepalive: int | None = None) -> Maker:
    def make(address: str) -> tuple[Callable[[], bytes], Callable[[], None]]:
        client = Client(address, max_keepalive=max_keepalive)
        request = client.request
        return (lambda: request(params).stdout), client.close

    return make


# --- (b) the bare hand-written loop ---

HEADER = struct.Struct(">BBHHBx")
BEGIN = struct.Struct(">BBHHBxHB5x")  # header + body of BEGIN_REQUEST
LONG_LENGTH = struct.Struct(">I")
PARAMS, STDIN, STDOUT, END_REQUEST = 4, 5, 6, 3
#: BEGIN_REQUEST (id 1, RESPONDER, KEEP_CONN) and the ends of PARAMS and STDIN never change.
BEGIN_RECORD = BEGIN.pack(1, 1, 1, 8, 0, 1, 1)
END_PARAMS_STDIN = HEADER.pack(1, PARAMS, 1, 0, 0) + HEADER.pack(1, STDIN, 1, 0, 0)


def bare_request(sock: socket.socket, params: dict[str, str]) -> bytes:
    """The least a keep-alive client can do: encode, send once, read records to END_REQUEST."""
    parts: list[bytes] = []
    for name, value in params.items():
        key, val = name.encode("latin-1"), value.encode("latin-1")
        nlen, vlen = len(key), len(val)
        parts.append(bytes((nlen,)) if nlen < 128 else LONG_LENGTH.pack(nlen | 0x80000000))
        parts.append(bytes((vlen,)) if vlen < 128 else LONG_LENGTH.pack(vlen | 0x80000000))
        parts.append(key)
        parts.append(val)
    body = b"".join(parts)  # < 64 KiB: one PARAMS record
    pad = -len(body) & 7
    sock.sendall(
        b"".join((BEGIN_RECORD, HEADER.pack(1, PARAMS, 1, len(body), pad), body, bytes(pad)))
        + END_PARAMS_STDIN
    )
    out: list[bytes] = []
    data = b""
    pos = 0
    unpack = HEADER.unpack_from
    recv = sock.recv
    while True:
        if len(data) - pos >= 8:
            _, rtype, _, clen, plen = unpack(data, pos)
            end = pos + 8 + clen
            if len(data) >= end + plen:
                if rtype == STDOUT:
                    out.append(data[pos + 8 : end])
                elif rtype == END_REQUEST:
                    return b"".join(out)
                pos = end + plen
                continue
        chunk = recv(262144)
        if not chunk:
            raise ConnectionError("php-fpm closed the connection")
        data = data[pos:] + chunk
        pos = 0


def bare(params: dict[str, str]) -> Maker:
    def make(address: str) -> tuple[Callable[[], bytes], Callable[[], None]]:
        family, sockaddr = peers.parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.connect(sockaddr)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return (lambda: bare_request(sock, params)), sock.close

    return make


# --- (c) nginx + wrk ---


@contextlib.contextmanager
def running(nginx: peers.Nginx) -> Iterator[int]:
    """nginx started for one wrk run, and stopped after it.

    Stopping closes its kept-alive upstream connections: each pins a php-fpm
    worker, and after wrk -c4 they would pin all four, starving the next case.
    """
    nginx.start()
    try:
        yield read_pid(nginx.base / "nginx.pid")
    finally:
        nginx.stop()


def through_nginx(fpm: PhpFpm, threads: int, connections: int) -> Callable[[Target], Run]:
    def run(target: Target) -> Run:
        assert target.nginx is not None
        url = f"http://{target.nginx.http_address}/{SCRIPT}"
        with running(target.nginx) as pid:
            wrk(url, threads, connections, WRK_WARM_UP)
            nginx, server, children = proc_cpu(pid), fpm.cpu(), children_cpu()
            count, rate = wrk(url, threads, connections, SETTINGS.wrk_seconds)
            wrk_cpu = children_cpu() - children
            server = fpm.cpu() - server
            nginx = proc_cpu(pid) - nginx
        return Run(count, count / rate, nginx, server, count, wrk_cpu)

    return run


# --- (d), (e) flup and fcgi-client, in a subprocess of their own virtualenv ---

#: The subprocess: warm up, run for a while, print requests, wall and its own CPU time.
PEER_CHILD = r"""
import io, json, socket, sys, time

args = json.loads(sys.argv[1])
kind, address, params = args["kind"], args["address"], args["params"]

if kind == "flup":
    from flup.client.fcgi_app import FCGIApp

    class App(FCGIApp):
        # flup 1.0.3 tests isinstance(address, types.StringTypes), which Python 3
        # lacks: every request would fail with AttributeError. Same logic, fixed.
        def _getConnection(self):
            if isinstance(self._connect, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self._connect)
                return sock
            return socket.create_connection(self._connect)

    connect = address[5:] if address.startswith("unix:") else (
        address.rpartition(":")[0], int(address.rpartition(":")[2]))
    # filterEnviron=False passes every upper-case key: the default filter drops
    # SCRIPT_FILENAME, without which php-fpm finds no script.
    app = App(connect=connect, filterEnviron=False)

    def start_response(status, headers):
        pass

    def one():
        environ = dict(params)
        environ["wsgi.input"] = io.BytesIO(b"")
        environ["wsgi.errors"] = sys.stderr
        return b"".join(app(environ, start_response))

elif kind == "fcgi-client":
    from fcgi_client import FastCGIClient

    target = "unix://" + address[5:] if address.startswith("unix:") else address
    # keepalive=True would hang: it reads records until the connection closes.
    client = FastCGIClient(target, timeout=30, keepalive=False)

    def one():
        return bytes(client.request(params, ""))

else:
    raise SystemExit(f"unknown peer {kind}")

first = one()
if b"Hello, World!" not in first:
    raise SystemExit(f"unexpected response: {first!r}")
total = 1
deadline = time.perf_counter() + args["warm_up"]
while time.perf_counter() < deadline:
    one()
    total += 1
count = 0
cpu = time.process_time()
start = now = time.perf_counter()
deadline = start + args["seconds"]
while now < deadline:
    one()
    count += 1
    now = time.perf_counter()
print(json.dumps({"requests": count, "wall": now - start,
                  "cpu": time.process_time() - cpu, "total": total + count}))
"""

PEER_MODULES = {"flup": "flup.client.fcgi_app", "fcgi-client": "fcgi_client"}


def peer_missing(python: str, kind: str) -> str:
    """Why the peer cannot run ("" when it can)."""
    if not Path(python).exists():
        return f"skipped: {python} not found"
    probe = subprocess.run(
        [python, "-c", f"import {PEER_MODULES[kind]}"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        return f"skipped: {kind} not installed in {python}"
    return ""


def python_peer(
    fpm: PhpFpm, python: str, kind: str, params: dict[str, str]
) -> Callable[[Target], Run]:
    def run(target: Target) -> Run:
        arg = {
            "kind": kind,
            "address": target.address,
            "params": params,
            "warm_up": WARM_UP,
            "seconds": SETTINGS.seconds,
        }
        server = fpm.cpu()
        done = subprocess.run(
            [python, "-c", PEER_CHILD, json.dumps(arg)],
            capture_output=True,
            text=True,
            timeout=SETTINGS.seconds + 60,
        )
        server = fpm.cpu() - server
        if done.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{done.stderr}")
        out = json.loads(done.stdout)
        return Run(out["requests"], out["wall"], out["cpu"], server, out["total"])

    return run


# --- concurrency: our client shared by threads ---


def threaded(fpm: PhpFpm, params: Params, threads: int) -> Callable[[Target], Run]:
    def loop(client: Client, seconds: float, counts: list[int], barrier: threading.Barrier) -> None:
        request = client.request
        barrier.wait()
        deadline = time.perf_counter() + seconds
        count = 0
        while time.perf_counter() < deadline:
            request(params)
            count += 1
        counts.append(count)

    def phase(client: Client, seconds: float) -> tuple[int, float]:
        counts: list[int] = []
        barrier = threading.Barrier(threads + 1)
        workers = [
            threading.Thread(target=loop, args=(client, seconds, counts, barrier))
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        barrier.wait()
        start = time.perf_counter()
        for worker in workers:
            worker.join()
        if len(counts) != threads:
            raise RuntimeError("a request thread failed")
        return sum(counts), time.perf_counter() - start

    def run(target: Target) -> Run:
        with Client(target.address, max_connections=threads) as client:
            phase(client, WARM_UP)
            server, cpu = fpm.cpu(), time.process_time()
            count, wall = phase(client, SETTINGS.seconds)
            return Run(count, wall, time.process_time() - cpu, fpm.cpu() - server, count)

    return run


# --- the table ---


@dataclass
class Settings:
    seconds: float = 1.5
    wrk_seconds: int = 5
    repeat: int = 3


SETTINGS = Settings()


@dataclass
class Summary:
    rate: float  # the best requests/s
    low: float  # the worst
    cpu: float  # the least client CPU seconds per request
    cpu_high: float  # the most
    server: float  # the least php-fpm CPU seconds per request
    wrk: float


def summarize(runs: list[Run]) -> Summary:
    return Summary(
        max(r.rate for r in runs),
        min(r.rate for r in runs),
        min(r.cpu / r.requests for r in runs),
        max(r.cpu / r.requests for r in runs),
        min(r.server_cpu / r.server_requests for r in runs),
        min(r.wrk_cpu / r.requests for r in runs),
    )


def print_cases(title: str, cases: list[Case], target: str) -> dict[str, Summary]:
    print(f"\n{title}, {target}")
    head = f"{'case':<53} {'req/s':>7} {'(worst)':>8} {'client CPU/req':>14} {'(worst)':>8}"
    print(f"{head} {'php-fpm CPU/req':>15}  notes")
    summaries: dict[str, Summary] = {}
    for case in cases:
        runs = case.runs.get(target, [])
        if not runs:
            print(f"{case.label:<53} {'-':>7} {'':>8} {'-':>14} {'':>8} {'-':>15}  {case.skip}")
            continue
        s = summaries[case.key] = summarize(runs)
        note = case.note
        if s.wrk:
            note = f"wrk itself: {us(s.wrk)}/req; " + note
        print(
            f"{case.label:<53} {s.rate:>7,.0f} {f'({s.low:,.0f})':>8} {us(s.cpu):>14}"
            f" {f'({s.cpu_high * 1e6:,.0f})':>8} {us(s.server):>15}  {note}".rstrip()
        )
    return summaries


def print_ratios(target: str, seq: dict[str, Summary], conc: dict[str, Summary]) -> None:
    print(f"\nratios and goals, {target}")
    lines: list[tuple[str, str, str]] = []

    def goal(name: str, ratio: float, aim: float, at_most: bool = False) -> None:
        sign = "<=" if at_most else ">="
        lines.append((name, f"{ratio:.2f}x", f"{sign} {aim:.2f}x {verdict(ratio, aim, at_most)}"))

    ours = seq.get("ours")
    if ours is not None and "bare" in seq:
        goal("ours vs bare loop, sequential req/s", ours.rate / seq["bare"].rate, GOAL_VS_BARE)
        goal(
            "ours vs bare loop, sequential client CPU/req",
            ours.cpu / seq["bare"].cpu,
            GOAL_CPU_VS_BARE,
            at_most=True,
        )
    if ours is not None and "nginx" in seq:
        goal(
            "ours vs nginx+wrk -c1, sequential req/s",
            ours.rate / seq["nginx"].rate,
            GOAL_VS_NGINX_C1,
        )
    python_peers = [(seq[k].cpu, k) for k in ("flup", "fcgi-client") if k in seq]
    if ours is not None and python_peers:
        best_cpu, best = min(python_peers)
        goal(
            f"ours vs best Python peer ({best}), client CPU/req",
            ours.cpu / best_cpu,
            GOAL_CPU_VS_PEER,
            at_most=True,
        )
        if "ours-close" in seq:
            ratio = seq["ours-close"].cpu / best_cpu
            lines.append(
                (f"  same, ours without keep-alive vs {best}", f"{ratio:.2f}x", "(like for like)")
            )
    if ours is not None and "nginx" in seq:
        ratio = ours.cpu / seq["nginx"].cpu
        lines.append(("ours vs nginx, CPU/req (c1)", f"{ratio:.2f}x", "(DESIGN.md: small)"))
    if "ours-4" in conc and "nginx-4" in conc:
        goal(
            "ours 4 threads vs nginx+wrk -c4, req/s",
            conc["ours-4"].rate / conc["nginx-4"].rate,
            GOAL_VS_NGINX_C4,
        )
    for name, ratio_text, aim_text in lines:
        print(f"{name:<58} {ratio_text:>7}  {aim_text}")


# --- main ---


def measure(cases: list[Case], targets: list[Target]) -> None:
    """Every case on every target, repeats interleaved so that cases share the noise."""
    for rep in range(SETTINGS.repeat):
        for target in targets:
            for case in cases:
                if case.run is None:
                    continue
                started = time.perf_counter()
                result = case.run(target)
                case.runs.setdefault(target.name, []).append(result)
                print(
                    f"  [{rep + 1}/{SETTINGS.repeat}] {target.name:<4} {case.label:<53}"
                    f" {result.rate:>8,.0f} req/s  {us(result.cpu / result.requests):>7}"
                    f"  ({time.perf_counter() - started:.1f} s)",
                    flush=True,
                )


def profile(params: Params, address: str, requests: int) -> None:
    with Client(address) as client:
        for _ in range(200):
            client.request(params)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(requests):
            client.request(params)
        profiler.disable()
    print(f"\ncProfile of {requests} sequential requests ({address}), by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def versions(php: str, nginx: str | None) -> str:
    php_version = subprocess.run([php, "-v"], capture_output=True, text=True).stdout.split()[1]
    parts = [f"php-fpm {php_version}"]
    if nginx:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        parts.append(out.rpartition(" ")[2])
    wrk_out = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.split()
    if len(wrk_out) > 1:
        parts.append(f"wrk {wrk_out[1]}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=SETTINGS.seconds,
        help="measured seconds per run of a Python client (default 1.5)",
    )
    parser.add_argument(
        "--wrk-seconds",
        type=int,
        default=SETTINGS.wrk_seconds,
        help="measured seconds per wrk run (default 5)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=SETTINGS.repeat,
        help="runs of every case; the table shows the best (default 3)",
    )
    parser.add_argument("--transports", nargs="+", choices=["tcp", "unix"], default=["tcp", "unix"])
    parser.add_argument(
        "--peers-python",
        default=DEFAULT_PEERS_PYTHON,
        help="python of the virtualenv holding flup and fcgi-client",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="N",
        default=0,
        help="only profile N sequential requests of our client (cProfile)",
    )
    args = parser.parse_args()
    SETTINGS.seconds, SETTINGS.wrk_seconds, SETTINGS.repeat = (
        args.seconds,
        args.wrk_seconds,
        args.repeat,
    )

    php = peers.find_php_fpm()
    if php is None:
        raise SystemExit("php-fpm is not installed: nothing to measure")
    nginx_binary = peers.find_nginx()
    have_wrk = shutil.which(WRK) is not None
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(
        f"{python} on {platform.platform()}, {os.cpu_count()} CPUs; {versions(php, nginx_binary)}"
    )
    print("load average before: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    base = Path(tempfile.mkdtemp(prefix="fcgi-bench-", dir="/tmp"))
    fpm = PhpFpm(php, base / "php-fpm")
    started = time.perf_counter()
    fpm.start()
    nginxes: list[peers.Nginx] = []
    try:
        params = fpm.params(SCRIPT)
        cgi: Params = {name: value for name, value in params.items()}
        if args.profile:
            profile(cgi, fpm.tcp_address, args.profile)
            return
        targets: list[Target] = []
        for name in args.transports:
            address = fpm.tcp_address if name == "tcp" else f"unix:{fpm.unix_path}"
            nginx = None
            if nginx_binary and have_wrk:
                directory = base / f"nginx-{name}"
                directory.mkdir()
                nginx = peers.Nginx(nginx_binary, directory, address, docroot=fpm.docroot)
                nginxes.append(nginx)
            targets.append(Target("TCP" if name == "tcp" else "Unix", address, nginx))
        no_nginx = "" if nginx_binary and have_wrk else "skipped: nginx or wrk not installed"
        sequential = [
            Case("ours", "(a) fcgiproto_socket.Client, keep-alive", in_process(fpm, ours(cgi))),
            Case(
                "bare", "(b) bare struct + socket loop, keep-alive", in_process(fpm, bare(params))
            ),
            Case(
                "nginx",
                "(c) nginx (fastcgi_keep_conn) + wrk -t1 -c1",
                None if no_nginx else through_nginx(fpm, 1, 1),
                no_nginx,
                "client CPU = nginx's process",
            ),
            Case(
                "flup",
                "(d) flup 1.0.3 FCGIApp (WSGI), new conn/request",
                None,
                note="no keep-alive in flup; _getConnection patched for Python 3",
            ),
            Case(
                "fcgi-client",
                "(e) fcgi-client 0.0.1, new conn/request",
                None,
                note="keepalive=True waits out its timeout: it reads until the peer closes",
            ),
            Case(
                "ours-close",
                "    fcgiproto_socket.Client, new conn/request",
                in_process(fpm, ours(cgi, max_keepalive=0)),
                note="max_keepalive=0: like for like with (d), (e)",
            ),
        ]
        for case in sequential:
            if case.key in PEER_MODULES:
                case.skip = peer_missing(args.peers_python, case.key)
                if not case.skip:
                    case.run = python_peer(fpm, args.peers_python, case.key, params)
        concurrent = [
            Case(
                "ours-4",
                "fcgiproto_socket.Client(max_connections=4) x4 threads",
                threaded(fpm, cgi, 4),
            ),
            Case(
                "nginx-4",
                "nginx + wrk -t2 -c4",
                None if no_nginx else through_nginx(fpm, 2, 4),
                no_nginx,
                "client CPU = nginx's process",
            ),
        ]
        # Warm the CPU and php-fpm (opcache) first: an idle VM CPU runs slow for a while.
        with Client(targets[0].address) as client:
            deadline = time.perf_counter() + 1.0
            while time.perf_counter() < deadline:
                client.request(cgi)
        print("\nsequential, one connection")
        measure(sequential, targets)
        print("\nconcurrency 4")
        measure(concurrent, targets)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"\n({time.perf_counter() - started:.0f} s, load average now {load}; each figure is"
            f" the best of {SETTINGS.repeat} runs ({SETTINGS.seconds:g} s each, wrk"
            f" {SETTINGS.wrk_seconds} s), the worst in brackets)"
        )
        for target in targets:
            seq = print_cases("1. sequential, one connection", sequential, target.name)
            conc = print_cases("2. concurrency 4", concurrent, target.name)
            print_ratios(target.name, seq, conc)
    finally:
        for nginx in nginxes:
            nginx.stop()
        fpm.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
