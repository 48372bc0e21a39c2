"""What both sides share: the incremental record reader and the output queue.

The reader never copies stream payloads through a buffer of its own: STDOUT
(or STDIN) content is sliced straight out of the caller's chunk, and the
contiguous records of one stream in one chunk become one event, so a payload is
copied once on its way through. Only an incomplete header (< 8 bytes) or an
incomplete non-stream record (<= 65535 + 255 bytes) is ever held back.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import ClassVar

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import Event
from ._records import FCGI_VERSION
from ._state import OPEN, Lifecycle, Streams, delivers, stream_name

__all__ = ["Connection"]

_HEADER, _STREAM, _BODY, _SKIP = range(4)
# The header read as (version, type and request id as one number, content
# length, padding length): HEADER's layout with its first four bytes joined.
_unpack_prefix = struct.Struct(">IHBx").unpack_from
_RUN_BASE = FCGI_VERSION << 24


class Connection:
    """Base of ClientConnection and ServerConnection."""

    #: Record types whose content is delivered as it arrives, each with its event.
    _STREAMED: ClassVar[dict[int, Callable[[int, bytes], Event]]]
    #: Record types read whole before they are acted on.
    _WHOLE: ClassVar[frozenset[int]]
    #: Which side this is, for messages.
    _PEER: ClassVar[str]
    #: This side's request table.
    _LIFECYCLE: ClassVar[Lifecycle]
    # Derived from the two above for _settle(): (streamed record type, its
    # header prefix less the request id) pairs, the prefixes alone, and the
    # request states in which received stream records go on.
    _STREAM_ITEMS: ClassVar[tuple[tuple[int, int], ...]]
    _STREAM_BASES: ClassVar[tuple[int, ...]]
    _DELIVERING_STATES: ClassVar[frozenset[int]]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._STREAM_ITEMS = tuple((rtype, _RUN_BASE | rtype << 16) for rtype in cls._STREAMED)
        cls._STREAM_BASES = tuple(base for _, base in cls._STREAM_ITEMS)
        cls._DELIVERING_STATES = cls._LIFECYCLE.delivering_states

    def __init__(self) -> None:
        self._out: list[bytes | memoryview] = []
        self._header_buf = bytearray()
        self._body_buf = bytearray()
        self._state = _HEADER
        self._rtype = 0
        self._rid = 0
        self._left = 0  # content bytes of the current record still to come
        self._padding = 0  # padding bytes after the current record's content
        # The message of the protocol error that killed the connection. Not
        # the exception itself: its traceback holds the frames that raised it,
        # and they hold this connection, a cycle only the gc would break.
        self._error: str | None = None
        self._peer_closed = False
        # Header prefixes of the streams whose data records the tables let
        # through unchanged: such a record needs no further checks. Only
        # _settle() changes it, from the tables, after every move.
        self._delivering: set[int] = set()

    # --- output ---

    def data_to_send(self) -> bytes:
        """Everything queued for the peer so far; b"" when there is nothing."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return bytes(data)

    # --- input ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; b"" means the peer closed the connection."""
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        if self._peer_closed:
            raise LocalProtocolError("receive_data() after the peer closed the connection")
        events: list[Event] = []
        try:
            if not data:
                self._peer_closed = True
                self._check_eof()
            elif type(data) is bytes:
                self._parse(data, events)
            else:
                # Parse the caller's buffer in place: each payload is copied
                # once, into its event, and the view is let go before returning.
                with memoryview(data) as view:
                    if view.c_contiguous:
                        with view.cast("B") as octets:  # lengths count bytes, not items
                            self._parse(octets, events)
                    else:
                        self._parse(view.tobytes(), events)
        except RemoteProtocolError as exc:
            self._error = str(exc)
            raise
        return events

    def _check_eof(self) -> None:
        if self._state != _HEADER or self._header_buf:
            if self._state == _HEADER:
                where = f"after {len(self._header_buf)} of a record header's 8 bytes"
            else:
                missing = self._left + self._padding
                where = (
                    f"in the middle of a {stream_name(self._rtype)} record for request {self._rid} "
                    f"({missing} bytes missing)"
                )
            raise RemoteProtocolError(f"the {self._PEER} closed the connection {where}")
        self._on_eof()

    def _parse(self, data: bytes | memoryview, events: list[Event], pos: int = 0) -> None:
        """Read `data` from offset `pos` (a record boundary when not 0) on."""
        end = len(data)
        # The stream run being gathered: start/stop offsets into `data` of the
        # content of consecutive records of one stream of one request, and
        # their header's first four bytes (version, type, request id) as one
        # number, so that a record continuing the run costs one comparison.
        pieces: list[int] = []
        run = -1
        streamed, delivering, header_buf = self._STREAMED, self._delivering, self._header_buf
        # A run of one whole record in bytes input is emitted here, its
        # content sliced once: the path of records that cannot be coalesced.
        whole_bytes = data if type(data) is bytes else None
        if self._state == _STREAM:
            run = _RUN_BASE | self._rtype << 16 | self._rid
        while pos < end:
            state = self._state
            if state == _HEADER:
                if header_buf or end - pos < 8:
                    buf = header_buf
                    take = min(8 - len(buf), end - pos)
                    buf += data[pos : pos + take]
                    pos += take
                    if len(buf) < 8:
                        break
                    prefix, clen, plen = _unpack_prefix(buf)
                    buf.clear()
                else:
                    prefix, clen, plen = _unpack_prefix(data, pos)
                    pos += 8
                    # The hot path: whole records continuing the run.
                    while prefix == run and clen:
                        stop = pos + clen
                        if stop + plen > end:
                            break
                        pieces.append(pos)
                        pieces.append(stop)
                        pos = stop + plen
                        if end - pos < 8:
                            prefix = -1
                            break
                        prefix, clen, plen = _unpack_prefix(data, pos)
                        pos += 8
                    if prefix == -1:
                        continue
                if prefix == run and clen:
                    # The run goes on past the end of this chunk.
                    self._rtype, self._rid = prefix >> 16 & 0xFF, prefix & 0xFFFF
                    self._left, self._padding, self._state = clen, plen, _STREAM
                    continue
                if pieces:
                    if whole_bytes is not None and len(pieces) == 2:
                        content = whole_bytes[pieces[0] : pieces[1]]
                        events.append(streamed[run >> 16 & 0xFF](run & 0xFFFF, content))
                    else:
                        self._flush(run, data, pieces, events)
                    pieces = []
                run = -1
                version, rtype, rid = prefix >> 24, prefix >> 16 & 0xFF, prefix & 0xFFFF
                if clen and prefix in delivering:
                    pass  # data the tables let through as it is
                elif version != FCGI_VERSION:
                    raise self._bad_version(version, rtype, rid, clen)
                elif rtype not in streamed:
                    pass
                elif not self._stream_allowed(rtype, rid, clen, events):
                    self._skip(clen + plen)
                    continue
                elif not clen:
                    self._skip(plen)
                    continue
                if rtype in streamed:
                    run = prefix
                    stop = pos + clen
                    if stop + plen <= end:
                        pieces.append(pos)
                        pieces.append(stop)
                        pos = stop + plen
                    else:
                        self._rtype, self._rid = rtype, rid
                        self._left, self._padding, self._state = clen, plen, _STREAM
                    continue
                self._rtype, self._rid, self._left, self._padding = rtype, rid, clen, plen
                if rtype in self._WHOLE:
                    if pos + clen <= end:
                        content = bytes(data[pos : pos + clen])
                        pos += clen
                        self._state, self._left, self._padding = _SKIP, plen, 0
                        self._on_record(rtype, rid, content, events)
                    else:
                        self._state = _BODY
                        self._body_buf.clear()
                else:
                    self._on_foreign_record(rtype, rid, clen)
                    self._state, self._left, self._padding = _SKIP, clen + plen, 0
            elif state == _STREAM:
                take = min(self._left, end - pos)
                pieces.append(pos)
                pos += take
                pieces.append(pos)
                self._left -= take
                if not self._left:
                    self._state, self._left, self._padding = _SKIP, self._padding, 0
            elif state == _BODY:
                buf = self._body_buf
                take = min(self._left, end - pos)
                buf += data[pos : pos + take]
                pos += take
                self._left -= take
                if not self._left:
                    self._state, self._left, self._padding = _SKIP, self._padding, 0
                    self._on_record(self._rtype, self._rid, bytes(buf), events)
                    buf.clear()
            else:  # _SKIP: padding, or the content of a record that is dropped
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
            if self._state == _SKIP and not self._left:
                self._state = _HEADER
        if pieces:
            self._flush(run, data, pieces, events)

    def _skip(self, count: int) -> None:
        self._state = _SKIP if count else _HEADER
        self._left, self._padding = count, 0

    def _flush(
        self, run: int, data: bytes | memoryview, pieces: list[int], events: list[Event]
    ) -> None:
        if len(pieces) == 2:
            chunk = bytes(data[pieces[0] : pieces[1]])
        else:
            view = memoryview(data)
            chunk = b"".join([view[pieces[i] : pieces[i + 1]] for i in range(0, len(pieces), 2)])
            view.release()
        events.append(self._STREAMED[run >> 16 & 0xFF](run & 0xFFFF, chunk))

    def _bad_version(self, version: int, rtype: int, rid: int, clen: int) -> RemoteProtocolError:
        if (version, rtype) == (ord("H"), ord("T")):
            return RemoteProtocolError(
                f"the {self._PEER} answered with HTTP, not FastCGI (bytes 'HT' where a "
                "record header was expected): is this an HTTP port?"
            )
        return RemoteProtocolError(
            f"record header with version {version} (type {rtype}, request {rid}, "
            f"{clen} bytes): only version {FCGI_VERSION} exists"
        )

    # --- what each side defines ---

    def _stream_allowed(self, rtype: int, rid: int, clen: int, events: list[Event]) -> bool:
        """Check a stream record; emit the stream's end if it is empty. False: drop it."""
        raise NotImplementedError

    def _on_record(self, rtype: int, rid: int, content: bytes, events: list[Event]) -> None:
        raise NotImplementedError

    def _on_foreign_record(self, rtype: int, rid: int, clen: int) -> None:
        """A record of a type this side never receives: raise, or answer it."""
        raise NotImplementedError

    def _on_eof(self) -> None:
        raise NotImplementedError

    # --- shared helpers ---

    def _settle(self, rid: int, state: int, received: Streams | None) -> None:
        """Derive the fast path for request `rid` from its states in the tables.

        Every move of a request that can change what it delivers ends here,
        so the set of delivering streams is never stale. A record of the
        request already half read that no longer delivers is skipped to its
        end, not delivered. `received` is None once the request has ended.
        This is `delivers()` for each stream, inlined (a test holds the two
        equal): it runs several times per request.
        """
        delivering = self._delivering
        if received is None or state not in self._DELIVERING_STATES:
            for base in self._STREAM_BASES:
                delivering.discard(base | rid)
        else:
            get = received.states.get
            for rtype, base in self._STREAM_ITEMS:
                if get(rtype) == OPEN:
                    delivering.add(base | rid)
                else:
                    delivering.discard(base | rid)
        if (
            self._state == _STREAM
            and self._rid == rid
            and (received is None or not delivers(self._LIFECYCLE, state, received, self._rtype))
        ):
            self._state, self._left, self._padding = _SKIP, self._left + self._padding, 0

    def _check_sendable(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(
                f"the connection is dead after a protocol error: {self._error}"
            )
        if self._peer_closed:
            raise LocalProtocolError("the peer closed the connection")
