"""Real web servers in front of the project's servers: Apache, lighttpd, HAProxy.

Each front (a web server, how it reaches the application) is started once for
this module, in front of fcgiproto_socket.Server running tests/webapp.py, or,
for the web servers that start the application themselves (mod_fcgid,
lighttpd bin-path), in front of tests/spawned_app.py on the socket they hand
it on fd 0. Every front then answers the same HTTP requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import webapp
import webservers as web

from fcgiproto_socket import Request, Server

pytestmark = pytest.mark.peer

TIMEOUT = 30.0  # generous: every request here ends long before, unless something hangs
TESTS = Path(__file__).resolve().parent
#: Requests HAProxy is sent at once to show that it multiplexes them.
TOGETHER = 4
#: What anyio imports, on some Pythons only (exceptiongroup before 3.11).
ANYIO_DEPENDENCIES = ("sniffio", "idna", "typing_extensions", "exceptiongroup")


class Backend:
    """tests/webapp.py for fcgiproto_socket.Server, plus /together for HAProxy.

    /together waits until TOGETHER requests are in the handler at once, then
    answers with the number of the connection it came on.
    """

    def __init__(self) -> None:
        self.barrier = threading.Barrier(TOGETHER)

    def __call__(self, request: Request) -> Iterable[bytes]:
        path, _ = webapp.path_and_query(request.params)
        if path == "/together":
            # Broken (BrokenBarrierError, a 500) unless all come within the time.
            self.barrier.wait(timeout=10)
            return [b"Content-Type: text/plain\r\n\r\n%d" % request.connection_id]
        return webapp.respond(request.params, request.stdin)


@dataclass
class Front:
    server: web.WebServer
    #: Whether the application is one the web server started.
    spawned: bool

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        host, port = self.server.http_address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()

    def check(self, response: http.client.HTTPResponse, expected: int = 200) -> None:
        assert response.status == expected, self.server.logs()


FRONTS = [
    "apache-proxy-tcp",
    "apache-proxy-unix",
    "apache-fcgid",
    "lighttpd-tcp",
    "lighttpd-unix",
    "lighttpd-spawn",
    "haproxy-tcp",
    "haproxy-unix",
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[web.WebServers]:
    factory = web.WebServers(lambda name: tmp_path_factory.mktemp(name))
    try:
        yield factory
    finally:
        factory.close()


def start_front(kind: str, servers: web.WebServers, stack: contextlib.ExitStack) -> Front:
    software, _, how = kind.partition("-")
    if how in ("fcgid", "spawn"):
        app = web.install_app(
            servers.directory("app") / "app",
            TESTS / "spawned_app.py",
            files=[TESTS / "webapp.py"],
            packages=["fcgiproto"],
        )
        if software == "apache":
            return Front(servers.apache_fcgid(app), spawned=True)
        return Front(servers.lighttpd(app=app), spawned=True)
    if how.endswith("unix"):
        path = str(servers.directory("app") / "app.sock")
        address = f"unix:{path}"
    else:
        address = "127.0.0.1:0"
    # HAProxy multiplexes; the others send one request at a time per connection.
    server = stack.enter_context(Server(Backend(), address, multiplex=software == "haproxy"))
    if how.endswith("unix"):
        web.share_socket(path)
        bound = address
    else:
        bound = f"{server.address.host}:{server.address.port}"
    if software == "apache":
        return Front(servers.apache_proxy(bound), spawned=False)
    if software == "lighttpd":
        return Front(servers.lighttpd(bound), spawned=False)
    return Front(servers.haproxy(bound), spawned=False)


@pytest.fixture(scope="module", params=FRONTS)
def front(request: pytest.FixtureRequest, servers: web.WebServers) -> Iterator[Front]:
    with contextlib.ExitStack() as stack:
        yield start_front(request.param, servers, stack)


@pytest.fixture(autouse=True)
def _web_server_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    # Printed after every test; pytest shows it only for a test that failed.
    yield
    if "front" in request.fixturenames:
        front: Front = request.getfixturevalue("front")
        print(f"=== {front.server.name} on {front.server.base_url} ===\n{front.server.logs()}")


def test_get_with_query_and_headers_reaches_the_app(front: Front) -> None:
    response, body = front.request(
        "GET", "/params?name=value&x=%20y&x=2", headers={"X-Custom": "some value", "Cookie": "a=b"}
    )
    front.check(response)
    assert response.getheader("Content-Type") == "application/json"
    document = json.loads(body)
    params = document["params"]
    assert params["REQUEST_METHOD"] == "GET"
    assert params["QUERY_STRING"] == "name=value&x=%20y&x=2"
    assert params["REQUEST_URI"] == "/params?name=value&x=%20y&x=2"
    assert params["HTTP_X_CUSTOM"] == "some value"
    assert params["HTTP_COOKIE"] == "a=b"
    assert params["HTTP_HOST"] == front.server.http_address
    assert params["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert params["REMOTE_ADDR"] == "127.0.0.1"
    assert params.get("CONTENT_LENGTH", "0") in ("", "0")
    assert document["body_length"] == 0


def test_the_path_arrives_split_into_script_name_and_path_info(front: Front) -> None:
    # How it is split differs (see tests/webservers.py); together they are the decoded path.
    response, body = front.request("GET", "/params/sub%20dir/x?q=1")
    front.check(response)
    params = json.loads(body)["params"]
    assert params["SCRIPT_NAME"] + params.get("PATH_INFO", "") == "/params/sub dir/x"
    assert params["REQUEST_URI"] == "/params/sub%20dir/x?q=1"
    assert params["QUERY_STRING"] == "q=1"


def test_post_body_reaches_the_app_whole(front: Front) -> None:
    body = os.urandom(1024 * 1024 + 7)
    response, answer = front.request(
        "POST", "/echo", body=body, headers={"Content-Type": "application/x-test"}
    )
    front.check(response)
    assert response.getheader("X-Body-Length") == str(len(body))
    assert response.getheader("X-Body-Sha256") == hashlib.sha256(body).hexdigest()
    assert answer == body


def test_post_params_carry_content_type_and_length(front: Front) -> None:
    response, answer = front.request(
        "POST",
        "/params",
        body=b"a=1&b=2",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    front.check(response)
    document = json.loads(answer)
    assert document["params"]["REQUEST_METHOD"] == "POST"
    assert document["params"]["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert document["params"]["CONTENT_LENGTH"] == "7"
    assert document["body_length"] == 7


def test_large_download_arrives_whole(front: Front) -> None:
    size = 16 * 1024 * 1024 + 3
    response, body = front.request("GET", f"/big?n={size}")
    front.check(response)
    assert len(body) == size
    assert body == webapp.big_body(size)


def test_head_has_the_headers_and_no_body(front: Front) -> None:
    response, body = front.request("HEAD", "/big?n=100000")
    front.check(response)
    assert body == b""
    assert response.getheader("Content-Type") == "application/octet-stream"
    length = response.getheader("Content-Length")
    if isinstance(front.server, web.ApacheProxyFcgi):
        # Apache 2.4.59 and later ignore a FastCGI app's Content-Length
        # (CVE-2024-24795) and send GET responses chunked; earlier ones pass it.
        assert length in (None, "100000")
    else:
        assert length == "100000"


def test_unknown_page_is_the_apps_404(front: Front) -> None:
    response, body = front.request("GET", "/nowhere")
    front.check(response, 404)
    assert body == b"no such page\n"


@pytest.mark.parametrize("front", ["apache-fcgid", "lighttpd-spawn"], indirect=True)
def test_spawned_app_runs_as_the_web_servers_user(front: Front) -> None:
    response, body = front.request("GET", "/params")
    front.check(response)
    document = json.loads(body)
    assert document["pid"] != os.getpid()
    user = web.web_user()
    if isinstance(front.server, web.ApacheFcgid) and user is not None:
        # Apache never runs its children, or what they start, as root.
        assert document["uid"] == user.uid
    else:
        assert document["uid"] == os.geteuid()


def test_haproxy_multiplexes_concurrent_requests_on_one_connection(
    webservers: web.WebServers,
) -> None:
    backend = Backend()
    with Server(backend, "127.0.0.1:0", multiplex=True) as server:
        haproxy = webservers.haproxy(
            f"{server.address.host}:{server.address.port}", max_reqs=TOGETHER
        )
        front = Front(haproxy, spawned=False)
        # One request first, so that HAProxy has a connection open when the
        # others come; without it, those that come before it is open each
        # open one of their own.
        response, _ = front.request("GET", "/params")
        front.check(response)
        answers: list[tuple[int, bytes]] = []

        def one() -> None:
            response, body = front.request("GET", "/together")
            answers.append((response.status, body))

        clients = [threading.Thread(target=one) for _ in range(TOGETHER)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(TIMEOUT)
        assert [status for status, _ in answers] == [200] * TOGETHER, haproxy.logs()
        # All were in the handler at once (the barrier let them through), so
        # a connection that carried two of them carried them at the same time.
        per_connection = Counter(body for _, body in answers)
        assert max(per_connection.values()) >= 2, answers


# --- fcgi serve, started by the web server on the socket it hands over on fd 0 ---


@pytest.fixture(scope="module")
def fcgi_serve() -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "fcgiproto_socket", "serve", "--help"],
        capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip("this checkout has no fcgi serve")


#: What fcgi serve imports beyond the standard library, to copy for the web server's user.
SERVE_PACKAGES = {
    "wsgi": ["fcgiproto", "fcgiproto_socket"],
    "asgi": ["fcgiproto", "fcgiproto_socket", "fcgiproto_anyio", "anyio"]
    + [name for name in ANYIO_DEPENDENCIES if importlib.util.find_spec(name) is not None],
}


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.parametrize("software", ["apache", "lighttpd"])
def test_fcgi_serve_started_by_the_web_server(
    fcgi_serve: None, webservers: web.WebServers, software: str, interface: str
) -> None:
    app = web.install_app(
        webservers.directory("app") / "app",
        args=[
            "-m",
            "fcgiproto_socket",
            "serve",
            f"webapp:{interface}_app",
            "--interface",
            interface,
        ],
        files=[TESTS / "webapp.py"],
        packages=SERVE_PACKAGES[interface],
    )
    server = webservers.apache_fcgid(app) if software == "apache" else webservers.lighttpd(app=app)
    front = Front(server, spawned=True)

    response, body = front.request("GET", "/a/b%20c?q=1", headers={"X-Custom": "v"})
    front.check(response)
    report = json.loads(body)
    assert (report["method"], report["path"], report["query"]) == ("GET", "/a/b c", "q=1")
    assert report["x_custom"] == "v"
    user = web.web_user()
    assert report["uid"] == (user.uid if software == "apache" and user else os.geteuid())

    upload = os.urandom(300_000)
    response, body = front.request("POST", "/upload", body=upload)
    front.check(response)
    assert json.loads(body)["body_length"] == len(upload)

    response, body = front.request("HEAD", "/a")
    front.check(response)
    assert body == b""
