"""Real web servers in front of a FastCGI application, for the tests.

Apache httpd with mod_proxy_fcgi (to an address) and with mod_fcgid (which
starts the application itself), lighttpd with mod_fastcgi (to an address, or
starting the application with ``bin-path``), and HAProxy with ``fcgi-app``
(which multiplexes). Each runs as a child process with its configuration and
logs in a directory of its own, serves HTTP on 127.0.0.1 only
(``base_url``), and has ``logs()`` for a failure report. tests/conftest.py's
``webservers`` fixture starts them and stops them after the test. Their
configurations are shown in docs/serving.md, which tests/test_docs_serving.py
keeps equal to what is written here.

Running as root (as CI does), Apache will not run its children as root: they
run as ``web_user()`` (www-data, or nobody), and so does every application
mod_fcgid starts. What they touch must be theirs to reach: the instance's
directory is made under /tmp (pytest's own are private to root), a Unix socket
they connect to is made writable for all (``share_socket``), and a spawned
application runs from a copy of its files (``install_app``) by an interpreter
that user can execute. nginx, lighttpd and HAProxy stay in one process as the
user who started them.

What each sends an application mounted at "/", for GET /a/b%20c?q=1 (all
send REQUEST_URI "/a/b%20c?q=1" and QUERY_STRING "q=1"):

- Apache mod_proxy_fcgi and HAProxy: SCRIPT_NAME "/a/b c", no PATH_INFO (as
  nginx does with Debian's fastcgi_params).
- Apache mod_fcgid (the script aliased at "/") and lighttpd (with
  fix-root-scriptname): SCRIPT_NAME "", PATH_INFO "/a/b c".
- HAProxy's SERVER_NAME is the Host header, port included ("127.0.0.1:8080");
  the others send the host alone.
- A HEAD response with a body: HAProxy 2.6 answers 502 (RFC 3875 asks the
  web server to discard it); Apache mod_proxy_fcgi and lighttpd discard it.
- Apache 2.4.59+ mod_proxy_fcgi drops the application's Content-Length and
  answers chunked; mod_fcgid, lighttpd and HAProxy keep it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peers import (
    ManagedProcess,
    PeerError,
    find_binary,
    format_logs,
    free_port,
    parse_address,
    require_peer,
    socket_dir,
    wait_until_ready,
)

#: Where Debian, Fedora and a source build put Apache's loadable modules.
APACHE_MODULE_DIRS = (
    "/usr/lib/apache2/modules",
    "/usr/lib64/httpd/modules",
    "/usr/libexec/apache2",
)
#: Request bodies the web servers here accept (their defaults are smaller:
#: mod_fcgid's FcgidMaxRequestLen is 128 KiB).
MAX_BODY = 128 * 1024 * 1024
#: How long a web server waits on the application: far longer than any test
#: request takes, short enough that a hang ends in a 504 rather than never.
BACKEND_TIMEOUT = 30


def find_apache() -> str | None:
    return find_binary(["apache2", "httpd"], ["/usr/sbin", "/usr/local/sbin"])


def find_apache_module(name: str) -> str | None:
    for directory in APACHE_MODULE_DIRS:
        path = Path(directory) / f"mod_{name}.so"
        if path.is_file():
            return str(path)
    return None


def find_lighttpd() -> str | None:
    return find_binary(["lighttpd"], ["/usr/sbin", "/usr/local/sbin"])


def find_haproxy() -> str | None:
    return find_binary(["haproxy"], ["/usr/sbin", "/usr/local/sbin"])


# -- who the web server runs its children as -----------------------------------


@dataclass(frozen=True)
class WebUser:
    name: str
    uid: int
    gid: int


def web_user() -> WebUser | None:
    """The unprivileged user Apache's children run as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("www-data", "apache", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return WebUser(name, entry.pw_uid, entry.pw_gid)
    raise PeerError("running as root, and no www-data, apache or nobody user to run Apache as")


def reachable_dir(make_preferred: Callable[[], Path], prefix: str) -> Path:
    """A directory the web server's user can enter and read: a preferred one unless we are root.

    As root, pytest's temporary directories sit under /tmp/pytest-of-root,
    which only root may enter: make one under /tmp instead, removed at exit.
    Its path is short enough for the Unix sockets inside it.
    """
    if web_user() is None:
        return socket_dir(make_preferred())
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def share_socket(path: str) -> None:
    """Let the web server's user connect to a Unix socket we listen on (connect needs write)."""
    os.chmod(path, 0o666)


def python_for(user: WebUser | None) -> str:
    """A Python 3.10+ that ``user`` can run: ours, or else the system's.

    Ours may live where only root can reach it (pyenv or uv under /root). The
    probe runs it after setgid/setgroups/setuid in the child, as Apache's
    children are made; a probe through ``setpriv --reuid`` once reported a
    Python under /root runnable that mod_fcgid then failed to exec (EACCES).
    """
    candidates = [sys.executable]
    if user is not None:
        candidates += [p for p in (shutil.which("python3"), "/usr/bin/python3") if p]
    check = "import sys; sys.exit(sys.version_info < (3, 10))"
    as_user = {} if user is None else {"user": user.uid, "group": user.gid, "extra_groups": []}
    for python in candidates:
        try:
            probe = subprocess.run(
                [python, "-c", check],
                capture_output=True,
                timeout=30,
                **as_user,  # type: ignore[call-overload]
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return python
    who = user.name if user else "this user"
    raise PeerError(f"no Python 3.10+ that {who} can run among {candidates}")


@dataclass
class SpawnedApp:
    """A FastCGI program for a web server to start, serving the socket it gets on fd 0."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: Where the program writes its own diagnostics, if it does.
    log: Path | None = None

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def install_app(
    dest: Path,
    script: Path | None = None,
    *,
    args: Sequence[str] = (),
    files: Sequence[Path] = (),
    packages: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> SpawnedApp:
    """Copy ``script``, ``files`` and the importable ``packages`` into ``dest``, readable by all.

    The program is ``python [dest/script] ARGS...`` (without a script, ARGS
    such as ``-m fcgiproto_socket serve module:app``), by an interpreter the
    web server's user can run, with ``dest`` first on its PYTHONPATH so that
    it imports the copies. ``packages`` must name every import that is not
    in the standard library (dependencies too): the user may not reach our
    environment. ``dest`` must be inside a reachable_dir.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for path in (*([script] if script else []), *files):
        shutil.copy(path, dest / path.name)
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise PeerError(f"cannot find package {name!r} to install for the web server")
        if spec.submodule_search_locations:
            source = Path(next(iter(spec.submodule_search_locations)))
            shutil.copytree(
                source,
                dest / name,
                ignore=shutil.ignore_patterns("__pycache__"),
                dirs_exist_ok=True,
            )
        else:
            shutil.copy(spec.origin, dest / Path(spec.origin).name)
    _open_for_reading(dest)
    # Neither mod_fcgid nor lighttpd passes the application's stderr on
    # anywhere we can read: the program the web server runs is a script that
    # sends it to a log, as a .fcgi script in a deployment would.
    log = dest / "app.log"
    log.touch()
    log.chmod(0o666)
    command = [python_for(web_user()), *([str(dest / script.name)] if script else []), *args]
    wrapper = dest / "app.fcgi"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.join(command)} 2>>{shlex.quote(str(log))}\n")
    wrapper.chmod(0o755)
    environment = {"PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    environment.update(env or {})
    return SpawnedApp([str(wrapper)], environment, log)


def _open_for_reading(top: Path) -> None:
    for root, dirs, files in os.walk(top):
        os.chmod(root, 0o755)
        for name in files:
            path = Path(root) / name
            path.chmod(path.stat().st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)


# -- the web servers -------------------------------------------------------------


class WebServer:
    """A web server serving HTTP on ``base_url``; subclasses write its configuration."""

    name = "web server"

    def __init__(self, base: Path) -> None:
        self.base = base
        self.http_address = f"127.0.0.1:{free_port()}"
        self.error_log = base / "error.log"
        self.config_path = base / "server.conf"
        self._proc: ManagedProcess | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    #: The application this web server starts itself, if it does.
    app: SpawnedApp | None = None

    def log_files(self) -> list[Path]:
        files = [self.error_log]
        if self._proc is not None:
            files.append(self._proc.output_log)
        if self.app is not None and self.app.log is not None:
            files.append(self.app.log)
        return files

    def logs(self) -> str:
        """The error log and the process's own output, for a failure report."""
        return format_logs(self.log_files())

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _config(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        self.config_path.write_text(self._config())
        self._proc = ManagedProcess(self.name, self._argv(), output_log=self.base / "server.out")
        self._proc.start()
        wait_until_ready(self._proc, [self.http_address], logs=[self.error_log])

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()


def _lines(*groups: Sequence[str] | str) -> str:
    out: list[str] = []
    for group in groups:
        out += [group] if isinstance(group, str) else list(group)
    return "\n".join(out) + "\n"


class Apache(WebServer):
    """A standalone Apache httpd: our configuration only, in the foreground.

    Not the system service: ``apache2 -f CONF -DFOREGROUND`` with every module
    loaded from its .so by path, so nothing of /etc/apache2 applies. The
    parent stays ours; its children (event MPM) run as ``web_user()`` when we
    are root, as Apache refuses to serve as root.
    """

    name = "apache"
    modules: tuple[str, ...] = ("mpm_event", "authz_core")

    def __init__(self, binary: str, base: Path) -> None:
        super().__init__(base)
        self.binary = binary
        self.user = web_user()
        self.docroot = base / "htdocs"
        self.docroot.mkdir(exist_ok=True)
        (base / "run").mkdir(exist_ok=True)

    def _argv(self) -> list[str]:
        # -X would serve in one process, but mod_fcgid's process manager
        # needs the usual parent and children; FOREGROUND keeps the parent ours.
        return [self.binary, "-d", str(self.base), "-f", str(self.config_path), "-DFOREGROUND"]

    def _load_modules(self) -> list[str]:
        lines = []
        for module in self.modules:
            path = find_apache_module(module)
            if path is None:
                raise PeerError(f"Apache module mod_{module}.so not found in {APACHE_MODULE_DIRS}")
            lines.append(f"LoadModule {module}_module {path}")
        return lines

    def _common(self) -> list[str]:
        run = self.base / "run"
        user = []
        if self.user is not None:
            user = [f"User {self.user.name}", f"Group #{self.user.gid}"]
        return [
            *self._load_modules(),
            f'ServerRoot "{self.base}"',
            f'DefaultRuntimeDir "{run}"',
            f'PidFile "{run / "httpd.pid"}"',
            f"Listen {self.http_address}",
            "ServerName 127.0.0.1",
            f'ErrorLog "{self.error_log}"',
            "LogLevel warn",
            *user,
            # Few processes: the machine is shared, and the tests are small.
            "StartServers 1",
            "ServerLimit 2",
            "ThreadsPerChild 16",
            "MaxRequestWorkers 32",
            "MinSpareThreads 1",
            "MaxSpareThreads 32",
            f"Timeout {BACKEND_TIMEOUT}",
            f"LimitRequestBody {MAX_BODY}",
            f'DocumentRoot "{self.docroot}"',
            "<Directory />",
            "    Require all granted",
            "</Directory>",
        ]


class ApacheProxyFcgi(Apache):
    """Apache with mod_proxy_fcgi forwarding every URL to ``fastcgi_address``.

    ``enablereuse=on`` keeps connections to the application open between
    requests (one request at a time on each: mod_proxy_fcgi never
    multiplexes). ``ProxyFCGIBackendType GENERIC`` sends SCRIPT_FILENAME as
    the path, not php-fpm's "proxy:fcgi://..." form. Since 2.4.59 Apache
    drops the application's Content-Length and answers chunked (CVE-2024-24795;
    ``SetEnv ap_trust_cgilike_cl`` would trust it); mod_fcgid keeps it.
    """

    name = "apache mod_proxy_fcgi"
    modules = (*Apache.modules, "proxy", "proxy_fcgi")

    def __init__(self, binary: str, base: Path, fastcgi_address: str) -> None:
        super().__init__(binary, base)
        self.fastcgi_address = fastcgi_address

    def _backend_url(self) -> str:
        family, sockaddr = parse_address(self.fastcgi_address)
        if family == socket.AF_UNIX:
            # The part after | names the scheme; its host is ignored.
            return f"unix:{sockaddr}|fcgi://localhost/"
        return f"fcgi://{self.fastcgi_address}/"

    def _config(self) -> str:
        return _lines(
            self._common(),
            "ProxyFCGIBackendType GENERIC",
            f'ProxyPass "/" "{self._backend_url()}" enablereuse=on timeout={BACKEND_TIMEOUT}',
        )


class ApacheFcgid(Apache):
    """Apache with mod_fcgid, which starts ``app`` itself and hands it a socket on fd 0.

    Deployed as mod_fcgid applications are: a script (``app``'s one program,
    or one made to exec its command), mounted at "/" by ``Alias / SCRIPT/``,
    so that the whole path is PATH_INFO and SCRIPT_NAME is "" (with a
    ``<Location />`` and ``FcgidWrapper ... virtual`` instead, Apache would
    make the path's first segment SCRIPT_NAME). mod_fcgid's process manager
    runs the script as Apache's user, with only the environment
    FcgidInitialEnv gives it, one request at a time per process; it listens
    on a Unix socket under FcgidIPCDir, which it makes and gives to that user.
    """

    name = "apache mod_fcgid"
    modules = (*Apache.modules, "alias", "fcgid")

    def __init__(self, binary: str, base: Path, app: SpawnedApp) -> None:
        super().__init__(binary, base)
        self.app = app
        if len(app.argv) == 1:  # a script already, as install_app makes
            self.script = Path(app.argv[0])
        else:
            self.script = base / "fcgi-bin" / "app.fcgi"
            self.script.parent.mkdir(mode=0o755, exist_ok=True)
            self.script.write_text(f"#!/bin/sh\nexec {app.command}\n")
            self.script.chmod(0o755)
        self.script_dir = self.script.parent

    def _config(self) -> str:
        run = self.base / "run"
        app = self.app
        assert app is not None
        env = [f'FcgidInitialEnv {name} "{value}"' for name, value in app.env.items()]
        return _lines(
            self._common(),
            # Each start and exit of the application, in the error log.
            "LogLevel warn fcgid:info",
            f'FcgidIPCDir "{self.base / "fcgid"}"',
            f'FcgidProcessTableFile "{run / "fcgid_shm"}"',
            # The default, 128 KiB, answers a larger body with 500.
            f"FcgidMaxRequestLen {MAX_BODY}",
            f"FcgidIOTimeout {BACKEND_TIMEOUT}",
            "FcgidMaxProcessesPerClass 2",
            # Responses reach the client as they come, not after 64 KiB.
            "FcgidOutputBufferSize 0",
            *env,
            f'Alias "/" "{self.script}/"',
            f'<Directory "{self.script_dir}">',
            "    SetHandler fcgid-script",
            "    Options +ExecCGI",
            "</Directory>",
        )


class Lighttpd(WebServer):
    """lighttpd with mod_fastcgi: to ``fastcgi_address``, or starting ``app`` (bin-path).

    With ``bin-path`` lighttpd makes the Unix socket, starts the program with
    it on fd 0 and the environment ``bin-environment`` gives it, and restarts
    it if it dies.
    """

    name = "lighttpd"

    def __init__(
        self,
        binary: str,
        base: Path,
        *,
        fastcgi_address: str | None = None,
        app: SpawnedApp | None = None,
    ) -> None:
        if (fastcgi_address is None) == (app is None):
            raise ValueError("give lighttpd a fastcgi_address or an app to start, not both")
        super().__init__(base)
        self.binary = binary
        self.fastcgi_address = fastcgi_address
        self.app = app
        self.docroot = base / "htdocs"
        self.docroot.mkdir(exist_ok=True)
        (base / "tmp").mkdir(exist_ok=True)

    def _argv(self) -> list[str]:
        return [self.binary, "-D", "-f", str(self.config_path)]

    def _backend(self) -> list[str]:
        if self.app is not None:
            env = ", ".join(f'"{k}" => "{v}"' for k, v in self.app.env.items())
            return [
                f'"socket" => "{self.base / "app.sock"}",',
                f'"bin-path" => "{self.app.command}",',
                f'"bin-environment" => ( {env} ),',
                '"max-procs" => 1,',
            ]
        assert self.fastcgi_address is not None
        family, sockaddr = parse_address(self.fastcgi_address)
        if family == socket.AF_UNIX:
            return [f'"socket" => "{sockaddr}",']
        assert isinstance(sockaddr, tuple)
        host, port = sockaddr
        return [f'"host" => "{host}",', f'"port" => {port},']

    def _config(self) -> str:
        host, port = self.http_address.rsplit(":", 1)
        backend = "".join(f"            {line}\n" for line in self._backend())
        return f"""\
server.modules = ( "mod_fastcgi" )
server.document-root = "{self.docroot}"
server.bind = "{host}"
server.port = {port}
server.errorlog = "{self.error_log}"
# Request bodies wait in temporary files here, not in /var/tmp.
server.upload-dirs = ( "{self.base / "tmp"}" )
server.max-request-size = {MAX_BODY // 1024}
# Responses go out as they come (and, with 2, without piling up in memory).
server.stream-response-body = 2
fastcgi.server = (
    "/" => (
        "app" => (
{backend}            # Every URL is the application's, whether or not a file has its name.
            "check-local" => "disable",
            # Mounted at "/", lighttpd would make the path's first segment
            # SCRIPT_NAME ("/app" of "/app/x", PATH_INFO "/x"); with this,
            # SCRIPT_NAME is "" and PATH_INFO the whole path, as elsewhere.
            "fix-root-scriptname" => "enable",
        ),
    ),
)
"""


class HAProxy(WebServer):
    """HAProxy: HTTP in front, ``fcgi-app`` to ``fastcgi_address`` behind.

    ``option mpxs-conns`` lets it send up to ``max_reqs`` requests at once on
    one connection, and ``http-reuse always`` lets requests of different
    clients share it. With ``get_values`` it first asks the application
    (FCGI_MAX_REQS, FCGI_MPXS_CONNS) and keeps to the answer.
    """

    name = "haproxy"

    def __init__(
        self,
        binary: str,
        base: Path,
        fastcgi_address: str,
        *,
        max_reqs: int = 10,
        get_values: bool = True,
    ) -> None:
        super().__init__(base)
        self.binary = binary
        self.fastcgi_address = fastcgi_address
        self.max_reqs = max_reqs
        self.get_values = get_values
        self.docroot = base / "htdocs"
        self.docroot.mkdir(exist_ok=True)
        # HAProxy logs to its standard error, which ManagedProcess keeps in server.out.
        self.error_log = base / "server.out"

    def _argv(self) -> list[str]:
        # -db: foreground, no daemon; -W is not needed for one process.
        return [self.binary, "-db", "-f", str(self.config_path)]

    def _server(self) -> str:
        family, sockaddr = parse_address(self.fastcgi_address)
        if family == socket.AF_UNIX:
            return f"unix@{sockaddr}"
        return self.fastcgi_address

    def _config(self) -> str:
        get_values = "option get-values" if self.get_values else "no option get-values"
        return f"""\
global
    log stderr format raw local0 info
    # No chroot, no user switch: it stays in this process as us.

defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client {BACKEND_TIMEOUT}s
    timeout server {BACKEND_TIMEOUT}s

fcgi-app app
    docroot {self.docroot}
    option mpxs-conns
    option max-reqs {self.max_reqs}
    {get_values}
    log-stderr global

frontend web
    bind {self.http_address}
    default_backend application

backend application
    use-fcgi-app app
    http-reuse always
    server app {self._server()} proto fcgi
    # A kept connection the application closes as it drains (a graceful restart) is
    # retried on another, as nginx does, instead of answering 502.
    retry-on conn-failure empty-response
    retries 3
"""


class WebServers:
    """Starts web servers on demand (each in a directory of its own) and stops them all."""

    def __init__(self, make_dir: Callable[[str], Path]) -> None:
        self._make_dir = make_dir
        self._started: list[WebServer] = []

    def directory(self, name: str) -> Path:
        """A fresh directory the web servers' user can reach, for sockets or an app's files."""
        return reachable_dir(lambda: self._make_dir(name), f"{name}-")

    def _start(self, server: WebServer) -> WebServer:
        self._started.append(server)
        server.start()
        return server

    def apache_proxy(self, fastcgi_address: str) -> WebServer:
        binary = _require_binary("apache", find_apache())
        return self._start(ApacheProxyFcgi(binary, self.directory("apache"), fastcgi_address))

    def apache_fcgid(self, app: SpawnedApp) -> WebServer:
        binary = _require_binary("apache", find_apache())
        _require_binary("mod_fcgid", find_apache_module("fcgid"))
        return self._start(ApacheFcgid(binary, self.directory("fcgid"), app))

    def lighttpd(
        self, fastcgi_address: str | None = None, *, app: SpawnedApp | None = None
    ) -> WebServer:
        binary = _require_binary("lighttpd", find_lighttpd())
        base = self.directory("lighttpd")
        return self._start(Lighttpd(binary, base, fastcgi_address=fastcgi_address, app=app))

    def haproxy(self, fastcgi_address: str, **options: int | bool) -> WebServer:
        binary = _require_binary("haproxy", find_haproxy())
        return self._start(HAProxy(binary, self.directory("haproxy"), fastcgi_address, **options))  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop them all; print their logs, which pytest shows for a failed test."""
        while self._started:
            server = self._started.pop()
            server.stop()
            print(f"=== {server.name} on {server.base_url} ===\n{server.logs()}")


def _require_binary(name: str, found: str | None) -> str:
    require_peer(name, found is not None)
    assert found is not None
    return found
