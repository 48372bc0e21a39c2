"""The stream AnyioBackend gives on asyncio: the socket stays registered with the loop.

anyio's wait_readable adds the socket to the loop and removes it again on
every wait (two epoll_ctl calls and a Handle), and a timeout through anyio is
a cancel scope; together they cost more than the client's own work per
request. Here the socket is registered once, as a reader whose callback does
the recv itself and hands the bytes to the one waiting read, and a timeout is
an entry in the loop's LoopTimeouts (one timer for every wait). The socket
is never readable after the callback has taken its bytes, so a kept
connection waiting for its next request costs the loop nothing; only bytes
nobody waits for (the application closing an idle connection) unregister
it, since the loop would otherwise call again on every pass.

A waiting read is a plain asyncio future, which anyio cancel scopes cancel
like any other await on asyncio (anyio cancels the task natively there), so
cancellation and shielding behave as on the portable stream. System calls,
errors and the liveness check are the same as AnyioStream's.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable
from typing import Final, TypeAlias

from fcgiproto import ReadTimeout, WriteTimeout
from fcgiproto.support import Address

from ._primitives import loop_timeouts
from ._stream_errors import StreamErrors

__all__ = ["AsyncioStream", "Feed"]

# What a wait ends with, besides the bytes a read was given.
_WRITABLE: Final = object()
_TIMED_OUT: Final = object()
_CLOSED: Final = object()
_FED: Final = object()

#: What read_fed offers the bytes it waited for, in the loop's callback: True
#: when it took them and the wait goes on, False when it took them and the
#: read returns None, or the bytes themselves to leave them to the read.
Feed: TypeAlias = "Callable[[bytes], bool | bytes]"


class AsyncioStream(StreamErrors):
    """One non-blocking socket, registered with the running asyncio loop while open."""

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._address = address
        self._loop = asyncio.get_running_loop()
        self._closed = False
        # Just wrote a request: its answer cannot be there yet, so a read
        # waits first instead of trying a recv that would fail.
        self._wrote = False
        self._poller: select.poll | None = None
        self._watching = False  # registered as a reader with the loop
        self._read_waiter: asyncio.Future[object] | None = None
        self._read_size = 0
        self._write_waiter: asyncio.Future[object] | None = None
        self._feed: Feed | None = None  # while a read_fed waits
        # What a wait was given but could not deliver (its task was
        # cancelled just after): the next read or write_or_read gets it.
        self._undelivered: object = None

    # --- the loop's callbacks ---

    def _on_readable(self) -> None:
        waiter = self._read_waiter
        if waiter is None or waiter.done():
            # Nobody reads now: stop watching until someone does, or the
            # loop would call again on every pass while the bytes sit there.
            self._loop.remove_reader(self._fd)
            self._watching = False
            return
        try:
            data = self._sock.recv(self._read_size)
        except BlockingIOError:
            return
        except OSError as exc:
            error = self._read_error(exc)
            error.__cause__ = exc
            waiter.set_exception(error)
            return
        feed = self._feed
        if feed is not None and data:
            try:
                taken = feed(data)
            except Exception as exc:  # raised by the read, as if it had fed itself
                if not waiter.done():
                    waiter.set_exception(exc)
                return
            if taken is True:
                return
            if waiter.done():  # cancelled by what `feed` did (the read's scope)
                return
            if taken is False:
                waiter.set_result(_FED)
                return
            data = taken
        waiter.set_result(data)

    def _on_writable(self) -> None:
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(_WRITABLE)

    # --- the stream ---

    def wait_first(self) -> None:
        """The next read waits for the socket before it tries: nothing can be there yet.

        What a server says once it has read every request the peer sent
        whole: the peer sends more only after an answer.
        """
        self._wrote = True

    def _at_once(self, max_bytes: int) -> bytes | None:
        """What the socket holds now, unless a wait must come first; None when nothing."""
        if self._wrote:
            self._wrote = False
            return None
        try:
            return self._sock.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise self._read_error(exc) from exc

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        if self._undelivered is not None:
            return self._take_undelivered()
        data = self._at_once(max_bytes)
        if data is not None:
            # Data was there at once: still let other tasks run, and
            # cancellation in, as every async call should.
            await asyncio.sleep(0)
            return data
        while True:
            result = await self._wait(max_bytes, False, timeout, ReadTimeout)
            if type(result) is bytes:
                return result

    async def read_fed(self, max_bytes: int, feed: Feed) -> bytes | None:
        """As read() without a limit, but bytes that come while it waits go to `feed` first.

        `feed` runs in the loop's callback that read them: a server takes a
        request there in the turn of the loop it arrived in, instead of
        waking the task that reads in a turn of its own. None when `feed`
        took the bytes and ended the wait.
        """
        if self._undelivered is not None:
            return self._take_undelivered()
        data = self._at_once(max_bytes)
        if data is not None:
            await asyncio.sleep(0)
            return data
        self._feed = feed
        try:
            while True:
                result = await self._wait(max_bytes, False, None, ReadTimeout)
                if type(result) is bytes:
                    return result
                if result is _FED:
                    return None
        finally:
            self._feed = None

    async def write_some(self, data: memoryview, timeout: float | None) -> int:
        while True:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                await self._wait(0, True, timeout, WriteTimeout)
                continue
            except OSError as exc:
                raise self._write_error(exc) from exc
            self._wrote = True
            return sent

    async def write_or_read(
        self, data: memoryview, max_bytes: int, timeout: float | None
    ) -> tuple[int, bytes | None]:
        if self._undelivered is not None:
            return 0, self._take_undelivered()
        while True:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._write_error(exc) from exc
            else:
                self._wrote = True
                return sent, None
            result = await self._wait(max_bytes, True, timeout, WriteTimeout)
            if type(result) is bytes:
                return 0, result

    def looks_alive(self) -> bool:
        if self._undelivered is not None:
            return False
        try:
            if self._poller is None:  # made once: the check runs before every reuse
                self._poller = select.poll()
                self._poller.register(self._sock, select.POLLIN | select.POLLPRI)
            return not self._poller.poll(0)
        except (OSError, ValueError):
            return False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Off the loop before the descriptor goes: a number the loop still
        # watched could be reused by the next socket. Waiting tasks wake.
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)
        if self._write_waiter is not None:
            self._loop.remove_writer(self._fd)
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(_CLOSED)
        self._sock.close()

    async def _wait(
        self,
        read_size: int,
        writable: bool,
        timeout: float | None,
        error: type[ReadTimeout] | type[WriteTimeout],
    ) -> object:
        """Wait for bytes (when read_size), or for room to write (when writable).

        The bytes read, or _WRITABLE; anything else raises.
        """
        if self._closed:
            raise self._closed_error(error)
        if timeout is not None and timeout <= 0:
            raise self._timeout(error, timeout)
        loop = self._loop
        waiter: asyncio.Future[object] = loop.create_future()
        if read_size:
            self._read_waiter = waiter
            self._read_size = read_size
            if not self._watching:
                loop.add_reader(self._fd, self._on_readable)
                self._watching = True
        if writable:
            self._write_waiter = waiter
            loop.add_writer(self._fd, self._on_writable)
        if timeout is not None:
            timeouts = loop_timeouts(loop)
            timeouts.add(waiter, loop.time() + timeout, _TIMED_OUT)
        try:
            result = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Read from the socket, then the task was cancelled before it
                # resumed: keep the bytes (or the error) for the next read.
                given = waiter.exception() or waiter.result()
                if isinstance(given, (bytes, BaseException)):
                    self._undelivered = given
            raise
        finally:
            if timeout is not None:
                timeouts.discard(waiter)
            if read_size:
                self._read_waiter = None
            if writable:
                self._write_waiter = None
                if not self._closed:
                    loop.remove_writer(self._fd)
        if result is _TIMED_OUT:
            raise self._timeout(error, timeout)
        if result is _CLOSED:
            raise self._closed_error(error)
        return result

    def _take_undelivered(self) -> bytes:
        undelivered, self._undelivered = self._undelivered, None
        if isinstance(undelivered, BaseException):
            raise undelivered
        assert type(undelivered) is bytes
        return undelivered
