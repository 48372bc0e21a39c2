"""`fcgi serve`'s mistakes that need no server: each a one-line usage error, exit status 2.

tests/test_serve_cli.py runs the command as a process against real sockets;
these run `main()` in this process, for the checks made before anything is
served, and the helpers that look at the app and at fd 0.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fcgiproto_socket._cli import main
from fcgiproto_socket._serve_cli import _Usage, inherited_listener, is_asgi, load_app

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "0", "must be at least 1: '0'"),
        ("--workers", "two", "not a whole number: 'two'"),
        ("--max-requests", "-1", "must not be negative: '-1'"),
        ("--params-timeout", "0", "must be more than 0: '0'"),
        ("--idle-timeout", "soon", "not a number: 'soon'"),
    ],
)
def test_a_bad_number_is_refused_by_name(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "python_apps:flask_app", option, value]) == 2
    err = capsys.readouterr().err
    assert option in err and message in err


def test_threads_are_for_wsgi_apps(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "python_apps:starlette_app", "--interface", "asgi", "--threads", "4"]
    assert main(argv) == 2
    assert "--threads is for WSGI apps" in capsys.readouterr().err


def test_an_app_spec_needs_a_module_and_an_app(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "python_apps:"]) == 2
    assert "MODULE:APP" in capsys.readouterr().err


@pytest.fixture
def app_module(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "cli_error_apps.py").write_text(
        "class Holder:\n"
        "    def wsgi(self, environ, start_response):\n"
        "        return []\n"
        "holder = Holder()\n"
        "not_an_app = 42\n"
        "def make():\n"
        "    return holder.wsgi\n"
        "class Asgi:\n"
        "    async def __call__(self, scope, receive, send):\n"
        "        pass\n"
        "asgi_object = Asgi()\n"
    )
    saved = list(sys.path)
    try:
        yield tmp_path
    finally:
        sys.path[:] = saved
        sys.modules.pop("cli_error_apps", None)


def test_load_app_follows_a_dotted_name_and_calls_a_factory(app_module: Path) -> None:
    app = load_app("cli_error_apps:holder.wsgi", app_dir=str(app_module))
    assert app.__name__ == "wsgi"
    made = load_app("cli_error_apps:make", factory=True, app_dir=str(app_module))
    assert made.__name__ == "wsgi"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cli_error_apps", "must be given as MODULE:APP"),
        (":app", "must be given as MODULE:APP"),
        ("cli_error_apps:holder.missing", "has no attribute 'holder.missing'"),
        ("cli_error_apps:not_an_app", "is not callable"),
    ],
)
def test_load_app_names_what_is_wrong(app_module: Path, spec: str, message: str) -> None:
    with pytest.raises(_Usage, match=message):
        load_app(spec, app_dir=str(app_module))


def test_is_asgi_knows_coroutine_functions_and_objects(app_module: Path) -> None:
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        pass

    def wsgi(environ: Any, start_response: Any) -> list[bytes]:
        return []

    assert is_asgi(asgi)
    assert is_asgi(load_app("cli_error_apps:asgi_object", app_dir=str(app_module)))
    assert not is_asgi(wsgi)
    assert not is_asgi(load_app("cli_error_apps:holder.wsgi", app_dir=str(app_module)))


def on_fd(fd_source: Any) -> Any:
    """inherited_listener() of a descriptor, closed after."""
    fd = fd_source.fileno() if hasattr(fd_source, "fileno") else fd_source
    return inherited_listener(fd)


def test_inherited_listener_takes_only_a_listening_stream_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(tmp_path / "l.sock"))
        listening.listen(1)
        taken = on_fd(listening)
        assert taken is not None
        assert taken.getsockname() == str(tmp_path / "l.sock")
        taken.close()  # a duplicate: the original stays open
        assert listening.fileno() >= 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        assert on_fd(unbound) is None  # not listening
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        datagram.bind(str(tmp_path / "d.sock"))
        assert on_fd(datagram) is None  # not a stream
    with open(tmp_path / "file", "wb") as file:
        assert on_fd(file) is None  # not a socket
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    assert on_fd(read_end) is None  # closed
