"""`fcgi exporter`: a Prometheus endpoint for php-fpm pools, scraped at every request."""

from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING

from ._cli import (
    ADDRESSES,
    FORMATTER,
    OK,
    Commands,
    _Usage,
    address_argument,
    positive,
)

if TYPE_CHECKING:
    from ._exporter import PoolScraper

__all__ = ["add", "serve_metrics"]

DESCRIPTION = """\
Serve php-fpm's status pages as Prometheus metrics, with the names of
php-fpm_exporter (phpfpm_up, phpfpm_accepted_connections, phpfpm_listen_queue,
phpfpm_process_state, ...), so its dashboards and alerts work unchanged.

At every scrape of /metrics each ADDRESS is read on a connection of its own,
all at once, each within --timeout: a pool that does not answer in time is
reported with phpfpm_up 0. An ADDRESS may be a glob of Unix sockets
(unix:/run/php/*.sock), expanded again at every scrape. Needs the exporter
extra: pip install 'fcgiproto-ng[exporter]'.
"""

EPILOG = """\
exit status:
  0  stopped by Ctrl-C or SIGTERM
  2  usage error, the listen address taken, or prometheus-client missing
"""

MISSING = (
    "fcgi exporter needs prometheus-client, which fcgiproto-ng installs with its "
    "extra: pip install 'fcgiproto-ng[exporter]'"
)


def add(commands: Commands) -> None:
    exporter = commands.add_parser(
        "exporter",
        help="a Prometheus endpoint for php-fpm pools",
        description=DESCRIPTION + ADDRESSES,
        epilog=EPILOG,
        formatter_class=FORMATTER,
    )
    exporter.add_argument(
        "addresses",
        metavar="ADDRESS",
        nargs="+",
        type=address_argument,
        help="a pool to scrape, or a glob of Unix sockets",
    )
    exporter.add_argument(
        "--listen",
        default="127.0.0.1:9253",
        metavar="HOST:PORT",
        help="where to serve /metrics (default: 127.0.0.1:9253)",
    )
    exporter.add_argument(
        "--path", default="/status", help="the pools' pm.status_path (default: /status)"
    )
    exporter.add_argument(
        "--timeout",
        type=positive,
        default=3.0,
        metavar="S",
        help="seconds each pool has to answer, per scrape (default: 3)",
    )
    exporter.add_argument(
        "--no-processes",
        action="store_true",
        help="leave out the per-process metrics (phpfpm_process_*)",
    )
    exporter.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import signal

    try:
        import prometheus_client  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "prometheus_client":
            raise
        raise _Usage(MISSING) from None
    from fcgiproto.support import parse_address

    from ._exporter import PoolScraper

    listen = parse_address(args.listen, listening=True)
    if listen.path is not None:
        raise _Usage(f"--listen takes HOST:PORT, not {args.listen!r}")
    if not args.path.startswith("/"):
        raise _Usage(f"--path must start with /: {args.path!r}")
    scraper = PoolScraper(
        args.addresses, path=args.path, deadline=args.timeout, full=not args.no_processes
    )
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if in_main:  # `kill` stops it as cleanly as Ctrl-C
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        serve_metrics(scraper, listen.host, listen.port, stop)
    except KeyboardInterrupt:
        pass
    finally:
        scraper.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print("Stopped.", flush=True)
    return OK


def serve_metrics(scraper: PoolScraper, host: str, port: int, stop: threading.Event) -> None:
    """Serve /metrics until `stop` is set; prints where once it listens."""
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import REGISTRY, generate_latest

    lock = threading.Lock()  # one scrape at a time: two scrapers do not double php-fpm's load

    class Handler(BaseHTTPRequestHandler):
        server_version = "fcgi-exporter"

        def do_GET(self) -> None:
            route = self.path.partition("?")[0]
            if route == "/metrics":
                with lock:
                    text = scraper.exposition()
                # The exporter's own process_* and python_* metrics, as every
                # exporter has; php-fpm_exporter has Go's.
                body = text.encode() + generate_latest(REGISTRY)
                self._answer(200, "text/plain; version=0.0.4; charset=utf-8", body)
            elif route == "/":
                page = '<html><body><a href="/metrics">php-fpm metrics</a></body></html>\n'
                self._answer(200, "text/html; charset=utf-8", page.encode())
            else:
                self._answer(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is not news

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        server = Server((host, port), Handler)
    except OSError as exc:
        raise _Usage(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"Serving php-fpm metrics on http://{shown}:{bound_port}/metrics "
        f"for {', '.join(scraper.targets)} (Ctrl-C to stop)",
        flush=True,
    )
    thread = threading.Thread(target=server.serve_forever, name="fcgi exporter http")
    thread.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
