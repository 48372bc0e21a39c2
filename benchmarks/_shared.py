"""Helpers the benchmarks share: CPU accounting, wrk, and how figures are printed."""

from __future__ import annotations

import contextlib
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

import peers

__all__ = ["WRK", "children_cpu", "read_pid", "us", "verdict", "wrk"]

WRK = shutil.which("wrk") or "wrk"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_pid(path: Path, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        if time.monotonic() > deadline:
            raise peers.PeerError(f"no pid in {path}")
        time.sleep(0.01)


def wrk(url: str, threads: int, connections: int, seconds: int) -> tuple[int, float]:
    """Run wrk; (requests, requests/s). Fails on errors or non-2xx answers."""
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True)
    out = done.stdout
    count = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if count is None or rate is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk failed:\n{out}{done.stderr}")
    return int(count.group(1)), float(rate.group(1))


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def verdict(value: float, goal: float, at_most: bool = False) -> str:
    ok = value <= goal if at_most else value >= goal
    return "met" if ok else "MISSED"
