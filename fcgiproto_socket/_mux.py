# Generated from fcgiproto_anyio/_mux.py by scripts/generate_sync.py: do not edit.
"""One connection shared by many requests, for applications that multiplex (FCGI_MPXS_CONNS=1).

A reader (task or thread) feeds the protocol state and routes each event to
the inbox of its request, waking only that request. Requests queue their
records and one writer at a time sends all that is queued, under a lock and
shielded from cancellation, since a record cut in half would corrupt the
connection for every request on it; a cancelled request is aborted instead,
and its id held until its END_REQUEST.

Written once for both clients: the blocking copy is generated from this file.
"""

from __future__ import annotations

from collections import deque

from fcgiproto import (
    Event,
    FastCGIError,
    GetValuesResult,
    LocalProtocolError,
    ParamsInput,
    ReadError,
    ReadTimeout,
    ResponseTooLarge,
    Role,
    StderrData,
    StdoutData,
    TimeoutException,
    WriteError,
)
from fcgiproto.support import Address, Deadline, receive_from, recipient, response_too_large

from ._connection import READ_SIZE, Connection, timeout_error
from ._primitives import Flag, Lock, StateLock, checkpoint, current_time, shield

__all__ = ["ABORT_WRITE_LIMIT", "COALESCE_LIMIT", "Inbox", "MuxConnection"]

#: How long an abort may take to write before the whole connection is given
#: up; writes cannot be cut short, so they need a bound.
ABORT_WRITE_LIMIT = 5.0
#: Queued bytes past which a request waits to send instead of leaving its
#: records to the writer at work.
COALESCE_LIMIT = 256 * 1024


class Inbox:
    """Where the reader leaves one request's events, and how it wakes the request.

    With a `max_size`, the reader counts the request's stdout and stderr,
    each in total, as request() gathers them: the chunk that would take one
    past it fails the request with ResponseTooLarge, and it and all that
    follows are dropped. The reader reads for every request on the connection
    and cannot wait for one; this keeps what it leaves for a request within
    the limit however far behind that request's caller is.
    """

    __slots__ = (
        "_address",
        "_max_size",
        "_request_id",
        "_stderr",
        "_stdout",
        "events",
        "failure",
        "wake",
    )

    def __init__(
        self, address: Address | None = None, request_id: int = 0, max_size: int = 0
    ) -> None:
        self.events: deque[Event] = deque()
        self.wake = Flag()
        self.failure: ResponseTooLarge | None = None
        self._address = address
        self._request_id = request_id
        self._max_size = max_size
        self._stdout = self._stderr = 0

    def put(self, event: Event) -> None:
        if self.failure is not None:
            return  # past its limit: the request is being given up
        if self._max_size and (type(event) is StdoutData or type(event) is StderrData):
            if type(event) is StdoutData:
                self._stdout += len(event.data)
                stream, size = "stdout", self._stdout
            else:
                self._stderr += len(event.data)
                stream, size = "stderr", self._stderr
            if size > self._max_size:
                assert self._address is not None
                self.failure = response_too_large(
                    stream, self._max_size, self._address, self._request_id
                )
                self.wake.set()
                return
        self.events.append(event)
        self.wake.set()


class MuxConnection:
    def __init__(self, conn: Connection, keepalive_expiry: float) -> None:
        self.conn = conn
        self.address = conn.address
        self.proto = conn.proto
        self._lock = StateLock()
        self._write_lock = Lock()
        self._inboxes: dict[int, Inbox] = {}
        self._values_waiters: deque[Inbox] = deque()
        self._failure: FastCGIError | None = None
        self._closing = False
        self._torn = False  # a write broke off inside a record
        # Records queued by requests for the writer, who holds _write_lock.
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._writing = False  # a writer sends what is queued before it stops
        self._expiry = keepalive_expiry
        self._idle_since = current_time()

    @property
    def usable(self) -> bool:
        with self._lock:
            return self._failure is None and not self._closing and self.proto.can_send_request

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._inboxes

    def expired(self) -> bool:
        """Whether it has carried no request for its keep-alive expiry."""
        with self._lock:
            return not self._inboxes and current_time() - self._idle_since >= self._expiry

    # --- a request's calls ---

    def begin(
        self,
        params: ParamsInput,
        stdin: bytes | None,
        role: Role,
        deadline: Deadline,
        write_timeout: float | None,
        max_size: int = 0,
    ) -> tuple[int, Inbox]:
        """Send a request (and its whole body, unless stdin is None); its id and inbox.

        `max_size` bounds the stdout and the stderr the inbox takes (see AsyncInbox).
        """
        with self._lock:
            self._check()
            if stdin is None:
                rid = self.proto.begin_request(role)
                self.proto.send_params(rid, params)
                self.proto.end_params(rid)
            else:
                rid = self.proto.send_request(params, stdin, role=role)
            inbox = self._inboxes[rid] = Inbox(self.address, rid, max_size)
            data = self.proto.data_to_send()
        try:
            self._write(data, deadline, write_timeout)
        except BaseException:
            with shield():
                self.finish(rid, inbox)  # its caller never gets the inbox
            raise
        return rid, inbox

    def send_stdin(
        self, rid: int, chunk: bytes | None, deadline: Deadline, write_timeout: float | None
    ) -> bool:
        """Send a piece of the body, or its end when chunk is None.

        False, sending nothing, once the application has ended the request:
        it may answer before reading the whole body (or refuse it with
        OVERLOADED), and the reader may take that END_REQUEST while the
        body is still being sent.
        """
        with self._lock:
            self._check()
            if rid not in self.proto.active_requests:
                return False
            if chunk is None:
                self.proto.end_stdin(rid)
            else:
                self.proto.send_stdin(rid, chunk)
            data = self.proto.data_to_send()
        self._write(data, deadline, write_timeout)
        return True

    def get_values(
        self, names: list[str], deadline: Deadline, limit: float | None
    ) -> GetValuesResult:
        with self._lock:
            self._check()
            inbox = Inbox()
            self._values_waiters.append(inbox)
            self.proto.get_values(names)
            data = self.proto.data_to_send()
        self._write(data, deadline, limit)
        while True:
            for event in self.events(inbox, deadline, limit):
                if isinstance(event, GetValuesResult):
                    return event

    def events(self, inbox: Inbox, deadline: Deadline, read_timeout: float | None) -> list[Event]:
        """Wait for events in a request's inbox; its failure, if it went past its limit."""
        while not inbox.events or inbox.failure is not None:
            if inbox.failure is not None:
                raise inbox.failure
            # Cleared before looking: a put() from here on sets it again.
            inbox.wake.clear()
            if inbox.events or inbox.failure is not None:
                continue
            with self._lock:
                self._check()
            wait, by_total = deadline.limit(read_timeout)
            if (wait is None or wait > 0) and inbox.wake.wait(wait):
                continue
            if inbox.events or inbox.failure is not None:
                continue
            with self._lock:
                self._check()
            raise timeout_error(ReadTimeout, self.address, deadline, read_timeout, by_total)
        events = []
        while inbox.events:
            events.append(inbox.events.popleft())
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
                self._idle_since = current_time()
            if rid not in self.proto.active_requests or self._failure is not None:
                return
            self.proto.abort_request(rid)
            data = self.proto.data_to_send()
        try:
            self._write(data, Deadline(None, current_time), ABORT_WRITE_LIMIT)
        except FastCGIError:
            self.close()

    # --- internals ---

    def _check(self) -> None:
        """Raise the connection's failure, if it failed (state lock held)."""
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))
        if self._closing:
            raise LocalProtocolError(f"the connection to {self.address} is closed")

    def _write(self, data: bytes, deadline: Deadline, write_timeout: float | None) -> None:
        """Send `data` (whole records), after what other requests queued before it.

        Requests queue their records and one writer at a time sends all that
        is queued, so the records of requests started together go out in one
        send, and none is ever cut by another. While a writer is at work a
        request only queues and returns: the writer sends its records next,
        and a failure reaches it through the connection (`_check`). Past
        COALESCE_LIMIT queued bytes a request waits for its turn instead, so
        a peer that reads slowly holds the senders back.
        """
        with self._lock:
            if self._torn:
                raise self._fail_locked(WriteError(f"the connection to {self.address} broke"))
            self._outgoing.append(data)
            self._outgoing_size += len(data)
            if self._writing and self._outgoing_size <= COALESCE_LIMIT:
                return
            self._writing = True
        # Shielded: a record cut in half would corrupt every request on the
        # connection. The write's own limit still bounds it.
        with shield(), self._write_lock:
            if len(self._inboxes) > 1:
                # Other requests are in flight and may be about to send:
                # let those the event loop runs now queue theirs first.
                checkpoint()
            self._send_queued(deadline, write_timeout)

    def _send_queued(self, deadline: Deadline, write_timeout: float | None) -> None:
        """Send what is queued until nothing is (write lock held)."""
        stream = self.conn.stream
        try:
            while True:
                with self._lock:
                    if not self._outgoing:
                        self._writing = False
                        return
                    if self._torn:
                        self._outgoing.clear()
                        self._outgoing_size = 0
                        raise self._fail_locked(
                            WriteError(f"the connection to {self.address} broke")
                        )
                    outgoing = self._outgoing
                    data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
                    outgoing.clear()
                    self._outgoing_size = 0
                view = memoryview(data)
                while view:
                    wait, by_total = deadline.limit(write_timeout)
                    try:
                        sent = stream.write_some(view, wait)
                    except FastCGIError as exc:
                        if len(view) < len(data):
                            # Half a record is on the wire: every request here is lost.
                            self._torn = True
                            self._fail(WriteError(f"the connection to {self.address} broke"))
                        elif isinstance(exc, TimeoutException):
                            # Nothing went: the records wait, whole, for the next writer.
                            with self._lock:
                                self._outgoing.insert(0, data)
                                self._outgoing_size += len(data)
                        else:
                            self._fail(exc)  # a broken transport; a timeout alone is not
                        if isinstance(exc, TimeoutException):
                            raise timeout_error(
                                type(exc), self.address, deadline, write_timeout, by_total
                            ) from None
                        raise
                    view = view[sent:]
        except BaseException:
            with self._lock:
                self._writing = False
            raise

    def read_loop(self) -> None:
        """The reader: route events to their requests until the connection ends."""
        stream = self.conn.stream
        try:
            while True:
                try:
                    data = stream.read(READ_SIZE, self._expiry)
                except ReadTimeout:
                    if self.expired():
                        self._fail(ReadError(f"the idle connection to {self.address} expired"))
                        return
                    continue
                except FastCGIError as exc:
                    self._fail(exc)
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
                            inbox.put(event)
        finally:
            with self._lock:
                self._closing = True
            with shield():
                self.conn.close()

    def _fail(self, failure: FastCGIError) -> FastCGIError:
        with self._lock:
            return self._fail_locked(failure)

    def _fail_locked(self, failure: FastCGIError) -> FastCGIError:
        if self._failure is None:
            self._failure = failure
        for inbox in [*self._inboxes.values(), *self._values_waiters]:
            inbox.wake.set()
        return failure

    def close(self) -> None:
        """Close the connection; its requests fail, and the reader ends."""
        with self._lock:
            self._closing = True
            self._fail_locked(ReadError(f"the connection to {self.address} was closed"))
        self.conn.close()
