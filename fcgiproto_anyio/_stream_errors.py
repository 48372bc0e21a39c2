"""The errors of a stream of the anyio adapter, worded once for every kind of stream.

AnyioStream, TrioStream and AsyncioStream wait differently but fail alike:
a limit passed, the connection closed under a wait, a read or a write the
operating system refused, each as the fcgiproto error that names the address.
"""

from __future__ import annotations

from fcgiproto import ReadError, ReadTimeout, WriteError, WriteTimeout
from fcgiproto.support import Address

__all__ = ["StreamErrors"]


class StreamErrors:
    """The error-making methods of a stream that keeps its peer's address in `_address`."""

    __slots__ = ()
    _address: Address

    def _timeout(
        self, error: type[ReadTimeout] | type[WriteTimeout], timeout: float | None
    ) -> ReadTimeout | WriteTimeout:
        doing = "send anything" if error is ReadTimeout else "take more"
        return error(f"{self._address} did not {doing} within {timeout}s")

    def _closed_error(
        self, error: type[ReadTimeout] | type[WriteTimeout]
    ) -> ReadError | WriteError:
        message = f"the connection to {self._address} was closed"
        return ReadError(message) if error is ReadTimeout else WriteError(message)

    def _read_error(self, exc: OSError) -> ReadError:
        return ReadError(f"reading from {self._address} failed: {exc.strerror or exc}")

    def _write_error(self, exc: OSError) -> WriteError:
        return WriteError(f"writing to {self._address} failed: {exc.strerror or exc}")
