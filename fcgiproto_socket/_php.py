"""`fcgi php`: serve a PHP document root through php-fpm, under uvicorn.

The gateway is the ASGI application fcgiproto_anyio.PhpGateway; this module
only parses the command line, so the blocking adapter still imports no event
loop. The async side is imported when the command runs, and a missing extra
is named then.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ._cli import positive

__all__ = ["add_php_command"]

DESCRIPTION = """\
Serve the PHP files of --root through the php-fpm pools at --upstream, as Caddy's
php_fastcgi does: scripts by extension (--split-path), the front controller
(--try-files, default "{path} {path}/index.php index.php"), the trailing-slash
redirect for directories, other files served directly (or refused with
--static refuse), never sent to PHP. Several upstreams are balanced (--policy),
taken out after --max-fails failures within --fail-timeout, checked through
php-fpm's ping path (--health-path), retried on the next one only when that
cannot run a request twice. Access logs go to stderr.

Needs the optional extra: pip install 'fcgiproto-ng[php]'"""


def add_php_command(commands: Any) -> None:
    """Add `fcgi php` to the subcommands of `fcgi`."""
    php = commands.add_parser(
        "php",
        help="serve a PHP document root through php-fpm (an HTTP server)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    php.add_argument("--root", required=True, metavar="DIR", help="the document root")
    php.add_argument(
        "--upstream",
        required=True,
        nargs="+",
        metavar="ADDRESS",
        help="php-fpm pools: unix:/run/php/php-fpm.sock, 127.0.0.1:9000, ...",
    )
    php.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    php.add_argument("--split-path", nargs="+", default=[".php"], metavar="EXT")
    php.add_argument("--index", default="index.php", help="directory index, or 'off'")
    php.add_argument("--try-files", nargs="+", metavar="PATTERN")
    php.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    php.add_argument("--resolve-root-symlink", action="store_true")
    php.add_argument("--no-capture-stderr", action="store_true", help="drop scripts' stderr")
    php.add_argument("--static", choices=["serve", "refuse"], default="serve")
    php.add_argument("--trusted-proxy", action="append", default=[], metavar="NETWORK")
    php.add_argument(
        "--policy",
        choices=["round_robin", "least_conn", "first", "random", "hash"],
        default="least_conn",
    )
    php.add_argument("--hash-key", default="remote_addr")
    php.add_argument(
        "--max-spooled-body",
        type=int,
        default=64 << 20,
        metavar="BYTES",
        help="largest chunked request body, spooled to a file for its length (413 past it)",
    )
    php.add_argument(
        "--max-connections",
        type=int,
        default=8,
        help="cap per upstream, shared by the workers (at most php-fpm's pm.max_children)",
    )
    php.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes serving the one listening socket: one per core a Python "
        "process would leave idle (each has its own connections and health state)",
    )
    php.add_argument("--max-fails", type=int, default=1)
    php.add_argument("--fail-timeout", type=positive, default=10.0)
    php.add_argument("--health-path", help="php-fpm's ping.path, e.g. /ping")
    php.add_argument("--health-interval", type=positive, default=10.0)
    php.add_argument("--health-timeout", type=positive, default=5.0)
    php.add_argument("--dial-timeout", type=positive, default=3.0)
    php.add_argument("--read-timeout", type=positive, default=60.0)
    php.add_argument("--write-timeout", type=positive, default=60.0)
    php.add_argument("--no-access-log", action="store_true")
    php.add_argument("--log-level", default="info")
    php.set_defaults(run=_php_command)


def _php_command(args: argparse.Namespace) -> int:
    try:
        serve = importlib.import_module("fcgiproto_anyio._phpserve")
    except ModuleNotFoundError as exc:
        if exc.name not in ("anyio", "fcgiproto_anyio"):
            raise
        raise ValueError(
            "fcgi php needs anyio and uvicorn: pip install 'fcgiproto-ng[php]'"
        ) from exc
    status: int = serve.run(args)
    return status
