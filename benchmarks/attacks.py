"""A well-behaved client's latency while each attack of tests/attacks.py runs, per server.

Run:  uv run python benchmarks/attacks.py            (about 9 min on 2 cores)
      uv run python benchmarks/attacks.py --hold 5 --kinds anyio --transports unix

Three processes, so that neither the attackers nor the measuring client take
the server's CPU or GIL and the server's memory is its own: the server (every
option at its default), the attack, and this one, which makes one GET on a
fresh connection every 50 ms (a web server that does not keep connections
alive) for `--hold` seconds while the attack holds, and samples the server's
RSS, descriptors and threads every 100 ms. The first request is sent right
after the attack has opened its connections, behind them in the listen
backlog, and is reported apart: it measures how fast the server gets through
them. The results are in benchmarks/README.md, "Hostile peers".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Measure the checkout this file sits in, whatever is installed; reuse the tests' attackers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import attacks

from fcgiproto.support import parse_address
from fcgiproto_socket import Address

ATTACKS: dict[str, Any] = {
    "quiet": None,
    "header-sitters": functools.partial(attacks.HeaderSitters, count=1000),
    "tricklers": functools.partial(attacks.Tricklers, count=1000),
    "half-requests": functools.partial(attacks.HalfRequests, count=1000),
    "non-readers": functools.partial(attacks.NonReaders, count=100),
    "many-pairs": functools.partial(attacks.ManyPairs, count=50),
    "mux-params": functools.partial(attacks.MultiplexedParams, count=1, ids=100),
    "endless-stdin": functools.partial(attacks.EndlessStdin, count=10),
    "values-flood": functools.partial(attacks.ValuesFlood, count=1),
}
KINDS = ("blocking", "blocking-mux", "anyio")
TRANSPORTS = ("unix", "tcp")


# --- the server and attacker processes ---


def run_server(kind: str, listen: str) -> None:
    """Serve attacks.blocking_app or attacks.async_app; print the address once bound."""

    def ready(address: Address) -> None:
        print(address, flush=True)

    if kind == "anyio":
        import anyio

        from fcgiproto_anyio import serve

        async def main() -> None:
            async with anyio.create_task_group() as tasks:
                bound = await tasks.start(functools.partial(serve, attacks.async_app, listen))
                ready(bound)

        anyio.run(main)
    else:
        from fcgiproto_socket import serve as blocking_serve

        blocking_serve(attacks.blocking_app, listen, multiplex=kind == "blocking-mux", ready=ready)


def run_attack(name: str, address: str) -> None:
    """Open the attack, say so, hold it until stdin closes."""
    with ATTACKS[name](parse_address(address)) as attack:
        print("ready", flush=True)
        sys.stdin.read()
        print(f"sent {attack.sent}", flush=True)


@contextlib.contextmanager
def process(*argv: str) -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen(
        [sys.executable, __file__, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield child
    finally:
        assert child.stdin is not None
        with contextlib.suppress(OSError):
            child.stdin.close()
        if argv[0] == "serve":
            child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def read_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if not line:
        raise RuntimeError(f"{child.args} ended before it was ready (exit {child.wait()})")
    return line


# --- what is measured ---


class Sampler:
    """The server's RSS, descriptors and threads, every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = self.rss()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self._status("VmRSS:") * 1024

    def threads(self) -> int:
        return self._status("Threads:")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
        raise RuntimeError(f"no {key} for {self.pid}")

    def _run(self) -> None:
        while not self.stopping.wait(0.1):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak_rss = max(self.peak_rss, self.rss())

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join()


def settle(read: Any, baseline: int, within: float = 15.0) -> int:
    """What `read()` comes down to, waiting up to `within` seconds for the baseline."""
    deadline = time.monotonic() + within
    value = read()
    while value > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return int(value)


def measure(kind: str, transport: str, name: str, hold: float, tmp: Path) -> dict[str, Any]:
    listen = "127.0.0.1:0" if transport == "tcp" else str(tmp / f"{kind}-{name}.sock")
    with process("serve", kind, listen) as server:
        address = parse_address(read_line(server))
        warm = attacks.GoodClient(address)
        for _ in range(20):
            warm.one()
        if warm.failures:
            raise RuntimeError(f"{kind} fails before any attack: {warm.failures}")
        sampler = Sampler(server.pid)
        rss_before, fds_before, threads_before = sampler.rss(), sampler.fds(), sampler.threads()
        good = attacks.GoodClient(address)
        with sampler, contextlib.ExitStack() as attack:
            if ATTACKS[name] is not None:
                attacker = attack.enter_context(process("attack", name, str(address)))
                read_line(attacker)
            good.one()  # behind the attack's connections in the listen backlog
            first = good.latencies[0] if good.latencies else None
            good.latencies.clear()
            with good.running():
                time.sleep(hold)
        fds_after = settle(sampler.fds, fds_before)
        threads_after = settle(sampler.threads, threads_before)
        rss_after = sampler.rss()
    ordered = sorted(good.latencies)
    return {
        "kind": kind,
        "transport": transport,
        "attack": name,
        "first": first,
        "count": len(ordered),
        "failures": good.failures,
        "p50": statistics.median(ordered) if ordered else None,
        "p99": good.p99() if ordered else None,
        "max": ordered[-1] if ordered else None,
        "rss_before": rss_before,
        "rss_peak": sampler.peak_rss,
        "rss_after": rss_after,
        "fds": (fds_before, fds_after),
        "threads": (threads_before, threads_after),
    }


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def mb(size: int) -> str:
    return f"{size / 1e6:.0f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        run_server(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "attack":
        run_attack(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each attack holds")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    args = parser.parse_args()
    print(f"# {platform.python_implementation()} {platform.python_version()}, hold {args.hold} s")
    print(
        "| server | transport | attack | first ms | requests | failed | p50 ms | p99 ms "
        "| max ms | server RSS MB before / peak / after | fds before / after "
        "| threads before / after |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="fcgi-attacks-") as tmp:
        for kind in args.kinds:
            for transport in args.transports:
                for name in args.attacks:
                    row = measure(kind, transport, name, args.hold, Path(tmp))
                    print(
                        f"| {kind} | {transport} | {name} | {ms(row['first'])} | {row['count']} "
                        f"| {len(row['failures'])} | {ms(row['p50'])} | {ms(row['p99'])} "
                        f"| {ms(row['max'])} | {mb(row['rss_before'])} / {mb(row['rss_peak'])} / "
                        f"{mb(row['rss_after'])} | {row['fds'][0]} / {row['fds'][1]} "
                        f"| {row['threads'][0]} / {row['threads'][1]} |",
                        flush=True,
                    )
                    for failure in row["failures"][:3]:
                        print(f"<!-- {kind} {transport} {name}: {failure} -->", flush=True)


if __name__ == "__main__":
    main()
