"""One socket to an application, with the waits and the error map of the blocking client.

The socket is non-blocking and every wait goes through poll() with an explicit
limit, so the request can send its body and read the response at once (an
application may answer before it has read all of stdin) without threads.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

from fcgiproto import (
    ClientConnection,
    ConnectError,
    ConnectTimeout,
    Event,
    ReadError,
    ReadTimeout,
    WriteError,
    WriteTimeout,
)
from fcgiproto.support import Address, Deadline, receive_from

__all__ = ["READ_SIZE", "SocketConnection", "connect", "wait_ready"]

#: A read takes what the kernel has, up to this: several 64 KiB records at once.
READ_SIZE = 256 * 1024
_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR


def connect(address: Address, timeout: float | None) -> socket.socket:
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError:
        raise ConnectTimeout(f"connecting to {address} took longer than {timeout}s") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def wait_ready(
    poller: select.poll, address: Address, deadline: Deadline, limit: float | None, writing: bool
) -> int:
    """Poll once within the step's limit and the deadline; the ready mask, or a timeout error."""
    wait, total = deadline.limit(limit)
    ready = poller.poll(None if wait is None else wait * 1000)
    if ready:
        return ready[0][1]
    error = WriteTimeout if writing else ReadTimeout
    if total:
        raise error(f"request to {address} exceeded its total timeout of {deadline.total}s")
    doing = "take more of the request" if writing else "send anything"
    raise error(f"{address} did not {doing} within {limit}s")


class SocketConnection:
    """A socket, its protocol state, and what is still to be written."""

    def __init__(self, sock: socket.socket, address: Address, multiplex: bool) -> None:
        self.sock = sock
        self.address = address
        self.proto = ClientConnection(multiplex=multiplex)
        self._pending = memoryview(b"")
        self._poller = select.poll()
        self._poller.register(sock, _READABLE)
        self._fd = sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def looks_alive(self) -> bool:
        """An idle connection is usable only while it has nothing to read.

        Anything readable on an idle FastCGI connection is either its end
        (php-fpm closes after pm.max_requests, or on restart) or garbage.
        """
        try:
            self._poller.modify(self._fd, _READABLE)
            return not self._poller.poll(0)
        except OSError:
            return False

    def queue(self) -> None:
        """Take what the protocol state has for the wire."""
        data = self.proto.data_to_send()
        if data:
            self._pending = (
                memoryview(bytes(self._pending) + data) if self._pending else memoryview(data)
            )

    @property
    def writing(self) -> bool:
        return bool(self._pending)

    def flush(self, deadline: Deadline, write_timeout: float | None) -> None:
        """Write everything pending, reading nothing."""
        while self._pending:
            self._wait(_WRITABLE, deadline, write_timeout, writing=True)
            self._send_some()

    def exchange(
        self,
        deadline: Deadline,
        read_timeout: float | None,
        write_timeout: float | None,
        refill: Callable[[], bool] | None = None,
    ) -> list[Event]:
        """Write what is pending while waiting for input; the events of the next read.

        `refill` is asked for more output whenever the pending output is gone;
        it returns False once it has nothing more to give.
        """
        while True:
            if not self._pending and refill is not None and refill():
                self.queue()
            if self._pending:
                # Most writes fit in the socket's buffer: try before polling.
                self._send_some()
                if not self._pending and refill is not None:
                    continue  # all gone: ask for more before waiting
            if self._pending:
                mask = _READABLE | _WRITABLE
                limit = write_timeout
            else:
                mask, limit = _READABLE, read_timeout
            ready = self._wait(mask, deadline, limit, writing=bool(self._pending))
            if ready & _READABLE:
                events = self._receive()
                if events:
                    return events
            elif ready & select.POLLOUT:
                self._send_some()

    def _wait(self, mask: int, deadline: Deadline, limit: float | None, writing: bool) -> int:
        self._poller.modify(self._fd, mask)
        return wait_ready(self._poller, self.address, deadline, limit, writing)

    def _send_some(self) -> None:
        try:
            sent = self.sock.send(self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            raise WriteError(f"writing to {self.address} failed: {exc.strerror or exc}") from exc
        self._pending = self._pending[sent:]

    def _receive(self) -> list[Event]:
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise ReadError(f"reading from {self.address} failed: {exc.strerror or exc}") from exc
        return receive_from(self.proto, data, self.address)
