"""The HTTP protocol `fcgi php` gives uvicorn: writes of one pass of the loop leave together."""

from __future__ import annotations

import asyncio

from fcgiproto_anyio._phphttp import _CoalescingTransport


class _Recording:
    """A transport that records its writes, as the system calls they would be."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 8080) if name == "sockname" else None


def test_head_and_body_leave_in_one_write() -> None:
    async def main() -> None:
        real = _Recording()
        transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"hi")
        assert real.writes == []
        assert transport.get_write_buffer_size() == 40
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"]
        # The next response: a write of its own, in order.
        transport.write(b"more")
        await asyncio.sleep(0)
        assert real.writes[1:] == [b"more"]
        # Everything else is the transport's.
        assert transport.get_extra_info("sockname") == ("127.0.0.1", 8080)

    asyncio.run(main())


def test_close_writes_what_is_pending_first() -> None:
    async def main() -> None:
        real = _Recording()
        transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"last words")
        transport.close()
        assert real.writes == [b"last words"]
        assert real.closed
        await asyncio.sleep(0)  # the queued callback finds nothing left to write
        assert real.writes == [b"last words"]

    asyncio.run(main())


def test_nothing_is_written_once_the_client_is_gone() -> None:
    async def main() -> None:
        real = _Recording()
        transport = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"too late")
        real.closed = True  # the connection was lost meanwhile
        await asyncio.sleep(0)
        assert real.writes == []

    asyncio.run(main())
