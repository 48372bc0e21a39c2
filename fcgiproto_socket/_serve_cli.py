"""`fcgi serve MODULE:APP`: a WSGI or ASGI application behind a web server, over FastCGI.

One process serves by itself; with `--workers N` (or `--max-requests`) a
master forks the workers, which share its listening socket, replaces one that
dies or that reached `--max-requests`, starts a new set and drains the old one
on SIGHUP, and drains them all on SIGTERM or SIGINT (no more accepting,
requests in progress get `--graceful-timeout` seconds). Without `--bind` the
listening socket is the one inherited on fd 0, as spawn-fcgi, Apache
mod_fcgid and lighttpd's bin-path hand it over. FCGI_WEB_SERVER_ADDRS in the
environment is the allowlist of web servers that may connect over TCP.

The option names are gunicorn's (--bind, --workers, --threads, --max-requests,
--graceful-timeout) and uvicorn's (--interface, --root-path, --lifespan,
--loop, --factory, --app-dir, --limit-concurrency) where they exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import logging
import math
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from ._cli import positive, whole_number

# The server and its options are imported when `serve` runs: every other subcommand builds
# this parser too, and `fcgi ping` must not pay for the server's import.

__all__ = ["add_parser", "inherited_listener", "load_app"]

logger = logging.getLogger("fcgiproto_socket.serve")

#: A worker's exit status when the app could not be loaded: the master gives up.
BOOT_FAILED = 4
#: Past the graceful timeout, how long the master waits before SIGKILL.
KILL_MARGIN = 5.0

DESCRIPTION = """\
Serve a WSGI or ASGI application over FastCGI, for a web server to pass
requests to (nginx fastcgi_pass, Apache mod_proxy_fcgi or mod_fcgid,
lighttpd, HAProxy fcgi-app).

MODULE:APP names the application as `import MODULE; MODULE.APP` (APP may be
dotted; with --factory it is called to make the application). Without
--bind, the listening socket inherited on fd 0 is served.

signals: SIGTERM, SIGINT drain and exit; SIGHUP (with workers) starts new
workers and drains the old ones."""


class _Usage(ValueError):
    """A mistake in the command line found after parsing (fcgi reports ValueError as usage)."""


def add_parser(commands: Any) -> None:
    """Register `serve` on the `fcgi` command's subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    serve = commands.add_parser(
        "serve",
        help="serve a WSGI or ASGI application (MODULE:APP) over FastCGI",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    serve.add_argument("app", metavar="MODULE:APP")
    serve.add_argument(
        "--bind",
        "-b",
        metavar="ADDRESS",
        help="host:port, [::1]:port, unix:/path.sock or an absolute path "
        "(default: the listening socket on fd 0)",
    )
    serve.add_argument("--interface", choices=("auto", "wsgi", "asgi"), default="auto")
    serve.add_argument(
        "--threads",
        type=_count,
        default=None,
        help="WSGI: apps running at once per worker (1: one thread reads and runs them all)",
    )
    serve.add_argument("--workers", "-w", type=_count, default=1, help="processes (default 1)")
    serve.add_argument(
        "--max-requests",
        type=whole_number,
        default=0,
        help="a worker serving this many requests is replaced (default 0: never)",
    )
    serve.add_argument("--max-requests-jitter", type=whole_number, default=0)
    serve.add_argument(
        "--graceful-timeout",
        type=positive,
        default=None,
        help="on SIGTERM, how long requests in progress may take to end (default 30)",
    )
    serve.add_argument("--root-path", default="", help="the path the app is mounted at")
    serve.add_argument("--lifespan", choices=("auto", "on", "off"), default="auto")
    serve.add_argument("--loop", choices=("asyncio", "trio"), default="asyncio")
    serve.add_argument("--factory", action="store_true", help="APP is a factory to call")
    serve.add_argument("--app-dir", default=".", help="put this directory on sys.path first")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    limits = serve.add_argument_group(
        "limits (the servers' options; unset, each has the server's default: README, Limits)"
    )
    limits.add_argument("--multiplex", action="store_true", help="many requests per connection")
    limits.add_argument("--max-connections", type=_count, default=None)
    limits.add_argument(
        "--limit-concurrency",
        type=_count,
        default=None,
        help="requests at once per worker (the server's max_requests, FCGI_MAX_REQS)",
    )
    limits.add_argument("--max-params-size", type=_count, default=None)
    limits.add_argument("--max-params-pairs", type=_count, default=None)
    limits.add_argument("--max-body-size", type=whole_number, default=None)
    limits.add_argument("--max-unsent-size", type=_count, default=None)
    limits.add_argument("--params-timeout", type=positive, default=None)
    limits.add_argument("--idle-timeout", type=positive, default=None)
    limits.add_argument("--send-timeout", type=positive, default=None)
    serve.set_defaults(run=run)


def _count(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


# --- the app and the socket ---


def load_app(spec: str, *, factory: bool = False, app_dir: str = ".") -> Any:
    """Import MODULE:APP (APP may be dotted), calling it with `factory`."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise _Usage(f"the app must be given as MODULE:APP, not {spec!r}")
    if app_dir:
        sys.path.insert(0, os.path.abspath(app_dir))
    module = importlib.import_module(module_name)
    app: Any = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise _Usage(f"{module_name} has no attribute {attribute!r}") from None
    if factory:
        app = app()
    if not callable(app):
        raise _Usage(f"{spec} is not callable")
    return app


def is_asgi(app: Any) -> bool:
    """Whether an app is ASGI (a coroutine function, or an object whose __call__ is one)."""
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004  (the method, to look at its kind)
    return inspect.iscoroutinefunction(call)


def inherited_listener(fd: int = 0) -> socket.socket | None:
    """The listening socket on `fd`, as spawn-fcgi, mod_fcgid and lighttpd pass it; else None."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # not a socket
        os.close(dup)
        return None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if not listening or sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


# --- running ---


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if args.threads is not None and args.interface == "asgi":
        raise _Usage("--threads is for WSGI apps")
    if ":" not in args.app.strip(":"):
        raise _Usage(f"the app must be given as MODULE:APP, not {args.app!r}")
    owned_path: tuple[str, int] | None = None
    if args.bind is not None:
        from fcgiproto.support import listen_address

        from ._server import _bind

        sock, address, inode = _bind(listen_address(args.bind))
        if address.path is not None:
            owned_path = (address.path, inode)
    else:
        inherited = inherited_listener(0)
        if inherited is None:
            raise _Usage("no --bind, and fd 0 is not a listening socket")
        sock = inherited
    logger.info("serving %s on %s", args.app, _describe(sock))
    try:
        if args.workers == 1 and not args.max_requests:
            return _serve(args, sock, multiprocess=False)
        return _Master(args, sock).run()
    finally:
        sock.close()
        if owned_path is not None:
            with contextlib.suppress(OSError):
                if os.stat(owned_path[0]).st_ino == owned_path[1]:
                    os.unlink(owned_path[0])


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    return f"{name[0]}:{name[1]}"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The server options the command line sets; those it leaves unset keep their defaults."""
    from fcgiproto.support import web_server_addrs

    given = {
        "max_connections": args.max_connections,
        "max_requests": args.limit_concurrency,
        "max_params_size": args.max_params_size,
        "max_params_pairs": args.max_params_pairs,
        "max_body_size": args.max_body_size,
        "max_unsent_size": args.max_unsent_size,
        "params_timeout": args.params_timeout,
        "idle_timeout": args.idle_timeout,
        "send_timeout": args.send_timeout,
    }
    return {
        "root_path": args.root_path,
        "graceful_timeout": _graceful_timeout(args),
        "multiplex": args.multiplex,
        "allowed_peers": web_server_addrs(os.environ.get("FCGI_WEB_SERVER_ADDRS")),
        **{name: value for name, value in given.items() if value is not None},
    }


def _graceful_timeout(args: argparse.Namespace) -> float:
    if args.graceful_timeout is not None:
        return float(args.graceful_timeout)
    from ._wsgi import DEFAULT_GRACEFUL_TIMEOUT

    return DEFAULT_GRACEFUL_TIMEOUT


def _serve(args: argparse.Namespace, sock: socket.socket, *, multiprocess: bool) -> int:
    """Serve in this process until a signal, or --max-requests; the exit status."""
    # A signal while the app loads (which can take seconds) drains as soon as it serves.
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return _load_and_serve(args, sock, multiprocess, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _load_and_serve(
    args: argparse.Namespace, sock: socket.socket, multiprocess: bool, stop: threading.Event
) -> int:
    try:
        app = load_app(args.app, factory=args.factory, app_dir=args.app_dir)
    except _Usage:
        if not multiprocess:
            raise
        logger.exception("could not load %s", args.app)  # a worker: the master gives up
        return BOOT_FAILED
    except Exception:
        logger.exception("could not load %s", args.app)
        return BOOT_FAILED
    interface = args.interface
    if interface == "auto":
        interface = "asgi" if is_asgi(app) else "wsgi"
    max_requests = args.max_requests
    if max_requests:
        max_requests += random.randint(0, args.max_requests_jitter)
    options = _options(args)
    if interface == "asgi":
        try:
            # Imported by name: the blocking adapter stays free of anyio, which
            # only an ASGI app needs (the fcgiproto-ng[anyio] extra).
            asgi = importlib.import_module("fcgiproto_anyio._asgi")
        except ModuleNotFoundError as exc:
            logger.error("an ASGI app needs anyio: pip install 'fcgiproto-ng[anyio]' (%s)", exc)
            return BOOT_FAILED
        asgi.run_asgi_process(
            app,
            sock=sock,
            backend=args.loop,
            recycle_after=max_requests,
            stopped=stop,
            lifespan=args.lifespan,
            **options,
        )
        return 0
    _serve_wsgi(app, sock, args.threads, max_requests, multiprocess, options, stop)
    return 0


def _serve_wsgi(
    app: Any,
    sock: socket.socket,
    threads: int | None,
    max_requests: int,
    multiprocess: bool,
    options: dict[str, Any],
    stop: threading.Event,
) -> None:
    from ._wsgi import serve_wsgi

    served = 0
    lock = threading.Lock()

    def counted(environ: dict[str, Any], start_response: Any) -> Any:
        nonlocal served
        with lock:
            served += 1
            if served >= max_requests:
                stop.set()
        return app(environ, start_response)

    serve_wsgi(
        counted if max_requests else app,
        sock=sock,
        threads=threads,
        multiprocess=multiprocess,
        stop=stop,
        **options,
    )


class _Master:
    """Forks the workers, keeps their number up, and drains them on a signal."""

    def __init__(self, args: argparse.Namespace, sock: socket.socket) -> None:
        self.args = args
        self.sock = sock
        self.workers: set[int] = set()
        self.retiring: set[int] = set()
        self.stopping = False
        self.reload = False
        self.failed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def run(self) -> int:
        handlers = {
            signal.SIGTERM: self._on_stop,
            signal.SIGINT: self._on_stop,
            signal.SIGHUP: self._on_reload,
            signal.SIGCHLD: self._on_child,
        }
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        try:
            for _ in range(self.args.workers):
                self._spawn()
            while not self.stopping:
                select.select([self._wake_r], [], [], 1.0)
                self._drain_wake()
                self._reap()
                if self.reload:
                    self.reload = False
                    self._rotate()
                while not self.stopping and len(self.workers) < self.args.workers:
                    self._spawn()
            self._stop_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)
        return 1 if self.failed else 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        self._wake()

    def _on_reload(self, signum: int, frame: object) -> None:
        self.reload = True
        self._wake()

    def _on_child(self, signum: int, frame: object) -> None:
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass

    def _spawn(self) -> None:
        # A signal sent to a worker before it resets the master's handlers would run the
        # master's handler in the worker and be lost: the worker would serve on, and
        # outlive the master. Blocked across fork, it waits for the worker's own handlers
        # (or the default action, which ends a worker not yet serving).
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            raise
        if pid == 0:  # the worker
            status = 1
            try:
                for signum in signals:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
                os.close(self._wake_r)
                os.close(self._wake_w)
                status = _serve(self.args, self.sock, multiprocess=True)
            except BaseException:
                logger.exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        self.workers.add(pid)
        logger.info("started worker %d", pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.workers.discard(pid)
            self.retiring.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code == BOOT_FAILED:
                logger.error("worker %d could not load the app: stopping", pid)
                self.failed = self.stopping = True
            elif code != 0 and not self.stopping:
                logger.warning("worker %d died (exit status %d): replacing it", pid, code)
            else:
                logger.info("worker %d exited", pid)

    def _rotate(self) -> None:
        """SIGHUP: new workers first, then the old ones drain."""
        old = set(self.workers)
        for _ in range(self.args.workers):
            self._spawn()
        for pid in old:
            self.workers.discard(pid)
            self.retiring.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _stop_all(self) -> None:
        everyone = self.workers | self.retiring
        for pid in everyone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _graceful_timeout(self.args) + KILL_MARGIN
        while self.workers or self.retiring:
            self._reap()
            if not (self.workers or self.retiring):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                for pid in self.workers | self.retiring:
                    logger.warning("worker %d did not stop: killing it", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = math.inf
            select.select([self._wake_r], [], [], min(max(left, 0.0), 0.5))
            self._drain_wake()
