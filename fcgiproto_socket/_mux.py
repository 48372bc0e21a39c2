"""One connection shared by many threads, for applications that multiplex (FCGI_MPXS_CONNS=1).

A reader thread owns the receiving side: it feeds the protocol state and
routes each event to the inbox of its request, waking only that request's
thread. Senders write whole records under a write lock, so records of
different requests interleave but never mix.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import deque

from fcgiproto import (
    ClientConnection,
    Event,
    FastCGIError,
    GetValuesResult,
    LocalProtocolError,
    ParamsInput,
    ReadError,
    ReadTimeout,
    Role,
    WriteError,
    WriteTimeout,
)
from fcgiproto.support import Address, Deadline, receive_from, recipient

from ._transport import READ_SIZE, wait_ready

__all__ = ["Inbox", "MuxConnection"]


class Inbox:
    __slots__ = ("events", "wake")

    def __init__(self, lock: threading.Lock) -> None:
        self.events: deque[Event] = deque()
        self.wake = threading.Condition(lock)


class MuxConnection:
    def __init__(self, sock: socket.socket, address: Address, keepalive_expiry: float) -> None:
        self.sock = sock
        self.address = address
        self.proto = ClientConnection(multiplex=True)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._write_poller = select.poll()
        self._write_poller.register(sock, select.POLLOUT)
        self._inboxes: dict[int, Inbox] = {}
        self._values_waiters: deque[Inbox] = deque()
        self._failure: FastCGIError | None = None
        self._closing = False
        self._idle_since = time.monotonic()
        self._expiry = keepalive_expiry
        self._reader = threading.Thread(
            target=self._read_loop, name=f"fcgiproto reader {address}", daemon=True
        )
        self._reader.start()

    @property
    def usable(self) -> bool:
        with self._lock:
            return self._failure is None and not self._closing and self.proto.can_send_request

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._inboxes

    def expired(self, expiry: float) -> bool:
        """Whether it has carried no request for `expiry` seconds."""
        with self._lock:
            return not self._inboxes and time.monotonic() - self._idle_since >= expiry

    # --- a request's calls ---

    def begin(
        self,
        params: ParamsInput,
        stdin: bytes | None,
        role: Role,
        deadline: Deadline,
        write_timeout: float | None,
    ) -> tuple[int, Inbox]:
        """Send a request (and its whole body, unless stdin is None); its id and inbox."""
        with self._lock:
            self._check()
            if stdin is None:
                rid = self.proto.begin_request(role)
                self.proto.send_params(rid, params)
                self.proto.end_params(rid)
            else:
                rid = self.proto.send_request(params, stdin, role=role)
            inbox = self._inboxes[rid] = Inbox(self._lock)
            data = self.proto.data_to_send()
        try:
            self._write(data, deadline, write_timeout)
        except BaseException:
            self.finish(rid, inbox)  # its caller never gets the inbox to finish with
            raise
        return rid, inbox

    def send_stdin(
        self, rid: int, chunk: bytes | None, deadline: Deadline, write_timeout: float | None
    ) -> None:
        """Send a piece of the body, or its end when chunk is None."""
        with self._lock:
            self._check()
            if chunk is None:
                self.proto.end_stdin(rid)
            else:
                self.proto.send_stdin(rid, chunk)
            data = self.proto.data_to_send()
        self._write(data, deadline, write_timeout)

    def get_values(
        self, names: list[str], deadline: Deadline, limit: float | None
    ) -> GetValuesResult:
        with self._lock:
            self._check()
            inbox = Inbox(self._lock)
            self._values_waiters.append(inbox)
            self.proto.get_values(names)
            data = self.proto.data_to_send()
        self._write(data, deadline, limit)
        while True:
            for event in self.events(inbox, deadline, limit):
                if isinstance(event, GetValuesResult):
                    return event

    def events(self, inbox: Inbox, deadline: Deadline, read_timeout: float | None) -> list[Event]:
        """Wait for events in a request's inbox."""
        with self._lock:
            while not inbox.events:
                self._check()
                wait, total = deadline.limit(read_timeout)
                if (wait is not None and wait <= 0) or not inbox.wake.wait(wait):
                    if inbox.events:
                        break
                    if total:
                        raise ReadTimeout(
                            f"request to {self.address} exceeded its total timeout "
                            f"of {deadline.total}s"
                        )
                    raise ReadTimeout(f"{self.address} did not answer within {read_timeout}s")
            events = list(inbox.events)
            inbox.events.clear()
            return events

    def finish(self, rid: int, inbox: Inbox) -> None:
        """The caller is done with the request: abort it when still in flight.

        The id then stays taken until the application's END_REQUEST, and is
        retired after it, so a late reply is dropped.
        """
        with self._lock:
            if self._inboxes.get(rid) is not inbox:
                return  # it ended, and the id already belongs to a newer request
            del self._inboxes[rid]
            if not self._inboxes:
                self._idle_since = time.monotonic()
            if rid not in self.proto.active_requests or self._failure is not None:
                return
            self.proto.abort_request(rid)
            data = self.proto.data_to_send()
        try:
            self._write(data, Deadline(None, time.monotonic), 5.0)
        except FastCGIError:
            self.close()

    # --- internals ---

    def _check(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))
        if self._closing:
            raise LocalProtocolError(f"the connection to {self.address} is closed")

    def _write(self, data: bytes, deadline: Deadline, write_timeout: float | None) -> None:
        view = memoryview(data)
        with self._write_lock:
            while view:
                try:
                    wait_ready(
                        self._write_poller, self.address, deadline, write_timeout, writing=True
                    )
                except WriteTimeout:
                    if len(view) < len(data):
                        # Half a record is on the wire: every request here is lost.
                        self._fail(WriteError(f"the connection to {self.address} broke"))
                    raise
                try:
                    sent = self.sock.send(view)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    failure = WriteError(f"writing to {self.address} failed: {exc.strerror or exc}")
                    self._fail(failure)
                    raise failure from exc
                view = view[sent:]

    def _read_loop(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLPRI)
        while True:
            try:
                if not poller.poll(self._expiry * 1000) and self._close_if_expired():
                    return
                data = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as exc:
                self._fail(ReadError(f"reading from {self.address} failed: {exc}"))
                return
            with self._lock:
                if self._closing:
                    return
                try:
                    events = receive_from(self.proto, data, self.address)
                except FastCGIError as exc:
                    self._fail_locked(exc)
                    return
                for event in events:
                    inbox = recipient(event, self._inboxes, self._values_waiters)
                    if inbox is not None:
                        inbox.events.append(event)
                        inbox.wake.notify()

    def _close_if_expired(self) -> bool:
        """Close the connection if it has been idle past its expiry (from the reader)."""
        with self._lock:
            if self._inboxes or time.monotonic() - self._idle_since < self._expiry:
                return False
            self._closing = True
            self._fail_locked(ReadError(f"the idle connection to {self.address} expired"))
        self.sock.close()
        return True

    def _fail(self, failure: FastCGIError) -> None:
        with self._lock:
            self._fail_locked(failure)

    def _fail_locked(self, failure: FastCGIError) -> None:
        if self._failure is None:
            self._failure = failure
        for inbox in [*self._inboxes.values(), *self._values_waiters]:
            inbox.wake.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._fail_locked(ReadError(f"the connection to {self.address} was closed"))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(10)
        self.sock.close()
