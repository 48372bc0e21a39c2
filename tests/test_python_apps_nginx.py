"""What is nginx's alone for the real Flask and Starlette apps served by `fcgi serve`.

The proof list every web server goes through (query and headers, uploads,
downloads in constant memory, cookies, redirects, HEAD, client aborts) is
tests/test_python_apps_fronts.py's, nginx among them. Here: an app that
raises, its traceback and log records in nginx's error log (FCGI_STDERR),
and the workers restarted (SIGHUP) or drained (SIGTERM) with requests in
flight behind nginx's kept-alive connections.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import peers
import pytest

REPO = Path(__file__).resolve().parent.parent
WAIT = 30.0
APPS = {"flask": "python_apps:flask_app", "starlette": "python_apps:starlette_app"}
MiB = 1 << 20


class Served:
    """`fcgi serve` of one of the test apps on a Unix socket, as a process of its own."""

    def __init__(self, app: str, base: Path, *extra: str) -> None:
        self.base = base
        self.socket = str(peers.socket_dir(base) / "app.sock")
        self.proc = peers.ManagedProcess(
            "fcgi serve",
            [
                sys.executable,
                "-m",
                "fcgiproto_socket",
                "serve",
                app,
                "--bind",
                f"unix:{self.socket}",
                "--app-dir",
                str(REPO / "tests"),
                "--log-level",
                "debug",
                *extra,
            ],
            output_log=base / "serve.log",
            cwd=REPO,
        )

    def start(self) -> None:
        self.proc.start()
        peers.wait_until_ready(self.proc, [f"unix:{self.socket}"], logs=[])

    @property
    def pid(self) -> int:
        assert self.proc.process is not None
        return self.proc.process.pid

    def log(self) -> str:
        return self.proc.read_output()


@pytest.fixture(params=sorted(APPS))
def app_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def served(
    app_name: str, tmp_path: Path, make_nginx: peers.NginxFactory
) -> Iterator[tuple[Served, peers.Nginx, httpx.Client]]:
    server = Served(APPS[app_name], tmp_path, "--max-body-size", str(64 * MiB))
    server.start()
    nginx = make_nginx(f"unix:{server.socket}")
    try:
        with httpx.Client(base_url=f"http://{nginx.http_address}", timeout=WAIT) as client:
            yield server, nginx, client
    finally:
        server.proc.stop()


def test_no_traceback_reaches_the_client(
    app_name: str, served: tuple[Served, peers.Nginx, httpx.Client]
) -> None:
    server, nginx, client = served
    r = client.get("/boom")
    assert r.status_code == 500
    assert b"secret detail" not in r.content
    assert b"Traceback" not in r.content
    assert client.get("/hello").status_code == 200
    deadline = time.monotonic() + WAIT
    while "secret detail" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "secret detail" in server.log()  # the traceback is in the server's log
    if app_name == "flask":
        # ... and in nginx's error log, through FCGI_STDERR. (Starlette answers
        # 500 itself and raises after the response ended: no STDERR left then.)
        assert "secret detail" in nginx.error_log.read_text()


def test_log_records_reach_the_web_servers_error_log(
    app_name: str, served: tuple[Served, peers.Nginx, httpx.Client]
) -> None:
    _, nginx, client = served
    assert client.get("/log").text == "logged"
    assert f"a record from the {app_name} app" in nginx.error_log.read_text()


# --- workers: graceful restart and drain ---


def slow_request(base: str, n: int, started: threading.Semaphore | None = None) -> tuple[int, int]:
    """A /slow request; `started` is released once its response has begun."""
    with (
        httpx.Client(base_url=base, timeout=WAIT) as client,
        client.stream("GET", "/slow", params={"n": n}) as r,
    ):
        if started is not None:
            started.release()
        return r.status_code, r.read().decode().count("chunk ")


def _wait_started(started: threading.Semaphore, count: int) -> None:
    for _ in range(count):
        assert started.acquire(timeout=WAIT)


@pytest.mark.parametrize("app", sorted(APPS))
def test_sighup_restarts_the_workers_without_losing_a_request(
    app: str, tmp_path: Path, make_nginx: peers.NginxFactory
) -> None:
    server = Served(APPS[app], tmp_path, "--workers", "2", "--graceful-timeout", "20")
    server.start()
    nginx = make_nginx(f"unix:{server.socket}")
    base = f"http://{nginx.http_address}"
    try:
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            old_pids = {client.get("/hello").json()["pid"] for _ in range(10)}
        started = threading.Semaphore(0)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            in_flight = [pool.submit(slow_request, base, 20, started) for _ in range(6)]
            _wait_started(started, 6)  # they are running now, a second each
            os.kill(server.pid, signal.SIGHUP)
            after = [pool.submit(slow_request, base, 2) for _ in range(6)]
            results = [f.result() for f in in_flight + after]
        assert results == [(200, 20)] * 6 + [(200, 2)] * 6
        deadline = time.monotonic() + WAIT
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            while True:
                pids = {client.get("/hello").json()["pid"] for _ in range(10)}
                if not pids & old_pids or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert not pids & old_pids, "the old workers still serve"
        assert server.proc.running
    finally:
        server.proc.stop()


@pytest.mark.parametrize("app", sorted(APPS))
def test_sigterm_drains_requests_in_flight(
    app: str, tmp_path: Path, make_nginx: peers.NginxFactory
) -> None:
    server = Served(APPS[app], tmp_path, "--workers", "2", "--graceful-timeout", "20")
    server.start()
    nginx = make_nginx(f"unix:{server.socket}")
    base = f"http://{nginx.http_address}"
    try:
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            for _ in range(6):  # both workers have loaded the app
                assert client.get("/hello").status_code == 200
        started = threading.Semaphore(0)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            in_flight = [pool.submit(slow_request, base, 20, started) for _ in range(4)]
            _wait_started(started, 4)
            os.kill(server.pid, signal.SIGTERM)
            results = [f.result() for f in in_flight]
        assert results == [(200, 20)] * 4
        assert server.proc.process is not None
        assert server.proc.process.wait(WAIT) == 0
        assert not Path(server.socket).exists()  # the socket file it made is gone
    finally:
        server.proc.stop()


def test_single_process_drains_on_sigterm(tmp_path: Path, make_nginx: peers.NginxFactory) -> None:
    server = Served(APPS["flask"], tmp_path, "--graceful-timeout", "20")
    server.start()
    nginx = make_nginx(f"unix:{server.socket}")
    base = f"http://{nginx.http_address}"
    try:
        assert httpx.get(f"{base}/hello", timeout=WAIT).status_code == 200  # the app is loaded
        done: list[tuple[int, int]] = []
        started = threading.Semaphore(0)
        thread = threading.Thread(target=lambda: done.append(slow_request(base, 20, started)))
        thread.start()
        _wait_started(started, 1)
        os.kill(server.pid, signal.SIGTERM)
        thread.join(WAIT)
        assert done == [(200, 20)]
        assert server.proc.process is not None
        assert server.proc.process.wait(WAIT) == 0
    finally:
        server.proc.stop()
