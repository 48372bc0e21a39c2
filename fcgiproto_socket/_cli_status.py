"""`fcgi status`: php-fpm's status page, printed, with thresholds for probes."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ._cli import (
    ADDRESSES,
    EXIT_STATUSES,
    FORMATTER,
    LISTEN_QUEUE_TOO_LONG,
    OK,
    TOO_BUSY,
    TOO_FEW_IDLE,
    Commands,
    _fail,
    add_address,
    add_timeout,
    one_shot_client,
    whole_number,
)

if TYPE_CHECKING:
    from fcgiproto.support import PoolStatus, ProcessStatus

__all__ = ["add", "render_text", "thresholds"]

DESCRIPTION = """\
Read php-fpm's status page (the pool's pm.status_path) over FastCGI, on one
connection, and print it: as text, as JSON with php-fpm's own names, or in
the Prometheus text format with php-fpm_exporter's metric names. A 503
(php-fpm's scoreboard in use) is asked again once.

Thresholds make it a probe: each one crossed is named in one line on stderr,
and the status is that of the first (5, 6, 7 below). The worker that answers
the status request counts as active, so a pool of N workers shows at most
N-1 idle ones.
"""


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1: {text!r}")
    return value


def add(commands: Commands) -> None:
    status = commands.add_parser(
        "status",
        help="php-fpm's status page, with thresholds for probes",
        description=DESCRIPTION + ADDRESSES,
        epilog=EXIT_STATUSES,
        formatter_class=FORMATTER,
    )
    add_address(status)
    status.add_argument(
        "--path", default="/status", help="the pool's pm.status_path (default: /status)"
    )
    status.add_argument("--full", action="store_true", help="also every worker process")
    status.add_argument(
        "--format",
        choices=("text", "json", "prometheus"),
        default="text",
        help="how to print it (default: text)",
    )
    status.add_argument(
        "--max-listen-queue",
        type=whole_number,
        metavar="N",
        help="fail (5) when more than N connections wait in the listen queue",
    )
    status.add_argument(
        "--min-idle",
        type=whole_number,
        metavar="N",
        help="fail (6) when fewer than N processes are idle",
    )
    status.add_argument(
        "--max-active-ratio",
        type=_ratio,
        metavar="R",
        help="fail (7) when active processes / total processes is above R (0 < R <= 1)",
    )
    add_timeout(status, 5.0)
    status.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ._status import read_status

    if not args.path.startswith("/"):
        raise ValueError(f"--path must start with /: {args.path!r}")
    with one_shot_client(args.address, args.timeout) as client:
        status = read_status(client, args.path, full=args.full, timeout=args.timeout)
    if args.format == "json":
        import json

        print(json.dumps(status.to_json(), indent=2))
    elif args.format == "prometheus":
        from fcgiproto.support import PoolScrape, prometheus_text

        sys.stdout.write(prometheus_text([PoolScrape(str(client.address), status)]))
    else:
        sys.stdout.write(render_text(status))
    crossed = thresholds(status, args.max_listen_queue, args.min_idle, args.max_active_ratio)
    if not crossed:
        return OK
    return _fail(
        "fcgi status",
        f"{client.address} pool {status.pool}: " + "; ".join(reason for _, reason in crossed),
        crossed[0][0],
    )


def thresholds(
    status: PoolStatus,
    max_listen_queue: int | None,
    min_idle: int | None,
    max_active_ratio: float | None,
) -> list[tuple[int, str]]:
    """(exit status, reason) of each threshold the pool crosses, in the order of their statuses."""
    crossed = []
    if max_listen_queue is not None and status.listen_queue > max_listen_queue:
        crossed.append(
            (
                LISTEN_QUEUE_TOO_LONG,
                f"listen queue {status.listen_queue} > --max-listen-queue {max_listen_queue}",
            )
        )
    if min_idle is not None and status.idle_processes < min_idle:
        crossed.append(
            (TOO_FEW_IDLE, f"idle processes {status.idle_processes} < --min-idle {min_idle}")
        )
    if max_active_ratio is not None:
        total = status.total_processes
        ratio = status.active_processes / total if total else 1.0
        if ratio > max_active_ratio:
            crossed.append(
                (
                    TOO_BUSY,
                    f"active processes {status.active_processes} of {total} ({ratio:.2f}) "
                    f"> --max-active-ratio {max_active_ratio:g}",
                )
            )
    return crossed


def render_text(status: PoolStatus) -> str:
    """The page as php-fpm writes its text form, which parse_status reads back."""
    blocks = [_fields(status)]
    blocks += [_fields(process) for process in status.processes]
    return "\n************************\n".join(blocks)


def _fields(status: PoolStatus | ProcessStatus) -> str:
    lines = []
    for name, value in status.to_json().items():
        if name == "processes":
            continue
        if name == "start time":
            value = status.start_time.strftime("%d/%b/%Y:%H:%M:%S %z")
        elif name == "request uri":
            name = "request URI"
        elif name == "last request cpu":
            value = f"{value:.2f}"
        lines.append(f"{name + ':':<22}{value}")
    return "\n".join(lines) + "\n"
