"""The `fcgi` command, run in-process with main() and once as `python -m fcgiproto_socket`."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
from helpers import no_new_thread_left

from fcgiproto_socket import Request, Server
from fcgiproto_socket._cli import main
from fcgiproto_socket._demo import app as demo_app

WAIT = 5.0


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    with no_new_thread_left():
        yield


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """The demo application on a Unix socket; yields its address."""
    path = str(tmp_path / "demo.sock")
    assert len(path) < 100, path
    with Server(demo_app, path) as server:
        yield str(server.address)


def show(request: Request) -> bytes:
    """Answers with the params and body it got, as JSON."""
    got = {"params": request.params, "stdin": request.stdin.decode("latin-1")}
    return b"Content-Type: application/json\r\n\r\n" + json.dumps(got).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: connecting to it is refused


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text


# --- demo ---


def test_demo_shows_a_request_a_post_stderr_values_and_keep_alive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert 12 <= len(lines) <= 25, out
    for item in (
        "GET /hello?name=FastCGI",
        "200 OK",
        "Content-Type: text/plain",
        "'Hello, FastCGI!\\n'",
        "stderr: 'demo: said hello to FastCGI\\n'",
        "POST /echo",
        "echoed back byte for byte",
        "GET_VALUES",
        "FCGI_MPXS_CONNS=0",
        "one connection, reused",
    ):
        assert item in out, item
    match = re.search(r"Stopped the application and removed (\S+)", out)
    assert match is not None, out
    assert not os.path.exists(match[1])


def test_demo_runs_as_python_m_fcgiproto_socket() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fcgiproto_socket", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "GET_VALUES" in done.stdout and "one connection, reused" in done.stdout
    assert done.stderr == ""


# --- request ---


def test_request_prints_the_body_and_the_application_stderr(
    demo: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["request", demo, "/srv/hello", "--uri", "/hello?name=cli"]) == 0
    out, err = capsysbinary.readouterr()
    assert out == b"Hello, cli!\n"
    assert err == b"demo: said hello to cli\n"


def test_request_include_prints_status_and_headers_first(
    demo: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["request", demo, "/srv/www/nothing.php", "-i"]) == 0
    out, _ = capsysbinary.readouterr()
    head, blank, body = out.partition(b"\n\n")
    assert blank
    assert head.splitlines() == [
        b"Status: 404 Not Found",
        b"Content-Type: text/plain; charset=utf-8",
        b"X-Connection: 1",
    ]
    assert body == b"no page at /nothing.php\n"


def test_request_sends_data_headers_and_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Server(show, str(tmp_path / "show.sock")) as server:
        argv = ["request", str(server.address), "/srv/www/show.php", "-d", "a=1"]
        argv += ["-H", "X-Token: secret", "-H", "Content-Type: text/x", "-p", "APP_ENV=test"]
        assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    params = got["params"]
    assert got["stdin"] == "a=1"
    assert params["REQUEST_METHOD"] == "POST"  # -d without -X
    assert params["CONTENT_LENGTH"] == "3"
    assert params["CONTENT_TYPE"] == "text/x"
    assert params["HTTP_X_TOKEN"] == "secret"
    assert params["APP_ENV"] == "test"
    assert params["SCRIPT_FILENAME"] == "/srv/www/show.php"
    assert params["SCRIPT_NAME"] == params["REQUEST_URI"] == "/show.php"
    assert params["DOCUMENT_ROOT"] == "/srv/www"


def test_request_sends_headers_with_underscores_as_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # build_params drops underscored names by default, as nginx does for
    # headers relayed from clients; on the command line the user typed them.
    with Server(show, str(tmp_path / "show.sock")) as server:
        argv = ["request", str(server.address), "/srv/www/show.php"]
        argv += ["-H", "X_Api_Key: k1", "-H", "X-Trace_Id: t1"]
        assert main(argv) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["HTTP_X_API_KEY"] == "k1"
    assert params["HTTP_X_TRACE_ID"] == "t1"


@pytest.mark.parametrize(
    ("option", "complaint"),
    [
        (["-p", "PATH_INFO=/a\nb"], "extra param PATH_INFO contains CR, LF or NUL"),
        (["-H", "X-A: a\rb"], "control characters"),
    ],
)
def test_request_refuses_line_breaks_in_what_it_sends(
    demo: str, option: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["request", demo, "/srv/x", *option]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err).startswith("fcgi request: ") and complaint in err


def test_request_method_and_uri(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Server(show, "127.0.0.1:0") as server:
        argv = ["request", str(server.address), "/srv/index.php", "-X", "DELETE"]
        assert main([*argv, "--uri", "/items/7?force=1"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["REQUEST_METHOD"] == "DELETE"
    assert params["QUERY_STRING"] == "force=1"
    assert params["REQUEST_URI"] == "/items/7?force=1"
    assert params["CONTENT_LENGTH"] == ""


def test_request_body_from_a_file_comes_back_byte_exact(
    demo: str, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    data = bytes(range(256)) * 1000
    source = tmp_path / "body.bin"
    source.write_bytes(data)
    assert main(["request", demo, "/srv/echo", "-X", "PUT", "-d", f"@{source}"]) == 0
    out, err = capsysbinary.readouterr()
    assert out == data
    assert err == b""


@pytest.mark.parametrize(
    ("argv", "status", "complaint"),
    [
        (["/srv/x", "-H", "no colon"], 2, 'a header is "Name: value"'),
        (["/srv/x", "-p", "NOEQUALS"], 2, "a param is NAME=VALUE"),
        (["/srv/x", "-d", "@/no/such/file"], 2, "cannot read /no/such/file"),
        (["/srv/x", "-X", "BAD METHOD"], 2, "method is not an HTTP token"),
        (["/srv/x", "--uri", "relative"], 2, "--uri must start with /"),
    ],
)
def test_request_usage_errors_are_one_line(
    demo: str,
    argv: list[str],
    status: int,
    complaint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["request", demo, *argv]) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err).startswith("fcgi request: ") and complaint in err


def test_request_to_a_bad_address_or_nobody(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["request", "no-port-here", "/srv/x"]) == 2
    assert "is not host:port" in one_line(capsys.readouterr().err)
    assert main(["request", f"127.0.0.1:{free_port()}", "/srv/x"]) == 3
    assert "refused" in one_line(capsys.readouterr().err)


def test_request_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = threading.Event()

    def stuck(request: Request) -> bytes:
        release.wait(WAIT)
        return b"Content-Type: text/plain\r\n\r\nlate"

    with Server(stuck, str(tmp_path / "stuck.sock")) as server:
        try:
            started = time.monotonic()
            assert main(["request", str(server.address), "/x", "--timeout", "0.3"]) == 4
            assert time.monotonic() - started < 2
        finally:
            release.set()
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err).startswith("fcgi request: timed out")


# --- values ---


def test_values_prints_name_value_lines(demo: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["values", demo]) == 0
    assert capsys.readouterr().out == "FCGI_MAX_CONNS=100\nFCGI_MAX_REQS=100\nFCGI_MPXS_CONNS=0\n"
    assert main(["values", demo, "FCGI_MPXS_CONNS"]) == 0
    assert capsys.readouterr().out == "FCGI_MPXS_CONNS=0\n"


def test_values_from_nobody(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["values", f"127.0.0.1:{free_port()}"]) == 3
    assert one_line(capsys.readouterr().err).startswith("fcgi values: cannot connect")


# --- ping ---


def test_ping_healthy(demo: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", demo]) == 0
    assert main(["ping", demo, "--expect", "pong", "--timeout", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("200 OK for /ping") == 2


def test_ping_sends_what_cgi_fcgi_health_checks_send(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[dict[str, str]] = []

    def remember(request: Request) -> bytes:
        seen.append(request.params)
        return b"Content-Type: text/plain\r\n\r\npong"

    with Server(remember, str(tmp_path / "ping.sock")) as server:
        assert main(["ping", str(server.address), "--path", "/fpm-ping", "--expect", "pong"]) == 0
    assert seen == [
        {
            "SCRIPT_NAME": "/fpm-ping",
            "SCRIPT_FILENAME": "/fpm-ping",
            "REQUEST_METHOD": "GET",
            "REQUEST_URI": "/fpm-ping",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
    ]
    assert "200 OK for /fpm-ping" in one_line(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("argv", "status", "complaint"),
    [
        (["--path", "/nope"], 1, "answered 404 Not Found for /nope"),
        (["--expect", "healthy"], 1, "lacks 'healthy'"),
        (["--path", "/fail"], 1, "answered 500 Internal Server Error"),
        (["--path", "nope"], 2, "--path must start with /"),
    ],
)
def test_ping_unhealthy_answers(
    demo: str,
    argv: list[str],
    status: int,
    complaint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["ping", demo, *argv]) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err).startswith("fcgi ping: ") and complaint in err


def test_ping_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", f"127.0.0.1:{free_port()}"]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert "Connection refused" in one_line(err)


def test_ping_no_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", str(tmp_path / "gone.sock")]) == 3
    assert "No such file" in one_line(capsys.readouterr().err)


def test_ping_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = threading.Event()

    def stuck(request: Request) -> bytes:
        release.wait(WAIT)
        return b"Content-Type: text/plain\r\n\r\npong"

    with Server(stuck, str(tmp_path / "stuck.sock")) as server:
        try:
            started = time.monotonic()
            assert main(["ping", str(server.address), "--timeout", "0.3"]) == 4
            assert time.monotonic() - started < 2
        finally:
            release.set()
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err).startswith("fcgi ping: timed out")


def test_ping_an_http_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        http.listen()

        def answer() -> None:
            conn, _ = http.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        status = main(["ping", f"127.0.0.1:{http.getsockname()[1]}"])
        thread.join(WAIT)
    assert status == 1
    assert "HTTP" in one_line(capsys.readouterr().err)


# --- help and usage ---


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["request"], ["values"], ["ping"], ["status"], ["exporter"]]
)
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fcgi")
    if command not in (["demo"], ["exporter"]):
        assert "exit status" in out and "3  could not connect" in out
        assert "4  timed out" in out and "7  status: more processes active" in out
    if command == ["exporter"]:
        assert "fcgiproto-ng[exporter]" in out and "2  usage error" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: fcgi" in capsys.readouterr().err
    assert main(["ping"]) == 2
    assert "required: ADDRESS" in capsys.readouterr().err
    assert main(["ping", "x:1", "--timeout", "-1"]) == 2
    assert "must be more than 0" in capsys.readouterr().err
    assert main(["nonsense"]) == 2


# --- against php-fpm ---


def test_ping_php_fpm(php_fpm: peers.PhpFpm, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", php_fpm.unix_path, "--expect", "pong"]) == 0
    assert main(["ping", php_fpm.tcp_address, "--expect", "pong"]) == 0
    assert capsys.readouterr().out.count("200 OK for /ping") == 2
    assert main(["ping", php_fpm.unix_path, "--path", "/no-such-page"]) == 1
    assert "answered 404" in one_line(capsys.readouterr().err)


def test_request_and_values_against_php_fpm(
    php_fpm: peers.PhpFpm, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["request", php_fpm.unix_path, php_fpm.script("hello.php")]) == 0
    assert capsysbinary.readouterr() == (peers.HELLO_BODY, b"")
    assert main(["request", php_fpm.tcp_address, php_fpm.script("stderr.php")]) == 0
    out, err = capsysbinary.readouterr()
    assert (out, b"to stderr" in err) == (b"to stdout", True)
    data = bytes(range(256)) * 64
    (php_fpm.tmp_dir / "body.bin").write_bytes(data)
    argv = ["request", php_fpm.unix_path, php_fpm.script("echo.php")]
    assert main([*argv, "-d", f"@{php_fpm.tmp_dir / 'body.bin'}"]) == 0
    assert capsysbinary.readouterr().out == data
    assert main(["values", php_fpm.unix_path]) == 0
    assert capsysbinary.readouterr().out == b"FCGI_MPXS_CONNS=0\n"


# --- against Go's net/http/fcgi ---


def test_request_values_and_ping_against_go(
    go_server: peers.GoServer, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["request", go_server.unix_path, "/srv/hello", "--uri", "/hello"]) == 0
    assert capsysbinary.readouterr().out == peers.HELLO_BODY
    argv = ["request", go_server.tcp_address, "/srv/echo", "--uri", "/echo", "-X", "POST"]
    assert main([*argv, "-d", "posted to Go"]) == 0
    assert capsysbinary.readouterr().out == b"posted to Go"
    assert main(["values", go_server.tcp_address]) == 0
    assert capsysbinary.readouterr().out == b"FCGI_MPXS_CONNS=1\n"
    assert main(["ping", go_server.unix_path, "--path", "/hello", "--expect", "Hello"]) == 0
    assert main(["ping", go_server.unix_path, "--path", "/hello", "--expect", "nothing"]) == 1


# --- against libfcgi (fcgiwrap) ---


def test_values_and_request_against_libfcgi(
    fcgiwrap: peers.Fcgiwrap, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    # The three standard names make a 48-byte question: libfcgi answers it
    # only because the client pads it.
    started = time.monotonic()
    assert main(["values", fcgiwrap.unix_path, "--timeout", "3"]) == 0
    assert time.monotonic() - started < 3
    assert capsysbinary.readouterr().out == (
        b"FCGI_MAX_CONNS=1\nFCGI_MAX_REQS=1\nFCGI_MPXS_CONNS=0\n"
    )
    assert main(["request", fcgiwrap.unix_path, fcgiwrap.script("hello.sh")]) == 0
    assert capsysbinary.readouterr().out == peers.HELLO_BODY


# --- the fixes of the operators' kit ---


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from fcgiproto._version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fcgi (fcgiproto-ng) {__version__}\n"


def test_tcp_and_unix_urls_are_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Server(demo_app, "127.0.0.1:0") as server:
        assert main(["ping", f"tcp://{server.address}", "--expect", "pong"]) == 0
    with Server(demo_app, str(tmp_path / "d.sock")) as server:
        assert main(["ping", f"unix://{tmp_path / 'd.sock'}", "--expect", "pong"]) == 0
    assert capsys.readouterr().out.count("200 OK for /ping") == 2
    for wrong in ("http://127.0.0.1:9000", "tcp://127.0.0.1:9000/status", "tcp://"):
        assert main(["ping", wrong]) == 2
        assert "use host:port, tcp://host:port" in capsys.readouterr().err


def test_data_is_sent_as_a_form_as_curl_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Server(show, str(tmp_path / "show.sock")) as server:
        assert main(["request", str(server.address), "/srv/www/show.php", "-d", "a=1&b=2"]) == 0
        params = json.loads(capsys.readouterr().out)["params"]
        assert params["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
        assert params["CONTENT_LENGTH"] == "7"
        argv = ["request", str(server.address), "/srv/www/show.php", "-d", "{}"]
        assert main([*argv, "-H", "content-type: application/json"]) == 0
        assert json.loads(capsys.readouterr().out)["params"]["CONTENT_TYPE"] == "application/json"
        assert main(["request", str(server.address), "/srv/www/show.php"]) == 0
        assert json.loads(capsys.readouterr().out)["params"]["CONTENT_TYPE"] == ""


def test_fail_exits_1_on_http_errors_without_the_body(
    demo: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["request", demo, "/srv/www/nothing.php"]) == 0
    assert capsysbinary.readouterr().out == b"no page at /nothing.php\n"
    assert main(["request", demo, "/srv/www/nothing.php", "--fail"]) == 1
    out, err = capsysbinary.readouterr()
    assert out == b""
    assert b"answered 404 Not Found for /srv/www/nothing.php" in err and err.count(b"\n") == 1
    assert main(["request", demo, "/srv/hello", "--uri", "/hello?name=f", "-f"]) == 0
    assert capsysbinary.readouterr().out == b"Hello, f!\n"


def test_values_says_which_names_went_unanswered(
    demo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["values", demo, "FCGI_MPXS_CONNS", "NO_SUCH_NAME", "OTHER"]) == 1
    out, err = capsys.readouterr()
    assert out == "FCGI_MPXS_CONNS=0\n"
    assert one_line(err).startswith("fcgi values: ") and "did not answer NO_SUCH_NAME OTHER" in err


def test_one_shot_commands_use_one_connection_and_no_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server numbers connections as it accepts them: a GET_VALUES probe
    # on a connection of its own would leave gaps.
    seen: list[int] = []

    def number(request: Request) -> bytes:
        seen.append(request.connection_id)
        return b"Content-Type: text/plain\r\n\r\npong"

    path = str(tmp_path / "count.sock")
    with Server(number, path):
        assert main(["ping", path]) == 0
        assert main(["values", path]) == 0  # connection 2 carries GET_VALUES alone
        assert main(["request", path, "/srv/x", "-d", "a=1"]) == 0
        assert main(["ping", path]) == 0
    assert seen == [1, 3, 4]
    capsys.readouterr()


def test_ping_asks_again_once_after_a_503(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = [b"Status: 503 Service Unavailable\r\n\r\nbusy", b"Status: 200 OK\r\n\r\npong"]
    seen: list[str] = []

    def busy_once(request: Request) -> bytes:
        seen.append(request.params["SCRIPT_NAME"])
        return answers.pop(0) if answers else b"Status: 503 Service Unavailable\r\n\r\nbusy"

    with Server(busy_once, str(tmp_path / "busy.sock")) as server:
        assert main(["ping", str(server.address), "--expect", "pong"]) == 0
        assert len(seen) == 2
        assert main(["ping", str(server.address)]) == 1  # 503 twice: unhealthy
        assert len(seen) == 4
    out, err = capsys.readouterr()
    assert "200 OK for /ping" in out
    assert "answered 503 Service Unavailable" in one_line(err)


def test_ping_imports_the_client_and_not_the_server(demo: str) -> None:
    code = (
        "import sys\n"
        "from fcgiproto_socket._cli import main\n"
        f"assert main(['ping', {demo!r}]) == 0\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('fcgiproto'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(done.stdout.split("\n")[-2].split())
    assert "fcgiproto_socket._client" in loaded
    for heavy in (
        "fcgiproto_socket._server",
        "fcgiproto_socket._demo",
        "fcgiproto.support._application",
    ):
        assert heavy not in loaded, heavy


def test_data_fills_php_post_and_fail_sees_php_errors(
    php_fpm: peers.PhpFpm, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    argv = ["request", php_fpm.unix_path, php_fpm.script("post.php"), "-d", "a=1&b=two"]
    assert main(argv) == 0
    assert json.loads(capsysbinary.readouterr().out) == {"a": "1", "b": "two"}
    status = ["request", php_fpm.tcp_address, php_fpm.script("status.php"), "--uri"]
    assert main([*status, "/status.php?code=500", "--fail"]) == 1
    assert b"answered 500 Internal Server Error" in capsysbinary.readouterr().err
    assert main([*status, "/status.php?code=500"]) == 0
    assert capsysbinary.readouterr().out == b"status 500"


def test_exporter_names_its_extra_when_prometheus_client_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    assert main(["exporter", "--listen", "127.0.0.1:0", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert one_line(err).startswith("fcgi exporter: ")
    assert "pip install 'fcgiproto-ng[exporter]'" in err


# --- how the command ends ---


def test_a_closed_stdout_ends_the_command_quietly(demo: str, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 4_000_000)
    argv = [sys.executable, "-m", "fcgiproto_socket", "request", demo, "/srv/echo"]
    with subprocess.Popen(
        [*argv, "-d", f"@{tmp_path / 'big'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as reader:
        assert reader.stdout is not None and reader.stderr is not None
        assert reader.stdout.read(1) == b"x"
        reader.stdout.close()  # `| head -c 1`
        assert reader.wait(60) == 1
        assert reader.stderr.read() == b""


def test_ctrl_c_exits_130_and_a_bug_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcgiproto_socket import _cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    def broken(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(_cli, "_ping_command", interrupted)
    assert main(["ping", "127.0.0.1:9"]) == 130
    monkeypatch.setattr(_cli, "_ping_command", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["ping", "127.0.0.1:9"])


def test_data_from_stdin_and_a_timeout_that_is_no_number(
    demo: str, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    class Stdin:
        buffer = io.BytesIO(b"from stdin")

    monkeypatch.setattr(sys, "stdin", Stdin)
    assert main(["request", demo, "/srv/echo", "-d", "@-"]) == 0
    assert capsysbinary.readouterr().out == b"from stdin"
    assert main(["ping", demo, "--timeout", "soon"]) == 2
    assert b"not a number: 'soon'" in capsysbinary.readouterr().err


def test_demo_serve_until_sigterm(tmp_path: Path) -> None:
    path = str(tmp_path / "served.sock")
    with subprocess.Popen(
        [sys.executable, "-m", "fcgiproto_socket", "demo", "--serve", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as served:
        assert served.stdout is not None and served.stderr is not None
        assert served.stdout.readline().startswith("Serving the example application on unix:")
        assert main(["ping", path, "--expect", "pong"]) == 0
        served.send_signal(signal.SIGTERM)
        assert served.wait(30) == 0
        assert served.stdout.read() == "Stopped.\n"
    assert main(["demo", "--serve", "no-port"]) == 2
