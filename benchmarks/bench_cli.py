"""`fcgi ping` beside `cgi-fcgi`: wall time per health check, and what the command imports.

    uv run python benchmarks/bench_cli.py [--runs 40]

Starts php-fpm (tests/peers.py) on a Unix socket and TCP, then times with
hyperfine: `fcgi ping` (the installed console script), `cgi-fcgi -bind
-connect` with the params php-fpm health checks send, and `python -c pass`,
the interpreter's own floor. Then `python -X importtime` of `fcgi ping`:
the milliseconds spent importing, summed over the top-level imports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers

FCGI = str(Path(sys.executable).with_name("fcgi"))
CGI_FCGI = shutil.which("cgi-fcgi") or "cgi-fcgi"
PING_ENV = "SCRIPT_NAME=/ping SCRIPT_FILENAME=/ping REQUEST_METHOD=GET"


def import_ms(argv: list[str]) -> float:
    """Milliseconds of imports in one run of `argv` (a Python -m command line)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=60
    )
    total = 0
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if match and not match[2]:  # a top-level import: its cumulative time
            total += int(match[1])
    return total / 1000


def cpu_ms(command: str, runs: int) -> float:
    """User + system CPU milliseconds per run of `command`: what load disturbs least."""
    argv = command.split()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        subprocess.run(argv, capture_output=True, timeout=60, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return spent / runs * 1000


def hyperfine(commands: dict[str, str], runs: int) -> dict[str, dict[str, float]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = ["hyperfine", "-N", "--warmup", "5", "--runs", str(runs), "--export-json", out.name]
        for name, command in commands.items():
            argv += ["-n", name, command]
        subprocess.run(argv, check=True, capture_output=True, timeout=600)
        results = json.loads(Path(out.name).read_text())["results"]
    return {r["command"]: r for r in results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    binary = peers.find_php_fpm()
    if binary is None or shutil.which("hyperfine") is None:
        print("needs php-fpm and hyperfine", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="fcgi-bench-", dir="/tmp") as base:
        fpm = peers.PhpFpm(binary, Path(base))
        fpm.start()
        try:
            sock, tcp = fpm.unix_path, fpm.tcp_address
            # hyperfine -N runs commands without a shell: env sets the params.
            commands = {
                "fcgi ping (unix)": f"{FCGI} ping {sock}",
                "cgi-fcgi (unix)": f"env {PING_ENV} {CGI_FCGI} -bind -connect {sock}",
                "fcgi ping (tcp)": f"{FCGI} ping {tcp}",
                "cgi-fcgi (tcp)": f"env {PING_ENV} {CGI_FCGI} -bind -connect {tcp}",
                "python -c pass": f"{sys.executable} -c pass",
                "fcgi --help": f"{FCGI} --help",
            }
            results = hyperfine(commands, args.runs)
            cpu = {name: cpu_ms(command, args.runs) for name, command in commands.items()}
            imports = import_ms(["-m", "fcgiproto_socket", "ping", sock])
        finally:
            fpm.stop()
    print(f"{'command':<18} {'mean ms':>8} {'sd':>6} {'min ms':>7} {'CPU ms':>7}")
    for name, r in results.items():
        wall = f"{r['mean'] * 1000:8.1f} {r['stddev'] * 1000:6.1f} {r['min'] * 1000:7.1f}"
        print(f"{name:<18} {wall} {cpu[name]:7.1f}")
    print(f"imports of `fcgi ping`: {imports:.1f} ms (python -X importtime, top-level cumulative)")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
