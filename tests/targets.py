"""Real peers as test targets, and what the client tests check with them."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, TypeVar

import peers
import pytest

from fcgiproto_socket import Response

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Target:
    """One peer on one transport, with the PARAMS its handlers need."""

    name: str
    kind: str  # "php" or "go"
    server: Any  # peers.PhpFpm or peers.GoServer
    address: str

    @property
    def shown(self) -> str:
        """The address as the library spells it in messages."""
        return f"unix:{self.address}" if self.address.startswith("/") else self.address

    def params(
        self,
        handler: str,
        method: str = "GET",
        query: str = "",
        *,
        content_length: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        if self.kind == "php":
            return self.server.params(  # type: ignore[no-any-return]
                f"{handler}.php", method, query, content_length=content_length, extra=extra
            )
        return peers.go_params(
            f"/{handler}", method, query, content_length=content_length, extra=extra
        )

    def echo(self, body: bytes) -> dict[str, str]:
        return self.params("echo", "POST", content_length=len(body))


T = TypeVar("T", bound=Target)


def make_target(request: pytest.FixtureRequest, name: str, kind_of: type[T]) -> T:
    """The peer a test id like "php-unix" or "go-tcp" names, running."""
    kind, transport = name.split("-")
    server = request.getfixturevalue("php_fpm" if kind == "php" else "go_server")
    # An earlier test may have restarted it; make sure it is up.
    server.ensure_running()
    address = server.unix_path if transport == "unix" else server.tcp_address
    return kind_of(name, kind, server, address)


def open_sockets() -> set[str]:
    """The sockets this process has open, as "socket:[inode]"."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:"):
                found.add(link)
    return found


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def echo_check(response: Response, body: bytes) -> None:
    assert response.status == 200
    assert response.header("X-Body-Length") == str(len(body))
    assert response.header("X-Body-Md5") == md5(body)
    assert len(response.body) == len(body)
    assert response.body == body
