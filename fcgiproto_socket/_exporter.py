"""Scrape many php-fpm pools at once, each within a deadline: the work behind `fcgi exporter`.

Every scrape expands the targets again (a glob of Unix sockets finds pools
that came and went), reads each pool's status page on a connection of its
own, concurrently, and gives up on a pool at its deadline: a pool that hangs
is reported down, never holds up the others or the scrape.
"""

from __future__ import annotations

import glob
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from fcgiproto import FastCGIError
from fcgiproto.support import PoolScrape, PoolStatus, parse_address, prometheus_text

from ._status import read_status

__all__ = ["PoolScraper"]

_GLOB = frozenset("*?[")


class PoolScraper:
    """The status pages of every target, as a Prometheus exposition.

    targets: addresses (host:port, unix:/path, /path) where a Unix socket
    path may be a glob, expanded at every scrape. deadline: seconds each
    pool has, from connect to the last byte. max_workers bounds the threads
    that scrape at once.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        path: str = "/status",
        deadline: float = 3.0,
        full: bool = True,
        max_workers: int = 64,
    ) -> None:
        if not targets:
            raise ValueError("no address to scrape")
        for target in targets:
            if not _is_glob(target):
                parse_address(target)  # a bad address is the caller's mistake, now
        self.targets = list(targets)
        self.path = path
        self.deadline = deadline
        self.full = full
        self._workers = ThreadPoolExecutor(max_workers, thread_name_prefix="fcgi exporter")
        self._lock = threading.Lock()  # the memory of failures and names
        self._failures: dict[str, int] = {}
        self._names: dict[str, str] = {}

    def addresses(self) -> list[str]:
        """The targets, globs expanded now: sorted, without duplicates."""
        found: dict[str, None] = {}
        for target in self.targets:
            if not _is_glob(target):
                found[str(parse_address(target))] = None
                continue
            pattern = target[len("unix:") :] if target.startswith("unix:") else target
            for path in sorted(glob.glob(pattern)):
                found[str(parse_address(path))] = None
        return list(found)

    def scrape(self) -> list[PoolScrape]:
        """Every pool's status, or its failure, within the deadline (and a moment for threads)."""
        addresses = self.addresses()
        futures: list[Future[PoolStatus]] = [
            self._workers.submit(self._read, address) for address in addresses
        ]
        # Each read ends by its own deadline; this bound only guards against a
        # read that does not (the exporter must answer its scraper regardless).
        give_up = time.monotonic() + self.deadline + 1.0
        results = []
        for address, future in zip(addresses, futures, strict=True):
            status: PoolStatus | None
            try:
                status = future.result(timeout=max(0.0, give_up - time.monotonic()))
            except (FastCGIError, OSError, TimeoutError):
                status = None
            results.append(self._remember(address, status))
        return results

    def exposition(self) -> str:
        return prometheus_text(self.scrape())

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _read(self, address: str) -> PoolStatus:
        return read_status(address, self.path, full=self.full, timeout=self.deadline)

    def _remember(self, address: str, status: PoolStatus | None) -> PoolScrape:
        with self._lock:
            if status is None:
                self._failures[address] = self._failures.get(address, 0) + 1
            else:
                self._names[address] = status.pool
            return PoolScrape(
                address,
                status,
                failures=self._failures.get(address, 0),
                pool=self._names.get(address, ""),
            )


def _is_glob(target: str) -> bool:
    return not _GLOB.isdisjoint(target)
