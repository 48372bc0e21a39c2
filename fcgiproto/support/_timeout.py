"""Limits in seconds, and the overall deadline of one request on an adapter's clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["PROBE_WAIT", "Deadline", "Timeout", "TimeoutInput", "probe_wait"]

TimeoutInput: TypeAlias = "Timeout | float | None"


@dataclass(frozen=True)
class Timeout:
    """Limits in seconds; None means no limit.

    connect: to open a connection. read: between two reads of the response.
    write: for the peer to take more of the request. pool: waiting for a free
    connection. total: the request's whole life, from asking the pool to the
    last byte, so a peer trickling one byte a second still times out.
    """

    connect: float | None = 5.0
    read: float | None = 30.0
    write: float | None = 30.0
    pool: float | None = 10.0
    total: float | None = None

    @classmethod
    def of(cls, value: TimeoutInput) -> Timeout:
        """A Timeout as given; a plain number sets every limit, total included."""
        if isinstance(value, Timeout):
            return value
        if value is None:
            return cls(None, None, None, None, None)
        if isinstance(value, (int, float)) and value > 0:
            number = float(value)
            return cls(number, number, number, number, number)
        raise ValueError(f"timeout must be a Timeout, a positive number or None, not {value!r}")


class Deadline:
    """The `total` limit of one request, on the adapter's clock."""

    __slots__ = ("at", "clock", "total")

    def __init__(self, total: float | None, clock: Callable[[], float]) -> None:
        self.total = total
        self.clock = clock
        self.at = None if total is None else clock() + total

    def limit(self, step: float | None) -> tuple[float | None, bool]:
        """The wait allowed for a step with its own limit; True when the total is the tighter."""
        if self.at is None:
            return step, False
        left = max(0.0, self.at - self.clock())
        if step is None or left < step:
            return left, True
        return step, False


#: How long the first request waits for the answer to "do you multiplex?".
PROBE_WAIT = 2.0


def probe_wait(limits: Timeout, deadline: Deadline) -> float:
    """How long to wait for the answer to "do you multiplex?" before the first request.

    An application that ignores GET_VALUES must not hold up the request: after
    this it is taken not to multiplex. At most half of what is left of the
    request's deadline, so the request itself still has time.
    """
    wait = PROBE_WAIT if limits.read is None else min(limits.read, PROBE_WAIT)
    left, _ = deadline.limit(None)
    return wait if left is None else min(wait, left / 2)
