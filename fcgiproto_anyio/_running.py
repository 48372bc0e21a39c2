"""Which event loop the current task runs on, for the paths specific to one."""

from __future__ import annotations

import asyncio

__all__ = ["running_asyncio", "running_library"]


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
