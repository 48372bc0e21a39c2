"""`fcgi serve`: fd 0 as spawn-fcgi and mod_fcgid hand it over, FCGI_WEB_SERVER_ADDRS, workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest

from fcgiproto import FastCGIError
from fcgiproto.cgi import build_params
from fcgiproto_socket import Client

TESTS = Path(__file__).resolve().parent
WAIT = 30.0
APPS = {"flask": "python_apps:flask_app", "starlette": "python_apps:starlette_app"}


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fcgiproto_socket", "serve", "--app-dir", str(TESTS), *args]


def hello(address: str) -> dict[str, str]:
    with Client(address, timeout=WAIT) as client:
        r = client.request(build_params("GET", "/hello", query="name=cli", script_filename="/x"))
    assert r.status == 200, r.body
    result: dict[str, str] = json.loads(r.body)
    return result


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    return peers.socket_dir(tmp_path)


class Running:
    def __init__(self, argv: list[str], log: Path, **popen: object) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=TESTS.parent, **popen
            )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return int(self.proc.wait(WAIT))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return int(self.proc.wait(WAIT))

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    try:
        yield started
    finally:
        for item in started:
            item.stop()


def wait_serving(address: str, proc: Running) -> dict[str, str]:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return hello(address)
        except (FastCGIError, OSError):
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(proc.output()) from None
            time.sleep(0.05)


@pytest.mark.parametrize("app", sorted(APPS))
def test_serves_the_listening_socket_inherited_on_fd_0(
    app: str, sock_dir: Path, tmp_path: Path, running: list[Running]
) -> None:
    """As spawn-fcgi, Apache mod_fcgid and lighttpd's bin-path start an application."""
    path = str(sock_dir / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    try:
        proc = Running(serve_argv(APPS[app]), tmp_path / "serve.log", stdin=listener.fileno())
        running.append(proc)
    finally:
        listener.close()  # the child has its own copy
    assert wait_serving(path, proc)["greeting"] == "hello cli"
    assert proc.stop() == 0


def test_without_bind_or_a_listening_fd_0_it_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        serve_argv(APPS["flask"]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=WAIT,
        cwd=TESTS.parent,
    )
    assert result.returncode == 2
    assert b"fd 0 is not a listening socket" in result.stderr


@pytest.mark.parametrize(
    ("allowed", "served"), [("127.0.0.1, 10.1.2.3", True), ("10.1.2.3", False)]
)
def test_fcgi_web_server_addrs_is_an_allowlist(
    allowed: str, served: bool, tmp_path: Path, running: list[Running]
) -> None:
    address = f"127.0.0.1:{peers.free_port()}"
    env = {**os.environ, "FCGI_WEB_SERVER_ADDRS": allowed}
    proc = Running(serve_argv(APPS["flask"], "--bind", address), tmp_path / "serve.log", env=env)
    running.append(proc)
    deadline = time.monotonic() + WAIT
    while not peers.can_connect(address):
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.output()
        time.sleep(0.05)
    if served:
        assert wait_serving(address, proc)["greeting"] == "hello cli"
    else:
        time.sleep(1.0)  # the app is loaded by now
        with pytest.raises(FastCGIError):
            hello(address)
        assert "not in allowed_peers" in proc.output()


@pytest.mark.parametrize("app", sorted(APPS))
def test_max_requests_recycles_the_worker_and_no_request_fails(
    app: str, sock_dir: Path, tmp_path: Path, running: list[Running]
) -> None:
    path = str(sock_dir / "app.sock")
    proc = Running(
        serve_argv(APPS[app], "--bind", f"unix:{path}", "--max-requests", "3"),
        tmp_path / "serve.log",
    )
    running.append(proc)
    pids = [wait_serving(path, proc)["pid"]]
    for _ in range(8):
        pids.append(wait_serving(path, proc)["pid"])
    assert len(set(pids)) >= 3, pids
    assert proc.proc.pid not in {int(pid) for pid in pids}  # the master serves nothing itself


def test_a_worker_that_dies_is_replaced(
    sock_dir: Path, tmp_path: Path, running: list[Running]
) -> None:
    path = str(sock_dir / "app.sock")
    proc = Running(
        serve_argv(APPS["flask"], "--bind", f"unix:{path}", "--workers", "2"),
        tmp_path / "serve.log",
    )
    running.append(proc)
    victim = int(wait_serving(path, proc)["pid"])
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    while "replacing it" not in proc.output():
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.05)
    seen = {int(wait_serving(path, proc)["pid"]) for _ in range(20)}
    assert victim not in seen
    assert proc.proc.poll() is None


def test_an_app_that_cannot_be_imported_stops_the_master(sock_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        serve_argv("no_such_module:app", "--bind", f"unix:{sock_dir / 'x.sock'}", "--workers", "2"),
        capture_output=True,
        timeout=WAIT,
        cwd=TESTS.parent,
    )
    assert result.returncode != 0
    assert b"could not load no_such_module:app" in result.stderr


def test_a_bad_app_spec_is_a_usage_error(sock_dir: Path) -> None:
    result = subprocess.run(
        serve_argv("python_apps", "--bind", f"unix:{sock_dir / 'x.sock'}"),
        capture_output=True,
        timeout=WAIT,
        cwd=TESTS.parent,
    )
    assert result.returncode == 2
    assert b"MODULE:APP" in result.stderr
