"""Instructions a call of the CGI helpers, with the arguments `fcgi php` gives them.

    uv run python benchmarks/callgrind_cgi.py [--calls 2000,6000]

Runs each piece under ``valgrind --tool=callgrind`` at two numbers of calls
and prints the difference divided by the difference of calls: the cost of
one call, interpreter startup excluded. Pieces: ``build_params`` as the
gateway calls it for /hello.php, the same through ``_build_params_general``
(the value-at-a-time reference the fast path falls back to), and
``ResponseParser`` fed the head php-fpm sends for /hello.php. ``--time``
prints microseconds a call from the clock instead (loaded machines move it).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcgiproto import cgi

KWARGS: dict = dict(
    query=b"",
    headers=[(b"host", b"127.0.0.1:8080")],
    script_filename=b"/srv/www/hello.php",
    document_root=b"/srv/www",
    server_name="127.0.0.1",
    server_port=8080,
    server_addr="127.0.0.1",
    remote_addr="127.0.0.1",
    remote_port=50312,
    https=False,
    server_protocol="HTTP/1.1",
    content_length=None,
    extra={
        "SCRIPT_NAME": b"/hello.php",
        "PATH_INFO": b"",
        "DOCUMENT_URI": b"/hello.php",
    },
)
HEAD = b"X-Powered-By: PHP/8.2.29\r\nContent-type: text/html; charset=UTF-8\r\n\r\nHello, world!\n"


def build_params() -> None:
    cgi.build_params("GET", b"/hello.php", **KWARGS)


def build_params_general() -> None:
    cgi._build_params_general("GET", b"/hello.php", **KWARGS)


def response_parser() -> None:
    parser = cgi.ResponseParser()
    parser.feed(HEAD)
    parser.close()


PIECES = {f.__name__: f for f in (build_params, build_params_general, response_parser)}


def instructions(piece: str, calls: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "callgrind.out")
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--inner",
                piece,
                str(calls),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        match = re.search(r"Collected : (\d+)", run.stderr)
        assert match, run.stderr
        return int(match[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="2000,6000")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--inner", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        piece, calls = PIECES[args.inner[0]], int(args.inner[1])
        for _ in range(calls):
            piece()
        return 0
    low, high = (int(n) for n in args.calls.split(","))
    for name, piece in PIECES.items():
        if args.time:
            best = min(_timed(piece, high) for _ in range(5))
            print(f"{name}: {best * 1e6:.2f} us a call")
        else:
            counts = [instructions(name, n) for n in (low, high)]
            print(f"{name}: {(counts[1] - counts[0]) / (high - low):,.0f} instructions a call")
    return 0


def _timed(piece, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        piece()
    return (time.perf_counter() - start) / calls


if __name__ == "__main__":
    sys.exit(main())
