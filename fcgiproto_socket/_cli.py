"""The `fcgi` command: talk to a FastCGI application from the shell.

A health check's start-up time is mostly imports, so each subcommand imports
what it needs when it runs: `fcgi ping` loads the client, never the server.
The operators' subcommands live in modules of their own (_cli_status,
_cli_exporter); this one holds the shared parts and the one-shot commands.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from fcgiproto.support import Address, Response

    from ._client import Client

__all__ = ["main"]

OK, FAILED, USAGE, UNREACHABLE, TIMED_OUT = 0, 1, 2, 3, 4
#: `fcgi status` thresholds, each with its own status (see _cli_status).
LISTEN_QUEUE_TOO_LONG, TOO_FEW_IDLE, TOO_BUSY = 5, 6, 7

EXIT_STATUSES = """\
exit status:
  0  success; for ping and status: healthy
  1  the application answered, but not as asked: ping unhealthy (not 2xx, no
     --expect text), request --fail with HTTP >= 400, values left unanswered,
     an unreadable status page, a FastCGI protocol error
  2  usage error: bad option, address, header or data file
  3  could not connect to the application (refused, no socket, connect timeout)
  4  timed out waiting for the answer
  5  status: the listen queue is longer than --max-listen-queue
  6  status: fewer idle processes than --min-idle
  7  status: more processes active than --max-active-ratio allows
"""

ADDRESSES = """
ADDRESS is host:port, tcp://host:port, [::1]:port, unix:/path.sock, or the
absolute path of a Unix socket."""


class _Usage(Exception):
    """A mistake in the command line found after parsing."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns its exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has reported
        return exc.code if isinstance(exc.code, int) else USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    name = f"fcgi {args.command}"
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except BrokenPipeError:  # `fcgi request ... | head`
        _silence_stdout()
        return FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        status = _exit_status(exc)
        if status is None:
            raise
        return _fail(name, _message(exc, status), status)


def _exit_status(exc: Exception) -> int | None:
    """The exit status for an error the command reports in one line; None for a bug."""
    if isinstance(exc, (_Usage, ValueError)):
        return USAGE
    # Imported here: the classes exist by now, as the command that raised loaded them.
    from fcgiproto import (
        ConnectError,
        ConnectTimeout,
        FastCGIError,
        LocalProtocolError,
        TimeoutException,
    )

    if isinstance(exc, LocalProtocolError):
        return USAGE
    if isinstance(exc, (ConnectError, ConnectTimeout)):
        return UNREACHABLE
    if isinstance(exc, TimeoutException):
        return TIMED_OUT
    if isinstance(exc, FastCGIError):
        return FAILED
    return None


def _message(exc: Exception, status: int) -> str:
    return f"timed out: {exc}" if status == TIMED_OUT else str(exc)


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


# Argument types every subcommand shares: each names what is wrong with the value.


def positive(text: str) -> float:
    """A number more than 0 (seconds, mostly)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def whole_number(text: str) -> int:
    """A count, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def address_argument(text: str) -> str:
    """An ADDRESS as typed, with the URL forms other tools print made plain.

    tcp://host:port and unix:///path (php-fpm_exporter's spellings) become
    host:port and /path; any other scheme is a usage error, not a host name.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    if scheme == "tcp" and rest and "/" not in rest:
        return rest
    if scheme == "unix" and rest.startswith("/"):
        return rest
    raise argparse.ArgumentTypeError(
        f"{text!r}: use host:port, tcp://host:port, unix:/path or /path"
    )


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address", metavar="ADDRESS", type=address_argument, help="where the application listens"
    )


def add_timeout(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--timeout",
        type=positive,
        default=default,
        metavar="S",
        help=f"seconds for the whole exchange (default: {default:g})",
    )


class _Version(argparse.Action):
    """--version, reading the version only when asked: it costs an import."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from fcgiproto._version import __version__

        print(f"fcgi (fcgiproto-ng) {__version__}")
        parser.exit()


#: What a subcommand adds its parser to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Adds a subcommand's parser, whose `run` default does its work.
Subcommand: TypeAlias = Callable[[Commands], None]
FORMATTER = argparse.RawDescriptionHelpFormatter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcgi",
        description="Talk to a FastCGI application (php-fpm, a Go or Python app) directly.\n"
        + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _subcommands():
        add(commands)
    return parser


def _subcommands() -> list[Subcommand]:
    # The operators' commands keep their code in modules of their own; their
    # parsers are cheap to build, their work is imported when they run.
    from ._cli_exporter import add as add_exporter
    from ._cli_status import add as add_status
    from ._php import add_php_command
    from ._serve_cli import add_parser as add_serve

    return [
        _add_demo,
        _add_request,
        _add_values,
        _add_ping,
        add_status,
        add_exporter,
        add_php_command,
        add_serve,
    ]


# --- demo ---


def _add_demo(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="start the bundled example application and talk to it",
        description="Start the bundled example application on a temporary Unix socket,\n"
        "talk to it with the blocking client, and clean up.",
        formatter_class=FORMATTER,
    )
    demo.add_argument(
        "--serve",
        metavar="ADDRESS",
        help="instead, serve the example application on ADDRESS until Ctrl-C "
        "(pages: /hello?name=, /echo, /ping, /stream?n=, /fail)",
    )
    demo.set_defaults(run=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    import tempfile

    from . import _demo
    from ._server import Server

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
    import signal
    import threading

    from . import _demo
    from ._server import serve

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


# --- one connection for one-shot commands ---


def one_shot_client(address: str, timeout: float) -> Client:
    """A client for a command's one exchange: one connection, no GET_VALUES probe.

    A probe would cost a connection of its own, and a command that sends one
    request has nothing to multiplex. Keeping no connection (keep_conn off)
    lets the application close it as it answers: php-fpm counts a kept
    connection twice in `accepted conn`, once more when the client leaves.
    """
    from ._client import Client

    return Client(address, max_connections=1, max_keepalive=0, multiplex=False, timeout=timeout)


# --- request ---


def _add_request(commands: Commands) -> None:
    request = commands.add_parser(
        "request",
        help="send one request and print the response body",
        description="Send one request, its CGI params built as nginx's fastcgi_params\n"
        "does, and print the response body; the application's STDERR goes to stderr.\n"
        "With -d and no Content-Type header, CONTENT_TYPE is\n"
        "application/x-www-form-urlencoded, as curl sends, so PHP fills $_POST.\n" + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=FORMATTER,
    )
    add_address(request)
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
        "-f",
        "--fail",
        action="store_true",
        help="on an HTTP status of 400 or more, print no body and exit 1",
    )
    add_timeout(request, 30.0)
    request.set_defaults(run=_request_command)


FORM = "application/x-www-form-urlencoded"


def _request_command(args: argparse.Namespace) -> int:
    from fcgiproto.cgi import build_params

    body = _read_data(args.data)
    method = args.method or ("POST" if body is not None else "GET")
    if args.uri is not None:
        path, _, query = args.uri.partition("?")
        if not path.startswith("/"):
            raise _Usage(f"--uri must start with /: {args.uri!r}")
    else:
        path, query = "/" + os.path.basename(args.script_filename), ""
    headers = [_header(text) for text in args.header]
    if body is not None and not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", FORM))  # what curl -d sends
    params = build_params(
        method,
        path,
        query=query,
        headers=headers,
        script_filename=args.script_filename,
        document_root=os.path.dirname(args.script_filename),
        content_length=None if body is None else len(body),
        extra=dict(_param(text) for text in args.param),
        # The headers are the user's own, not relayed from an HTTP client:
        # there is no proxy in front to bypass, so take them as typed.
        underscores_in_headers=True,
    )
    out = sys.stdout.buffer
    with one_shot_client(args.address, args.timeout) as client:
        response = client.stream(params, body or b"")
        try:
            with response:
                status = f"{response.status} {response.reason}".rstrip()
                if args.fail and response.status >= 400:
                    return _fail(
                        "fcgi request",
                        f"{client.address} answered {status} for {args.script_filename}",
                        FAILED,
                    )
                if args.include:
                    lines = [f"Status: {status}"]
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

MANAGEMENT_VARIABLES = ("FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS")


def _add_values(commands: Commands) -> None:
    values = commands.add_parser(
        "values",
        help="ask the application's management values (GET_VALUES)",
        description="Send GET_VALUES and print the answer, one NAME=value a line. Names\n"
        "the application leaves unanswered are listed on stderr; when they were named\n"
        "on the command line, that is a failure (exit 1). php-fpm answers only\n"
        "FCGI_MPXS_CONNS.\n" + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=FORMATTER,
    )
    add_address(values)
    values.add_argument(
        "names",
        metavar="NAME",
        nargs="*",
        help=f"the values to ask (default: {' '.join(MANAGEMENT_VARIABLES)})",
    )
    add_timeout(values, 5.0)
    values.set_defaults(run=_values_command)


def _values_command(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(args.names)) or list(MANAGEMENT_VARIABLES)
    with one_shot_client(args.address, args.timeout) as client:
        values = client.get_values(names)
    for name, value in values.items():
        print(f"{name}={value}")
    unanswered = [name for name in names if name not in values]
    if not unanswered:
        return OK
    message = f"{client.address} did not answer {' '.join(unanswered)}"
    if not args.names:
        _flush_streams()
        print(f"fcgi values: {message}", file=sys.stderr)
        return OK
    return _fail("fcgi values", message, FAILED)


# --- ping ---


def _add_ping(commands: Commands) -> None:
    ping = commands.add_parser(
        "ping",
        help="health check, as php-fpm's ping.path expects",
        description="Send GET with SCRIPT_NAME, SCRIPT_FILENAME and REQUEST_URI set to\n"
        "--path, as cgi-fcgi health checks of php-fpm do, on one connection. Healthy:\n"
        "the request completes within the timeout with a 2xx status (and, with\n"
        "--expect, a body containing that text). A 503 is asked again once (php-fpm\n"
        "answers it while its scoreboard is in use). Otherwise one line says what\n"
        "was wrong.\n" + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=FORMATTER,
    )
    add_address(ping)
    ping.add_argument("--path", default="/ping", help="the ping path (default: /ping)")
    ping.add_argument("--expect", metavar="TEXT", help="text the body must contain, e.g. pong")
    add_timeout(ping, 5.0)
    ping.set_defaults(run=_ping_command)


def request_with_retry(client: Client, params: dict[str, str], timeout: float) -> Response:
    """One request within `timeout` seconds, asked again once after a 503 if time is left.

    php-fpm answers 503 while its scoreboard is locked, for microseconds at a
    time; a probe should not call a pool unhealthy for that.
    """
    import time

    deadline = time.monotonic() + timeout
    response = client.request(params, timeout=timeout)
    left = deadline - time.monotonic() - RETRY_PAUSE
    if response.status == 503 and left > 0:
        time.sleep(RETRY_PAUSE)
        response = client.request(params, timeout=left)
    return response


RETRY_PAUSE = 0.05


def _ping_command(args: argparse.Namespace) -> int:
    import time

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
    with one_shot_client(args.address, args.timeout) as client:
        response = request_with_retry(client, params, args.timeout)
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
