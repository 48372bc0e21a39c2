"""The rules of a request's life, as tables both sides of a connection follow.

Two tables, composed. The request table says what may happen to a request id
at all; the stream table says what may happen to each stream of a request
that is in flight. Anything missing from either is a protocol error: whose
fault depends on who made the move (LocalProtocolError for our caller,
RemoteProtocolError for the peer), so the tables give the complaint and the
caller raises. The tables are only read, never changed, and a move is looked
up before anything is changed, so a refused move changes nothing.

The request table, per side (inputs: BEGIN, SEND on a stream, RECEIVE a stream
record, ABORT, END the request; END_EARLY is END while the client has not yet
sent all its input; REFUSE is a BEGIN_REQUEST the application turns down):

    client   IDLE --BEGIN--> BEGUN --ABORT--> ABORTED --END--> RETIRED
                             BEGUN --END--> IDLE            (the id is free again)
                             BEGUN --END_EARLY--> RETIRED   (the application may still read)
             BEGUN: SEND and RECEIVE go on.  ABORTED: RECEIVE and a second ABORT
             are dropped, SEND is refused.  RETIRED: RECEIVE and END are dropped
             for the life of the connection (Go's late reply after an abort).
    server   IDLE, ENDED or DONE --BEGIN--> BEGUN --ABORT--> ABORTED
             IDLE, ENDED or DONE --REFUSE--> ENDED        (answered at once)
             BEGUN --END--> DONE        (all its input in: only a crossing ABORT may come)
             BEGUN or ABORTED --END_EARLY--> ENDED        (its input may still come)
             ABORTED --END--> IDLE      (aborted with all its input in: nothing more can come)
             DONE --ABORT--> IDLE       (the crossing ABORT, dropped: nothing more can come)
             BEGUN and ABORTED: SEND and RECEIVE go on; a second ABORT is dropped.
             ENDED: RECEIVE and ABORT are dropped until the id begins again.
             DONE: RECEIVE is dropped until the id begins again.

An ended id is remembered (ENDED or DONE), so that its late records are
dropped; IDLE ones cost nothing. A client may still be sending the input of a
request that ended, or send an ABORT that crosses the END_REQUEST; once it has
aborted and sent all its input, nothing more can come for the id. A client
that never reuses an aborted id (ours retires it) would otherwise leave one
remembered id per cancelled request on a multiplexed connection, up to all
65,535 of them.

IDLE is an id never used, or one after whose end nothing more can come (on
the client, one that ended normally): records for it are the peer's error. A
request is in `active_requests` while it is BEGUN or ABORTED.

The stream table: each stream of a request is WAITING, OPEN or CLOSED.

    WAITING --opens--> OPEN --data--> OPEN
                       OPEN --end---> CLOSED

Which streams a request has, and what a stream's end opens, depends on the
side and the role:

    client sends     PARAMS (open at BEGIN_REQUEST) -> STDIN -> DATA (filter role only)
    client receives  STDOUT, STDERR (open at BEGIN_REQUEST; END_REQUEST may come at any time)
    server receives  PARAMS (open at BEGIN_REQUEST) -> STDIN and DATA (filter role only)
    server sends     STDOUT, STDERR (open at BEGIN_REQUEST; end_request closes both)

The reader's fast path (a set of record headers whose data needs no checks)
is derived from both tables by `delivers`, after every move, in one place.
"""

from __future__ import annotations

from ._records import RecordType

__all__ = [
    "ABORT",
    "ABORTED",
    "BEGIN",
    "BEGUN",
    "CLIENT",
    "CLOSED",
    "DONE",
    "DROP",
    "END",
    "ENDED",
    "END_EARLY",
    "GO",
    "IDLE",
    "OPEN",
    "RECEIVE",
    "REFUSE",
    "RETIRED",
    "SEND",
    "SERVER",
    "STRAND",
    "WAITING",
    "Layout",
    "Lifecycle",
    "Streams",
    "delivers",
    "stream_name",
]

# --- the request table ---

# Request states.
IDLE, BEGUN, ABORTED, RETIRED, ENDED, DONE = range(6)
# Inputs.
BEGIN, SEND, RECEIVE, ABORT, END, END_EARLY, REFUSE = range(7)
# What to do with the input: carry it out, drop it silently, or (the client's
# request ended before its input was sent whole) carry it out and stop
# reusing a plain connection, whose application may still read that input.
GO, DROP, STRAND = 0, 1, 2


class Lifecycle:
    """One side's request table: (state, input) -> (target state, action)."""

    __slots__ = ("delivering_states", "local", "remote", "steps", "transitions")

    def __init__(
        self,
        transitions: dict[tuple[int, int], tuple[int, int]],
        local: dict[int, str],
        remote: dict[int, str],
    ) -> None:
        self.transitions = transitions
        #: The same table keyed by `state << 3 | input`: an int hashes faster than a
        #: tuple, and these lookups run several times per request.
        assert all(0 <= move < 8 for _, move in transitions)
        self.steps = {state << 3 | move: step for (state, move), step in transitions.items()}
        #: Why our caller's move from a state is refused: "request N <complaint>".
        self.local = local
        #: Why the peer's move from a state is refused: "... for request N, <complaint>".
        self.remote = remote
        #: States in which a received stream record goes on, the state unchanged.
        self.delivering_states = frozenset(
            state
            for (state, move), (target, action) in transitions.items()
            if move == RECEIVE and target == state and action == GO
        )

    def refusal(self, state: int, local: bool) -> str:
        """Why a move missing from the table, made from `state`, is refused."""
        return (self.local if local else self.remote)[state]


CLIENT = Lifecycle(
    {
        (IDLE, BEGIN): (BEGUN, GO),
        (BEGUN, SEND): (BEGUN, GO),
        (BEGUN, RECEIVE): (BEGUN, GO),
        (BEGUN, ABORT): (ABORTED, GO),
        (BEGUN, END): (IDLE, GO),
        (BEGUN, END_EARLY): (RETIRED, STRAND),
        (ABORTED, RECEIVE): (ABORTED, DROP),
        (ABORTED, ABORT): (ABORTED, DROP),
        (ABORTED, END): (RETIRED, GO),
        (ABORTED, END_EARLY): (RETIRED, GO),
        (RETIRED, RECEIVE): (RETIRED, DROP),
        (RETIRED, END): (RETIRED, DROP),
        (RETIRED, END_EARLY): (RETIRED, DROP),
    },
    local={IDLE: "is not active", ABORTED: "was aborted", RETIRED: "is not active"},
    remote={IDLE: "which is not active"},
)

SERVER = Lifecycle(
    {
        (IDLE, BEGIN): (BEGUN, GO),
        (IDLE, REFUSE): (ENDED, GO),
        (BEGUN, SEND): (BEGUN, GO),
        (BEGUN, RECEIVE): (BEGUN, GO),
        (BEGUN, ABORT): (ABORTED, GO),
        (BEGUN, END): (DONE, GO),
        (BEGUN, END_EARLY): (ENDED, GO),
        (ABORTED, SEND): (ABORTED, GO),
        (ABORTED, RECEIVE): (ABORTED, GO),
        (ABORTED, ABORT): (ABORTED, DROP),
        (ABORTED, END): (IDLE, GO),
        (ABORTED, END_EARLY): (ENDED, GO),
        (ENDED, BEGIN): (BEGUN, GO),
        (ENDED, REFUSE): (ENDED, GO),
        (ENDED, RECEIVE): (ENDED, DROP),
        (ENDED, ABORT): (ENDED, DROP),
        (DONE, BEGIN): (BEGUN, GO),
        (DONE, REFUSE): (ENDED, GO),
        (DONE, RECEIVE): (DONE, DROP),
        (DONE, ABORT): (IDLE, DROP),
    },
    local={IDLE: "is not active", ENDED: "is not active", DONE: "is not active"},
    remote={
        IDLE: "which has not begun",
        BEGUN: "which is already active",
        ABORTED: "which is already active",
    },
)


# --- the stream table ---

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

    def check(self, rtype: int, end: bool) -> str | None:
        """A complaint if data (or the end) of stream `rtype` is refused now; changes nothing."""
        state = self.states.get(rtype)
        if state is None:
            return "which this request does not have"
        if (state, _END if end else _DATA) not in _TRANSITIONS:
            opener = stream_name(self.layout.openers.get(rtype, 0))
            return _COMPLAINTS[state].format(opener=opener)
        return None

    def move(self, rtype: int, end: bool) -> str | None:
        """Apply data (or the end) of stream `rtype`; if refused, a complaint and no change."""
        states = self.states
        state = states.get(rtype)
        target = None if state is None else _TRANSITIONS.get((state, _END if end else _DATA))
        if target is None:
            return self.check(rtype, end)
        states[rtype] = target
        if target == CLOSED and rtype in self.layout.following:
            group, following = self.layout.following[rtype]
            for other in group:
                if states[other] != CLOSED:
                    break
            else:
                for opened in following:
                    states[opened] = OPEN
        return None

    def all_closed(self) -> bool:
        # A loop, not all() over a generator: it runs at every END_REQUEST.
        for state in self.states.values():  # noqa: SIM110
            if state != CLOSED:
                return False
        return True


def delivers(lifecycle: Lifecycle, state: int, streams: Streams, rtype: int) -> bool:
    """Whether a data record of stream `rtype` would go on with no change of state.

    Such records are what the reader's fast path lets through unchecked; this
    is the one place that decides which.
    """
    return state in lifecycle.delivering_states and streams.states.get(rtype) == OPEN
