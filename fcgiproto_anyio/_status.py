"""Read php-fpm's status page over a client: one request, parsed by fcgiproto.support.

Written once for both clients: the blocking copy is generated from this file.
"""

from __future__ import annotations

from fcgiproto.support import (
    AddressInput,
    PoolStatus,
    StatusPageError,
    Timeout,
    TimeoutInput,
    parse_status,
    status_params,
)

from ._client import AsyncClient
from ._primitives import AsyncFlag, current_time

__all__ = ["SCOREBOARD_RETRY_PAUSE", "read_status"]

#: How long to wait before asking again after php-fpm's 503: its scoreboard
#: is locked for microseconds, by the master or by another status request.
SCOREBOARD_RETRY_PAUSE = 0.05


async def read_status(
    client: AsyncClient | AddressInput,
    path: str = "/status",
    *,
    full: bool = False,
    timeout: TimeoutInput | None = None,
) -> PoolStatus:
    """php-fpm's status page at `path` (its pm.status_path), parsed.

    `client` is a client, or an address: then one connection carries the one
    request, and php-fpm closes it as it answers (no GET_VALUES probe, no
    kept connection to pin a worker or count twice in `accepted conn`).
    full=True adds every worker process. A 503 (php-fpm's "scoreboard in
    use") is asked again once; any other answer but 200, or a page that is
    not a status page, raises StatusPageError. The timeout's total bounds
    both tries together.
    """
    params = status_params(path, full=full)
    if not isinstance(client, AsyncClient):
        own_limits = 5.0 if timeout is None else timeout
        async with AsyncClient(
            client, max_connections=1, max_keepalive=0, multiplex=False, timeout=own_limits
        ) as own:
            return await read_status(own, path, full=full)
    limits = client.timeout if timeout is None else Timeout.of(timeout)
    started = current_time()
    for attempt in (1, 2):
        response = await client.request(params, timeout=limits)
        if response.status != 503 or attempt == 2:
            break
        if limits.total is not None:
            left = limits.total - (current_time() - started) - SCOREBOARD_RETRY_PAUSE
            if left <= 0:
                break
            limits = Timeout(limits.connect, limits.read, limits.write, limits.pool, left)
        await AsyncFlag().wait(SCOREBOARD_RETRY_PAUSE)
    if response.status != 200:
        reason = f"{response.status} {response.reason}".rstrip()
        raise StatusPageError(f"{client.address} answered {reason} for the status page {path}")
    return parse_status(response.body)
