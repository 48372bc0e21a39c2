"""Real FastCGI peers for the tests: php-fpm, a Go net/http/fcgi server, nginx.

Plain classes and functions; tests/conftest.py turns them into fixtures. Each
peer runs as a child process with its configuration, logs, pid file, sockets
and temporary files in a directory of its own, listens on loopback or on a
Unix socket only, and is stopped (SIGTERM, a bounded wait, then SIGKILL) by
its fixture's teardown, or at interpreter exit if a teardown never ran.

What each peer needs in PARAMS:

- php-fpm: SCRIPT_FILENAME (an absolute path under ``PhpFpm.docroot``) and
  REQUEST_METHOD; QUERY_STRING for ``$_GET``; CONTENT_LENGTH for the body to be
  read at all (php://input is empty without it); SCRIPT_NAME=/ping for the ping
  page. ``PhpFpm.params()`` builds a complete set.
- Go: REQUEST_METHOD, SERVER_PROTOCOL and REQUEST_URI (or SCRIPT_NAME +
  PATH_INFO + QUERY_STRING); CONTENT_LENGTH, when present, must be a number.
  ``go_params()`` builds a complete set.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pytest

#: How long a peer may take to accept connections before its start counts as failed.
START_TIMEOUT = 20.0
#: How long a peer may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0

#: The body of php-fpm's hello.php and of the Go server's /hello.
HELLO_BODY = b"Hello, World!"
#: The pattern that big.php and the Go server's /big repeat; see big_body().
BIG_PATTERN = b"0123456789abcdef"

#: Where the Go server binary and Go's build cache live between runs (gitignored).
PEER_CACHE = Path(__file__).resolve().parent / ".peer-cache"
GO_SOURCE = Path(__file__).resolve().parent / "goserver" / "main.go"

# AF_UNIX paths are limited to 108 bytes on Linux (104 elsewhere); leave room
# for the file name.
_MAX_SOCKET_DIR = 80


class PeerError(RuntimeError):
    """A peer could not be built, could not start, or died."""


def ci_requires_peers() -> bool:
    """True in CI, where every peer is installed and must run."""
    return os.environ.get("CI", "").lower() == "true"


def require_peer(name: str, found: bool) -> None:
    """Skip the test when peer ``name`` is missing, except in CI, where fail it.

    On a developer's machine a missing php-fpm should not make the suite red,
    but in CI a missing peer would silently skip the tests that matter most.
    """
    if found:
        return
    message = f"{name} is not installed"
    if ci_requires_peers():
        pytest.fail(f"{message}, and CI=true requires every FastCGI peer", pytrace=False)
    pytest.skip(message)


def find_binary(names: Sequence[str], extra_dirs: Sequence[str] = ()) -> str | None:
    """The first of ``names`` found in PATH, or else in ``extra_dirs``."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    # /usr/sbin is often missing from a non-root user's PATH, yet that is
    # where Debian puts php-fpm and nginx.
    for directory in extra_dirs:
        for name in names:
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def find_php_fpm() -> str | None:
    return find_binary(["php-fpm8.2", "php-fpm"], ["/usr/sbin", "/usr/local/sbin"])


def find_nginx() -> str | None:
    return find_binary(["nginx"], ["/usr/sbin", "/usr/local/sbin"])


def find_go() -> str | None:
    return find_binary(["go"], ["/usr/lib/go/bin", "/usr/local/go/bin"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Binding port 0 and closing leaves a small race with other programs, which
    is acceptable on a test machine; SO_REUSEADDR is not set here, so the port
    is not in TIME_WAIT afterwards.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def socket_dir(preferred: Path) -> Path:
    """A directory for Unix sockets: ``preferred`` unless its path is too long.

    pytest's temporary directories sit under $TMPDIR, which can be deep enough
    to push a socket path past the AF_UNIX limit; then use a short directory
    under /tmp, removed at exit.
    """
    if len(str(preferred)) <= _MAX_SOCKET_DIR:
        return preferred
    short = Path(tempfile.mkdtemp(prefix="fcgi-", dir="/tmp"))
    atexit.register(shutil.rmtree, short, ignore_errors=True)
    return short


def parse_address(address: str) -> tuple[int, str | tuple[str, int]]:
    """(family, sockaddr) for "host:port", "[::1]:port", "unix:/path" or "/path"."""
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:") :]
    if address.startswith("/"):
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not an address: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


def open_connection(address: str, timeout: float = 10.0) -> socket.socket:
    """A connected socket to ``address`` (see parse_address for the forms)."""
    family, sockaddr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def can_connect(address: str) -> bool:
    try:
        open_connection(address, timeout=1.0).close()
    except OSError:
        return False
    return True


def big_body(n: int) -> bytes:
    """The n bytes that big.php?n=N and the Go server's /big?n=N answer with."""
    repeats, rest = divmod(n, len(BIG_PATTERN))
    return BIG_PATTERN * repeats + BIG_PATTERN[:rest]


def go_params(
    path: str,
    method: str = "GET",
    query: str = "",
    *,
    content_length: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """PARAMS for the Go server: what net/http/cgi needs, plus what nginx sends.

    Go requires REQUEST_METHOD, SERVER_PROTOCOL and REQUEST_URI (or
    SCRIPT_NAME + PATH_INFO); without SERVER_PROTOCOL it answers 500 and
    writes the reason to FCGI_STDERR.
    """
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "fcgiproto-tests",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost",
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "REQUEST_SCHEME": "http",
        "REQUEST_METHOD": method,
        "REQUEST_URI": f"{path}?{query}" if query else path,
        "SCRIPT_NAME": path,
        "DOCUMENT_URI": path,
        "QUERY_STRING": query,
        "HTTP_HOST": "localhost",
    }
    if content_length is not None:
        params["CONTENT_LENGTH"] = str(content_length)
        params["CONTENT_TYPE"] = "application/octet-stream"
    if extra:
        params.update(extra)
    return params


# -- processes ----------------------------------------------------------------

_live: set[ManagedProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    # A safety net: fixtures stop their peers, but an interrupted session
    # (or a helper used outside a fixture) must not leave orphans behind.
    for proc in list(_live):
        proc.stop()


class ManagedProcess:
    """A child process whose output goes to a log file, stopped with a bound."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        output_log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.output_log = output_log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stdin_pipe = stdin_pipe
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            raise PeerError(f"{self.name} is already running")
        argv = self.argv
        setpriv = shutil.which("setpriv")
        # If this Python process dies without cleaning up (SIGKILL, a CI
        # timeout), the kernel sends the peer SIGTERM. The signal fires when
        # the *thread* that forked exits, so only arm it from the main thread.
        if setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        # Output goes to a file rather than a pipe: nobody would drain a pipe
        # while the peer runs, and a full pipe would block the peer.
        with open(self.output_log, "ab") as out:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        _live.add(self)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit code."""
        proc = self.process
        if proc is None:
            return None
        _live.discard(self)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        return proc.returncode

    def read_output(self) -> str:
        try:
            return self.output_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def wait_until_ready(
    proc: ManagedProcess,
    addresses: Iterable[str],
    *,
    logs: Sequence[Path],
    ready: Callable[[], bool] | None = None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll until every address accepts a connection and ``ready()`` holds.

    Raises PeerError, with the peer's logs, if the process exits or the time
    runs out; the process is stopped first so nothing is left behind.
    """
    pending = list(addresses)
    deadline = time.monotonic() + timeout
    while True:
        if not proc.running:
            code = proc.process.returncode if proc.process else None
            break
        pending = [address for address in pending if not can_connect(address)]
        if not pending and (ready is None or ready()):
            # A connect() can succeed against some other program that holds a
            # port we thought free while our peer fails to bind it: check that
            # the peer is still alive once everything answered.
            if proc.running:
                return
            code = proc.process.returncode if proc.process else None
            break
        if time.monotonic() > deadline:
            code = None
            break
        time.sleep(0.02)
    proc.stop()
    why = f"exited with status {code}" if code is not None else f"not ready after {timeout:g} s"
    raise PeerError(
        f"{proc.name} {why}; still not accepting: {pending or 'none'}\n"
        f"command: {' '.join(proc.argv)}\n" + format_logs([proc.output_log, *logs])
    )


def format_logs(paths: Iterable[Path]) -> str:
    parts = []
    seen: set[Path] = set()
    for path in paths:
        if path in seen:
            continue
        seen.add(path)
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = "(no such file)"
        parts.append(f"--- {path} ---\n{text[-8000:]}")
    return "\n".join(parts)


# -- php-fpm ------------------------------------------------------------------

#: The docroot's scripts. Query parameters are read from QUERY_STRING.
PHP_SCRIPTS: dict[str, str] = {
    "hello.php": """<?php
header('Content-Type: text/plain');
echo 'Hello, World!';
""",
    # The raw body, whatever its Content-Type (but CONTENT_LENGTH is needed).
    "echo.php": """<?php
$body = file_get_contents('php://input');
header('Content-Type: application/octet-stream');
header('X-Body-Length: ' . strlen($body));
header('X-Body-Md5: ' . md5($body));
echo $body;
""",
    # $_SERVER as JSON. Bytes that are not UTF-8 become U+FFFD; with ?b64=1
    # every string key and value is base64-encoded instead, so tests can check
    # that arbitrary bytes arrived intact.
    "params.php": """<?php
header('Content-Type: application/json');
$server = $_SERVER;
if (isset($_GET['b64'])) {
    $server = [];
    foreach ($_SERVER as $k => $v) {
        $server[base64_encode((string) $k)] = is_string($v) ? base64_encode($v) : $v;
    }
}
echo json_encode($server, JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
""",
    # n bytes (query n) of BIG_PATTERN, in 64 KiB chunks so memory stays flat;
    # 64 KiB is a multiple of 16, so the pattern continues across chunks.
    "big.php": """<?php
$n = isset($_GET['n']) ? max(0, (int) $_GET['n']) : 0;
header('Content-Type: application/octet-stream');
header('X-Body-Length: ' . $n);
$chunk = str_repeat('0123456789abcdef', 4096);
$size = strlen($chunk);
while ($n >= $size) {
    echo $chunk;
    $n -= $size;
}
echo substr($chunk, 0, $n);
""",
    # error_log() with no error_log ini goes to the SAPI logger, which php-fpm
    # sends as FCGI_STDERR ("PHP message: to stderr"). php://stderr would go
    # to the worker's own fd 2 instead, which php-fpm does not forward.
    "stderr.php": """<?php
error_log('to stderr');
echo 'to stdout';
""",
    "exit.php": """<?php
echo 'exiting';
exit(3);
""",
    # A Location header without a status: PHP turns it into 302 Found.
    "cookies.php": """<?php
setcookie('first', 'one');
setcookie('second', 'two', ['path' => '/', 'httponly' => true]);
header('Location: /elsewhere');
echo 'moved';
""",
    "sleep.php": """<?php
$s = isset($_GET['s']) ? (float) $_GET['s'] : 1.0;
usleep((int) ($s * 1000000));
echo 'slept';
""",
    "status.php": """<?php
$code = isset($_GET['code']) ? (int) $_GET['code'] : 200;
http_response_code($code);
echo "status $code";
""",
    "pid.php": """<?php
echo getmypid();
""",
    # $_POST as JSON: PHP fills it only for a form CONTENT_TYPE.
    "post.php": """<?php
header('Content-Type: application/json');
echo json_encode($_POST);
""",
    # n bytes "x" (query n, default 5), flushed one at a time, interval seconds
    # (query interval, default 1) apart; the first one goes out at once.
    "trickle.php": """<?php
$n = isset($_GET['n']) ? (int) $_GET['n'] : 5;
$interval = isset($_GET['interval']) ? (float) $_GET['interval'] : 1.0;
header('Content-Type: text/plain');
for ($i = 0; $i < $n; $i++) {
    if ($i > 0) {
        usleep((int) ($interval * 1000000));
    }
    echo 'x';
    flush();
}
""",
}


def write_docroot(docroot: Path) -> Path:
    docroot.mkdir(parents=True, exist_ok=True)
    for name, source in PHP_SCRIPTS.items():
        (docroot / name).write_text(source)
    return docroot


class PhpFpm:
    """php-fpm in the foreground with two pools sharing one docroot.

    Pool "unix" listens on ``unix_path``, pool "tcp" on ``tcp_address``
    (php-fpm allows one listen per pool). Each has 4 static workers that never
    recycle (pm.max_requests = 0), so a test can count workers with pid.php.
    """

    def __init__(
        self,
        binary: str,
        base: Path,
        *,
        extra_pools: int = 0,
        pool_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.base = base
        # pool_settings override the two main pools' settings (pm.max_children,
        # listen.backlog, ...); extra_pools adds pools "pool-1" ... "pool-N",
        # one static worker each, on the Unix sockets of pool_paths.
        self.pool_settings = dict(pool_settings or {})
        base.mkdir(parents=True, exist_ok=True)
        self.pools_dir = socket_dir(base) / "pools"
        self.pools_dir.mkdir(exist_ok=True)
        self.pool_paths = [
            str(self.pools_dir / f"pool-{n}.sock") for n in range(1, extra_pools + 1)
        ]
        self.docroot = write_docroot(base / "docroot")
        self.tmp_dir = base / "tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        self.unix_path = str(socket_dir(base) / "php-fpm.sock")
        self.tcp_address = f"127.0.0.1:{free_port()}"
        self.config_path = base / "php-fpm.conf"
        self.error_log = base / "php-fpm.log"
        self.pid_file = base / "php-fpm.pid"
        self.config_path.write_text(self._config())
        self._proc = ManagedProcess(
            "php-fpm",
            # -F: stay in the foreground, so our child is the master itself.
            # -n: no php.ini, so the host's settings and extensions do not leak
            #     in; the pools set what the tests rely on.
            # -R: allow running as root, as CI does; without root it is a no-op.
            [binary, "-F", "-n", "-R", "-y", str(self.config_path), "-p", str(base)],
            output_log=base / "php-fpm.out",
            # php-fpm takes inherited listening sockets from FPM_SOCKETS (its
            # own reload mechanism); never let one leak in from our environment.
            env={k: v for k, v in os.environ.items() if k != "FPM_SOCKETS"},
        )

    def _config(self) -> str:
        lines = [
            "[global]",
            f"pid = {self.pid_file}",
            f"error_log = {self.error_log}",
            "log_level = notice",
            "daemonize = no",
        ]
        pools = [
            ("unix", self.unix_path, self.pool_settings),
            ("tcp", self.tcp_address, self.pool_settings),
        ]
        pools += [
            (f"pool-{n}", path, {"pm.max_children": "1"})
            for n, path in enumerate(self.pool_paths, 1)
        ]
        for pool, listen, overrides in pools:
            settings = {
                "listen": listen,
                "listen.mode": "0666",
                "pm": "static",
                "pm.max_children": "4",
                "pm.max_requests": "0",
                "pm.status_path": "/fpm-status",
                "ping.path": "/ping",
                "ping.response": "pong",
                "catch_workers_output": "no",
                "clear_env": "no",
                "request_terminate_timeout": "0",
                "chdir": str(self.docroot),
                "php_admin_value[post_max_size]": "64M",
                "php_admin_value[upload_max_filesize]": "64M",
                "php_admin_value[memory_limit]": "256M",
                "php_admin_value[output_buffering]": "0",
                # sleep.php and trickle.php may run longer than the default 30 s.
                "php_admin_value[max_execution_time]": "0",
                "php_admin_value[max_input_time]": "-1",
                # Warnings go to FCGI_STDERR, never into a response body.
                "php_admin_flag[display_errors]": "off",
                "php_admin_flag[log_errors]": "on",
                # Large bodies spill to temporary files: keep them in our dir.
                "php_admin_value[sys_temp_dir]": str(self.tmp_dir),
                "php_admin_value[upload_tmp_dir]": str(self.tmp_dir),
            }
            if pool == "tcp":
                settings["listen.allowed_clients"] = "127.0.0.1"
            settings.update(overrides)
            lines += ["", f"[{pool}]", *(f"{key} = {value}" for key, value in settings.items())]
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        return self._proc.running

    def script(self, name: str) -> str:
        """SCRIPT_FILENAME for a script of the docroot."""
        return str(self.docroot / name)

    def params(
        self,
        script: str,
        method: str = "GET",
        query: str = "",
        *,
        content_length: int | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """PARAMS for ``script`` (such as "hello.php", or "/ping"), as nginx sends them."""
        if script.startswith("/"):
            # A status page such as /ping: php-fpm matches SCRIPT_NAME and
            # answers before it looks for a file.
            uri, filename = script, str(self.docroot) + script
        else:
            uri, filename = "/" + script, self.script(script)
        params = go_params(uri, method, query, content_length=content_length)
        params["SCRIPT_FILENAME"] = filename
        params["DOCUMENT_ROOT"] = str(self.docroot)
        # Needed when PHP is built with --enable-force-cgi-redirect.
        params["REDIRECT_STATUS"] = "200"
        if extra:
            params.update(extra)
        return params

    def start(self) -> None:
        # Readiness is "both sockets accept" plus php-fpm's own log line, which
        # it writes once the workers exist; only lines from this start count.
        log_offset = self.error_log.stat().st_size if self.error_log.exists() else 0

        def logged_ready() -> bool:
            with open(self.error_log, "rb") as log:
                log.seek(log_offset)
                return b"ready to handle connections" in log.read()

        self._proc.start()
        wait_until_ready(
            self._proc,
            [self.unix_path, self.tcp_address, *self.pool_paths],
            logs=[self.error_log],
            ready=lambda: self.error_log.exists() and logged_ready(),
        )

    def stop(self) -> None:
        self._proc.stop()

    def pids(self) -> list[int]:
        """The master's pid and its workers'."""
        process = self._proc.process
        if process is None or process.poll() is not None:
            return []
        try:
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        except OSError:
            children = ""
        return [process.pid, *map(int, children.split())]

    def restart(self) -> None:
        """Stop php-fpm and start it again on the same sockets."""
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Start php-fpm again if a test stopped it or it died."""
        if not self.running:
            self.start()

    def logs(self) -> str:
        return format_logs([self.error_log, self._proc.output_log])


# -- fcgiwrap (libfcgi) -------------------------------------------------------


def find_fcgiwrap() -> str | None:
    return find_binary(["fcgiwrap"], ["/usr/sbin", "/usr/local/sbin"])


#: CGI programs fcgiwrap runs; SCRIPT_FILENAME names one of them.
CGI_SCRIPTS: dict[str, str] = {
    "hello.sh": "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nHello, World!'\n",
}


class Fcgiwrap:
    """fcgiwrap, a libfcgi (fcgiapp.h) program, on a Unix socket; runs ``docroot``'s CGI scripts."""

    def __init__(self, binary: str, base: Path) -> None:
        self.base = base
        self.docroot = base / "cgi"
        self.docroot.mkdir(parents=True, exist_ok=True)
        for name, source in CGI_SCRIPTS.items():
            script = self.docroot / name
            script.write_text(source)
            script.chmod(0o755)
        self.unix_path = str(socket_dir(base) / "fcgiwrap.sock")
        self._proc = ManagedProcess(
            "fcgiwrap",
            [binary, "-c", "2", "-s", f"unix:{self.unix_path}"],
            output_log=base / "fcgiwrap.out",
        )

    @property
    def running(self) -> bool:
        return self._proc.running

    def script(self, name: str) -> str:
        return str(self.docroot / name)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)  # fcgiwrap refuses to bind over a stale socket
        self._proc.start()
        wait_until_ready(self._proc, [self.unix_path], logs=[])

    def stop(self) -> None:
        self._proc.stop()


# -- uWSGI in FastCGI mode ------------------------------------------------------


def find_uwsgi() -> str | None:
    """uWSGI with its python3 plugin (Debian: uwsgi-core, uwsgi-plugin-python3)."""
    binary = find_binary(["uwsgi", "uwsgi-core"])
    if binary is None or not Path("/usr/lib/uwsgi/plugins/python3_plugin.so").exists():
        return None
    return binary


#: The WSGI application uWSGI serves: the request body back, with its length.
UWSGI_APP = """\
def application(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Length", str(len(body)))])
    return [body]
"""


class Uwsgi:
    """uWSGI serving a WSGI echo application over FastCGI (--fastcgi-socket).

    uWSGI closes its connection after every response, FCGI_KEEP_CONN or not.
    """

    def __init__(self, binary: str, base: Path, *, tcp: bool = False) -> None:
        self.base = base
        app = base / "echo_app.py"
        app.write_text(UWSGI_APP)
        self.address = f"127.0.0.1:{free_port()}" if tcp else str(socket_dir(base) / "uwsgi.sock")
        self._proc = ManagedProcess(
            "uwsgi",
            [
                binary,
                "--plugin",
                "python3",
                "--fastcgi-socket",
                self.address,
                "--wsgi-file",
                str(app),
                "--master",
                "--processes",
                "2",
                "--disable-logging",
                # SIGTERM stops it (by default uWSGI 2.0 reloads on SIGTERM).
                "--die-on-term",
            ],
            output_log=base / "uwsgi.out",
        )

    def start(self) -> None:
        self._proc.start()
        wait_until_ready(self._proc, [self.address], logs=[])

    def stop(self) -> None:
        self._proc.stop()


# -- Go net/http/fcgi server --------------------------------------------------


def go_environment(cache: Path) -> dict[str, str]:
    """Environment for an offline, reproducible ``go build``."""
    env = dict(os.environ)
    env.update(
        # The toolchain installed here, never a download.
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOFLAGS="",
        GOWORK="off",
        # A pure-Go binary needs no C compiler.
        CGO_ENABLED="0",
        GOPATH=str(cache / "gopath"),
        # Honour a GOCACHE someone set on purpose (CI may keep one warm).
        GOCACHE=os.environ.get("GOCACHE") or str(cache / "go-build"),
    )
    env.setdefault("HOME", str(cache))
    return env


def build_go_server(go: str, cache: Path = PEER_CACHE) -> Path:
    """Build tests/goserver/main.go, unless a binary of this source exists.

    The binary's name carries a hash of the source and of ``go version``, so a
    change to either rebuilds, and concurrent sessions never see a half-written
    binary (it is built under a temporary name and renamed).
    """
    cache.mkdir(parents=True, exist_ok=True)
    env = go_environment(cache)
    version = subprocess.run(
        [go, "version"], env=env, capture_output=True, check=True, text=True, timeout=60
    ).stdout
    digest = hashlib.sha256(GO_SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = cache / f"goserver-{digest}"
    if binary.exists():
        return binary
    partial = cache / f"goserver-{digest}.{os.getpid()}.tmp"
    result = subprocess.run(
        [go, "build", "-o", str(partial), GO_SOURCE.name],
        cwd=GO_SOURCE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise PeerError(f"go build failed:\n{result.stdout}{result.stderr}")
    os.replace(partial, binary)
    # Binaries of earlier sources are dead weight now. A session still running
    # one keeps its inode open, so unlinking it under that session is safe.
    for stale in cache.glob("goserver-*"):
        if stale != binary and not stale.name.endswith(".tmp"):
            stale.unlink(missing_ok=True)
    return binary


class GoServer:
    """The Go net/http/fcgi server of tests/goserver, on a Unix socket and TCP.

    Handlers: /hello, /echo (X-Body-Length, X-Body-Md5), /big?n=,
    /sleep?s=, /trickle?n=&interval=, /status?code=, /params (JSON). Build
    PARAMS with go_params(). Go has no stderr stream of its own: only a
    request it cannot parse gets FCGI_STDERR (with status 500).
    """

    def __init__(self, binary: Path, base: Path) -> None:
        self.binary = binary
        self.base = base
        self.unix_path = str(socket_dir(base) / "go.sock")
        self.tcp_address = f"127.0.0.1:{free_port()}"
        self._proc = ManagedProcess(
            "go server",
            [
                str(binary),
                "-unix",
                self.unix_path,
                "-tcp",
                self.tcp_address,
                # Exit when our end of its stdin closes, i.e. when this Python
                # process dies, even by SIGKILL.
                "-watch-stdin",
            ],
            output_log=base / "goserver.out",
            stdin_pipe=True,
        )

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> None:
        log_offset = self._proc.output_log.stat().st_size if self._proc.output_log.exists() else 0

        def printed_ready() -> bool:
            with open(self._proc.output_log, "rb") as out:
                out.seek(log_offset)
                return b"ready\n" in out.read()

        self._proc.start()
        wait_until_ready(
            self._proc, [self.unix_path, self.tcp_address], logs=[], ready=printed_ready
        )

    def stop(self) -> None:
        self._proc.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()


# -- nginx --------------------------------------------------------------------

# The CGI variables of Debian's /etc/nginx/fastcgi_params, written inline so
# the tests do not depend on where (or whether) that file is installed.
_NGINX_FASTCGI_PARAMS = """\
fastcgi_param QUERY_STRING $query_string;
fastcgi_param REQUEST_METHOD $request_method;
fastcgi_param CONTENT_TYPE $content_type;
fastcgi_param CONTENT_LENGTH $content_length;
fastcgi_param SCRIPT_NAME $fastcgi_script_name;
fastcgi_param REQUEST_URI $request_uri;
fastcgi_param DOCUMENT_URI $document_uri;
fastcgi_param DOCUMENT_ROOT $document_root;
fastcgi_param SERVER_PROTOCOL $server_protocol;
fastcgi_param REQUEST_SCHEME $scheme;
fastcgi_param HTTPS $https if_not_empty;
fastcgi_param GATEWAY_INTERFACE CGI/1.1;
fastcgi_param SERVER_SOFTWARE nginx/$nginx_version;
fastcgi_param REMOTE_ADDR $remote_addr;
fastcgi_param REMOTE_PORT $remote_port;
fastcgi_param REMOTE_USER $remote_user;
fastcgi_param SERVER_ADDR $server_addr;
fastcgi_param SERVER_PORT $server_port;
fastcgi_param SERVER_NAME $server_name;
fastcgi_param REDIRECT_STATUS 200;
fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
"""


def nginx_upstream(address: str) -> str:
    """An address as nginx's ``server`` directive spells it."""
    family, sockaddr = parse_address(address)
    if family == socket.AF_UNIX:
        return f"unix:{sockaddr}"
    return address


class Nginx:
    """nginx in front of a FastCGI address, serving HTTP on ``http_address``."""

    def __init__(
        self,
        binary: str,
        base: Path,
        fastcgi_address: str,
        *,
        keep_conn: bool = True,
        docroot: Path | None = None,
    ) -> None:
        self.binary = binary
        self.base = base
        self.fastcgi_address = fastcgi_address
        self.keep_conn = keep_conn
        # $document_root becomes SCRIPT_FILENAME's prefix: pass php-fpm's
        # docroot when nginx fronts php-fpm. Go ignores it.
        self.docroot = docroot if docroot is not None else base / "html"
        self.docroot.mkdir(parents=True, exist_ok=True)
        self.http_address = f"127.0.0.1:{free_port()}"
        self.config_path = base / "nginx.conf"
        self.error_log = base / "error.log"
        self.config_path.write_text(self._config())
        self._proc = ManagedProcess(
            "nginx",
            # daemon off comes from -g, so the file never says it twice; -e
            # keeps even the log of startup errors (written before the config
            # is read) out of /var/log/nginx.
            [
                binary,
                "-p",
                str(base),
                "-c",
                str(self.config_path),
                "-e",
                str(self.error_log),
                "-g",
                "daemon off;",
            ],
            output_log=base / "nginx.out",
        )

    def _config(self) -> str:
        # nginx creates each temp path's last component, not its parents.
        temp = self.base / "temp"
        temp.mkdir(exist_ok=True)
        keepalive = "        keepalive 8;\n" if self.keep_conn else ""
        params = "".join(f"            {line}\n" for line in _NGINX_FASTCGI_PARAMS.splitlines())
        return f"""\
# One process that does everything: no master/worker split, so no switch to
# an unprivileged user that could not reach our sockets and temp dirs.
master_process off;
pid {self.base / "nginx.pid"};
error_log {self.error_log} info;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {temp / "client_body"};
    fastcgi_temp_path {temp / "fastcgi"};
    proxy_temp_path {temp / "proxy"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    client_max_body_size 128m;

    upstream fastcgi_backend {{
        server {nginx_upstream(self.fastcgi_address)};
{keepalive}    }}

    server {{
        listen {self.http_address};
        server_name localhost;
        root {self.docroot};

        location / {{
            fastcgi_pass fastcgi_backend;
            fastcgi_keep_conn {"on" if self.keep_conn else "off"};
{params}        }}
    }}
}}
"""

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> None:
        self._proc.start()
        wait_until_ready(self._proc, [self.http_address], logs=[self.error_log])

    def stop(self) -> None:
        self._proc.stop()


class NginxFactory:
    """Starts Nginx instances on demand and stops them all in close()."""

    def __init__(self, binary: str, make_dir: Callable[[], Path]) -> None:
        self.binary = binary
        self.make_dir = make_dir
        self._started: list[Nginx] = []

    def __call__(
        self, fastcgi_address: str, *, keep_conn: bool = True, docroot: Path | None = None
    ) -> Nginx:
        nginx = Nginx(
            self.binary, self.make_dir(), fastcgi_address, keep_conn=keep_conn, docroot=docroot
        )
        nginx.start()
        self._started.append(nginx)
        return nginx

    def close(self) -> None:
        while self._started:
            self._started.pop().stop()
