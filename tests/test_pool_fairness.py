"""The blocking client's pool serves waiting threads in the order they came."""

from __future__ import annotations

import threading
import time
from collections import Counter

from fcgiproto import PoolTimeout
from fcgiproto_socket import Client, Request, Server, Timeout


def answer(request: Request) -> bytes:
    time.sleep(0.002)  # long enough that threads queue for the two connections
    return b"Content-Type: text/plain\r\n\r\nok"


def test_many_threads_on_a_small_pool_all_get_their_turn() -> None:
    done: Counter[int] = Counter()
    timeouts = Counter[int]()
    limits = Timeout(pool=1.5, read=5)
    with (
        Server(answer, "127.0.0.1:0") as server,
        Client(server.address, max_connections=2, timeout=limits) as client,
    ):
        stop = time.monotonic() + 2.0

        def work(number: int) -> None:
            while time.monotonic() < stop:
                try:
                    assert client.request({}).body == b"ok"
                    done[number] += 1
                except PoolTimeout:
                    timeouts[number] += 1

        threads = [threading.Thread(target=work, args=(n,)) for n in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    # A thread that releases a connection cannot take it straight back past
    # the others: every thread is served, and none waits out its pool timeout.
    assert not timeouts, timeouts
    assert len(done) == 24
    assert min(done.values()) >= max(done.values()) // 3, done
