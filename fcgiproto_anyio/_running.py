"""Which event loop the current task runs on, for the paths specific to one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["loop_clock", "running_asyncio", "running_library"]


def running_library() -> str | None:
    """ "asyncio" (any loop: uvloop's too), "trio", or None when neither is known."""
    try:
        import sniffio
    except ImportError:  # anyio runs without it: then asyncio is the only candidate
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return "asyncio"
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


def running_asyncio() -> bool:
    return running_library() == "asyncio"


def loop_clock() -> Callable[[], float]:
    """The running loop's clock (anyio.current_time's), found once for whoever calls it often.

    anyio.current_time() looks the loop up on every call: sniffio, then on
    asyncio get_running_loop(), which costs a getpid system call.
    """
    library = running_library()
    if library == "asyncio":
        loop = asyncio.get_running_loop()
        if type(loop).time is asyncio.BaseEventLoop.time:
            return time.monotonic  # what BaseEventLoop.time() returns, without its frame
        return loop.time
    if library == "trio":
        import trio  # trio is an optional extra

        return trio.current_time
    import anyio

    return anyio.current_time
