"""Regenerate the seed corpus from real peers: php-fpm 8.2, Go's net/http/fcgi, nginx.

    uv run python fuzz/capture.py            # rewrites fuzz/corpus/*/<peer>-*

Needs php-fpm, go and nginx as tests/peers.py finds them (a missing one is
skipped with a message). Every exchange goes over a real socket and is
recorded byte for byte:

- client/: what php-fpm and the Go server answered (server to client), after
  the 4 setup bytes with which fuzz_client.py rebuilds the very connection
  state the answer was read in (multiplexing, requests in flight, a pending
  GET_VALUES, an abort, EOF);
- response_parser/: the STDOUT of those answers, after the parser's setup;
- server/: what our ClientConnection sent php-fpm and Go, and what nginx sent
  a recording application, after fuzz_server.py's setup;
- roundtrip/: the same STDOUT and STDERR replayed as server operations.

Headers such as Go's Date and php-fpm's X-Powered-By change from run to run,
so files differ in a few bytes each time; the set of exchanges does not.
Seeds are named after what they hold; files that atheris added (hashes) are
left alone.
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import fuzz_client  # noqa: E402
import fuzz_server  # noqa: E402
import peers  # noqa: E402

from fcgiproto import (  # noqa: E402
    GetValuesResult,
    ServerConnection,
    StderrData,
    StdinEnd,
    StdoutData,
)

CORPUS = Path(__file__).resolve().parent / "corpus"
#: How long to keep reading after the last request ended, for trailing records.
SETTLE = 0.3
#: After an abort, Go's late reply comes once the handler finishes.
SETTLE_ABORTED = 1.5

Request = tuple[Mapping[str, str], bytes]


@dataclasses.dataclass
class Exchange:
    name: str
    setup: fuzz_client.ClientSetup
    sent: bytes
    received: bytes
    stdout: dict[int, bytes]
    stderr: dict[int, bytes]


def exchange(
    address: str, name: str, setup: fuzz_client.ClientSetup, requests: list[Request]
) -> Exchange:
    """Send what fuzz_client.prepare() queues for `setup`; record every byte both ways."""
    conn, _ = fuzz_client.prepare(setup, requests)
    sent = conn.data_to_send()
    received = bytearray()
    events: list = []
    eof = False
    settle = SETTLE_ABORTED if setup.abort else SETTLE
    with peers.open_connection(address) as sock:
        sock.sendall(sent)
        deadline = time.monotonic() + 30
        while True:
            answered = not setup.get_values or any(isinstance(e, GetValuesResult) for e in events)
            done = answered and not conn.active_requests
            sock.settimeout(settle if done else max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if done:
                    break
                raise RuntimeError(f"{name}: no answer from {address}") from None
            if not chunk:
                eof = True
                events += conn.receive_data(b"")
                break
            received += chunk
            events += conn.receive_data(chunk)
    stdout: dict[int, bytes] = {}
    stderr: dict[int, bytes] = {}
    for event in events:
        if isinstance(event, StdoutData):
            stdout[event.request_id] = stdout.get(event.request_id, b"") + event.data
        elif isinstance(event, StderrData):
            stderr[event.request_id] = stderr.get(event.request_id, b"") + event.data
    setup = dataclasses.replace(setup, eof=eof)
    print(f"  {name}: sent {len(sent)} bytes, received {len(received)}{' and EOF' * eof}")
    return Exchange(name, setup, sent, bytes(received), stdout, stderr)


def php_exchanges(binary: str, base: Path) -> list[Exchange]:
    php = peers.PhpFpm(binary, base)
    php.start()
    one = fuzz_client.ClientSetup(requests=1)
    body = bytes(range(256)) * 12
    try:
        address = php.unix_path
        return [
            exchange(address, "php-hello", one, [(php.params("hello.php"), b"")]),
            exchange(
                address,
                "php-echo-post",
                one,
                [(php.params("echo.php", "POST", content_length=len(body)), body)],
            ),
            exchange(address, "php-stderr", one, [(php.params("stderr.php"), b"")]),
            exchange(address, "php-cookies-302", one, [(php.params("cookies.php"), b"")]),
            exchange(
                address, "php-status-404", one, [(php.params("status.php", query="code=404"), b"")]
            ),
            exchange(address, "php-exit-3", one, [(php.params("exit.php"), b"")]),
            exchange(address, "php-big", one, [(php.params("big.php", query="n=40000"), b"")]),
            exchange(address, "php-ping", one, [(php.params("/ping"), b"")]),
            exchange(
                address,
                "php-get-values",
                fuzz_client.ClientSetup(requests=0, get_values=True),
                [],
            ),
            exchange(
                address,
                "php-keep-conn-off",
                fuzz_client.ClientSetup(requests=1, close_after=True),
                [(php.params("hello.php"), b"")],
            ),
        ]
    finally:
        php.stop()


def go_exchanges(go: str, base: Path) -> list[Exchange]:
    server = peers.GoServer(peers.build_go_server(go), base)
    server.start()
    params = peers.go_params
    body = b"echo me " * 500
    one = fuzz_client.ClientSetup(multiplex=True, requests=1)
    try:
        address = server.unix_path
        no_protocol = {k: v for k, v in params("/hello").items() if k != "SERVER_PROTOCOL"}
        return [
            exchange(address, "go-hello", one, [(params("/hello"), b"")]),
            exchange(
                address,
                "go-echo-post",
                one,
                [(params("/echo", "POST", content_length=len(body)), body)],
            ),
            exchange(address, "go-status-302", one, [(params("/status", query="code=302"), b"")]),
            exchange(address, "go-big", one, [(params("/big", query="n=30000"), b"")]),
            # Without SERVER_PROTOCOL Go answers 500 and explains on FCGI_STDERR.
            exchange(address, "go-stderr-500", one, [(no_protocol, b"")]),
            exchange(
                address,
                "go-get-values",
                fuzz_client.ClientSetup(multiplex=True, requests=0, get_values=True),
                [],
            ),
            exchange(
                address,
                "go-multiplexed",
                fuzz_client.ClientSetup(multiplex=True, requests=3),
                [
                    (params("/big", query="n=5000"), b""),
                    (params("/echo", "POST", content_length=len(body)), body),
                    (params("/hello"), b""),
                ],
            ),
            # Go drops a request from its table once STDIN has ended, so an
            # abort after that is ignored and the answer comes as usual...
            exchange(
                address,
                "go-abort-ignored",
                fuzz_client.ClientSetup(multiplex=True, requests=1, abort=True),
                [(params("/sleep", query="s=0.2"), b"")],
            ),
            # ...but with STDIN still open, Go ends the request at once, then the
            # handler finishes and sends a late reply and a second END_REQUEST.
            exchange(
                address,
                "go-aborted",
                fuzz_client.ClientSetup(multiplex=True, requests=1, abort=True, stdin_open=True),
                [(params("/sleep", query="s=0.3"), b"partial body")],
            ),
            exchange(
                address,
                "go-aborted-multiplexed",
                fuzz_client.ClientSetup(
                    multiplex=True, requests=2, abort=True, abort_index=1, stdin_open=True
                ),
                [(params("/hello"), b""), (params("/sleep", query="s=0.3"), b"partial body")],
            ),
        ]
    finally:
        server.stop()


class Recorder:
    """A FastCGI application on a Unix socket that records what its clients send.

    Each request's bytes (from its BEGIN_REQUEST to its STDIN's end, on a
    kept-alive connection too) are recorded on their own and answered with a
    fixed response.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(sock,), daemon=True).start()

    def _connection(self, sock: socket.socket) -> None:
        conn = ServerConnection()
        pending = bytearray()
        with sock:
            while chunk := sock.recv(65536):
                pending += chunk
                for event in conn.receive_data(chunk):
                    if isinstance(event, StdinEnd):
                        self.requests.append(bytes(pending))
                        pending.clear()
                        rid = event.request_id
                        conn.send_stdout(rid, b"Content-Type: text/plain\r\n\r\nrecorded")
                        conn.end_request(rid)
                sock.sendall(conn.data_to_send())
                if conn.closed:
                    return

    def close(self) -> None:
        self.listener.close()


def nginx_requests(binary: str, base: Path) -> list[tuple[str, bytes]]:
    """What nginx sends a FastCGI application for a few HTTP requests."""
    recorder = Recorder(str(peers.socket_dir(base) / "recorder.sock"))
    nginx = peers.Nginx(binary, base / "nginx", f"unix:{recorder.path}", keep_conn=True)
    nginx.start()
    host, port = nginx.http_address.rsplit(":", 1)
    cases = [
        ("nginx-get", "GET", "/index.php?x=1&y=%C3%A9", None, {"Accept": "*/*"}),
        (
            "nginx-post",
            "POST",
            "/upload.php",
            bytes(range(256)) * 20,
            {"Content-Type": "application/octet-stream"},
        ),
        (
            "nginx-long-headers",
            "GET",
            "/a/b.php/extra",
            None,
            {"Cookie": "session=" + "c" * 300, "X-Forwarded-For": "10.0.0.1", "User-Agent": "x"},
        ),
    ]
    names = []
    try:
        http_conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for name, method, path, body, headers in cases:
            http_conn.request(method, path, body=body, headers=headers)
            response = http_conn.getresponse()
            assert response.read() == b"recorded", name
            names.append(name)
        http_conn.close()
    finally:
        nginx.stop()
        recorder.close()
    for name, wire in zip(names, recorder.requests, strict=True):
        print(f"  {name}: nginx sent {len(wire)} bytes")
    return list(zip(names, recorder.requests, strict=True))


def stdout_ops(stdout: bytes, stderr: bytes, index: int = 0) -> bytes:
    """fuzz_roundtrip operations sending these streams (in pieces) for request `index`."""
    ops = b""
    for kind, data in ((1, stderr), (0, stdout)):
        for start in range(0, len(data), 4096):
            piece = data[start : start + 4096]
            ops += bytes((kind | index << 2,)) + len(piece).to_bytes(2, "big") + piece
    return ops + bytes((2 | index << 2, 0, 0))


def write(target: str, name: str, data: bytes) -> None:
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def main() -> None:
    exchanges: list[Exchange] = []
    nginx_wires: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fcgi-capture-", dir="/tmp") as tmp:
        base = Path(tmp)
        php, go, nginx = peers.find_php_fpm(), peers.find_go(), peers.find_nginx()
        if php:
            print("php-fpm:")
            (base / "php").mkdir()
            exchanges += php_exchanges(php, base / "php")
        else:
            print("php-fpm not found: skipped")
        if go:
            print("go:")
            (base / "go").mkdir()
            exchanges += go_exchanges(go, base / "go")
        else:
            print("go not found: skipped")
        if nginx:
            print("nginx:")
            (base / "nginx-peer").mkdir()
            nginx_wires = nginx_requests(nginx, base / "nginx-peer")
        else:
            print("nginx not found: skipped")

    small = h.Feeding(h.RANDOM, h.BYTES, 7)
    for ex in exchanges:
        # The client target reads the answer in the state it was captured in.
        write("client", ex.name, ex.setup.encode() + ex.received)
        if len(ex.received) < 4096:
            chunked = dataclasses.replace(ex.setup, feeding=small)
            write("client", ex.name + "-chunked", chunked.encode() + ex.received)
        # The server target reads what our client sent, answering as an application.
        server_setup = fuzz_server.ServerSetup(multiplex=ex.setup.multiplex, reactive=True)
        write("server", ex.name + "-request", server_setup.encode() + ex.sent)
        for rid, stdout in sorted(ex.stdout.items()):
            suffix = f"-{rid}" if len(ex.stdout) > 1 else ""
            write("response_parser", ex.name + suffix, b"\x01\x00\x00\x00" + stdout)
        if ex.stdout and not ex.setup.abort:
            rid, stdout = min(ex.stdout.items())
            flags = 1 if ex.setup.multiplex else 0
            ops = stdout_ops(stdout, ex.stderr.get(rid, b""))
            write("roundtrip", ex.name, bytes((flags, 0, 0, 0)) + ops)
    # Two answers interleaved on one multiplexed connection, and a big one in 256-byte feeds.
    by_name = {ex.name: ex for ex in exchanges}
    if "go-multiplexed" in by_name:
        ex = by_name["go-multiplexed"]
        ops = b"".join(stdout_ops(ex.stdout.get(rid, b""), b"", rid - 1) for rid in (3, 1, 2))
        write("roundtrip", "go-multiplexed", bytes((1, 2, 0, 0)) + ops)
    bulk = b"\x03\x50\x00" + b"\x02\x00\x00"  # 80 KiB made up, then end_request
    write("roundtrip", "bulk-256-byte-feeds", bytes((0, 0, h.FIXED, 255)) + bulk)
    for name, wire in nginx_wires:
        setup = fuzz_server.ServerSetup(reactive=True)
        write("server", name, setup.encode() + wire)
        chunked = dataclasses.replace(setup, reactive=False, feeding=small)
        write("server", name + "-chunked", chunked.encode() + wire)
    total = sum(path.stat().st_size for path in CORPUS.rglob("*") if path.is_file())
    print(f"corpus: {total} bytes in {CORPUS}")


if __name__ == "__main__":
    main()
