"""Several php-fpm pools behind one gateway: killed, slow, brought back.

Each pool is a php-fpm master of its own (tests/gateway_peers.py). The
front controller tells which pool answered (X-Pool) and, for POST /count,
writes the request id to a shared log when the script starts, so a request
run twice shows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_peers import FpmPool, Gateway, copy_app, wait_for
from peers import find_php_fpm, require_peer

from fcgiproto_socket import BalancedClient

pytestmark = pytest.mark.peer


@pytest.fixture
def fpm() -> str:
    binary = find_php_fpm()
    require_peer("php-fpm", binary is not None)
    assert binary is not None
    return binary


class Pools:
    def __init__(
        self, binary: str, base: Path, names: list[str], slow: frozenset[str] = frozenset()
    ) -> None:
        self.base = base
        self.root = copy_app(base / "www")
        self.state = base / "state"
        self.state.mkdir(exist_ok=True)
        env = {"STATE_DIR": str(self.state), "SESSION_DIR": str(self.state)}
        self.pools = {
            name: FpmPool(
                binary, base, name, env={**env, **({"SLOW_POOL": "1"} if name in slow else {})}
            )
            for name in names
        }
        for pool in self.pools.values():
            pool.start()

    def addresses(self) -> list[str]:
        return [pool.address for pool in self.pools.values()]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.stop()


@pytest.fixture
def make_pools(fpm: str, tmp_path: Path) -> Iterator[object]:
    made: list[Pools] = []

    def make(names: list[str], slow: frozenset[str] = frozenset()) -> Pools:
        pools = Pools(fpm, tmp_path, names, slow)
        made.append(pools)
        return pools

    yield make
    for pools in made:
        pools.close()


def test_pool_killed_mid_run_loses_no_retriable_request_and_repeats_no_post(
    make_pools: object, tmp_path: Path
) -> None:
    pools: Pools = make_pools(["a", "b", "c"])  # type: ignore[operator]
    gw = Gateway(
        tmp_path, pools.root, pools.addresses(), "--policy", "round_robin", "--fail-timeout", "60"
    ).start()
    results: dict[str, int] = {}
    lock = threading.Lock()
    try:

        def call(method: str, i: int) -> None:
            request_id = f"{method}{i}"
            with httpx.Client(base_url=gw.url, timeout=30) as http:
                # Every request logs its start and then works 1.5 s.
                response = http.request(
                    method,
                    "/count",
                    params={"id": request_id, "us": "1500000"},
                    content=b"x=1" if method == "POST" else None,
                )
                with lock:
                    results[request_id] = response.status_code

        with concurrent.futures.ThreadPoolExecutor(24) as executor:
            futures = [executor.submit(call, m, i) for i in range(6) for m in ("GET", "POST")]
            # Round robin gives b a third of them: kill it once they all run.
            wait_for(lambda: _started(pools).count("b") >= 4, timeout=5)
            assert _started(pools).count("b") >= 1
            pools.pools["b"].stop()
            futures += [executor.submit(call, m, i) for i in range(6, 12) for m in ("GET", "POST")]
            for future in futures:
                future.result()
    finally:
        gw.stop()
    started = collections.defaultdict(list)
    for line in (pools.state / "count.log").read_text().splitlines():
        request_id, pool = line.split()
        started[request_id].append(pool)
    cut_on_b = [rid for rid, where in started.items() if where[0] == "b"]
    print(f"started on b before the kill: {cut_on_b}; results: {results}")
    assert cut_on_b  # the kill hit requests in flight
    for request_id, status in results.items():
        where = started[request_id]
        if request_id.startswith("GET"):
            # Idempotent: never lost; one cut on b ran again on another pool.
            assert status == 200, (request_id, where)
            assert where[-1] != "b" or len(where) == 1
        else:
            # Not idempotent: never run twice; one cut on b is a 502.
            assert len(where) <= 1, (request_id, where)
            assert status == (502 if where == ["b"] else 200), (request_id, where, status)


def _started(pools: Pools) -> list[str]:
    log = pools.state / "count.log"
    return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


def test_least_conn_moves_load_away_from_a_slow_pool(make_pools: object, tmp_path: Path) -> None:
    pools: Pools = make_pools(["fast", "slow"], slow=frozenset({"slow"}))  # type: ignore[operator]
    gw = Gateway(tmp_path, pools.root, pools.addresses(), "--policy", "least_conn").start()
    served: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    try:

        def fetch(_: int) -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as http:
                response = http.get("/")
                assert response.status_code == 200
                with lock:
                    served[response.headers["x-pool"]] += 1

        with concurrent.futures.ThreadPoolExecutor(6) as executor:
            list(executor.map(fetch, range(60)))
    finally:
        gw.stop()
    print(f"least_conn with one slow pool: {dict(served)}")
    assert served["fast"] > 2 * served["slow"], served


def test_active_health_brings_a_pool_back(make_pools: object, tmp_path: Path) -> None:
    pools: Pools = make_pools(["a", "b"])  # type: ignore[operator]
    gw = Gateway(
        tmp_path,
        pools.root,
        pools.addresses(),
        "--policy",
        "round_robin",
        "--fail-timeout",
        "600",  # passive health alone would keep b out for the whole test
        "--health-path",
        "/ping",
        "--health-interval",
        "0.5",
    ).start()
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:

            def pools_serving(n: int) -> collections.Counter[str]:
                seen: collections.Counter[str] = collections.Counter()
                for _ in range(n):
                    response = http.get("/")
                    assert response.status_code == 200
                    seen[response.headers["x-pool"]] += 1
                return seen

            assert set(pools_serving(6)) == {"a", "b"}
            pools.pools["b"].stop()
            assert set(pools_serving(6)) == {"a"}  # never an error: b is skipped
            pools.pools["b"].start()
            assert wait_for(lambda: "b" in pools_serving(4), timeout=10)
    finally:
        gw.stop()


def test_hash_of_a_cookie_keeps_a_session_on_its_pool(make_pools: object, tmp_path: Path) -> None:
    pools: Pools = make_pools(["a", "b", "c"])  # type: ignore[operator]
    gw = Gateway(
        tmp_path, pools.root, pools.addresses(), "--policy", "hash", "--hash-key", "cookie:sid"
    ).start()
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:

            def pool_of(sid: str) -> set[str]:
                return {
                    http.get("/", headers={"Cookie": f"other=1; sid={sid}"}).headers["x-pool"]
                    for _ in range(5)
                }

            homes = [pool_of(f"user{i}") for i in range(12)]
    finally:
        gw.stop()
    assert all(len(home) == 1 for home in homes)  # each session sticks to one pool
    assert len(set().union(*homes)) >= 2  # and the sessions spread over the pools


def test_every_pool_down_is_503(make_pools: object, tmp_path: Path) -> None:
    pools: Pools = make_pools(["a"])  # type: ignore[operator]
    gw = Gateway(tmp_path, pools.root, pools.addresses()).start()
    try:
        pools.pools["a"].stop()
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            assert http.get("/").status_code in (502, 503)
            assert http.get("/").status_code == 503  # a is out for fail_timeout
    finally:
        gw.stop()


def test_blocking_balanced_client_skips_a_dead_pool(make_pools: object) -> None:
    pools: Pools = make_pools(["a", "b"])  # type: ignore[operator]
    pools.pools["a"].stop()
    params = {
        "REQUEST_METHOD": "POST",  # not idempotent: only a failed connect is retried
        "SCRIPT_FILENAME": str(pools.root / "index.php"),
        "SCRIPT_NAME": "/index.php",
        "REQUEST_URI": "/",
        "QUERY_STRING": "",
        "REDIRECT_STATUS": "200",
    }
    with BalancedClient(pools.addresses(), policy="first") as client:
        for _ in range(3):
            response = client.request(params)
            assert response.header("x-pool") == "b"
        assert client.balancer.backends[0].total == 1  # tried once, then out
        with client.stream(params, stdin=iter([b"a=1"])) as streamed:
            assert streamed.header("x-pool") == "b"
            assert b"".join(streamed.iter_body()).startswith(b"home of b")


def test_blocking_balanced_client_health_checks_in_a_thread(tmp_path: Path) -> None:
    """The generated blocking client runs its health checks on a thread of its own."""
    from fcgiproto_socket import Request, Server

    def app(request: Request) -> bytes:
        if request.params.get("SCRIPT_NAME") == "/ping":
            return b"Content-Type: text/plain\r\n\r\npong"
        return b"Content-Type: text/plain\r\n\r\nok"

    dead = f"unix:{tmp_path / 'dead.sock'}"
    with (
        Server(app, "127.0.0.1:0") as server,
        BalancedClient(
            [dead, server.address],
            policy="first",
            health_path="/ping",
            health_expect="pong",
            health_interval=0.1,
            fail_timeout=600,
        ) as client,
    ):
        assert wait_for(lambda: not client.balancer.backends[0].checked_healthy, timeout=5)
        assert client.balancer.backends[1].checked_healthy
        response = client.request({"REQUEST_METHOD": "POST", "SCRIPT_NAME": "/x"})
        assert response.body == b"ok"
        assert client.balancer.backends[0].total == 0  # never tried: the check took it out
