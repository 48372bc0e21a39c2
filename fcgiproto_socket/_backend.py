"""The blocking backend: sockets whose every wait is bounded, one system call per step.

A request's answer is read with one blocking recv() whose limit the kernel
keeps (SO_RCVTIMEO), not a poll() and then a recv(): a kept-alive request costs
a liveness poll, one send and the recvs its answer needs. Writes never block
(MSG_DONTWAIT): when the socket takes nothing, poll() waits for it to take more
or for the answer, so a request can send its body and read the answer at once
in one thread (an application may answer before it has read all of stdin).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

from fcgiproto import (
    ConnectError,
    ConnectTimeout,
    ReadError,
    ReadTimeout,
    WriteError,
    WriteTimeout,
)
from fcgiproto.support import Address

__all__ = ["SocketBackend", "SocketStream"]

_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR
_NO_WAIT = socket.MSG_DONTWAIT
#: struct timeval, as SO_RCVTIMEO and SO_SNDTIMEO take it.
_TIMEVAL = struct.Struct("@ll")


def kernel_timeout(timeout: float | None) -> bytes:
    """A limit for SO_RCVTIMEO or SO_SNDTIMEO; at least 1 µs, since 0 means none to the kernel."""
    micros = 0 if timeout is None else max(1, round(timeout * 1_000_000))
    return _TIMEVAL.pack(*divmod(micros, 1_000_000))


class SocketBackend:
    """TCP and Unix sockets."""

    def connect(self, address: Address, timeout: float | None) -> SocketStream:
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
        # Blocking, so that a read waits in the kernel, bounded by SO_RCVTIMEO;
        # every write passes MSG_DONTWAIT.
        sock.settimeout(None)
        return SocketStream(sock, address)


class SocketStream:
    """One non-blocking socket; its errors leave as the fcgiproto tree.

    On a multiplexed connection a reader thread waits in read() while other
    threads write and one may close: the socket is shut down at once, which
    wakes the reader, but closed only when no call is using it any more, so
    its descriptor cannot be reused under a call in progress.
    """

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self._sock = sock
        self._address = address
        self._fd = sock.fileno()
        self._read_poller = select.poll()
        self._read_poller.register(self._fd, _READABLE)
        self._write_poller = select.poll()
        self._write_poller.register(self._fd, _WRITABLE)
        self._both_poller = select.poll()
        self._both_poller.register(self._fd, _READABLE | _WRITABLE)
        self._lock = threading.Lock()
        self._in_use = 0
        self._closed = False
        # The read limit the socket has now (SO_RCVTIMEO; None: none): set
        # again only when a read asks for another, which most reads do not.
        self._read_limit: float | None = None

    def read(self, max_bytes: int, timeout: float | None) -> bytes:
        self._enter(ReadError)
        try:
            if timeout is not None and timeout <= 0:
                return self._read_now(max_bytes, timeout)
            if timeout != self._read_limit:
                self._set_read_limit(timeout)
            try:
                return self._sock.recv(max_bytes)
            except BlockingIOError:  # SO_RCVTIMEO ran out
                raise self._timeout(ReadTimeout, timeout) from None
            except OSError as exc:
                raise self._read_error(exc) from exc
        finally:
            self._leave()

    def write_some(self, data: memoryview, timeout: float | None) -> int:
        self._enter(WriteError)
        try:
            while True:
                try:
                    return self._sock.send(data, _NO_WAIT)
                except BlockingIOError:
                    self._wait(self._write_poller, timeout, WriteTimeout)
                except OSError as exc:
                    raise self._write_error(exc) from exc
        finally:
            self._leave()

    def write_or_read(
        self, data: memoryview, max_bytes: int, timeout: float | None
    ) -> tuple[int, bytes | None]:
        self._enter(WriteError)
        try:
            while True:
                try:
                    return self._sock.send(data, _NO_WAIT), None
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise self._write_error(exc) from exc
                if self._wait(self._both_poller, timeout, WriteTimeout) & _READABLE:
                    try:
                        return 0, self._sock.recv(max_bytes, _NO_WAIT)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise self._read_error(exc) from exc
        finally:
            self._leave()

    def looks_alive(self) -> bool:
        try:
            return not self._read_poller.poll(0)
        except OSError:
            return False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):  # not connected any more
                self._sock.shutdown(socket.SHUT_RDWR)
            if self._in_use:
                return  # the last call in progress closes it
        self._sock.close()

    def _enter(self, error: type[ReadError] | type[WriteError]) -> None:
        with self._lock:
            if self._closed:
                raise error(f"the connection to {self._address} was closed")
            self._in_use += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_use -= 1
            last = self._closed and not self._in_use
        if last:
            self._sock.close()

    def _read_now(self, max_bytes: int, timeout: float) -> bytes:
        """A read allowed no wait: what is there already, else ReadTimeout."""
        try:
            return self._sock.recv(max_bytes, _NO_WAIT)
        except BlockingIOError:
            raise self._timeout(ReadTimeout, timeout) from None
        except OSError as exc:
            raise self._read_error(exc) from exc

    def _set_read_limit(self, timeout: float | None) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, kernel_timeout(timeout))
        except OSError as exc:
            raise self._read_error(exc) from exc
        self._read_limit = timeout

    def _wait(
        self,
        poller: select.poll,
        timeout: float | None,
        error: type[ReadTimeout] | type[WriteTimeout],
    ) -> int:
        ready = poller.poll(None if timeout is None else timeout * 1000)
        if ready:
            return ready[0][1]
        raise self._timeout(error, timeout)

    def _timeout(
        self, error: type[ReadTimeout] | type[WriteTimeout], timeout: float | None
    ) -> ReadTimeout | WriteTimeout:
        doing = "send anything" if error is ReadTimeout else "take more"
        return error(f"{self._address} did not {doing} within {timeout}s")

    def _read_error(self, exc: OSError) -> ReadError:
        return ReadError(f"reading from {self._address} failed: {exc.strerror or exc}")

    def _write_error(self, exc: OSError) -> WriteError:
        return WriteError(f"writing to {self._address} failed: {exc.strerror or exc}")
