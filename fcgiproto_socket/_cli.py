"""The `fcgi` command: talk to a FastCGI application from the shell."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from fcgiproto import (
    ConnectError,
    ConnectTimeout,
    FastCGIError,
    LocalProtocolError,
    TimeoutException,
)
from fcgiproto.cgi import build_params
from fcgiproto.support import Address

from . import _demo, _serve_cli
from ._client import MANAGEMENT_VARIABLES, Client
from ._php import add_php_command
from ._server import Server, serve

__all__ = ["main"]

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3

EXIT_STATUSES = """\
exit status:
  0  the request completed (ping: with a 2xx status, and the --expect text)
  1  the request failed, timed out or (ping) had an unhealthy answer
  2  usage error: bad option, address, header or data file
  3  could not connect to the application
"""

ADDRESSES = """
ADDRESS is host:port, [::1]:port, unix:/path.sock, or the absolute path of a
Unix socket."""


class _Usage(Exception):
    """A mistake in the command line found after parsing."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns its exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has reported
        return exc.code if isinstance(exc.code, int) else USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    name = f"fcgi {args.command}"
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (_Usage, ValueError, LocalProtocolError) as exc:
        return _fail(name, str(exc), USAGE)
    except (ConnectError, ConnectTimeout) as exc:
        return _fail(name, str(exc), UNREACHABLE)
    except TimeoutException as exc:
        return _fail(name, f"timed out: {exc}", FAILED)
    except FastCGIError as exc:
        return _fail(name, str(exc), FAILED)
    except BrokenPipeError:  # `fcgi request ... | head`
        _silence_stdout()
        return FAILED
    except KeyboardInterrupt:
        return 130


def _fail(name: str, message: str, status: int) -> int:
    _flush_streams()
    print(f"{name}: {message}", file=sys.stderr)
    return status


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe
            stream.flush()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # pragma: no cover - not a real file
        pass


# --- the parser ---


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fcgi",
        description="Talk to a FastCGI application (php-fpm, a Go or Python app) directly.\n"
        + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="start the bundled example application and talk to it",
        description="Start the bundled example application on a temporary Unix socket,\n"
        "talk to it with the blocking client, and clean up.",
        formatter_class=formatter,
    )
    demo.add_argument(
        "--serve",
        metavar="ADDRESS",
        help="instead, serve the example application on ADDRESS until Ctrl-C "
        "(pages: /hello?name=, /echo, /ping, /stream?n=, /fail)",
    )
    demo.set_defaults(run=_demo_command)

    request = commands.add_parser(
        "request",
        help="send one request and print the response body",
        description="Send one request, its CGI params built as nginx's fastcgi_params\n"
        "does, and print the response body; the application's STDERR goes to stderr.\n" + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=formatter,
    )
    request.add_argument("address", metavar="ADDRESS", help="where the application listens")
    request.add_argument(
        "script_filename", metavar="SCRIPT_FILENAME", help="the file the application runs"
    )
    request.add_argument(
        "-X", "--method", help="the request method (default: GET, or POST with -d)"
    )
    request.add_argument(
        "-d", "--data", help="the request body: text, @file to read a file, @- for stdin"
    )
    request.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar='"NAME: VALUE"',
        help="a request header, sent as HTTP_NAME, underscores and all (repeatable)",
    )
    request.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a CGI param to add or override (repeatable)",
    )
    request.add_argument(
        "--uri",
        help="the request URI, /path?query (default: / and the basename of SCRIPT_FILENAME)",
    )
    request.add_argument(
        "-i", "--include", action="store_true", help="print the status and headers first"
    )
    request.add_argument(
        "--timeout", type=_positive, default=30.0, metavar="S", help="seconds (default: 30)"
    )
    request.set_defaults(run=_request_command)

    values = commands.add_parser(
        "values",
        help="ask the application's management values (GET_VALUES)",
        description="Send GET_VALUES and print the answer, one NAME=value a line.\n" + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=formatter,
    )
    values.add_argument("address", metavar="ADDRESS", help="where the application listens")
    values.add_argument(
        "names",
        metavar="NAME",
        nargs="*",
        help=f"the values to ask (default: {' '.join(MANAGEMENT_VARIABLES)})",
    )
    values.add_argument(
        "--timeout", type=_positive, default=5.0, metavar="S", help="seconds (default: 5)"
    )
    values.set_defaults(run=_values_command)

    ping = commands.add_parser(
        "ping",
        help="health check, as php-fpm's ping.path expects",
        description="Send GET with SCRIPT_NAME, SCRIPT_FILENAME and REQUEST_URI set to\n"
        "--path, as cgi-fcgi health checks of php-fpm do. Healthy: the request completes\n"
        "within the timeout with a 2xx status (and, with --expect, a body\n"
        "containing that text). Otherwise one line says what was wrong.\n" + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=formatter,
    )
    ping.add_argument("address", metavar="ADDRESS", help="where the application listens")
    ping.add_argument("--path", default="/ping", help="the ping path (default: /ping)")
    ping.add_argument("--expect", metavar="TEXT", help="text the body must contain, e.g. pong")
    ping.add_argument(
        "--timeout", type=_positive, default=5.0, metavar="S", help="seconds (default: 5)"
    )
    ping.set_defaults(run=_ping_command)
    add_php_command(commands)

    _serve_cli.add_parser(commands)
    return parser


# --- demo ---


def _demo_command(args: argparse.Namespace) -> int:
    if args.serve is not None:
        return _serve_demo(args.serve)
    # A Unix socket path must stay short (108 bytes on Linux): prefer /tmp to a long TMPDIR.
    base = "/tmp" if len(tempfile.gettempdir()) > 60 and os.path.isdir("/tmp") else None
    with tempfile.TemporaryDirectory(prefix="fcgi-demo-", dir=base) as directory:
        path = os.path.join(directory, "app.sock")
        with Server(_demo.app, path) as server:
            print(f"The example application listens on {server.address}")
            print()
            _demo.tour(server.address, print)
    gone = "removed" if not os.path.exists(directory) else "could NOT remove"
    print()
    print(f"Stopped the application and {gone} {directory}")
    return OK


def _serve_demo(address: str) -> int:
    def ready(bound: Address) -> None:
        print(f"Serving the example application on {bound} (Ctrl-C to stop)", flush=True)

    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if in_main:  # `kill` stops it as cleanly as Ctrl-C
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        serve(_demo.app, address, ready=ready, stop=stop)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise _Usage(f"cannot listen on {address}: {exc}") from exc
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print("Stopped.")
    return OK


# --- request ---


def _request_command(args: argparse.Namespace) -> int:
    body = _read_data(args.data)
    method = args.method or ("POST" if body is not None else "GET")
    if args.uri is not None:
        path, _, query = args.uri.partition("?")
        if not path.startswith("/"):
            raise _Usage(f"--uri must start with /: {args.uri!r}")
    else:
        path, query = "/" + os.path.basename(args.script_filename), ""
    params = build_params(
        method,
        path,
        query=query,
        headers=[_header(text) for text in args.header],
        script_filename=args.script_filename,
        document_root=os.path.dirname(args.script_filename),
        content_length=None if body is None else len(body),
        extra=dict(_param(text) for text in args.param),
        # The headers are the user's own, not relayed from an HTTP client:
        # there is no proxy in front to bypass, so take them as typed.
        underscores_in_headers=True,
    )
    out = sys.stdout.buffer
    with Client(args.address, max_connections=1, timeout=args.timeout) as client:
        response = client.stream(params, body or b"")
        try:
            with response:
                if args.include:
                    lines = [f"Status: {response.status} {response.reason}"]
                    lines += [f"{name}: {value}" for name, value in response.headers]
                    out.write(("\n".join(lines) + "\n\n").encode("latin-1"))
                for chunk in response.iter_body():
                    out.write(chunk)
        finally:
            out.flush()
            if response.stderr:
                sys.stderr.flush()
                sys.stderr.buffer.write(bytes(response.stderr))
                sys.stderr.buffer.flush()
    return OK


def _read_data(data: str | None) -> bytes | None:
    if data is None or not data.startswith("@"):
        return None if data is None else os.fsencode(data)
    name = data[1:]
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        with open(name, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _Usage(f"cannot read {name}: {exc.strerror or exc}") from None


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise _Usage(f'a header is "Name: value", not {text!r}')
    return name.strip(), value.strip()


def _param(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise _Usage(f"a param is NAME=VALUE, not {text!r}")
    return name, value


# --- values ---


def _values_command(args: argparse.Namespace) -> int:
    with Client(args.address, max_connections=1, timeout=args.timeout) as client:
        values = client.get_values(args.names or MANAGEMENT_VARIABLES)
    for name, value in values.items():
        print(f"{name}={value}")
    return OK


# --- ping ---


def _ping_command(args: argparse.Namespace) -> int:
    path = args.path
    if not path.startswith("/"):
        raise _Usage(f"--path must start with /: {path!r}")
    # What cgi-fcgi sends php-fpm, plus the two an application on another
    # stack needs to see a request at all (Go's net/http/fcgi does).
    params = {
        "SCRIPT_NAME": path,
        "SCRIPT_FILENAME": path,
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": path,
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    started = time.monotonic()
    with Client(args.address, max_connections=1, timeout=args.timeout) as client:
        response = client.request(params)
        status = f"{response.status} {response.reason}".rstrip()
    elapsed = (time.monotonic() - started) * 1000
    where = client.address
    if not 200 <= response.status < 300:
        return _fail("fcgi ping", f"{where} answered {status} for {path}", FAILED)
    if args.expect is not None and args.expect.encode() not in response.body:
        return _fail(
            "fcgi ping",
            f"{where} answered {status} for {path}, but the body lacks "
            f"{args.expect!r}: {response.body[:60]!r}",
            FAILED,
        )
    print(f"{where}: {status} for {path} in {elapsed:.1f} ms")
    return OK
