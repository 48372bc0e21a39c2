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

__all__ = ["CLOSED", "OPEN", "WAITING", "Layout", "Streams", "stream_name"]

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


class Layout:
    """Which streams a kind of request has, and what the end of each opens.

    `sequence` lists groups of streams: the first group is open from the
    start, and once every stream of a group has ended the next group opens.
    """

    __slots__ = ("following", "initial", "openers")

    def __init__(self, *sequence: tuple[int, ...]) -> None:
        self.initial = {
            rtype: OPEN if index == 0 else WAITING
            for index, group in enumerate(sequence)
            for rtype in group
        }
        self.openers = {
            rtype: sequence[index - 1][0]
            for index, group in enumerate(sequence)
            if index
            for rtype in group
        }
        # stream -> (its group, the group its group's end opens)
        self.following = {
            rtype: (group, sequence[index + 1])
            for index, group in enumerate(sequence[:-1])
            for rtype in group
        }


class Streams:
    """The streams of one request in one direction."""

    __slots__ = ("layout", "states")

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.states = dict(layout.initial)

    def move(self, rtype: int, end: bool) -> str | None:
        """Apply data (or the end) of stream `rtype`; a complaint string if not allowed."""
        states = self.states
        state = states.get(rtype)
        if state is None:
            return "which this request does not have"
        target = _TRANSITIONS.get((state, _END if end else _DATA))
        if target is None:
            opener = stream_name(self.layout.openers.get(rtype, 0))
            return _COMPLAINTS[state].format(opener=opener)
        states[rtype] = target
        if target == CLOSED and rtype in self.layout.following:
            group, following = self.layout.following[rtype]
            if all(states[t] == CLOSED for t in group):
                for opened in following:
                    states[opened] = OPEN
        return None

    def all_closed(self) -> bool:
        return all(state == CLOSED for state in self.states.values())
