"""The PHP gateway (`fcgi php`, uvicorn) beside nginx and Caddy, in front of the same php-fpm.

    uv run python benchmarks/bench_gateway.py [--seconds 5] [--only gateway,nginx,caddy]

A php-fpm pool per front (8 static workers, opcache on) on a Unix socket serves
hello.php and a front controller (index.php) that prints REQUEST_URI. Each front server is set up as
its documentation recommends for a PHP front controller:

- nginx: one process, ``try_files $uri $uri/ /index.php?$args``, a
  ``\\.php(/|$)`` location with ``fastcgi_split_path_info`` and ``try_files
  $fastcgi_script_name =404``, upstream keepalive 8;
- Caddy: ``root``, ``php_fastcgi unix//...``, ``file_server``; no access log;
- the gateway: ``fcgi php --max-connections 8 --no-access-log``, one uvicorn
  process on uvloop with httptools (as installed by the ``php`` extra);
- gateway2: the same with ``--workers 2``: a process a core, 4 connections each.

wrk asks each for /hello.php (a script) and for /blog/post (the front
controller: every file check fails until index.php) with -t1 -c1 and -t2 -c16.
All fronts run at once and each cell of the table runs them back to back, so
that the fronts compared saw the same load from other jobs.
Figures: requests/s, CPU per request of the front server (its process
tree, from /proc), of php-fpm and of wrk, and the cores each used over the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import re
import subprocess

import peers
from _shared import WRK
from gateway_peers import FpmPool

TICKS = os.sysconf("SC_CLK_TCK")


class Row(NamedTuple):
    """One wrk run: req/s, requests, seconds, and CPU seconds of the front, php-fpm and wrk."""

    rate: float
    count: int
    elapsed: float
    front: float
    php: float
    wrk: float

    def __str__(self) -> str:
        per = 1e6 / self.count
        return (
            f"{self.rate:9,.0f} req/s  front {self.front * per:5,.0f} us/req  "
            f"php-fpm {self.php * per:4,.0f} us/req  wrk {self.wrk * per:3,.0f} us/req  "
            f"cores: front {self.front / self.elapsed:.2f} php-fpm {self.php / self.elapsed:.2f} "
            f"wrk {self.wrk / self.elapsed:.2f}"
        )


def wrk_timed(url: str, threads: int, connections: int, seconds: int) -> tuple[int, float, float]:
    """wrk's requests and requests/s, and the CPU seconds wrk itself used."""
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0  # reaped here, for Popen's sake
    count, rate = _parse_wrk(out)
    return count, rate, usage.ru_utime + usage.ru_stime


def _parse_wrk(out: str) -> tuple[int, float]:
    count = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if count is None or rate is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk failed:\n{out}")
    return int(count.group(1)), float(rate.group(1))


def wrk(url: str, threads: int, connections: int, seconds: int) -> tuple[int, float]:
    """wrk's requests and requests/s; fails on errors or non-2xx answers.

    A 10 s request timeout rather than wrk's 2 s: on a loaded machine a
    php-fpm worker can stall that long, which is no failure of the front.
    """
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    return _parse_wrk(out)


OPCACHE = ["-d", "zend_extension=opcache", "-d", "opcache.enable=1"]


def write_docroot(base: Path) -> Path:
    """The benchmarks' document root under `base`: hello.php and a front controller."""
    root = base / "www"
    root.mkdir()
    (root / "hello.php").write_text('<?php echo "Hello, world\\n";')
    (root / "index.php").write_text('<?php echo "front controller: ", $_SERVER["REQUEST_URI"];')
    return root


def start_pool(binary: str, base: Path, name: str) -> FpmPool:
    """A php-fpm pool of 8 static workers with opcache, started; stop() it."""
    fpm = FpmPool(binary, base, name, workers=8)
    fpm._proc.argv[1:1] = OPCACHE
    fpm.start()
    return fpm


PATHS = ("/hello.php", "/blog/post")
LOADS = ((1, 1), (2, 16))


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants that are alive."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    total = 0.0
    for proc, seconds in times.items():
        walk = proc
        while walk in parents and walk != pid:
            walk = parents[walk]
        if walk == pid:
            total += seconds
    return total


class Front:
    """A front server in a process of its own."""

    def __init__(self, name: str, argv: list[str], port: int, base: Path, env: dict[str, str]):
        self.name = name
        self.port = port
        self.proc = peers.ManagedProcess(
            name, argv, output_log=base / f"{name}.out", env={**os.environ, **env}
        )
        self.base = base

    def __enter__(self) -> Front:
        self.proc.start()
        peers.wait_until_ready(self.proc, [f"127.0.0.1:{self.port}"], logs=[])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    @property
    def pid(self) -> int:
        assert self.proc.process is not None
        return self.proc.process.pid


def nginx_front(base: Path, root: Path, upstream: str) -> Front:
    binary = peers.find_nginx()
    assert binary, "nginx is not installed"
    port = peers.free_port()
    temp = base / "nginx-temp"
    temp.mkdir(exist_ok=True)
    params = "".join(
        f"            {line}\n"
        for line in peers._NGINX_FASTCGI_PARAMS.splitlines()
        if "SCRIPT_NAME" not in line
    )
    config = base / "nginx.conf"
    config.write_text(f"""\
master_process off;
pid {base / "nginx.pid"};
error_log {base / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp / "body"};
    fastcgi_temp_path {temp / "fastcgi"};
    proxy_temp_path {temp / "proxy"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    upstream php {{ server unix:{upstream}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        index index.php;
        location / {{ try_files $uri $uri/ /index.php?$args; }}
        location ~ \\.php(/|$) {{
            fastcgi_split_path_info ^(.+?\\.php)(/.*)$;
            try_files $fastcgi_script_name =404;
            fastcgi_pass php;
            fastcgi_keep_conn on;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_param PATH_INFO $fastcgi_path_info;
{params}        }}
    }}
}}
""")
    argv = [binary, "-p", str(base), "-c", str(config), "-e", str(base / "nginx-error.log")]
    return Front("nginx", [*argv, "-g", "daemon off;"], port, base, {})


def caddy_front(base: Path, root: Path, upstream: str) -> Front:
    binary = shutil.which("caddy")
    assert binary, "caddy is not installed (apt-get install caddy)"
    port = peers.free_port()
    config = base / "Caddyfile"
    config.write_text(f"""\
{{
    admin off
    auto_https off
}}
http://127.0.0.1:{port} {{
    root * {root}
    php_fastcgi unix/{upstream}
    file_server
}}
""")
    env = {"XDG_DATA_HOME": str(base / "caddy-data"), "XDG_CONFIG_HOME": str(base / "caddy-cfg")}
    argv = [binary, "run", "--config", str(config), "--adapter", "caddyfile"]
    return Front("caddy", argv, port, base, env)


def gateway_front(base: Path, root: Path, upstream: str, workers: int = 1) -> Front:
    port = peers.free_port()
    argv = [sys.executable, "-m", "fcgiproto_socket", "php", "--root", str(root)]
    argv += ["--upstream", f"unix:{upstream}", "--listen", f"127.0.0.1:{port}"]
    argv += ["--max-connections", "8", "--no-access-log", "--log-level", "warning"]
    argv += ["--workers", str(workers)]
    return Front("gateway" if workers == 1 else f"gateway{workers}", argv, port, base, {})


def gateway2_front(base: Path, root: Path, upstream: str) -> Front:
    """Two worker processes, one a core, sharing the 8 connections (4 each)."""
    return gateway_front(base, root, upstream, workers=2)


#: uvicorn answering by itself, no PHP: the floor the gateway stands on.
FLOOR_APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": b"Hello, world\\n"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False,
            log_level="warning", lifespan="off", proxy_headers=False, server_header=False)
"""


def floor_front(base: Path, root: Path, upstream: str) -> Front:
    port = peers.free_port()
    return Front("uvicorn", [sys.executable, "-c", FLOOR_APP, str(port)], port, base, {})


FRONTS: dict[str, Callable[[Path, Path, str], Front]] = {
    "gateway": gateway_front,
    "gateway2": gateway2_front,
    "uvicorn": floor_front,
    "nginx": nginx_front,
    "caddy": caddy_front,
}


def measure(url: str, threads: int, conns: int, seconds: int, front_pid: int, fpm_pid: int) -> Row:
    """One wrk run against a front: its rate, and the CPU each party spent on it."""
    wrk(url, threads, conns, 1)  # warm-up
    front_before, php_before = tree_cpu(front_pid), tree_cpu(fpm_pid)
    started = time.monotonic()
    count, rate, wrk_cpu = wrk_timed(url, threads, conns, seconds)
    elapsed = time.monotonic() - started
    front = tree_cpu(front_pid) - front_before
    php = tree_cpu(fpm_pid) - php_before
    return Row(rate, count, elapsed, front, php, wrk_cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--only", default=",".join(FRONTS))
    args = parser.parse_args()
    binary = peers.find_php_fpm()
    assert binary, "php-fpm is not installed"
    names = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as scratch, ExitStack() as stack:
        base = Path(scratch)
        root = write_docroot(base)
        # A pool each, alike: php-fpm pins a worker to every connection a
        # front keeps alive, so fronts sharing one pool would starve each other.
        fronts: dict[str, tuple[Front, int]] = {}
        for name in names:
            fpm = start_pool(binary, base, f"bench-{name}")
            stack.callback(fpm.stop)
            fpm_pid = fpm._proc.process.pid  # type: ignore[union-attr]
            # Every front runs from the start (an idle one costs nothing), and
            # each cell of the table runs them back to back: what other jobs
            # do to the machine changes by the minute, so fronts compared
            # within seconds of each other see the same load.
            front = stack.enter_context(FRONTS[name](base, root, fpm.socket))
            fronts[name] = (front, fpm_pid)
        print(f"load average at start: {os.getloadavg()}", flush=True)
        rows: dict[tuple[str, str, int], Row] = {}
        for path in PATHS:
            for threads, conns in LOADS:
                for name, (front, fpm_pid) in fronts.items():
                    url = f"http://127.0.0.1:{front.port}{path}"
                    row = measure(url, threads, conns, args.seconds, front.pid, fpm_pid)
                    rows[(name, path, conns)] = row
                    print(f"{name:8} {path:11} -c{conns:<3} {row}", flush=True)
        print(f"load average at end: {os.getloadavg()}", flush=True)
    for path in PATHS:
        for _, conns in LOADS:
            for ours in ("gateway", "gateway2"):
                for theirs in ("caddy", "nginx"):
                    if (ours, path, conns) in rows and (theirs, path, conns) in rows:
                        ratio = rows[(ours, path, conns)].rate / rows[(theirs, path, conns)].rate
                        print(f"{ours} / {theirs} {path} -c{conns}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
