"""Where an application listens: the addresses both adapters accept."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["Address", "AddressInput", "parse_address"]

AddressInput: TypeAlias = "Address | str | os.PathLike[str] | tuple[str, int]"


@dataclass(frozen=True)
class Address:
    """Where an application listens: a Unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(address: AddressInput, *, listening: bool = False) -> Address:
    """Read "host:port", "[::1]:9000", "unix:/path.sock", "/path.sock" or (host, port).

    Port 0 (any free port) is only an address to listen on.
    """
    if isinstance(address, Address):
        return address
    if isinstance(address, tuple):
        return Address(host=address[0], port=_port(address[1], address, listening))
    text = os.fspath(address)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"no socket path in address {text!r}")
        return Address(path=path)
    if text.startswith("/") or text.startswith("./"):
        return Address(path=text)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"address {text!r} is not [host]:port")
        return Address(host=host, port=_port(rest[1:], text, listening))
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ValueError(
            f"address {text!r} is not host:port, [host]:port, unix:/path or an absolute path"
        )
    return Address(host=host, port=_port(port_text, text, listening))


def _port(port: str | int, address: object, listening: bool) -> int:
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"bad port in address {address!r}") from None
    if not (0 if listening else 1) <= number < 65536:
        raise ValueError(f"port {number} out of range in address {address!r}")
    return number
