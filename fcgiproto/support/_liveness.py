"""When a server's connection last moved, what it waits for, and whether it may give way.

A peer can hold a connection without ever finishing a request: a few bytes of
a record header and silence, a byte a second, a request whose PARAMS never
end, a response it never reads. Both servers keep a `Liveness` per connection,
updated from their I/O, and ask it two things, the same way:

- `deadline()`: when the connection has waited on its peer too long. PARAMS
  must end within `params_timeout` of their BEGIN_REQUEST; while no request
  runs the application, the peer must send something within `idle_timeout`;
  a send that the peer does not take must move within `send_timeout`.
- `eviction_rank()`: at `max_connections`, which connection gives way to a new
  one. Any connection that waits on its peer may: one between requests, one
  still receiving a request, one whose response the peer is not reading. The
  one that moved longest ago goes first. A connection whose application is
  running, or whose output is still going out as fast as it is read, never
  does: a send counts as waiting on the peer once it has not moved for
  `SEND_STALL_GRACE` (a blocking server marks every send as it starts, and a
  fast reader's window fills and empties all the time).

Nothing here reads a clock: the servers pass `now` (time.monotonic, or the
event loop's clock), and a server with threads updates it from several of them
(each update is one attribute store; the deadline is read under the
connection's lock).
"""

from __future__ import annotations

from collections.abc import Iterable

from ._application import RequestState, ServerOptions

__all__ = ["SEND_STALL_GRACE", "Liveness"]

#: Seconds a send may wait on the peer before its connection may give way to a new one.
SEND_STALL_GRACE = 0.25


class Liveness:
    """One connection's last movement, running apps and stalled send (see the module)."""

    __slots__ = ("body_waits", "last_activity", "running", "send_stalled_since", "sending")

    def __init__(self, now: float) -> None:
        #: When a byte last arrived, a send last moved, or an app last ended.
        self.last_activity = now
        #: Applications running for this connection's requests.
        self.running = 0
        #: Of those, the ones waiting for more of their request body: they
        #: wait on the peer, so idle_timeout and eviction treat them as idle.
        self.body_waits = 0
        #: Output is queued that the kernel has not taken yet.
        self.sending = False
        #: When the send in progress started waiting on the peer; None if none does.
        self.send_stalled_since: float | None = None

    def received(self, now: float) -> None:
        """Bytes arrived from the peer."""
        self.last_activity = now

    def send_waiting(self, now: float) -> None:
        """A send found the peer's window full and waits for it."""
        if self.send_stalled_since is None:
            self.send_stalled_since = now

    def send_moved(self, now: float) -> None:
        """A send handed bytes to the kernel."""
        self.send_stalled_since = None
        self.last_activity = now

    def app_started(self) -> None:
        """An application began running for one of this connection's requests."""
        self.running += 1

    def app_ended(self, now: float) -> None:
        """An application ended; the idle clock starts again from `now`."""
        self.running -= 1
        self.last_activity = now

    def deadline(
        self, options: ServerOptions, requests: Iterable[RequestState]
    ) -> tuple[float, str] | None:
        """The earliest moment the connection has waited too long, and what for."""
        earliest: tuple[float, str] | None = None
        for state in requests:
            if state.raw_params is None:
                when = state.begun_at + options.params_timeout
                if earliest is None or when < earliest[0]:
                    earliest = (when, f"PARAMS of request {state.request_id} took too long")
        if self.send_stalled_since is not None:
            when = self.send_stalled_since + options.send_timeout
            if earliest is None or when < earliest[0]:
                earliest = (when, "the client stopped reading")
        if self.running <= self.body_waits:
            when = self.last_activity + options.idle_timeout
            if earliest is None or when < earliest[0]:
                earliest = (when, "the client sent nothing for too long")
        return earliest

    def eviction_rank(self, now: float) -> float | None:
        """Oldest first among connections that may give way; None for one that may not."""
        # `running` is read before `sending`, and servers set `sending` before
        # they lower `running`: an app that just ended with its last output
        # still queued is never taken for an idle connection.
        stalled = self.send_stalled_since
        if (self.running > self.body_waits or self.sending) and (
            stalled is None or now - stalled < SEND_STALL_GRACE
        ):
            return None
        return self.last_activity
