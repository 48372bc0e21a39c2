"""An application that closes after every response (uWSGI): the client stops keeping connections.

uWSGI in FastCGI mode closes its connection after each response even when
FCGI_KEEP_CONN asked it not to. A client that reuses the connection before
the close arrives loses the request; one whose body is an iterator cannot
send it again. The client notices and asks for no kept connections.
"""

from __future__ import annotations

from collections.abc import Iterator

import peers
import pytest

from fcgiproto_socket import Client

pytestmark = pytest.mark.peer

POSTS = 3000


@pytest.fixture(params=["unix", "tcp"])
def uwsgi(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[peers.Uwsgi]:
    binary = peers.find_uwsgi()
    peers.require_peer("uwsgi", binary is not None)
    assert binary is not None
    server = peers.Uwsgi(binary, tmp_path_factory.mktemp("uwsgi"), tcp=request.param == "tcp")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def params(length: int) -> dict[str, str]:
    return {
        **peers.go_params("/echo", "POST", content_length=length),
        "PATH_INFO": "/echo",
        "SCRIPT_NAME": "",
    }


def test_back_to_back_posts_with_an_iterable_body_never_fail(uwsgi: peers.Uwsgi) -> None:
    failures: list[str] = []
    with Client(uwsgi.address, max_connections=1, multiplex=False, timeout=10) as client:
        assert client.keep_conn
        for n in range(POSTS):
            body = [b"post ", str(n).encode()]
            try:
                with client.stream(params(sum(map(len, body))), iter(body)) as response:
                    got = response.read()
                assert (response.status, got) == (200, b"".join(body))
            except Exception as exc:  # every failure counts, whatever its kind
                failures.append(f"POST {n}: {exc!r}")
        assert not client.keep_conn  # it noticed
    assert failures == []


def test_whole_requests_too(uwsgi: peers.Uwsgi) -> None:
    with Client(uwsgi.address, max_connections=2, multiplex=False, timeout=10) as client:
        for _ in range(300):
            response = client.request(params(3), b"abc")
            assert (response.status, response.body) == (200, b"abc")
        assert not client.keep_conn


def test_an_application_that_keeps_connections_is_still_asked_to(
    php_fpm: peers.PhpFpm,
) -> None:
    # A connection that carried a second request proves it; a later close
    # (a restart, pm.max_requests) changes nothing.
    with Client(php_fpm.unix_path, max_connections=1, multiplex=False, timeout=10) as client:
        for _ in range(3):
            assert client.request(php_fpm.params("hello.php")).body == peers.HELLO_BODY
        php_fpm.restart()
        for _ in range(3):
            assert client.request(php_fpm.params("hello.php")).body == peers.HELLO_BODY
        assert client.keep_conn
        pids = {client.request(php_fpm.params("pid.php")).body for _ in range(5)}
        assert len(pids) == 1  # one connection, kept


def test_max_keepalive_0_asks_for_no_kept_connection(php_fpm: peers.PhpFpm) -> None:
    with Client(php_fpm.unix_path, max_keepalive=0, multiplex=False) as client:
        assert not client.keep_conn
        assert client.request(php_fpm.params("hello.php")).body == peers.HELLO_BODY


def test_iterable_bodies_to_php_fpm_keep_their_connection(php_fpm: peers.PhpFpm) -> None:
    # The first iterable body on a reused connection waits a moment for a
    # close that never comes; the connection is kept from then on.
    with Client(php_fpm.tcp_address, max_connections=1, multiplex=False, timeout=10) as client:
        workers = set()
        for n in range(5):
            body = [b"part one, ", str(n).encode()]
            params = php_fpm.params("echo.php", "POST", content_length=sum(map(len, body)))
            with client.stream(params, iter(body)) as response:
                assert response.read() == b"".join(body)
            workers.add(client.request(php_fpm.params("pid.php")).body)
        assert client.keep_conn
        assert len(workers) == 1  # every request on the one kept connection
