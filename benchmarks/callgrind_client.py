"""Instructions per request of the clients against Go, counted by callgrind (load-independent).

Run:  uv run python benchmarks/callgrind_client.py              (about 3 min on 2 cores)
      uv run python benchmarks/callgrind_client.py blocking asyncio-mux100

Starts the tests' Go server (tests/goserver) on loopback and, for each case,
runs the client in a child process under `valgrind --tool=callgrind` twice:
once for 200 requests and once for 2,200. The difference of the two totals
divided by 2,000 is what one request costs the client process (the client,
the event loop and, multiplexed, the reader), with start-up, imports and the
warm-up cancelled out. Every request is GET /hello with peers.go_params().
The cases:

- blocking: `Client(multiplex=False)`, sequential, one pooled connection;
- asyncio, trio: `AsyncClient(multiplex=False)`, likewise;
- asyncio-mux100, trio-mux100: `AsyncClient(multiplex=True)`, 100 tasks
  looping over request() on the one shared connection;
- asyncio-pool100, trio-pool100: `AsyncClient(multiplex=False,
  max_connections=100)`, 100 tasks, a connection each.

Needs valgrind (callgrind) and Go.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers

PARAMS: dict[str, str] = peers.go_params("/hello")
CASES = (
    "blocking",
    "asyncio",
    "trio",
    "asyncio-mux100",
    "trio-mux100",
    "asyncio-pool100",
    "trio-pool100",
)
SHORT, LONG = 200, 2200
WARM_UP = 200


def child(case: str, requests: int, address: str) -> None:
    """Make `requests` requests (after a warm-up that both runs share)."""
    if case == "blocking":
        from fcgiproto_socket import Client

        with Client(address, multiplex=False, max_connections=1) as client:
            for _ in range(WARM_UP + requests):
                client.request(PARAMS)
        return

    import anyio

    from fcgiproto_anyio import AsyncClient

    backend, _, mode = case.partition("-")
    tasks = 100 if mode else 1
    multiplex = mode == "mux100"

    async def main() -> None:
        async with AsyncClient(address, multiplex=multiplex, max_connections=tasks) as client:

            async def loop(count: int) -> None:
                for _ in range(count):
                    await client.request(PARAMS)

            async with anyio.create_task_group() as group:
                for _ in range(tasks):
                    group.start_soon(loop, (WARM_UP + requests) // tasks)

    anyio.run(main, backend=backend)


def instructions(case: str, requests: int, address: str, work: Path) -> int:
    out = work / f"callgrind.{case}.{requests}"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            case,
            str(requests),
            address,
        ],
        check=True,
        capture_output=True,
    )
    match = re.search(r"^totals:\s*(\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (default: all)")
    parser.add_argument(
        "--child", nargs=3, metavar=("CASE", "N", "ADDRESS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        case, requests, address = args.child
        child(case, int(requests), address)
        return
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    go_binary = peers.find_go()
    if go_binary is None:
        raise SystemExit("go is not installed: no Go server to measure against")
    base = Path(tempfile.mkdtemp(prefix="fcgi-callgrind-", dir="/tmp"))
    go = peers.GoServer(peers.build_go_server(go_binary), base)
    go.start()
    try:
        print(f"callgrind instructions per request of the client process, Go at {go.tcp_address}")
        print(f"{'case':<18}{SHORT:>16,}{LONG:>16,}{'per request':>14}")
        for case in args.cases or CASES:
            short = instructions(case, SHORT, go.tcp_address, base)
            long = instructions(case, LONG, go.tcp_address, base)
            per = (long - short) / (LONG - SHORT)
            print(f"{case:<18}{short:>16,}{long:>16,}{per:>14,.0f}", flush=True)
    finally:
        go.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
