"""Async client against Go's net/http/fcgi: multiplexed and pooled, beside the blocking client.

Run:  uv run python benchmarks/bench_async.py        (about 2 min on 2 cores)

Starts the tests' Go server (tests/goserver, built with the local Go toolchain
if it is not cached yet) and, for the HTTP rows, nginx in front of it; they
listen on loopback (or a Unix socket with --transport unix) and are stopped at
the end. Every request is GET /hello ("Hello, World!") with the params
peers.go_params() builds. What each row measures is written in
benchmarks/README.md, section "Async client against Go".
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

# Measure the checkout this file sits in, whatever is installed; reuse the tests' peers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import anyio
import peers
from _shared import WRK, children_cpu, read_pid, us, verdict, wrk

from fcgiproto_anyio import AsyncClient
from fcgiproto_socket import Client

PATH = "/hello"
PARAMS: dict[str, str] = peers.go_params(PATH)
TICKS = os.sysconf("SC_CLK_TCK")
BACKENDS = ("asyncio", "trio")
CONCURRENCY = (1, 10, 100)
THREADS = (1, 10)  # the blocking client: one thread per concurrent request
#: Upstream keepalive for nginx: enough idle connections for wrk -c100, so
#: that nginx never closes one between requests (the tests' config keeps 8).
NGINX_KEEPALIVE = 128

#: Warm-up before every measured run, in seconds (wrk's shortest run is 1 s).
WARM_UP = 0.3
WRK_WARM_UP = 1

# --- the goals ---

# The speed issue's: multiplexed over one connection at 100 concurrent, req/s >= 1.2x a pool
# of connections; CPU per request at concurrency 1 <= 1.3x the blocking client's on asyncio,
# 1.6x on trio.
GOAL_MUX_VS_POOL = 1.2
GOAL_CPU_VS_BLOCKING = {"asyncio": 1.3, "trio": 1.6}


# --- CPU accounting ---


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / TICKS


# --- the peers ---


class GoServer(peers.GoServer):
    def cpu(self) -> float:
        """The Go server's CPU seconds (setpriv execs it: the child's pid is the server's)."""
        process = self._proc.process
        assert process is not None
        return proc_cpu(process.pid)


class Nginx(peers.Nginx):
    """The tests' nginx (one process, fastcgi_keep_conn on), with a larger upstream keepalive."""

    def _config(self) -> str:
        config = super()._config()
        assert "keepalive 8;" in config
        return config.replace("keepalive 8;", f"keepalive {NGINX_KEEPALIVE};")


# --- one measured run ---


@dataclass
class Run:
    requests: int
    wall: float
    cpu: float  # this process's CPU seconds (for the nginx rows: nginx's process)
    server_cpu: float  # the Go server's
    wrk_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.wall


@dataclass
class Case:
    key: str
    label: str
    concurrency: int
    run: Callable[[], Run] | None
    skip: str = ""  # why run is None
    note: str = ""
    runs: list[Run] = field(default_factory=list)


@dataclass
class Settings:
    seconds: float = 1.5
    wrk_seconds: int = 2
    repeat: int = 3


SETTINGS = Settings()


def check(stdout: bytes) -> None:
    if peers.HELLO_BODY not in stdout:
        raise RuntimeError(f"unexpected response: {stdout!r}")


# --- the async client ---


async def async_phase(client: AsyncClient, tasks: int, seconds: float) -> tuple[int, float]:
    """`tasks` tasks, each looping over request() for `seconds`; (requests, wall)."""
    counts: list[int] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def loop() -> None:
        request = client.request
        count = 0
        while time.perf_counter() < deadline:
            await request(PARAMS)
            count += 1
        counts.append(count)

    async with anyio.create_task_group() as tasks_group:
        for _ in range(tasks):
            tasks_group.start_soon(loop)
    return sum(counts), time.perf_counter() - start


def async_client(address: str, tasks: int, multiplex: bool) -> AsyncClient:
    # Multiplexed, every request() shares one connection whatever max_connections says.
    return AsyncClient(address, max_connections=tasks, multiplex=multiplex)


def async_case(
    go: GoServer, address: str, backend: str, tasks: int, multiplex: bool
) -> Callable[[], Run]:
    async def main() -> Run:
        async with async_client(address, tasks, multiplex) as client:
            check((await client.request(PARAMS)).stdout)
            await async_phase(client, tasks, WARM_UP)
            server, cpu = go.cpu(), time.process_time()
            count, wall = await async_phase(client, tasks, SETTINGS.seconds)
            return Run(count, wall, time.process_time() - cpu, go.cpu() - server)

    def run() -> Run:
        result: Run = anyio.run(main, backend=backend)
        return result

    return run


# --- the blocking client ---


def threads_phase(client: Client, threads: int, seconds: float) -> tuple[int, float]:
    """`threads` threads, each looping over request() for `seconds`; (requests, wall).

    One thread is this one, so that the sequential case pays for no thread switch.
    """
    counts: list[int] = []
    barrier = threading.Barrier(threads)

    def loop() -> None:
        request = client.request
        barrier.wait()
        deadline = time.perf_counter() + seconds
        count = 0
        while time.perf_counter() < deadline:
            request(PARAMS)
            count += 1
        counts.append(count)

    workers = [threading.Thread(target=loop) for _ in range(threads - 1)]
    for worker in workers:
        worker.start()
    start = time.perf_counter()
    loop()
    for worker in workers:
        worker.join()
    if len(counts) != threads:
        raise RuntimeError("a request thread failed")
    return sum(counts), time.perf_counter() - start


def blocking_case(go: GoServer, address: str, threads: int, multiplex: bool) -> Callable[[], Run]:
    def run() -> Run:
        with Client(address, max_connections=threads, multiplex=multiplex) as client:
            check(client.request(PARAMS).stdout)
            threads_phase(client, threads, WARM_UP)
            server, cpu = go.cpu(), time.process_time()
            count, wall = threads_phase(client, threads, SETTINGS.seconds)
            return Run(count, wall, time.process_time() - cpu, go.cpu() - server)

    return run


# --- nginx + wrk ---


@contextlib.contextmanager
def running(nginx: Nginx) -> Iterator[int]:
    """nginx started for one wrk run (its upstream connections fresh), and stopped after it."""
    nginx.start()
    try:
        yield read_pid(nginx.base / "nginx.pid")
    finally:
        nginx.stop()


def nginx_case(go: GoServer, nginx: Nginx, connections: int) -> Callable[[], Run]:
    threads = min(connections, 2)  # 2 cores

    def run() -> Run:
        url = f"http://{nginx.http_address}{PATH}"
        with running(nginx) as pid:
            wrk(url, threads, connections, WRK_WARM_UP)
            cpu, server, children = proc_cpu(pid), go.cpu(), children_cpu()
            count, rate = wrk(url, threads, connections, SETTINGS.wrk_seconds)
            wrk_cpu = children_cpu() - children
            server = go.cpu() - server
            cpu = proc_cpu(pid) - cpu
        return Run(count, count / rate, cpu, server, wrk_cpu)

    return run


# --- the table ---


@dataclass
class Summary:
    rate: float  # the best requests/s
    low: float  # the worst
    cpu: float  # the least client CPU seconds per request
    cpu_high: float  # the most
    server: float  # the least Go CPU seconds per request
    wrk: float


def summarize(runs: list[Run]) -> Summary:
    return Summary(
        max(r.rate for r in runs),
        min(r.rate for r in runs),
        min(r.cpu / r.requests for r in runs),
        max(r.cpu / r.requests for r in runs),
        min(r.server_cpu / r.requests for r in runs),
        min(r.wrk_cpu / r.requests for r in runs),
    )


LABEL = 46


def print_cases(cases: list[Case]) -> dict[str, Summary]:
    summaries: dict[str, Summary] = {}
    head = f"{'case':<{LABEL}} {'req/s':>7} {'(worst)':>8} {'client CPU/req':>14} {'(worst)':>8}"
    for concurrency in CONCURRENCY:
        print(f"\nconcurrency {concurrency}")
        print(f"{head} {'Go CPU/req':>10}  notes")
        for case in cases:
            if case.concurrency != concurrency:
                continue
            if not case.runs:
                blank = f"{'-':>7} {'':>8} {'-':>14} {'':>8} {'-':>10}"
                print(f"{case.label:<{LABEL}} {blank}  {case.skip}")
                continue
            s = summaries[case.key] = summarize(case.runs)
            note = case.note
            if s.wrk:
                note = f"wrk itself: {us(s.wrk)}/req; " + note
            print(
                f"{case.label:<{LABEL}} {s.rate:>7,.0f} {f'({s.low:,.0f})':>8} {us(s.cpu):>14}"
                f" {f'({s.cpu_high * 1e6:,.0f})':>8} {us(s.server):>10}  {note}".rstrip()
            )
    return summaries


def print_ratios(s: dict[str, Summary]) -> None:
    lines: list[tuple[str, float, str]] = []

    def rate(name: str, a: str, b: str, goal: float | None = None) -> None:
        if a in s and b in s:
            ratio = s[a].rate / s[b].rate
            text = "" if goal is None else f">= {goal:.2f}x {verdict(ratio, goal)}"
            lines.append((name, ratio, text))

    def cpu(name: str, a: str, b: str, goal: float | None = None) -> None:
        if a in s and b in s:
            ratio = s[a].cpu / s[b].cpu
            text = "" if goal is None else f"<= {goal:.2f}x {verdict(ratio, goal, at_most=True)}"
            lines.append((name, ratio, text))

    def best(client: str, n: int) -> str:
        """The faster of a client's two modes at concurrency n ("" if neither ran)."""
        keys = [k for k in (f"{client}-pool-{n}", f"{client}-mux-{n}") if k in s]
        return max(keys, key=lambda k: s[k].rate, default="")

    def flush(title: str) -> None:
        print(f"\n{title}")
        for name, ratio, goal in lines:
            print(f"{name:<58} {ratio:>6.2f}x  {goal}".rstrip())
        lines.clear()

    for backend in BACKENDS:
        rate(
            f"{backend}: multiplexed vs pool, c100 req/s",
            f"{backend}-mux-100",
            f"{backend}-pool-100",
            GOAL_MUX_VS_POOL,
        )
    for backend in BACKENDS:
        cpu(
            f"{backend} pool c1 vs blocking pool c1, CPU/req",
            f"{backend}-pool-1",
            "blocking-pool-1",
            GOAL_CPU_VS_BLOCKING[backend],
        )
        cpu(
            f"{backend} mux c1 vs blocking mux c1, CPU/req",
            f"{backend}-mux-1",
            "blocking-mux-1",
            GOAL_CPU_VS_BLOCKING[backend],
        )
    flush("goals")
    for backend in BACKENDS:
        for n in CONCURRENCY:
            rate(
                f"{backend}: multiplexed vs pool, c{n} req/s",
                f"{backend}-mux-{n}",
                f"{backend}-pool-{n}",
            )
        cpu(
            f"{backend}: multiplexed vs pool, c100 CPU/req",
            f"{backend}-mux-100",
            f"{backend}-pool-100",
        )
    for n in THREADS:
        rate(
            f"blocking: multiplexed vs pool, c{n} req/s", f"blocking-mux-{n}", f"blocking-pool-{n}"
        )
    for backend in BACKENDS:
        for n in THREADS:
            rate(
                f"{backend} vs blocking, c{n} req/s (faster mode of each)",
                best(backend, n),
                best("blocking", n),
            )
    for backend in BACKENDS:
        for n in CONCURRENCY:
            rate(
                f"{backend} vs nginx + wrk -c{n}, req/s (faster mode)",
                best(backend, n),
                f"nginx-{n}",
            )
    cpu("trio vs asyncio, pool c1 CPU/req", "trio-pool-1", "asyncio-pool-1")
    cpu("trio vs asyncio, mux c1 CPU/req", "trio-mux-1", "asyncio-mux-1")
    flush("other ratios (no goal)")


# --- main ---


def measure(cases: list[Case]) -> None:
    """Every case once, then again: repeats interleaved so that cases share the noise."""
    for rep in range(SETTINGS.repeat):
        for case in cases:
            if case.run is None:
                continue
            started = time.perf_counter()
            result = case.run()
            case.runs.append(result)
            print(
                f"  [{rep + 1}/{SETTINGS.repeat}] c{case.concurrency:<3} {case.label:<{LABEL}}"
                f" {result.rate:>8,.0f} req/s  {us(result.cpu / result.requests):>7}"
                f"  ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )


def make_cases(go: GoServer, address: str, nginx: Nginx | None, no_nginx: str) -> list[Case]:
    cases: list[Case] = []
    for n in CONCURRENCY:
        for backend in BACKENDS:
            cases.append(
                Case(
                    f"{backend}-mux-{n}",
                    f"AsyncClient {backend}, multiplexed (1 conn)",
                    n,
                    async_case(go, address, backend, n, multiplex=True),
                    note=f"{n} tasks" if n > 1 else "",
                )
            )
            cases.append(
                Case(
                    f"{backend}-pool-{n}",
                    f"AsyncClient {backend}, pool of {n} conn",
                    n,
                    async_case(go, address, backend, n, multiplex=False),
                    note=f"{n} tasks, max_connections={n}" if n > 1 else "",
                )
            )
        if n in THREADS:
            cases.append(
                Case(
                    f"blocking-mux-{n}",
                    f"blocking Client, multiplexed (1 conn), {n} thr",
                    n,
                    blocking_case(go, address, n, multiplex=True),
                    note="plus its reader thread",
                )
            )
            cases.append(
                Case(
                    f"blocking-pool-{n}",
                    f"blocking Client, pool of {n} conn, {n} thr",
                    n,
                    blocking_case(go, address, n, multiplex=False),
                )
            )
        cases.append(
            Case(
                f"nginx-{n}",
                f"nginx + wrk -t{min(n, 2)} -c{n}",
                n,
                None if nginx is None else nginx_case(go, nginx, n),
                no_nginx,
                "client CPU = nginx's process",
            )
        )
    return cases


async def profile_one(address: str, tasks: int, multiplex: bool, requests: int) -> cProfile.Profile:
    """A cProfile of `requests` requests from `tasks` tasks, after a warm-up."""
    async with async_client(address, tasks, multiplex) as client:
        await async_phase(client, tasks, WARM_UP)

        async def loop() -> None:
            for _ in range(requests // tasks):
                await client.request(PARAMS)

        profiler = cProfile.Profile()
        profiler.enable()
        async with anyio.create_task_group() as group:
            for _ in range(tasks):
                group.start_soon(loop)
        profiler.disable()
        return profiler


def profile(address: str, requests: int) -> None:
    """cProfile of the async client on asyncio: sequential (pool, multiplexed), 100 multiplexed."""
    for tasks, multiplex in ((1, False), (1, True), (100, True)):
        profiler: cProfile.Profile = anyio.run(
            profile_one, address, tasks, multiplex, requests, backend="asyncio"
        )
        stats = pstats.Stats(profiler)
        calls: int = stats.total_calls  # type: ignore[attr-defined]
        table: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
        table = stats.stats  # type: ignore[attr-defined]
        # Entries of C functions (len, send, ...) have "~" for a file name.
        python = sum(row[1] for key, row in table.items() if key[0] != "~")
        mode = "multiplexed" if multiplex else "pool"
        print(
            f"\ncProfile, asyncio, {tasks} task(s), {mode}, {requests} requests ({address}):"
            f" {calls / requests:.0f} calls per request, {python / requests:.0f} of them to"
            " Python functions (a coroutine counts once per resumption); by own time:"
        )
        stats.sort_stats("tottime").print_stats(22)


def versions(nginx: str | None) -> str:
    go = peers.find_go()
    parts = [f"anyio {version('anyio')}", f"trio {version('trio')}"]
    if go:
        words = subprocess.run([go, "version"], capture_output=True, text=True).stdout.split()
        parts.append(f"Go {words[2].removeprefix('go')}" if len(words) > 2 else "Go ?")
    if nginx:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        parts.append(out.rpartition(" ")[2])
    wrk_out = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.split()
    if len(wrk_out) > 1:
        parts.append(f"wrk {wrk_out[1]}")
    return ", ".join(parts)


def warm(address: str) -> None:
    """Keep the CPU and the Go server busy for a second: an idle VM CPU runs slow for a while."""
    with Client(address, multiplex=False) as client:
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            client.request(PARAMS)


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
        help="measured seconds per wrk run (default 2)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=SETTINGS.repeat,
        help="runs of every case; the table shows the best (default 3)",
    )
    parser.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="N",
        default=0,
        help="only profile N requests of the async client on asyncio (cProfile)",
    )
    args = parser.parse_args()
    SETTINGS.seconds, SETTINGS.wrk_seconds, SETTINGS.repeat = (
        args.seconds,
        args.wrk_seconds,
        args.repeat,
    )

    go_binary = peers.find_go()
    if go_binary is None:
        raise SystemExit("go is not installed: no Go server to measure against")
    nginx_binary = peers.find_nginx()
    have_wrk = shutil.which(WRK) is not None
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"{python} on {platform.platform()}, {os.cpu_count()} CPUs; {versions(nginx_binary)}")
    print("load average before: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

    base = Path(tempfile.mkdtemp(prefix="fcgi-bench-", dir="/tmp"))
    started = time.perf_counter()
    go = GoServer(peers.build_go_server(go_binary), base)
    nginx: Nginx | None = None
    go.start()
    try:
        address = go.tcp_address if args.transport == "tcp" else f"unix:{go.unix_path}"
        if args.profile:
            warm(address)
            profile(address, args.profile)
            return
        if nginx_binary and have_wrk:
            directory = base / "nginx"
            directory.mkdir()
            nginx = Nginx(nginx_binary, directory, address)
        no_nginx = "" if nginx else "skipped: nginx or wrk not installed"
        cases = make_cases(go, address, nginx, no_nginx)
        warm(address)
        print(f"\nGo net/http/fcgi at {address}, GET {PATH}")
        measure(cases)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"\n({time.perf_counter() - started:.0f} s, load average now {load}; each figure is"
            f" the best of {SETTINGS.repeat} runs ({SETTINGS.seconds:g} s each, wrk"
            f" {SETTINGS.wrk_seconds} s), the worst in brackets; {args.transport.upper()})"
        )
        print_ratios(print_cases(cases))
    finally:
        if nginx is not None:
            nginx.stop()
        go.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
