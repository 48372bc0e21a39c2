"""Python application servers behind nginx, under wrk: ours beside flup and fcgisgi.

Run:  uv sync --group bench && uv run python benchmarks/bench_wsgi.py   (about 4 min)

Each server runs alone in a child process (this file, ``--serve KIND
ADDRESS``) on a Unix socket, with nginx (tests/peers.py's, one process,
``keepalive 8`` to the application) in front. Three cases: hello world with
wrk -c1 and -c16, and a 1 MiB response with -c4. For each server and case:
a 1 s warm-up, then a measured wrk run; the server's CPU time (user + system
of its process, all threads) over that run, divided by the requests, is its
CPU per request. Rounds are interleaved (every server and case once, then
again), and the table gives the median of the rounds.

The rows:

- ``fcgiproto_socket.Server``: ``serve(handler)``, a Request -> bytes handler,
  a thread per connection.
- ``fcgiproto_anyio.serve``: the same handler, async, on asyncio.
- ``fcgiproto_socket.serve_wsgi`` and ``fcgiproto_anyio.serve_asgi``: the WSGI
  and ASGI apps below, when the checkout has them.
- flup's ``WSGIServer`` (threaded) and fcgisgi's ``run_asgi_server`` (asyncio):
  the same WSGI and ASGI apps; from the ``bench`` dependency group.

A server that is missing is listed with the reason and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Measure the checkout this file sits in, whatever is installed; reuse the tests' peers.
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

HELLO = b"Hello, World!"
BIG = b"0123456789abcdef" * (1024 * 1024 // 16)
TICKS = os.sysconf("SC_CLK_TCK")
WARM_UP = 1


# --- the applications, one per interface, all answering the same bytes ---


def wants_big(path: str) -> bool:
    return path.startswith("/big")


def wsgi_app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    path = f"{environ.get('SCRIPT_NAME', '')}{environ.get('PATH_INFO', '')}"
    body = BIG if wants_big(path) else HELLO
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(
    scope: dict[str, object], receive: Callable[..., object], send: Callable[..., object]
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()  # type: ignore[misc]
            kind = message["type"]
            if kind == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})  # type: ignore[misc]
            elif kind == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})  # type: ignore[misc]
                return
    path = f"{scope.get('root_path', '')}{scope['path']}"
    body = BIG if wants_big(path) else HELLO
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[misc]
    await send({"type": "http.response.body", "body": body})  # type: ignore[misc]


def handler_response(params: dict[str, str]) -> bytes:
    body = BIG if wants_big(params.get("DOCUMENT_URI", "")) else HELLO
    return b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


# --- the servers, each run as `bench_wsgi.py --serve KIND ADDRESS` ---


def serve_socket(address: str) -> None:
    from fcgiproto_socket import serve

    serve(lambda request: handler_response(request.params), address)


def serve_anyio(address: str) -> None:
    import anyio

    from fcgiproto_anyio import serve

    async def app(request: object) -> bytes:
        return handler_response(request.params)  # type: ignore[attr-defined]

    anyio.run(serve, app, address, backend="asyncio")


def serve_wsgi(address: str) -> None:
    import fcgiproto_socket

    fcgiproto_socket.serve_wsgi(wsgi_app, address)  # type: ignore[attr-defined]


def serve_wsgi_one_thread(address: str) -> None:
    import fcgiproto_socket

    fcgiproto_socket.serve_wsgi(wsgi_app, address, threads=1)  # type: ignore[attr-defined]


def serve_asgi(address: str) -> None:
    import anyio

    import fcgiproto_anyio

    anyio.run(fcgiproto_anyio.serve_asgi, asgi_app, address, backend="asyncio")  # type: ignore[attr-defined]


def serve_flup(address: str) -> None:
    from flup.server.fcgi import WSGIServer

    WSGIServer(wsgi_app, bindAddress=address.removeprefix("unix:")).run()


def serve_fcgisgi(address: str) -> None:
    import asyncio

    from fcgisgi import run_asgi_server

    asyncio.run(run_asgi_server(asgi_app, bind_address=address.removeprefix("unix:")))


def has_module(name: str) -> str:
    import importlib.util

    return (
        "" if importlib.util.find_spec(name) else f"{name} is not installed (uv sync --group bench)"
    )


def has_attribute(module: str, name: str) -> str:
    import importlib

    return (
        ""
        if hasattr(importlib.import_module(module), name)
        else f"{module}.{name} does not exist yet"
    )


@dataclass(frozen=True)
class Kind:
    label: str
    serve: Callable[[str], None]
    #: Why it cannot run here, or "".
    missing: Callable[[], str]


KINDS: dict[str, Kind] = {
    "socket": Kind("`fcgiproto_socket.Server` (Request → bytes)", serve_socket, lambda: ""),
    "anyio": Kind("`fcgiproto_anyio.serve` (asyncio)", serve_anyio, lambda: ""),
    "serve_wsgi": Kind(
        "`fcgiproto_socket.serve_wsgi`",
        serve_wsgi,
        lambda: has_attribute("fcgiproto_socket", "serve_wsgi"),
    ),
    "serve_wsgi_1": Kind(
        "`fcgiproto_socket.serve_wsgi`, threads=1",
        serve_wsgi_one_thread,
        lambda: has_attribute("fcgiproto_socket", "serve_wsgi"),
    ),
    "serve_asgi": Kind(
        "`fcgiproto_anyio.serve_asgi` (asyncio)",
        serve_asgi,
        lambda: has_attribute("fcgiproto_anyio", "serve_asgi"),
    ),
    "flup": Kind("flup `WSGIServer`", serve_flup, lambda: has_module("flup")),
    "fcgisgi": Kind("fcgisgi `run_asgi_server`", serve_fcgisgi, lambda: has_module("fcgisgi")),
}


@dataclass(frozen=True)
class Case:
    label: str
    path: str
    threads: int
    connections: int
    size: int


CASES = [
    Case("c1", "/hello", 1, 1, len(HELLO)),
    Case("c16", "/hello", 2, 16, len(HELLO)),
    Case("1 MiB, c4", "/big", 2, 4, len(BIG)),
]


# --- measuring ---


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)
    cpu_per_request: list[float] = field(default_factory=list)
    #: Runs where wrk saw errors (timeouts, resets, non-2xx answers).
    failures: int = 0


def one_run(
    kind: str, case: Case, seconds: int, work: Path, script: Path | None = None
) -> tuple[float, float]:
    """(requests/s, server CPU seconds per request) of one wrk run through a fresh nginx.

    The server is `script --serve KIND ADDRESS`: this file, or another
    checkout's copy of it (ab_wsgi.py's revisions).
    """
    import peers
    from _shared import wrk

    base = Path(tempfile.mkdtemp(dir=work))
    address = f"unix:{peers.socket_dir(base) / 'app.sock'}"
    server = peers.ManagedProcess(
        kind,
        [sys.executable, str(script or Path(__file__).resolve()), "--serve", kind, address],
        output_log=base / "server.out",
    )
    server.start()
    try:
        peers.wait_until_ready(server, [address], logs=[])
        nginx_binary = peers.find_nginx()
        if nginx_binary is None:
            raise peers.PeerError("nginx is not installed")
        nginx = peers.Nginx(nginx_binary, base / "nginx", address)
        nginx.start()
        try:
            url = f"http://{nginx.http_address}{case.path}"
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
            if len(body) != case.size:
                raise RuntimeError(f"{kind} answered {url} with {len(body)} bytes, not {case.size}")
            assert server.process is not None
            pid = server.process.pid
            wrk(url, case.threads, case.connections, WARM_UP)
            before = proc_cpu(pid)
            count, rate = wrk(url, case.threads, case.connections, seconds)
            cpu = proc_cpu(pid) - before
        finally:
            nginx.stop()
    except BaseException:
        sys.stderr.write(server.read_output()[-4000:])
        raise
    finally:
        server.stop()
    return rate, cpu / count


def named_script(argument: str) -> tuple[str, Path] | None:
    """NAME and SCRIPT of a NAME=SCRIPT argument (a script that serves as this file does)."""
    name, equals, script = argument.partition("=")
    return (name, Path(script).resolve()) if equals else None


def callgrind_run(
    kind: str, requests: int, work: Path, cache_sim: bool = False, script: Path | None = None
) -> dict[str, float]:
    """Callgrind's counts per hello-world request, one request after another.

    The server (`script --serve KIND ADDRESS`, this file by default) runs
    under callgrind with counting off; 50 requests warm it up (imports,
    first connection), then `requests` more are counted. Unlike CPU time,
    the counts do not depend on what else loads the machine. "Ir" is the
    instructions; with `cache_sim`, also the simulated cache's misses:
    "I1mr" (code), "D1mr" and "D1mw" (data read and written), ...
    """
    import http.client
    import shutil

    import peers

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind (callgrind) is not installed")
    base = Path(tempfile.mkdtemp(dir=work))
    address = f"unix:{peers.socket_dir(base) / 'app.sock'}"
    out = base / "callgrind.out"
    server = peers.ManagedProcess(
        kind,
        [
            "valgrind",
            "--tool=callgrind",
            f"--cache-sim={'yes' if cache_sim else 'no'}",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(script or Path(__file__).resolve()),
            "--serve",
            kind,
            address,
        ],
        output_log=base / "server.out",
    )
    server.start()
    try:
        peers.wait_until_ready(server, [address], logs=[], timeout=120)
        nginx_binary = peers.find_nginx()
        if nginx_binary is None:
            raise peers.PeerError("nginx is not installed")
        nginx = peers.Nginx(nginx_binary, base / "nginx", address)
        nginx.start()
        try:
            host, port = nginx.http_address.rsplit(":", 1)
            client = http.client.HTTPConnection(host, int(port), timeout=120)

            def get(count: int) -> None:
                for _ in range(count):
                    client.request("GET", "/hello")
                    response = client.getresponse()
                    if response.read() != HELLO:
                        raise RuntimeError(f"{kind} answered {response.status}")

            assert server.process is not None
            pid = str(server.process.pid)
            get(50)
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
            get(requests)
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
            client.close()
            # The dump asked for (callgrind.out.1), not the one written at exit.
            dump = base / "callgrind.out.1"
            deadline = time.monotonic() + 60
            while "totals:" not in (dump.read_text() if dump.exists() else ""):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"callgrind wrote no {dump}")
                time.sleep(0.2)
        finally:
            nginx.stop()
    except BaseException:
        sys.stderr.write(server.read_output()[-4000:])
        raise
    finally:
        server.stop()
    keep = os.environ.get("BENCH_WSGI_KEEP_CALLGRIND")
    if keep:  # a directory: the profile, to read with callgrind_annotate
        import shutil

        shutil.copy(dump, Path(keep) / f"callgrind.{kind}.out")
    names: list[str] = []
    for line in dump.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("totals:"):
            totals = line.split()[1:]
            return {name: int(total) / requests for name, total in zip(names, totals, strict=True)}
    raise RuntimeError(f"no totals in {dump}")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import peers

    parts = [f"Python {platform.python_version()}"]
    for name in ("flup", "fcgisgi", "anyio"):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{name} {version(name)}")
    nginx = subprocess.run(
        [peers.find_nginx() or "nginx", "-v"], capture_output=True, text=True
    ).stderr.strip()
    parts.append(nginx.split(": ")[-1])
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--seconds", type=int, default=3, help="measured seconds per wrk run (default 3)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--only", nargs="*", choices=list(KINDS), help="these servers only")
    parser.add_argument(
        "--cases", nargs="*", choices=[case.label for case in CASES], help="these cases only"
    )
    parser.add_argument(
        "--callgrind",
        type=int,
        metavar="N",
        help="instead: instructions per hello-world request over N sequential requests",
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="with --callgrind: the simulated cache's misses per request as well",
    )
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="NAME=SCRIPT",
        help="with --callgrind: a script that serves as this file does (floor_asgi.py)",
    )
    args = parser.parse_args()
    if (args.cache_sim or args.also) and not args.callgrind:
        parser.error("--cache-sim and --also go with --callgrind")
    if args.serve:
        kind, address = args.serve
        KINDS[kind].serve(address)
        return

    kinds = []
    for name in args.only or KINDS:
        why = KINDS[name].missing()
        if why:
            print(f"skipped {name}: {why}")
        else:
            kinds.append(name)
    print(versions())
    if args.callgrind:
        with tempfile.TemporaryDirectory(prefix="bench-wsgi-") as work:
            runs: list[tuple[str, Path | None]] = [(kind, None) for kind in kinds]
            for also in args.also:
                named = named_script(also)
                if named is None:
                    parser.error(f"--also takes NAME=SCRIPT, not {also!r}")
                runs.append(named)
            for kind, script in runs:
                counts = callgrind_run(kind, args.callgrind, Path(work), args.cache_sim, script)
                line = f"{kind:>10}: {counts['Ir']:,.0f} instructions per request"
                if args.cache_sim:
                    misses = ", ".join(
                        f"{counts[name]:,.0f} {name}" for name in ("I1mr", "D1mr", "D1mw")
                    )
                    line += f"; L1 misses: {misses}"
                print(line, flush=True)
        return
    cases = [case for case in CASES if not args.cases or case.label in args.cases]
    results = {(kind, case.label): Result() for kind in kinds for case in cases}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-wsgi-") as work:
        for round_number in range(1, args.rounds + 1):
            for case in cases:
                for kind in kinds:
                    result = results[kind, case.label]
                    try:
                        rate, cpu = one_run(kind, case, args.seconds, Path(work))
                    except RuntimeError as exc:  # wrk saw errors: noted, and the run goes on
                        result.failures += 1
                        summary = [line for line in str(exc).splitlines() if "errors" in line]
                        print(
                            f"round {round_number} {case.label:>10} {kind:>10}: failed, "
                            + " ".join(summary or [str(exc).splitlines()[0]]),
                            flush=True,
                        )
                        continue
                    result.rates.append(rate)
                    result.cpu_per_request.append(cpu)
                    print(
                        f"round {round_number} {case.label:>10} {kind:>10}: "
                        f"{rate:9,.0f} req/s {cpu * 1e6:8,.0f} us/req",
                        flush=True,
                    )
    print(
        f"\n{args.rounds} rounds in {time.monotonic() - started:.0f} s; "
        "median req/s / server CPU µs per request:\n"
    )
    print("| server | " + " | ".join(case.label for case in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for kind in kinds:
        cells = []
        for case in cases:
            result = results[kind, case.label]
            if not result.rates:
                cells.append("failed")
                continue
            rate = statistics.median(result.rates)
            cpu = statistics.median(result.cpu_per_request)
            failed = f" ({result.failures} failed)" if result.failures else ""
            cells.append(f"{rate:,.0f} / {cpu * 1e6:,.0f}{failed}")
        print(f"| {KINDS[kind].label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
