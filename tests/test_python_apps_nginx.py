"""A real Flask app and a real Starlette app behind nginx, served by `fcgi serve`.

Everything a browser would do goes through nginx's fastcgi_pass (kept-alive
connections, as the Nginx fixture configures): query and headers, a 10 MiB
upload, a 50 MiB download in constant memory, cookies, redirects, HEAD, an
app that raises, the app's log records in nginx's error log, a client that
goes away mid-response, and a restart of the workers while requests are in
flight.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
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


def rss_peak_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


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


def test_get_with_query_and_headers(served: tuple[Served, peers.Nginx, httpx.Client]) -> None:
    _, _, client = served
    r = client.get("/hello", params={"name": "Zoë & co"}, headers={"X-Test": "yes"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["greeting"] == "hello Zoë & co"
    assert body["x_test"] == "yes"
    assert (body["method"], body["path"], body["script_root"], body["scheme"]) == (
        "GET",
        "/hello",
        "",
        "http",
    )


def test_upload_10_mib(served: tuple[Served, peers.Nginx, httpx.Client]) -> None:
    _, _, client = served
    data = os.urandom(10 * MiB)
    r = client.post("/upload", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_download_50_mib_in_constant_memory(
    served: tuple[Served, peers.Nginx, httpx.Client],
) -> None:
    server, _, client = served
    size = 50 * MiB
    assert client.get("/download", params={"size": MiB}).status_code == 200  # warm up
    before = rss_peak_kib(server.pid)
    digest = hashlib.sha256()
    got = 0
    with client.stream("GET", "/download", params={"size": size}) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(size)
        for chunk in r.iter_bytes():
            digest.update(chunk)
            got += len(chunk)
    expected = hashlib.sha256()
    block = bytes(range(256)) * (64 * 1024 // 256)
    for _ in range(size // len(block)):
        expected.update(block)
    assert got == size
    assert digest.hexdigest() == expected.hexdigest()
    grown = rss_peak_kib(server.pid) - before
    # 50 MiB went through; the server's peak grew by a few buffers at most.
    assert grown < 16 * 1024, f"the server's peak RSS grew by {grown} KiB"


def test_cookies_and_redirects(served: tuple[Served, peers.Nginx, httpx.Client]) -> None:
    _, _, client = served
    r = client.get("/set-cookie")
    assert r.status_code == 200
    assert "flavour=oatmeal" in r.headers["set-cookie"]
    assert client.get("/get-cookie").text == "flavour=oatmeal"
    r = client.get("/redirect")
    assert r.status_code == 302
    assert r.headers["location"] == "/hello?name=redirected"
    r = client.get("/redirect", follow_redirects=True)
    assert r.status_code == 200
    assert r.json()["greeting"] == "hello redirected"


def test_head(served: tuple[Served, peers.Nginx, httpx.Client]) -> None:
    _, _, client = served
    r = client.head("/hello")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.content == b""
    assert client.get("/hello").status_code == 200  # the connection is still good


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


def test_client_abort_mid_response_stops_the_app(
    served: tuple[Served, peers.Nginx, httpx.Client], tmp_path: Path
) -> None:
    _server, _, client = served
    marker = tmp_path / "closed"
    n = 400  # 20 s if it ran to the end
    started = time.monotonic()
    with client.stream("GET", "/slow", params={"n": n, "marker": str(marker)}) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    deadline = time.monotonic() + WAIT
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "closed"
    assert time.monotonic() - started < n * 0.05 / 2, "the app ran on after the client left"
    assert client.get("/hello").status_code == 200


# --- workers: graceful restart and drain ---


def _slow_request(base: str, n: int, started: threading.Semaphore | None = None) -> tuple[int, int]:
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
            in_flight = [pool.submit(_slow_request, base, 20, started) for _ in range(6)]
            _wait_started(started, 6)  # they are running now, a second each
            os.kill(server.pid, signal.SIGHUP)
            after = [pool.submit(_slow_request, base, 2) for _ in range(6)]
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
            in_flight = [pool.submit(_slow_request, base, 20, started) for _ in range(4)]
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
        thread = threading.Thread(target=lambda: done.append(_slow_request(base, 20, started)))
        thread.start()
        _wait_started(started, 1)
        os.kill(server.pid, signal.SIGTERM)
        thread.join(WAIT)
        assert done == [(200, 20)]
        assert server.proc.process is not None
        assert server.proc.process.wait(WAIT) == 0
    finally:
        server.proc.stop()


def test_json_of_the_env(served: tuple[Served, peers.Nginx, httpx.Client]) -> None:
    """The request reached the app through nginx with nginx's own params."""
    _, _, client = served
    assert json.loads(client.get("/hello", params={"name": "x"}).text)["greeting"] == "hello x"
