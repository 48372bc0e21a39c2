"""The Flask and Starlette apps of tests/python_apps.py behind every web server.

Issue 11's proof list runs through each front: nginx (tests/peers.py), Apache
mod_proxy_fcgi and lighttpd to `fcgi serve` on a Unix socket, HAProxy to `fcgi
serve --multiplex` (HAProxy multiplexes), and Apache mod_fcgid and lighttpd's
bin-path starting `fcgi serve` themselves on the socket they hand over on fd 0
(as Apache's user, from a copy of the app and its packages). What is nginx's
alone (its error log, draining on SIGTERM) is in tests/test_python_apps_nginx.py.

Each front and app is one test that goes through the list (GET with query and
headers, a 10 MiB upload, a 50 MiB download in constant memory, cookies,
redirects, HEAD, a client that leaves mid-response) and reports every step that
failed, so that one web server and app start once for all of them. A graceful
restart with requests in flight is ours to do only where we started the app
(the socket fronts); where the web server spawned it, restarting it is the web
server's business (apachectl graceful, lighttpd's graceful restart).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import peers
import pytest
import webservers as web
from test_python_apps_nginx import APPS, REPO, slow_request

pytestmark = pytest.mark.peer

WAIT = 30.0
MiB = 1 << 20
TESTS = REPO / "tests"
FRONTS = ["nginx", "apache-proxy", "apache-fcgid", "lighttpd-socket", "lighttpd-spawn", "haproxy"]
#: What `fcgi serve` and python_apps.py import beyond the standard library,
#: copied for a web server's user who cannot reach our environment.
APP_PACKAGES = [
    "fcgiproto",
    "fcgiproto_socket",
    "fcgiproto_anyio",
    "anyio",
    "sniffio",
    "idna",
    "typing_extensions",
    "exceptiongroup",
    "flask",
    "werkzeug",
    "jinja2",
    "markupsafe",
    "itsdangerous",
    "click",
    "blinker",
    "starlette",
]
SERVE_OPTIONS = ["--max-body-size", str(64 * MiB)]


def serve_argv(app: str, *options: str) -> list[str]:
    return ["-m", "fcgiproto_socket", "serve", app, *SERVE_OPTIONS, *options]


class Served:
    """`fcgi serve` on a Unix socket the web server's user may connect to."""

    def __init__(self, app: str, base: Path, *options: str) -> None:
        self.socket = str(base / "app.sock")
        argv = serve_argv(app, "--bind", f"unix:{self.socket}", "--app-dir", str(TESTS), *options)
        self.proc = peers.ManagedProcess(
            "fcgi serve", [sys.executable, *argv], output_log=base / "serve.log", cwd=REPO
        )

    def start(self) -> None:
        self.proc.start()
        peers.wait_until_ready(self.proc, [f"unix:{self.socket}"], logs=[])
        web.share_socket(self.socket)

    @property
    def pid(self) -> int:
        assert self.proc.process is not None
        return self.proc.process.pid


@dataclass
class Site:
    """A web server in front of one of the apps, and how to find the app's processes."""

    server: web.WebServer | peers.Nginx
    app_pids: Callable[[], list[int]]
    #: A directory the app (maybe as the web server's user) may write to.
    scratch: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.server.http_address}"


def start_site(
    front: str, app: str, servers: web.WebServers, request: pytest.FixtureRequest
) -> tuple[Site, Served | None]:
    scratch = servers.directory("scratch")
    scratch.chmod(0o777)
    front, one_thread, _ = front.partition(ONE_THREAD)
    software, _, how = front.partition("-")
    if how in ("fcgid", "spawn"):
        dest = servers.directory("app") / "app"
        spawned = web.install_app(
            dest,
            args=serve_argv(
                APPS[app], "--app-dir", str(dest), *(["--threads", "1"] if one_thread else [])
            ),
            files=[TESTS / "python_apps.py"],
            packages=[name for name in APP_PACKAGES if importlib.util.find_spec(name)],
        )
        server = (
            servers.apache_fcgid(spawned) if software == "apache" else servers.lighttpd(app=spawned)
        )
        return Site(server, lambda: _pids_with_argument(str(dest)), scratch), None
    served = Served(
        APPS[app],
        servers.directory("app"),
        *(["--multiplex"] if software == "haproxy" else []),
        *(["--threads", "1"] if one_thread else []),
    )
    served.start()
    address = f"unix:{served.socket}"
    server: web.WebServer | peers.Nginx
    if software == "nginx":
        make_nginx: peers.NginxFactory = request.getfixturevalue("make_nginx")
        server = make_nginx(address)
    elif software == "apache":
        server = servers.apache_proxy(address)
    elif software == "lighttpd":
        server = servers.lighttpd(address)
    else:
        server = servers.haproxy(address)
    return Site(server, lambda: [served.pid], scratch), served


def rss_peak_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _pids_with_argument(argument: str) -> list[int]:
    """The Python processes whose command line has `argument` (the app's copy): the spawned app."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in argv and b"fcgiproto_socket" in argv:
            found.append(int(entry.name))
    return found


# --- the proof list, step by step ---


def get_with_query_and_headers(site: Site, client: httpx.Client) -> None:
    r = client.get("/hello", params={"name": "Zoë & co"}, headers={"X-Test": "yes"})
    assert r.status_code == 200, r.text
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


def upload_10_mib(site: Site, client: httpx.Client) -> None:
    data = os.urandom(10 * MiB)
    r = client.post("/upload", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def download_50_mib_in_constant_memory(site: Site, client: httpx.Client) -> None:
    size = 50 * MiB
    assert client.get("/download", params={"size": MiB}).status_code == 200  # warm up
    pids = site.app_pids()
    assert pids, "no app process found"
    before = {pid: rss_peak_kib(pid) for pid in pids}
    digest = hashlib.sha256()
    got = 0
    with client.stream("GET", "/download", params={"size": size}) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            digest.update(chunk)
            got += len(chunk)
    expected = hashlib.sha256()
    block = bytes(range(256)) * (64 * 1024 // 256)
    for _ in range(size // len(block)):
        expected.update(block)
    assert got == size
    assert digest.hexdigest() == expected.hexdigest()
    # 50 MiB went through; no app process's peak grew by more than a few buffers.
    # (A process the web server started meanwhile is measured from the lowest peak.)
    floor = min(before.values())
    grown = max(rss_peak_kib(pid) - before.get(pid, floor) for pid in site.app_pids())
    assert grown < 16 * 1024, f"the app's peak RSS grew by {grown} KiB"


def cookies_and_redirects(site: Site, client: httpx.Client) -> None:
    r = client.get("/set-cookie")
    assert r.status_code == 200
    assert "flavour=oatmeal" in r.headers["set-cookie"]
    assert client.get("/get-cookie").text == "flavour=oatmeal"
    r = client.get("/redirect")
    assert r.status_code == 302
    assert r.headers["location"].endswith("/hello?name=redirected")
    r = client.get("/redirect", follow_redirects=True)
    assert r.status_code == 200
    assert r.json()["greeting"] == "hello redirected"


def head(site: Site, client: httpx.Client) -> None:
    r = client.head("/download", params={"size": MiB})
    assert r.status_code == 200
    assert r.content == b""
    length = r.headers.get("content-length")
    if isinstance(site.server, web.ApacheProxyFcgi):
        # Apache 2.4.59 and later drop a FastCGI app's Content-Length (CVE-2024-24795).
        assert length in (None, str(MiB))
    else:
        assert length == str(MiB)
    r = client.head("/hello")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.content == b""
    assert client.get("/hello").status_code == 200  # the connection is still good


def client_abort_mid_response_stops_the_app(site: Site, client: httpx.Client) -> None:
    marker = site.scratch / "closed"
    n = 400  # 20 s if it ran to the end
    started = time.monotonic()
    # A client of its own, whose connection goes when it leaves.
    with (
        httpx.Client(base_url=str(client.base_url), timeout=WAIT) as leaving,
        leaving.stream("GET", "/slow", params={"n": n, "marker": str(marker)}) as r,
    ):
        assert r.status_code == 200
        next(r.iter_raw())
    deadline = time.monotonic() + WAIT

    def closed() -> bool:
        # The app creates the file, then writes to it: seen in between, it is empty.
        return marker.exists() and marker.read_text() == "closed"

    while not closed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closed(), "the app's response never ended"
    took = time.monotonic() - started
    assert took < n * 0.05 / 2, f"the app ran on for {took:.1f} s after the client left"
    assert client.get("/hello").status_code == 200


STEPS = [
    get_with_query_and_headers,
    upload_10_mib,
    download_50_mib_in_constant_memory,
    cookies_and_redirects,
    head,
    client_abort_mid_response_stops_the_app,
]


#: A front named with this suffix serves the WSGI app with `--threads 1`.
ONE_THREAD = "+threads=1"


@pytest.mark.parametrize(
    ("front", "app"),
    [(front, app) for front in FRONTS for app in sorted(APPS)]
    # One thread for every connection, behind each web server.
    + [(front + ONE_THREAD, "flask") for front in FRONTS],
)
def test_the_apps_behind_the_web_server(
    front: str, app: str, webservers: web.WebServers, request: pytest.FixtureRequest
) -> None:
    site, served = start_site(front, app, webservers, request)
    failures = []
    try:
        with httpx.Client(base_url=site.base_url, timeout=WAIT) as client:
            for step in STEPS:
                try:
                    step(site, client)
                except Exception:
                    failures.append(f"--- {step.__name__} ---\n{traceback.format_exc()}")
    finally:
        if served is not None:
            served.proc.stop()
    logs = "" if served is None else f"\n=== fcgi serve ===\n{served.proc.read_output()}"
    assert not failures, "\n".join(failures) + logs


# --- graceful restart, where the app is ours to restart ---


#: Every other socket front, each app once and both behind HAProxy (which
#: multiplexes requests, so a draining worker has several on one connection);
#: nginx has both apps in tests/test_python_apps_nginx.py.
RESTARTS = [
    ("apache-proxy", "flask"),
    ("lighttpd-socket", "starlette"),
    ("haproxy", "flask"),
    ("haproxy", "starlette"),
    ("haproxy" + ONE_THREAD, "flask"),  # requests one after another, several on a connection
]


@pytest.mark.parametrize(("front", "app"), RESTARTS)
def test_sighup_restarts_the_workers_without_losing_a_request(
    front: str, app: str, webservers: web.WebServers
) -> None:
    front, one_thread, _ = front.partition(ONE_THREAD)
    software = front.partition("-")[0]
    options = ["--workers", "2", "--graceful-timeout", "20"]
    if software == "haproxy":
        options.append("--multiplex")
    if one_thread:
        options += ["--threads", "1"]
    served = Served(APPS[app], webservers.directory("app"), *options)
    served.start()
    address = f"unix:{served.socket}"
    try:
        if software == "apache":
            server = webservers.apache_proxy(address)
        elif software == "lighttpd":
            server = webservers.lighttpd(address)
        else:
            server = webservers.haproxy(address)
        base = server.base_url
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            old_pids = {client.get("/hello").json()["pid"] for _ in range(6)}
        started = threading.Semaphore(0)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(slow_request, base, 20, started) for _ in range(4)]
            for _ in range(4):
                assert started.acquire(timeout=WAIT)  # all four are running, a second each
            os.kill(served.pid, signal.SIGHUP)
            after = [pool.submit(slow_request, base, 2) for _ in range(4)]
            results = [f.result() for f in in_flight + after]
        assert results == [(200, 20)] * 4 + [(200, 2)] * 4, served.proc.read_output()
        deadline = time.monotonic() + WAIT
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            while True:
                pids = {client.get("/hello").json()["pid"] for _ in range(6)}
                if not pids & old_pids or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert not pids & old_pids, "the old workers still serve"
        assert served.proc.running
    finally:
        served.proc.stop()
