"""A/B of Python application servers behind nginx: ratios within rounds, for small changes.

Run:  uv run python benchmarks/ab_wsgi.py serve_asgi@71c32db serve_asgi fcgisgi --cases c16

Each argument is a bench_wsgi.py server (KIND) as this checkout has it, or
as a git revision had it (KIND@REV: that revision's files, from git
archive, serve it), or NAME=SCRIPT: a script that serves as bench_wsgi.py
does (``SCRIPT --serve NAME ADDRESS``), such as floor_asgi.py. Every round
runs each of them once per case, one after another, as bench_wsgi.py does.
On this machine one cell moves by up to 40% between rounds while servers
measured in the same round move together, so what is read is each server's
CPU per request divided by the first argument's in the same round: the
median of those ratios, and in how many rounds it was below 1.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

import bench_wsgi

HERE = Path(__file__).resolve().parent


def checkout(revision: str, into: Path) -> Path:
    """bench_wsgi.py of `revision`, with the package beside it as it was then."""
    root = into / revision
    if not root.exists():
        root.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(HERE.parent), "archive", revision],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root / "benchmarks" / "bench_wsgi.py"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("servers", nargs="+", metavar="KIND[@REV]|NAME=SCRIPT")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--seconds", type=int, default=2, help="measured seconds (default 2)")
    parser.add_argument(
        "--cases",
        nargs="*",
        choices=[case.label for case in bench_wsgi.CASES],
        help="these cases only",
    )
    args = parser.parse_args()
    if len(args.servers) < 2:
        parser.error("give at least two servers: the first is what the others are divided by")
    cases = [case for case in bench_wsgi.CASES if not args.cases or case.label in args.cases]
    print(bench_wsgi.versions())
    cpu: dict[tuple[str, str], list[float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="ab-wsgi-") as work:
        # Each argument's KIND (or NAME) and the script that serves it (None: bench_wsgi.py).
        served: dict[str, tuple[str, Path | None]] = {}
        for server in args.servers:
            named = bench_wsgi.named_script(server)
            if named is not None:
                served[server] = named
                continue
            kind, _, revision = server.partition("@")
            if kind not in bench_wsgi.KINDS:
                parser.error(f"no server {kind!r}; bench_wsgi.py has {', '.join(bench_wsgi.KINDS)}")
            served[server] = (kind, checkout(revision, Path(work) / "trees") if revision else None)
        for round_number in range(1, args.rounds + 1):
            for case in cases:
                for server in args.servers:
                    kind, script = served[server]
                    cell = cpu.setdefault((case.label, server), [])
                    try:
                        rate, per_request = bench_wsgi.one_run(
                            kind, case, args.seconds, Path(work), script
                        )
                    except RuntimeError as exc:  # wrk saw errors: this round has no ratio
                        cell.append(None)
                        print(f"round {round_number} {case.label:>10} {server}: failed: {exc}")
                        continue
                    cell.append(per_request)
                    print(
                        f"round {round_number} {case.label:>10} {server}: "
                        f"{rate:9,.0f} req/s {per_request * 1e6:8,.1f} us/req",
                        flush=True,
                    )
    base = args.servers[0]
    print(f"\nserver CPU per request, divided by {base}'s in the same round:\n")
    for case in cases:
        for server in args.servers[1:]:
            pairs = zip(cpu[case.label, base], cpu[case.label, server], strict=True)
            ratios = [b / a for a, b in pairs if a is not None and b is not None]
            if not ratios:
                print(f"{case.label:>10} {server}: no round measured both")
                continue
            below = sum(ratio < 1 for ratio in ratios)
            print(
                f"{case.label:>10} {server}: median {statistics.median(ratios):.3f}, "
                f"below 1 in {below} of {len(ratios)} rounds "
                f"({' '.join(f'{ratio:.2f}' for ratio in ratios)})"
            )


if __name__ == "__main__":
    main()
