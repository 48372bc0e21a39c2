"""Instructions per request of `fcgi php` as served: uvicorn, the gateway, the client.

    uv run python benchmarks/callgrind_gateway.py [--requests 300,1300] [--path /hello.php]

Runs ``fcgi php`` (one process) under ``valgrind --tool=callgrind`` in front
of one php-fpm pool (opcache on), sends it the two numbers of sequential
keep-alive requests of wrk's shape (a request line and a Host header), stops
it with SIGINT so that callgrind writes its total, and prints the difference
divided by the difference of requests: what one request costs the process,
HTTP parsing and socket calls included, startup and shutdown excluded.
Instruction counts hardly move with the load other jobs put on the machine,
which req/s and CPU time do.

``--no-valgrind`` runs the same without it and prints CPU time per request
(the process's, from /proc) instead.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers
from bench_gateway import start_pool, write_docroot

TICKS = os.sysconf("SC_CLK_TCK")


def drive(port: int, path: str, requests: int) -> None:
    """`requests` GETs one after the other on one kept-alive connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        buffer = b""
        for _ in range(requests):
            conn.sendall(request)
            while True:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end >= 0:
                    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buffer[:head_end])
                    assert match, buffer[:head_end]
                    if not buffer.startswith(b"HTTP/1.1 200 "):
                        raise RuntimeError(buffer[:head_end].decode("latin-1"))
                    end = head_end + 4 + int(match.group(1))
                    if len(buffer) >= end:
                        buffer = buffer[end:]
                        break
                data = conn.recv(65536)
                if not data:
                    raise RuntimeError("the gateway closed the connection")
                buffer += data


def process_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def one_run(
    root: Path, upstream: str, base: Path, path: str, requests: int, valgrind: bool
) -> float:
    """Callgrind's instruction total (or the CPU seconds) of a gateway that served `requests`."""
    port = peers.free_port()
    argv = [sys.executable, "-m", "fcgiproto_socket", "php", "--root", str(root)]
    argv += ["--upstream", f"unix:{upstream}", "--listen", f"127.0.0.1:{port}"]
    argv += ["--max-connections", "8", "--no-access-log", "--log-level", "warning"]
    argv += ["--workers", "1"]
    log = base / f"callgrind-{requests}.log"
    if valgrind:
        argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]
    with open(log, "wb") as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(log.read_text()) from None
                    time.sleep(0.2)
            try:
                drive(port, path, 50)  # warm-up: connections made, code paths taken
            except OSError:
                raise RuntimeError(log.read_text()) from None
            started = process_cpu(proc.pid)
            drive(port, path, requests)
            spent = process_cpu(proc.pid) - started
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    if not valgrind:
        return spent
    collected = re.search(rb"Collected : (\d+)", log.read_bytes())
    assert collected, log.read_text()
    return float(collected.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="300,1300", help="two request counts")
    parser.add_argument("--path", default="/hello.php")
    parser.add_argument("--no-valgrind", action="store_true")
    args = parser.parse_args()
    low, high = (int(n) for n in args.requests.split(","))
    binary = peers.find_php_fpm()
    assert binary, "php-fpm is not installed"
    with tempfile.TemporaryDirectory(prefix="callgrind-gateway-") as scratch:
        base = Path(scratch)
        root = write_docroot(base)
        fpm = start_pool(binary, base, "bench")
        try:
            valgrind = not args.no_valgrind
            if not valgrind:
                spent = one_run(root, fpm.socket, base, args.path, high, valgrind)
                print(f"{args.path}: {spent / high * 1e6:.0f} us CPU a request (no valgrind)")
                return 0
            counts = [one_run(root, fpm.socket, base, args.path, n, valgrind) for n in (low, high)]
        finally:
            fpm.stop()
    per_request = (counts[1] - counts[0]) / (high - low)
    print(f"{args.path}: {per_request:,.0f} instructions a request (served, one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
