"""What `fcgi php` runs: PhpGateway under uvicorn, with access logs."""

from __future__ import annotations

import argparse
import logging
import sys

from ._gateway import PhpGateway

__all__ = ["run"]


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


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; the exit status."""
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        if exc.name != "uvicorn":
            raise
        raise ValueError("fcgi php needs uvicorn: pip install 'fcgiproto-ng[php]'") from exc
    gateway = PhpGateway(
        args.root,
        args.upstream,
        split_path=args.split_path,
        index=None if args.index == "off" else args.index,
        try_files=args.try_files,
        env=_env(args.env),
        resolve_root_symlink=args.resolve_root_symlink,
        capture_stderr=not args.no_capture_stderr,
        dial_timeout=args.dial_timeout,
        read_timeout=args.read_timeout,
        write_timeout=args.write_timeout,
        static=args.static,
        trusted_proxies=args.trusted_proxy,
        policy=args.policy,
        hash_key=args.hash_key,
        max_connections=args.max_connections,
        max_fails=args.max_fails,
        fail_timeout=args.fail_timeout,
        health_path=args.health_path,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        max_spooled_body=args.max_spooled_body,
    )
    host, port = _listen(args.listen)
    # Scripts' stderr and the gateway's own errors, beside uvicorn's lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:  [%(name)s] %(message)s"))
    php_logger = logging.getLogger("fcgiproto.php")
    php_logger.addHandler(handler)
    php_logger.setLevel(logging.INFO)
    php_logger.propagate = False
    uvicorn.run(
        gateway,
        host=host,
        port=port,
        lifespan="on",
        access_log=not args.no_access_log,
        log_level=args.log_level,
        # The gateway decides what X-Forwarded-* to believe (--trusted-proxy);
        # uvicorn's own handling would rewrite the client address first.
        proxy_headers=False,
        server_header=False,
    )
    return 0
