"""Choosing among several FastCGI backends: I/O-free, shared by both clients.

`Balancer` keeps, per backend, the requests in flight, the recent failures
(passive health) and the verdict of the last health check (active health),
and picks a backend by a policy. The caller passes the time in; nothing
here reads a clock, sleeps or opens a socket. `may_retry` is the one rule
for trying a request again on another backend.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

__all__ = [
    "IDEMPOTENT_METHODS",
    "BackendState",
    "Balancer",
    "Policy",
    "may_retry",
]

#: RFC 9110 9.2.2: methods a client may repeat without repeating an effect.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Policy(str, enum.Enum):
    """How `Balancer.choose` picks among the backends that are up."""

    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"
    FIRST = "first"
    RANDOM = "random"
    HASH = "hash"  # of a key the caller gives: a client address, a cookie, a path


@dataclass
class BackendState:
    """What the balancer knows of one backend."""

    name: str
    max_active: int | None = None  # the connection cap; None: none
    active: int = 0  # requests in flight
    failures: deque[float] = field(default_factory=deque)  # times of recent failures
    checked_healthy: bool = True  # the last active health check's verdict
    total: int = 0  # requests started, for the tests and the logs
    weight_seed: bytes = b""


def may_retry(
    *, connect_failed: bool, idempotent: bool, body_sent: bool, answer_started: bool
) -> bool:
    """Whether a failed attempt may be repeated on another backend.

    A connection that never opened carried nothing: always retry. Otherwise
    the application may have run the request, so only an idempotent method,
    with no body byte consumed (it cannot be sent twice) and no byte of the
    answer received (the client would see two answers spliced).
    """
    if connect_failed:
        return True
    return idempotent and not body_sent and not answer_started


class Balancer:
    """Picks a backend for each request and keeps their health.

    :param names: one per backend (its address, for logs and hashing).
    :param policy: a `Policy` or its name.
    :param max_fails: failures within ``fail_timeout`` seconds that take a
        backend out until the oldest of them is that old; 0 disables passive
        health.
    :param max_active: requests in flight per backend before the balancer
        prefers another (the client's pool queues beyond it); None: no cap.
    :param rng: for the random policy (seeded in tests).
    """

    def __init__(
        self,
        names: Sequence[str],
        policy: Policy | str = Policy.ROUND_ROBIN,
        *,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        max_active: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not names:
            raise ValueError("a balancer needs at least one backend")
        if max_fails < 0 or fail_timeout < 0:
            raise ValueError("max_fails and fail_timeout must not be negative")
        self.policy = Policy(policy)
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.backends = [
            BackendState(name, max_active, weight_seed=name.encode("utf-8", "surrogateescape"))
            for name in names
        ]
        self._next = 0
        self._rng = rng if rng is not None else random.Random()

    # --- health ---

    def is_up(self, index: int, now: float) -> bool:
        """Not failed max_fails times within fail_timeout, and its last check passed."""
        backend = self.backends[index]
        if not backend.checked_healthy:
            return False
        if self.max_fails == 0:
            return True
        failures = backend.failures
        while failures and now - failures[0] >= self.fail_timeout:
            failures.popleft()
        return len(failures) < self.max_fails

    def failed(self, index: int, now: float) -> None:
        """A request to this backend failed in a way that blames the backend."""
        if self.max_fails:
            failures = self.backends[index].failures
            failures.append(now)
            while len(failures) > self.max_fails:
                failures.popleft()

    def checked(self, index: int, healthy: bool) -> None:
        """The verdict of an active health check."""
        backend = self.backends[index]
        backend.checked_healthy = healthy
        if healthy:
            backend.failures.clear()

    # --- choosing ---

    def choose(
        self, now: float, *, exclude: Collection[int] = (), key: bytes | None = None
    ) -> int | None:
        """The backend for the next attempt; None when every one is down or excluded.

        Backends below their cap are preferred; when every backend that is up
        is at its cap, the policy picks among them anyway and the client's
        pool makes the request wait its turn.
        """
        up = [i for i in range(len(self.backends)) if i not in exclude and self.is_up(i, now)]
        if not up:
            return None
        free = [i for i in up if not self._full(i)]
        candidates = free or up
        policy = self.policy
        if policy is Policy.FIRST:
            return candidates[0]
        if policy is Policy.LEAST_CONN:
            least = min(self.backends[i].active for i in candidates)
            tied = [i for i in candidates if self.backends[i].active == least]
            return tied[0] if len(tied) == 1 else self._round_robin(tied)
        if policy is Policy.RANDOM:
            return self._rng.choice(candidates)
        if policy is Policy.HASH:
            # Rendezvous hashing: a key keeps its backend while that backend
            # is up, and only the keys of a backend that goes move.
            k = key or b""
            return max(
                candidates,
                key=lambda i: hashlib.blake2b(
                    self.backends[i].weight_seed + b"\x00" + k, digest_size=8
                ).digest(),
            )
        return self._round_robin(candidates)

    def _round_robin(self, candidates: list[int]) -> int:
        count = len(self.backends)
        for step in range(count):
            index = (self._next + step) % count
            if index in candidates:
                self._next = (index + 1) % count
                return index
        return candidates[0]

    def _full(self, index: int) -> bool:
        backend = self.backends[index]
        return backend.max_active is not None and backend.active >= backend.max_active

    def started(self, index: int) -> None:
        """A request went to backend ``index``: count it for least_conn and the cap."""
        backend = self.backends[index]
        backend.active += 1
        backend.total += 1

    def finished(self, index: int) -> None:
        """A request on backend ``index`` is over, however it ended."""
        self.backends[index].active -= 1
