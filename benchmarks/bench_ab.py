"""A/B: the clients of two checkouts against one php-fpm, rounds interleaved.

For a change to the clients: is it slower? Each round runs every client of
checkout A, then of checkout B, for a short while each, sequential requests
on one kept-alive connection, in a process of its own started from that
checkout (so each imports its own packages). Interleaving rounds spreads the
machine's load drift over both sides; the table shows the median of the
rounds, and the ratio B/A.

    uv run python benchmarks/bench_ab.py --a ../base-checkout --b .
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers

# Runs inside a checkout: requests for `seconds`, then "count cpu_seconds".
RUNNER = r"""
import sys, time
kind, address, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
params = {"SCRIPT_FILENAME": sys.argv[4], "REQUEST_METHOD": "GET"}
if kind == "blocking":
    from fcgiproto_socket import Client
    with Client(address, max_connections=1, multiplex=False) as client:
        client.request(params)
        count, cpu, stop = 0, time.process_time(), time.monotonic() + seconds
        while time.monotonic() < stop:
            client.request(params)
            count += 1
        cpu = time.process_time() - cpu
else:
    import anyio
    from fcgiproto_anyio import AsyncClient
    async def main():
        async with AsyncClient(address, max_connections=1, multiplex=False) as client:
            await client.request(params)
            count, cpu, stop = 0, time.process_time(), time.monotonic() + seconds
            while time.monotonic() < stop:
                await client.request(params)
                count += 1
            return count, time.process_time() - cpu
    count, cpu = anyio.run(main, backend=kind)
print(count, cpu)
"""

KINDS = ("blocking", "asyncio", "trio")


def run_once(checkout: Path, kind: str, address: str, seconds: float, script: str) -> float:
    """Client CPU microseconds per request, for one short run."""
    python = checkout / ".venv" / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c", RUNNER, kind, address, str(seconds), script],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    count, cpu = int(out[0]), float(out[1])
    return cpu / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="the checkout to compare against")
    parser.add_argument("--b", type=Path, default=Path("."), help="the checkout measured")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--transport", choices=["tcp", "unix"], default="unix")
    args = parser.parse_args()
    binary = peers.find_php_fpm()
    if binary is None:
        sys.exit("php-fpm is not installed")
    with tempfile.TemporaryDirectory() as scratch:
        php = peers.PhpFpm(binary, Path(scratch))
        php.start()
        try:
            address = f"unix:{php.unix_path}" if args.transport == "unix" else php.tcp_address
            script = str(php.docroot / "hello.php")
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for side, checkout in (("A", args.a), ("B", args.b)):
                    for kind in KINDS:
                        cost = run_once(checkout.resolve(), kind, address, args.seconds, script)
                        results.setdefault((side, kind), []).append(cost)
        finally:
            php.stop()
    print(f"client CPU per request (us), median of {args.rounds} interleaved rounds")
    print(f"A = {args.a}, B = {args.b}, php-fpm over {args.transport}")
    print(f"{'client':<10} {'A':>8} {'B':>8} {'B/A':>6}")
    for kind in KINDS:
        a = statistics.median(results[("A", kind)])
        b = statistics.median(results[("B", kind)])
        print(f"{kind:<10} {a:>8.1f} {b:>8.1f} {b / a:>5.2f}x")


if __name__ == "__main__":
    main()
