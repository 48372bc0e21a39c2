"""The peer fixtures are up and speak FastCGI.

Deliberately independent of fcgiproto: a FastCGI client of a few lines, written
here with struct, so that a bug in the library cannot hide a broken fixture
(and the other way round).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import peers
import pytest

FCGI_VERSION = 1
BEGIN_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR = 1, 3, 4, 5, 6, 7
RESPONDER = 1
HEADER = struct.Struct(">BBHHBx")
# Keep every record's content well under 65535: php-fpm resets the connection
# on content + padding > 65535.
MAX_CONTENT = 32768


@dataclass
class RawResponse:
    stdout: bytes
    stderr: bytes
    app_status: int
    protocol_status: int

    @property
    def head_and_body(self) -> tuple[dict[str, str], bytes]:
        """The CGI response in stdout: headers (last value wins) and body."""
        head, _, body = self.stdout.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return headers, body


def record(record_type: int, content: bytes, request_id: int = 1) -> bytes:
    return HEADER.pack(FCGI_VERSION, record_type, request_id, len(content), 0) + content


def stream(record_type: int, data: bytes) -> bytes:
    """``data`` as records of ``record_type``, then the empty one that ends the stream."""
    chunks = [data[i : i + MAX_CONTENT] for i in range(0, len(data), MAX_CONTENT)]
    return b"".join(record(record_type, chunk) for chunk in [*chunks, b""])


def encode_length(n: int) -> bytes:
    return bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)


def encode_params(params: Mapping[str, str]) -> bytes:
    out = b""
    for name, value in params.items():
        key, val = name.encode(), value.encode()
        out += encode_length(len(key)) + encode_length(len(val)) + key + val
    return out


def fcgi_request(address: str, params: Mapping[str, str], stdin: bytes = b"") -> RawResponse:
    """One responder request with keep_conn=0, read until END_REQUEST."""
    begin = struct.pack(">HB5x", RESPONDER, 0)
    payload = encode_params(params)
    # All pairs in one PARAMS record (small here) so no pair is ever split.
    assert len(payload) <= MAX_CONTENT
    wire = record(BEGIN_REQUEST, begin) + record(PARAMS, payload) + record(PARAMS, b"")
    wire += stream(STDIN, stdin)
    stdout, stderr = bytearray(), bytearray()
    with peers.open_connection(address, timeout=30.0) as sock:
        sock.sendall(wire)
        buffer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before END_REQUEST; stdout={stdout!r}")
            buffer += chunk
            while len(buffer) >= HEADER.size:
                version, rtype, rid, length, padding = HEADER.unpack_from(buffer)
                end = HEADER.size + length + padding
                if len(buffer) < end:
                    break
                content = buffer[HEADER.size : HEADER.size + length]
                buffer = buffer[end:]
                assert (version, rid) == (FCGI_VERSION, 1)
                if rtype == STDOUT:
                    stdout += content
                elif rtype == STDERR:
                    stderr += content
                elif rtype == END_REQUEST:
                    app_status, protocol_status = struct.unpack(">IB3x", content)
                    return RawResponse(bytes(stdout), bytes(stderr), app_status, protocol_status)
                else:
                    raise AssertionError(f"unexpected record type {rtype}")


def php_addresses(php_fpm: peers.PhpFpm) -> list[str]:
    return [php_fpm.unix_path, php_fpm.tcp_address]


@pytest.fixture(params=["unix", "tcp"])
def php_address(request: pytest.FixtureRequest, php_fpm: peers.PhpFpm) -> str:
    return php_fpm.unix_path if request.param == "unix" else php_fpm.tcp_address


@pytest.fixture(params=["unix", "tcp"])
def go_address(request: pytest.FixtureRequest, go_server: peers.GoServer) -> str:
    return go_server.unix_path if request.param == "unix" else go_server.tcp_address


def test_php_hello(php_fpm: peers.PhpFpm, php_address: str) -> None:
    response = fcgi_request(php_address, php_fpm.params("hello.php"))
    headers, body = response.head_and_body
    assert body == peers.HELLO_BODY
    assert headers["content-type"].startswith("text/plain")
    assert response.protocol_status == 0


def test_php_echo_100k(php_fpm: peers.PhpFpm, php_address: str) -> None:
    data = os.urandom(100 * 1024)
    params = php_fpm.params("echo.php", "POST", content_length=len(data))
    headers, body = fcgi_request(php_address, params, data).head_and_body
    assert body == data
    assert headers["x-body-length"] == str(len(data))
    assert headers["x-body-md5"] == hashlib.md5(data).hexdigest()


def test_php_ping(php_fpm: peers.PhpFpm, php_address: str) -> None:
    _, body = fcgi_request(php_address, php_fpm.params("/ping")).head_and_body
    assert body == b"pong"


def test_php_big(php_fpm: peers.PhpFpm) -> None:
    n = 200_003
    _, body = fcgi_request(
        php_fpm.unix_path, php_fpm.params("big.php", query=f"n={n}")
    ).head_and_body
    assert body == peers.big_body(n)


def test_php_stderr(php_fpm: peers.PhpFpm) -> None:
    response = fcgi_request(php_fpm.unix_path, php_fpm.params("stderr.php"))
    assert response.head_and_body[1] == b"to stdout"
    assert b"to stderr" in response.stderr


def test_php_exit_status(php_fpm: peers.PhpFpm) -> None:
    # php-fpm always reports app_status 0: exit()'s code does not reach END_REQUEST.
    response = fcgi_request(php_fpm.unix_path, php_fpm.params("exit.php"))
    assert response.head_and_body[1] == b"exiting"
    assert (response.app_status, response.protocol_status) == (0, 0)


def test_php_cookies_and_location(php_fpm: peers.PhpFpm) -> None:
    response = fcgi_request(php_fpm.unix_path, php_fpm.params("cookies.php"))
    head = response.stdout.partition(b"\r\n\r\n")[0].decode()
    assert head.count("Set-Cookie:") == 2
    assert "Location: /elsewhere" in head
    assert "Status: 302" in head


def test_php_workers(php_fpm: peers.PhpFpm) -> None:
    pid = fcgi_request(php_fpm.unix_path, php_fpm.params("pid.php")).head_and_body[1]
    assert pid.isdigit()


def test_php_stop_then_ensure_running(php_fpm: peers.PhpFpm) -> None:
    # What the autouse fixture in conftest does for the next test after a stop().
    php_fpm.stop()
    assert not php_fpm.running
    assert not peers.can_connect(php_fpm.tcp_address)
    php_fpm.ensure_running()
    response = fcgi_request(php_fpm.tcp_address, php_fpm.params("hello.php"))
    assert response.head_and_body[1] == peers.HELLO_BODY


def test_php_restart(php_fpm: peers.PhpFpm) -> None:
    php_fpm.restart()
    for address in php_addresses(php_fpm):
        assert fcgi_request(address, php_fpm.params("hello.php")).head_and_body[1] == (
            peers.HELLO_BODY
        )


def test_go_hello(go_server: peers.GoServer, go_address: str) -> None:
    headers, body = fcgi_request(go_address, peers.go_params("/hello")).head_and_body
    assert body == peers.HELLO_BODY
    assert headers["content-type"].startswith("text/plain")


def test_go_echo(go_server: peers.GoServer, go_address: str) -> None:
    data = os.urandom(100 * 1024)
    params = peers.go_params("/echo", "POST", content_length=len(data))
    headers, body = fcgi_request(go_address, params, data).head_and_body
    assert body == data
    assert headers["x-body-md5"] == hashlib.md5(data).hexdigest()


def test_go_big(go_server: peers.GoServer) -> None:
    n = 200_003
    params = peers.go_params("/big", query=f"n={n}")
    assert fcgi_request(go_server.tcp_address, params).head_and_body[1] == peers.big_body(n)


def test_go_needs_server_protocol(go_server: peers.GoServer) -> None:
    # Documents go_params(): without SERVER_PROTOCOL Go answers 500 and says why on stderr.
    params = peers.go_params("/hello")
    del params["SERVER_PROTOCOL"]
    response = fcgi_request(go_server.unix_path, params)
    assert response.head_and_body[0]["status"].startswith("500")
    assert b"SERVER_PROTOCOL" in response.stderr


@pytest.mark.parametrize("keep_conn", [True, False])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nginx_in_front_of_php(
    php_fpm: peers.PhpFpm,
    make_nginx: peers.NginxFactory,
    keep_conn: bool,
    transport: str,
) -> None:
    address = php_fpm.unix_path if transport == "unix" else php_fpm.tcp_address
    if transport == "unix":
        address = "unix:" + address
    nginx = make_nginx(address, keep_conn=keep_conn, docroot=php_fpm.docroot)
    host, port = nginx.http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for _ in range(3):  # several requests, so a kept connection is reused
            connection.request("GET", "/hello.php")
            response = connection.getresponse()
            assert response.status == 200
            assert response.read() == peers.HELLO_BODY
    finally:
        connection.close()


def test_nginx_in_front_of_go(go_server: peers.GoServer, make_nginx: peers.NginxFactory) -> None:
    nginx = make_nginx(go_server.tcp_address)
    host, port = nginx.http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/hello")
        response = connection.getresponse()
        assert response.status == 200
        assert response.read() == peers.HELLO_BODY
    finally:
        connection.close()


@pytest.mark.parametrize("ci", ["true", ""])
def test_require_peer(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    peers.require_peer("present", True)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="absent is not installed"):
        peers.require_peer("absent", False)
