"""Fixtures that run real FastCGI peers; the machinery lives in tests/peers.py.

- ``php_fpm`` (session): a PhpFpm with ``unix_path``, ``tcp_address``,
  ``docroot``, ``params()``, ``restart()``, ``stop()``.
- ``go_server`` (session): a GoServer with ``unix_path``, ``tcp_address``,
  ``restart()``, ``stop()``; build its PARAMS with ``peers.go_params()``.
- ``fcgiwrap`` (session): a Fcgiwrap (libfcgi) with ``unix_path`` and ``script()``.
- ``make_nginx`` (function): ``make_nginx(fastcgi_address, *, keep_conn=True,
  docroot=None)`` -> an Nginx with ``http_address``; stopped after the test.
- ``webservers`` (function): a tests/webservers.py WebServers, whose
  ``apache_proxy(address)``, ``apache_fcgid(app)``, ``lighttpd(address)`` or
  ``lighttpd(app=app)``, ``haproxy(address)`` start a web server with a
  ``base_url``; all are stopped after the test, their logs printed (pytest
  shows them when the test failed).

A test that uses any of them is marked ``peer`` automatically, so
``-m "not peer"`` runs the suite without them. A missing binary skips the
test, except with CI=true, where it fails.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
import webservers as web
from hypothesis import settings

# Each xdist worker imports every test module, and pytest rewrites its asserts
# first: without a bytecode cache (PYTHONDONTWRITEBYTECODE=1, as on this
# project's machines) that is about 3 s of CPU per worker and run. The cache
# lives in the checkout's __pycache__ directories, which git ignores.
sys.dont_write_bytecode = False

# Properties are about what happens, not how fast: a machine busy with the
# other test workers (four on two cores) took 256 ms over a 200 ms deadline.
settings.register_profile("fcgiproto", deadline=None)
settings.load_profile("fcgiproto")

PEER_FIXTURES = frozenset({"php_fpm", "go_server", "make_nginx", "webservers", "fcgiwrap"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PEER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.peer)


@pytest.fixture(scope="session")
def php_fpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.PhpFpm]:
    binary = peers.find_php_fpm()
    peers.require_peer("php-fpm", binary is not None)
    assert binary is not None
    server = peers.PhpFpm(binary, tmp_path_factory.mktemp("php-fpm"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def go_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.GoServer]:
    go = peers.find_go()
    peers.require_peer("go", go is not None)
    assert go is not None
    server = peers.GoServer(peers.build_go_server(go), tmp_path_factory.mktemp("goserver"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fcgiwrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Fcgiwrap]:
    binary = peers.find_fcgiwrap()
    peers.require_peer("fcgiwrap", binary is not None)
    assert binary is not None
    server = peers.Fcgiwrap(binary, tmp_path_factory.mktemp("fcgiwrap"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.NginxFactory]:
    binary = peers.find_nginx()
    peers.require_peer("nginx", binary is not None)
    assert binary is not None
    factory = peers.NginxFactory(binary, lambda: tmp_path_factory.mktemp("nginx"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def webservers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[web.WebServers]:
    factory = web.WebServers(lambda name: tmp_path_factory.mktemp(name))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(params=["blocking", "blocking-mux", "anyio", "wsgi-one-thread"])
def kind(request: pytest.FixtureRequest) -> str:
    """A server kind of tests/test_attacks.py's SERVERS."""
    return str(request.param)


@pytest.fixture(params=["unix", "tcp"])
def listen(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a server of `kind` listens: a Unix socket in a temp dir, or loopback TCP."""
    return "127.0.0.1:0" if request.param == "tcp" else str(tmp_path / "app.sock")


@pytest.fixture(autouse=True)
def _peers_running(request: pytest.FixtureRequest) -> None:
    # The session-scoped peers are shared: if an earlier test stopped one
    # (or it died), start it again before the next test that uses it.
    for name in ("php_fpm", "go_server"):
        if name in request.fixturenames:
            request.getfixturevalue(name).ensure_running()
