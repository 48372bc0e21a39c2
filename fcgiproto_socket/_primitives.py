"""What the blocking face of the client needs that the async face does differently.

The client's control flow is written once, async, in fcgiproto_anyio, and
this package's copy is generated from it (scripts/generate_sync.py). Each name here
has a namesake in fcgiproto_anyio/_primitives.py: locks, events with a
timeout, a shield against cancellation (threads cannot be cancelled: it does
nothing), the clock, and the threads a client runs in the background.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

__all__ = [
    "Background",
    "Body",
    "BodyPieces",
    "Flag",
    "Lock",
    "NextChunk",
    "Refill",
    "StateLock",
    "checkpoint",
    "current_time",
    "shield",
]

current_time = time.monotonic
#: Asked for more of the request body to send; False when there is none.
Refill: TypeAlias = "Callable[[], bool]"
#: Gives the next piece of a stream; None at its end.
NextChunk: TypeAlias = "Callable[[], bytes | None]"
Lock = threading.Lock
Flag = threading.Event
#: Guards state that a reader thread and the callers' threads change together.
StateLock = threading.Lock


def checkpoint() -> None:
    """Where the async face lets other tasks run; threads need no such point."""


def shield() -> contextlib.nullcontext[None]:
    """Threads cannot be cancelled: nothing to shield against."""
    return contextlib.nullcontext()


class Background:
    """The threads a client runs beside its callers: the reaper, connection readers.

    Daemon threads, so a client never closed cannot keep the process alive;
    close() joins them, so nothing outlives a client closed.
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def check(self) -> None:
        """The blocking client needs no `with` to start threads."""

    def start(self, run: Callable[[], object], name: str) -> None:
        thread = threading.Thread(target=run, name=name, daemon=True)
        # Started under the lock: a join() between listing the thread and
        # starting it would find it not yet started (RuntimeError), and so
        # would is_alive() here, dropping another caller's thread from the list.
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        self.join()

    def join(self) -> None:
        """Wait for the threads that are ending (not for the one calling)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()


Body: TypeAlias = "bytes | bytearray | memoryview | Iterable[bytes]"


class BodyPieces:
    """The pieces of a request body given as an iterable, as bytes."""

    __slots__ = ("_pieces",)

    def __init__(self, stdin: Iterable[bytes]) -> None:
        self._pieces: Iterator[bytes] = iter(stdin)

    def next(self) -> bytes | None:
        """The next piece; None once there are no more."""
        chunk = next(self._pieces, None)
        return None if chunk is None else bytes(chunk)

    def close(self) -> None:
        """Close a generator left unfinished."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
