"""A large response through stream(): peak memory and MB/s, beside nginx + curl.

Run:  uv run python benchmarks/bench_stream.py             (about 1 min on 2 cores)
      uv run python benchmarks/bench_stream.py --mib 256   (a smaller response)

Starts php-fpm (as bench_e2e.py does: pm = static, opcache on) and nginx in
front of it, on loopback TCP, and fetches tests/peers.py's big.php?n=SIZE
(SIZE bytes of a pattern, written by PHP in 64 KiB echoes) three ways, each
run 3 times, interleaved:

- `fcgiproto_socket.Client.stream()`, iterating `iter_body()` and counting
  bytes, in a child process of its own: the growth is its peak RSS over the
  stream (VmHWM, reset just before through /proc/self/clear_refs) minus its
  RSS just before;
- the same with `iter_stdout()` (the raw stream: no CGI head parsing);
- nginx (fastcgi_keep_conn, default buffering) + `curl -o /dev/null`.

MB/s is bytes over wall time from the request to the last byte. The table
shows the best run with the worst in brackets. What the rows mean is in
benchmarks/README.md, section "stream() of a large response".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from bench_e2e import PhpFpm

MIB = 1024 * 1024
GOAL_RSS_MIB = 16  # peak RSS growth while streaming, at most
GOAL_VS_CURL = 0.8  # MB/s at least this share of nginx + curl's

#: The child that streams: prints {"bytes", "seconds", "rss_growth"} as JSON.
CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from fcgiproto_socket import Client

def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)

address, params, raw = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "raw"
with Client(address) as client:
    client.request(params | {{"QUERY_STRING": "n=1"}})  # connect and decide multiplexing first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the RSS now
    before = status_kib("VmRSS")
    count = 0
    start = time.perf_counter()
    with client.stream(params) as response:
        chunks = response.iter_stdout() if raw else response.iter_body()
        for chunk in chunks:
            count += len(chunk)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
print(json.dumps({{"bytes": count, "seconds": seconds, "rss_growth": peak - before}}))
"""


def ours(address: str, params: dict[str, str], raw: bool) -> dict[str, float]:
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD.format(root=root),
            address,
            json.dumps(params),
            "raw" if raw else "body",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def curl(url: str) -> dict[str, float]:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return {"bytes": int(out[0]), "seconds": float(out[1]), "rss_growth": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="response size in MiB (1024)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.mib * MIB
    php, nginx_binary = peers.find_php_fpm(), peers.find_nginx()
    if php is None or nginx_binary is None or shutil.which("curl") is None:
        raise SystemExit("needs php-fpm, nginx and curl")
    print(
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average before: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    base = Path(tempfile.mkdtemp(prefix="fcgi-bench-stream-", dir="/tmp"))
    fpm = PhpFpm(php, base / "php-fpm")
    fpm.start()
    (base / "nginx").mkdir()
    nginx = peers.Nginx(nginx_binary, base / "nginx", fpm.tcp_address, docroot=fpm.docroot)
    nginx.start()
    try:
        params = fpm.params("big.php") | {"QUERY_STRING": f"n={size}"}
        url = f"http://{nginx.http_address}/big.php?n={size}"
        cases = {
            "fcgiproto_socket.Client.stream(), iter_body()": lambda: ours(
                fpm.tcp_address, params, raw=False
            ),
            "fcgiproto_socket.Client.stream(), iter_stdout()": lambda: ours(
                fpm.tcp_address, params, raw=True
            ),
            "nginx (buffering on) + curl -o /dev/null": lambda: curl(url),
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for rep in range(args.repeat):
            for name, run in cases.items():
                result = run()
                # The raw stream carries the CGI head too.
                if not size <= result["bytes"] < size + 1024:
                    raise RuntimeError(f"{name}: {result['bytes']} bytes, not {size}")
                runs[name].append(result)
                print(
                    f"  [{rep + 1}/{args.repeat}] {name:<50} "
                    f"{result['bytes'] / result['seconds'] / 1e6:8,.0f} MB/s",
                    flush=True,
                )
        print(
            f"\n{args.mib} MiB from php-fpm over TCP; best of {args.repeat} (worst); load "
            "average now " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        )
        print(f"{'case':<52} {'MB/s':>8} {'(worst)':>9} {'peak RSS growth':>16}")
        rates = {}
        for name, results in runs.items():
            speeds = [r["bytes"] / r["seconds"] / 1e6 for r in results]
            rates[name] = max(speeds)
            growth = max(r["rss_growth"] for r in results)
            shown = "-" if growth != growth else f"{growth / MIB:.1f} MiB"
            print(f"{name:<52} {max(speeds):8,.0f} {min(speeds):9,.0f} {shown:>16}")
        ref = rates["nginx (buffering on) + curl -o /dev/null"]
        for name in list(cases)[:2]:
            ratio = rates[name] / ref
            growth = max(r["rss_growth"] for r in runs[name]) / MIB
            print(
                f"{name}: {ratio:.2f}x nginx + curl (goal >= {GOAL_VS_CURL}x: "
                f"{'ok' if ratio >= GOAL_VS_CURL else 'MISSED'}), peak RSS growth "
                f"{growth:.1f} MiB (goal < {GOAL_RSS_MIB} MiB: "
                f"{'ok' if growth < GOAL_RSS_MIB else 'MISSED'})"
            )
    finally:
        nginx.stop()
        fpm.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
