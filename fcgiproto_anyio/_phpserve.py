"""What `fcgi php` runs: PhpGateway under uvicorn, with access logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ._gateway import PhpGateway

__all__ = ["run", "worker_app"]


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ValueError(f"--env takes NAME=VALUE, not {pair!r}")
        env[name] = value
    return env


def _listen(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"--listen takes HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


#: Where the parent hands the gateway's options to its worker processes.
_OPTIONS_VARIABLE = "FCGIPROTO_PHP_GATEWAY"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """PhpGateway's keyword arguments from the command line (JSON-serializable)."""
    workers: int = args.workers
    if workers < 1:
        raise ValueError(f"--workers must be 1 or more, not {workers}")
    if args.max_connections < workers:
        raise ValueError(
            f"--max-connections ({args.max_connections}) is shared by the workers: "
            f"it must be at least --workers ({workers})"
        )
    return {
        "root": args.root,
        "upstreams": list(args.upstream),
        "split_path": list(args.split_path),
        "index": None if args.index == "off" else args.index,
        "try_files": args.try_files,
        "env": _env(args.env),
        "resolve_root_symlink": args.resolve_root_symlink,
        "capture_stderr": not args.no_capture_stderr,
        "dial_timeout": args.dial_timeout,
        "read_timeout": args.read_timeout,
        "write_timeout": args.write_timeout,
        "static": args.static,
        "trusted_proxies": list(args.trusted_proxy),
        "policy": args.policy,
        "hash_key": args.hash_key,
        # php-fpm pins a worker to each kept-alive connection: the cap is
        # for the upstream, so the processes share it.
        "max_connections": args.max_connections // workers,
        "max_fails": args.max_fails,
        "fail_timeout": args.fail_timeout,
        "health_path": args.health_path,
        "health_interval": args.health_interval,
        "health_timeout": args.health_timeout,
        "max_spooled_body": args.max_spooled_body,
    }


def _log_to_stderr() -> None:
    """Scripts' stderr and the gateway's own errors, beside uvicorn's lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:  [%(name)s] %(message)s"))
    php_logger = logging.getLogger("fcgiproto.php")
    php_logger.addHandler(handler)
    php_logger.setLevel(logging.INFO)
    php_logger.propagate = False


def worker_app() -> PhpGateway:
    """The gateway of one worker process of `fcgi php --workers N` (a uvicorn factory)."""
    _log_to_stderr()
    return PhpGateway(**json.loads(os.environ[_OPTIONS_VARIABLE]))


def _http_protocol() -> type[Any] | str:
    """uvicorn's httptools protocol with coalesced writes, or uvicorn's choice without httptools."""
    try:
        from ._phphttp import CoalescingHttpToolsProtocol
    except ImportError:
        return "auto"
    return CoalescingHttpToolsProtocol


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; the exit status."""
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        if exc.name != "uvicorn":
            raise
        raise ValueError("fcgi php needs uvicorn: pip install 'fcgiproto-ng[php]'") from exc
    options = _options(args)
    # Built here even with workers: a bad option fails before any process starts.
    gateway = PhpGateway(**options)
    host, port = _listen(args.listen)
    _log_to_stderr()
    server_options: dict[str, Any] = {
        "http": _http_protocol(),
        "host": host,
        "port": port,
        "lifespan": "on",
        "access_log": not args.no_access_log,
        "log_level": args.log_level,
        # The gateway decides what X-Forwarded-* to believe (--trusted-proxy);
        # uvicorn's own handling would rewrite the client address first.
        "proxy_headers": False,
        "server_header": False,
    }
    if args.workers == 1:
        uvicorn.run(gateway, **server_options)
        return 0
    # uvicorn starts each worker afresh (spawn), from an import string: the
    # options travel in the environment, which the workers inherit.
    os.environ[_OPTIONS_VARIABLE] = json.dumps(options)
    uvicorn.run(
        "fcgiproto_anyio._phpserve:worker_app",
        factory=True,
        workers=args.workers,
        **server_options,
    )
    return 0
