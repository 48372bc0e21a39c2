"""The per-request stream rules both sides of a connection follow.

A request carries up to five streams. Each is in one of three states:

    WAITING --opens--> OPEN --data--> OPEN
                       OPEN --end---> CLOSED

Which streams a request has, and what a stream's end opens, depends on the
side and the role:

    client sends     PARAMS (open at BEGIN_REQUEST) -> STDIN -> DATA (filter role only)
    client receives  STDOUT, STDERR (open at BEGIN_REQUEST; END_REQUEST may come at any time)
    server receives  PARAMS (open at BEGIN_REQUEST) -> STDIN and DATA (filter role only)
    server sends     STDOUT, STDERR (open at BEGIN_REQUEST; end_request closes both)

An input missing from _TRANSITIONS is a protocol error; whose fault depends on
which side made the move (LocalProtocolError for our caller, RemoteProtocolError
for the peer), so the table returns the complaint and the caller raises.
"""

from __future__ import annotations

from ._records import RecordType

__all__ = ["CLOSED", "OPEN", "WAITING", "Streams", "stream_name"]

WAITING, OPEN, CLOSED = 0, 1, 2
_DATA, _END = 0, 1

_TRANSITIONS: dict[tuple[int, int], int] = {
    (OPEN, _DATA): OPEN,
    (OPEN, _END): CLOSED,
}

_COMPLAINTS = {
    WAITING: "before {opener} ended",
    CLOSED: "after the stream ended",
}


def stream_name(rtype: int) -> str:
    try:
        return RecordType(rtype).name
    except ValueError:
        return f"record type {rtype}"


class Streams:
    """The streams of one request in one direction, and what each end opens."""

    __slots__ = ("_sequence", "openers", "states")

    def __init__(self, sequence: tuple[tuple[int, ...], ...]) -> None:
        # `sequence` lists groups of streams: the first group is open, and the
        # end of every stream of one group opens the next group.
        self.states: dict[int, int] = {}
        self.openers: dict[int, int] = {}
        for index, group in enumerate(sequence):
            for rtype in group:
                self.states[rtype] = OPEN if index == 0 else WAITING
                if index:
                    self.openers[rtype] = sequence[index - 1][0]
        self._sequence = sequence

    def move(self, rtype: int, end: bool) -> str | None:
        """Apply data (or the end) of stream `rtype`; a complaint string if not allowed."""
        state = self.states.get(rtype)
        if state is None:
            return "which this request does not have"
        target = _TRANSITIONS.get((state, _END if end else _DATA))
        if target is None:
            opener = stream_name(self.openers.get(rtype, 0))
            return _COMPLAINTS[state].format(opener=opener)
        self.states[rtype] = target
        if target == CLOSED:
            self._open_after(rtype)
        return None

    def _open_after(self, rtype: int) -> None:
        for index, group in enumerate(self._sequence[:-1]):
            if rtype in group and all(self.states[t] == CLOSED for t in group):
                for following in self._sequence[index + 1]:
                    self.states[following] = OPEN

    def is_open(self, rtype: int) -> bool:
        return self.states.get(rtype) == OPEN

    def all_closed(self) -> bool:
        return all(state == CLOSED for state in self.states.values())
