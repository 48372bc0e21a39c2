"""The stream AnyioBackend gives on trio: AnyioStream, waiting through trio itself.

anyio on trio wraps each cancel scope and each wait_readable in a layer of its
own; a read is one of each, so going to trio directly saves a few
microseconds per request (about a seventh of a round trip's own cost). trio
registers a socket once per wait (EPOLLONESHOT) whichever way it is called,
so the waits themselves stay as they were.
"""

from __future__ import annotations

import anyio
import trio
import trio.lowlevel

from fcgiproto import ReadTimeout, WriteTimeout

from ._backend import AnyioStream, _Wait

__all__ = ["TrioStream"]


class TrioStream(AnyioStream):
    """One non-blocking socket, waited on with trio's own calls."""

    _checkpoint = staticmethod(trio.lowlevel.checkpoint)

    async def _wait(
        self,
        wait: _Wait,
        timeout: float | None,
        error: type[ReadTimeout] | type[WriteTimeout],
    ) -> None:
        if self._closed:
            raise self._closed_error(error)
        wait_for = (
            trio.lowlevel.wait_readable
            if wait is anyio.wait_readable
            else trio.lowlevel.wait_writable
        )
        if timeout is None:  # no scope to make: a server's reads and writes have no limit here
            try:
                await wait_for(self._sock)
            except (trio.ClosedResourceError, OSError):
                raise self._closed_error(error) from None
            return
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            try:
                await wait_for(self._sock)
            except (trio.ClosedResourceError, OSError):
                raise self._closed_error(error) from None
        if scope.cancelled_caught:
            doing = "send anything" if error is ReadTimeout else "take more"
            raise error(f"{self._address} did not {doing} within {timeout}s")
