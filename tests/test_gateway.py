"""The PHP gateway end to end: `fcgi php` under uvicorn, php-fpm behind it, httpx in front.

The app is tests/php_app: a front controller (index.php) with routes for
sessions, forms, uploads, downloads and slow scripts, plus files that the
bypass tests aim at (upload.jpg holds PHP code; .env a secret).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_peers import FpmPool, Gateway, copy_app, wait_for
from peers import find_php_fpm, require_peer

from fcgiproto_socket import Client
from fcgiproto_socket._cli import main

pytestmark = pytest.mark.peer


class Site:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = copy_app(base / "www")
        self.state = base / "state"
        self.state.mkdir(exist_ok=True)
        self.env = {"STATE_DIR": str(self.state), "SESSION_DIR": str(self.state)}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("gateway"))


@pytest.fixture(scope="module")
def pool(site: Site) -> Iterator[FpmPool]:
    binary = find_php_fpm()
    require_peer("php-fpm", binary is not None)
    assert binary is not None
    pool = FpmPool(binary, site.base, "main", env=site.env)
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def gateway(site: Site, pool: FpmPool) -> Iterator[Gateway]:
    gw = Gateway(site.base, site.root, [pool.address], "--read-timeout", "2").start()
    yield gw
    gw.stop()


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


def raw_request(port: int, target: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    """Send a request line exactly as given (httpx would normalize it); status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET " + target + b" HTTP/1.0\r\nHost: localhost\r\n"
            + headers + b"\r\n"
        )  # fmt: skip
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def server_vars(http: httpx.Client, **headers: str) -> dict[str, object]:
    response = http.get("/server", headers=headers)
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


# --- the application ---


def test_front_controller_gets_unknown_paths(http: httpx.Client) -> None:
    assert http.get("/").text.startswith("home of main")
    response = http.get("/server", params={"q": "1"})
    assert response.json()["SCRIPT_NAME"] == "/index.php"
    assert response.json()["REQUEST_URI"] == "/server?q=1"
    assert http.get("/no/such/page").status_code == 404  # the app's own 404


def test_script_with_path_info(http: httpx.Client, site: Site) -> None:
    body = http.get("/info.php/a/b").text
    assert body == f"/info.php|/a/b|{site.root}/info.php"


def test_directory_redirects_with_308(http: httpx.Client) -> None:
    response = http.get("/admin?x=1")
    assert response.status_code == 308
    assert response.headers["location"] == "/admin/?x=1"
    assert http.get("/admin/").text == "admin index"


def test_static_file_is_served_not_run(http: httpx.Client) -> None:
    response = http.get("/style.css")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert response.text == "body { color: red; }\n"
    jpg = http.get("/upload.jpg")
    assert jpg.content.startswith(b"<?php")  # the source, never its output


def test_dotfiles_are_refused(http: httpx.Client) -> None:
    response = http.get("/.env")
    assert response.status_code == 404
    assert b"hunter2" not in response.content


def test_cookies_and_sessions(http: httpx.Client) -> None:
    assert http.get("/session").text == "visits=1"
    assert "PHPSESSID" in http.cookies
    assert http.get("/session").text == "visits=2"


def test_form_post(http: httpx.Client) -> None:
    response = http.post("/form", data={"name": "Ann Lee", "age": "33"})
    assert response.text == "hello Ann Lee age 33"


def test_multipart_upload_of_20_mib(http: httpx.Client, gateway: Gateway) -> None:
    data = os.urandom(20 << 20)
    before = gateway.rss_kib()
    samples = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            samples.append(gateway.rss_kib())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = http.post("/upload", files={"file": ("big.bin", data)})
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200, response.text
    assert response.text == f"{len(data)} {hashlib.sha256(data).hexdigest()}"
    # The body streamed through: the gateway never held a good part of it.
    assert (max(samples) - before) / 1024 < 10, (before, max(samples))


def test_chunked_request_body_is_spooled_and_sent_with_its_length(http: httpx.Client) -> None:
    """php-fpm reads CONTENT_LENGTH bytes; a chunked body gets one, as nginx gives it."""
    pieces = [os.urandom(100_000) for _ in range(30)]
    whole = b"".join(pieces)
    response = http.post("/input", content=iter(pieces))  # an iterator: sent chunked
    assert response.status_code == 200, response.text
    assert response.text == f"{len(whole)} {hashlib.sha256(whole).hexdigest()} {len(whole)} -"


def test_chunked_request_body_past_the_limit_is_413(site: Site, pool: FpmPool) -> None:
    gw = Gateway(site.base, site.root, [pool.address], "--max-spooled-body", "1000").start()
    try:
        with httpx.Client(base_url=gw.url) as http:
            response = http.post("/input", content=iter([b"x" * 600, b"y" * 600]))
            assert response.status_code == 413
            assert http.post("/input", content=iter([b"x" * 600])).text.startswith("600 ")
    finally:
        gw.stop()


def test_download_of_100_mib_streams_in_constant_memory(
    http: httpx.Client, gateway: Gateway
) -> None:
    before = gateway.rss_kib()
    highest = before
    received = 0
    with http.stream("GET", "/download", params={"mib": "100"}) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw(1 << 20):
            received += len(chunk)
            highest = max(highest, gateway.rss_kib())
            time.sleep(0.0005)  # a reader slower than php-fpm: the gateway must not buffer
    assert received == 100 << 20
    grown_mib = (highest - before) / 1024
    print(f"gateway RSS {before / 1024:.1f} MiB, at most +{grown_mib:.1f} MiB over 100 MiB")
    assert grown_mib < 30


def test_slow_script_times_out_with_504(http: httpx.Client) -> None:
    started = time.monotonic()
    response = http.get("/slow", params={"s": "10"})
    assert response.status_code == 504  # --read-timeout 2
    assert time.monotonic() - started < 9


def test_slow_script_within_the_timeout(http: httpx.Client) -> None:
    assert http.get("/slow", params={"s": "1"}).text == "slept"


def test_client_that_leaves_stops_the_script(gateway: Gateway, site: Site) -> None:
    tick = site.state / "tick-leave"
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as http,
        http.stream("GET", "/tick", params={"id": "leave"}) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "0"
    # The client left; the script must stop within a tick or two.
    time.sleep(4)
    stopped_at = int(tick.read_text())
    time.sleep(2.5)
    assert int(tick.read_text()) == stopped_at
    assert stopped_at < 5


def test_stderr_is_logged_at_error_level_for_a_5xx(http: httpx.Client, gateway: Gateway) -> None:
    assert http.get("/stderr").status_code == 500
    assert wait_for(lambda: "a warning the gateway must log" in gateway.output())
    line = next(ln for ln in gateway.output().splitlines() if "a warning the gateway" in ln)
    assert line.startswith("ERROR:") and "status 500" in line
    # uvicorn's access log, beside it
    assert '"GET /stderr HTTP/1.1" 500' in gateway.output()


def test_fcgi_php_command_line() -> None:
    assert main(["php", "--help"]) == 0
    assert main(["php", "--root", "/"]) != 0  # --upstream is required


def test_fcgi_php_without_uvicorn_names_the_extra(tmp_path: Path) -> None:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'uvicorn':\n"
        "            raise ModuleNotFoundError('No module named uvicorn', name='uvicorn')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fcgiproto_socket._cli import main\n"
        "sys.exit(main(['php', '--root', '/', '--upstream', 'unix:/nowhere.sock']))\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'fcgiproto-ng[php]'" in done.stderr


def test_env_option_reaches_the_script(site: Site, pool: FpmPool) -> None:
    gw = Gateway(site.base, site.root, [pool.address], "--env", "GREETING=hi there").start()
    try:
        with httpx.Client(base_url=gw.url) as http:
            assert server_vars(http)["GREETING"] == "hi there"
    finally:
        gw.stop()


def _worker_processes(parent: int) -> list[int]:
    """The uvicorn workers of `parent` (multiprocessing's spawned children), from /proc."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            workers.append(int(entry.name))
    return workers


def test_workers_share_the_socket_and_the_options(site: Site, pool: FpmPool) -> None:
    gw = Gateway(
        site.base,
        site.root,
        [pool.address],
        *("--workers", "2", "--max-connections", "2", "--env", "GREETING=from a worker"),
    ).start()
    try:
        assert wait_for(lambda: len(_worker_processes(gw.pid)) == 2)
        # A connection each, so that both workers may take some.
        for _ in range(10):
            with httpx.Client(base_url=gw.url, timeout=30) as http:
                assert server_vars(http)["GREETING"] == "from a worker"
    finally:
        gw.stop()


def test_workers_cannot_exceed_the_connection_cap() -> None:
    # Each worker has connections of its own: fewer than one each would
    # break the cap that keeps php-fpm's workers from being all pinned.
    argv = ["php", "--root", "/", "--upstream", "unix:/nowhere.sock"]
    assert main([*argv, "--workers", "3", "--max-connections", "2"]) != 0


# --- the bypasses, each of which a naive gateway lets through ---


@pytest.mark.parametrize(
    "target",
    [
        b"/info.php/%0a",
        b"/index.php%0a.php",
        b"/a%00.php",
        b"/info.php%0d%0aX:1",
        b"/x%0A/info.php",
    ],
)
def test_cve_2019_11043_and_nul_bytes_are_refused(gateway: Gateway, target: bytes) -> None:
    """A %0a broke nginx's fastcgi_split_path_info and gave RCE in php-fpm; NUL cuts C strings."""
    status, _ = raw_request(gateway.port, target)
    assert status == 400


@pytest.mark.parametrize(
    "target",
    [b"/../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd", b"/admin/../../etc/passwd",
     b"/..%2f..%2fetc%2fpasswd", b"/%2E%2E/info.php"],
)  # fmt: skip
def test_traversal_cannot_leave_the_root(gateway: Gateway, target: bytes) -> None:
    status, body = raw_request(gateway.port, target)
    assert status == 400
    assert b"root:" not in body


def test_upload_jpg_never_runs_as_php(http: httpx.Client, site: Site, pool: FpmPool) -> None:
    """cgi.fix_pathinfo: SCRIPT_FILENAME /upload.jpg/x.php makes php-fpm run upload.jpg."""
    for path in ("/upload.jpg/x.php", "/upload.jpg/x.php/more", "/upload.jpg%2fx.php"):
        response = http.get(path)
        assert b"PWNED" not in response.content, path
    # What a naive gateway (root + path as SCRIPT_FILENAME) gets from this pool:
    naive = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_FILENAME": f"{site.root}/upload.jpg/x.php",
        "SCRIPT_NAME": "/upload.jpg/x.php",
        "REQUEST_URI": "/upload.jpg/x.php",
        "QUERY_STRING": "",
        "REDIRECT_STATUS": "200",
    }
    with Client(pool.address) as client:
        assert b"PWNED" in client.request(naive).body


def test_unicode_case_folding_does_not_move_the_split(http: httpx.Client, site: Site) -> None:
    """Caddy CVE-2026-27590/45135: the split index came from a Unicode-lowered copy."""
    name = "\u212a\u212ax.php"  # KELVIN SIGN lowers to 'k': 3 bytes become 1
    (site.root / name).write_text('<?php echo "kelvin|" . $_SERVER["PATH_INFO"];')
    response = http.get(f"/{name}/upload.jpg")
    assert response.text == "kelvin|/upload.jpg"
    assert b"PWNED" not in response.content


def test_httpoxy_proxy_header_never_becomes_http_proxy(http: httpx.Client) -> None:
    found = server_vars(http, Proxy="http://evil.example:3128")
    assert found["HTTP_PROXY"] is None
    assert found["getenv_HTTP_PROXY"] is False


def test_underscore_headers_cannot_spoof_dash_headers(http: httpx.Client) -> None:
    assert server_vars(http, X_Remote_User="admin")["HTTP_X_REMOTE_USER"] is None
    _, body = raw_request(
        gateway_port(http), b"/server", b"X-Remote-User: bob\r\nX_Remote_User: admin\r\n"
    )
    assert json.loads(body)["HTTP_X_REMOTE_USER"] == "bob"


def gateway_port(http: httpx.Client) -> int:
    port = http.base_url.port
    assert port is not None
    return port


def test_untrusted_client_cannot_set_remote_addr_or_https(http: httpx.Client) -> None:
    found = server_vars(http, **{"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
    assert found["REMOTE_ADDR"] == "127.0.0.1"
    assert found["HTTPS"] is None


def test_trusted_proxy_decides_remote_addr_and_https(site: Site, pool: FpmPool) -> None:
    gw = Gateway(site.base, site.root, [pool.address], "--trusted-proxy", "127.0.0.0/8").start()
    try:
        with httpx.Client(base_url=gw.url) as http:
            found = server_vars(
                http,
                **{"X-Forwarded-For": "1.1.1.1, 6.6.6.6, 127.0.0.2", "X-Forwarded-Proto": "https"},
            )
            # 127.0.0.2 is a trusted hop; 6.6.6.6 is the client; 1.1.1.1 it may have forged.
            assert found["REMOTE_ADDR"] == "6.6.6.6"
            assert found["HTTPS"] == "on"
    finally:
        gw.stop()


def test_symlink_out_of_the_root_is_not_run(http: httpx.Client, site: Site) -> None:
    outside = site.base / "outside.php"
    outside.write_text('<?php echo "OUTSIDE";')
    link = site.root / "linked.php"
    if not link.exists():
        link.symlink_to(outside)
    response = http.get("/linked.php")
    assert b"OUTSIDE" not in response.content


def test_static_refuse_never_sends_files_to_php(site: Site, pool: FpmPool) -> None:
    gw = Gateway(site.base, site.root, [pool.address], "--static", "refuse").start()
    try:
        with httpx.Client(base_url=gw.url) as http:
            assert http.get("/style.css").status_code == 403
            jpg = http.get("/upload.jpg")
            assert jpg.status_code == 403 and b"PWNED" not in jpg.content
            assert http.get("/info.php/x").status_code == 200
    finally:
        gw.stop()


@pytest.mark.parametrize("resolve", [False, True])
def test_resolve_root_symlink(site: Site, pool: FpmPool, resolve: bool) -> None:
    """A deploy that swaps a symlink: with the option, PHP sees the real directory."""
    link = site.base / f"current-{resolve}"
    if not link.exists():
        link.symlink_to(site.root)
    options = ["--resolve-root-symlink"] if resolve else []
    gw = Gateway(site.base, link, [pool.address], *options).start()
    try:
        with httpx.Client(base_url=gw.url) as http:
            found = server_vars(http)
    finally:
        gw.stop()
    expected = site.root.resolve() if resolve else link
    assert found["DOCUMENT_ROOT"] == str(expected)
    assert found["SCRIPT_FILENAME"] == f"{expected}/index.php"
