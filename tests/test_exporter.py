"""`fcgi exporter`: php-fpm pools as Prometheus metrics, read by prometheus_client's own parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fcgiproto_socket._exporter import PoolScraper

STATUS_PATH = "/fpm-status"
Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(text: str) -> Samples:
    """sample name -> [(labels, value)], as prometheus_client parses the exposition."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def up_by_uri(found: Samples) -> dict[str, float]:
    return {labels["scrape_uri"]: value for labels, value in found["phpfpm_up"]}


def start_fpm(base: Path, extra_pools: int) -> peers.PhpFpm:
    binary = peers.find_php_fpm()
    peers.require_peer("php-fpm", binary is not None)
    assert binary is not None
    fpm = peers.PhpFpm(binary, base, extra_pools=extra_pools)
    fpm.start()
    return fpm


@pytest.fixture
def fpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.PhpFpm]:
    """php-fpm of the test's own (tests here stop it): pools unix, tcp, pool-1 ... pool-3."""
    server = start_fpm(tmp_path_factory.mktemp("php-fpm-exporter"), 3)
    try:
        yield server
    finally:
        server.stop()


class Exporter:
    """`python -m fcgiproto_socket exporter` as a child process, on a free port."""

    def __init__(self, *args: str, log: Path) -> None:
        argv = [sys.executable, "-m", "fcgiproto_socket", "exporter", "--listen", "127.0.0.1:0"]
        self.log = log
        with log.open("wb") as errors:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(
                [*argv, *args], stdout=subprocess.PIPE, stderr=errors, text=True
            )
        assert self.process.stdout is not None
        line = (
            self.process.stdout.readline()
        )  # "Serving php-fpm metrics on http://...:PORT/metrics"
        assert "/metrics" in line, line + log.read_text()
        self.url = line.split(" on ", 1)[1].split()[0]

    def scrape(self, timeout: float = 10.0) -> tuple[Samples, str, str]:
        with urllib.request.urlopen(self.url, timeout=timeout) as answer:
            text = answer.read().decode()
            return samples(text), text, answer.headers["Content-Type"]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            assert self.process.stdout is not None
            self.process.stdout.close()


@pytest.fixture
def run_exporter(tmp_path: Path) -> Iterator[type[Exporter]]:
    started: list[Exporter] = []

    class Started(Exporter):
        def __init__(self, *args: str) -> None:
            super().__init__(*args, log=tmp_path / f"exporter-{len(started)}.log")
            started.append(self)

    try:
        yield Started
    finally:
        for exporter in started:
            if exporter.process.poll() is None:
                exporter.stop()


@pytest.mark.peer
def test_every_pool_by_address_and_glob_with_php_fpm_exporter_names(
    fpm: peers.PhpFpm, run_exporter: type[Exporter], tmp_path: Path
) -> None:
    exporter = run_exporter(
        f"tcp://{fpm.tcp_address}",
        f"unix:{fpm.unix_path}",
        f"unix:{fpm.pools_dir}/*.sock",
        "--path",
        STATUS_PATH,
    )
    found, text, content_type = exporter.scrape()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    pools = {labels["pool"]: value for labels, value in found["phpfpm_up"]}
    assert pools == {"tcp": 1, "unix": 1, "pool-1": 1, "pool-2": 1, "pool-3": 1}
    assert up_by_uri(found)[f"unix:{fpm.pools_dir}/pool-2.sock"] == 1
    # The names php-fpm_exporter's dashboards query; counters without _total.
    assert "\nphpfpm_accepted_connections{" in text
    assert "# TYPE phpfpm_accepted_connections counter" in text
    for name in (
        "phpfpm_scrape_failures_total",  # the parser's name for a counter
        "phpfpm_start_since_total",
        "phpfpm_listen_queue",
        "phpfpm_max_listen_queue_total",
        "phpfpm_listen_queue_length",
        "phpfpm_idle_processes",
        "phpfpm_active_processes",
        "phpfpm_total_processes",
        "phpfpm_max_active_processes_total",
        "phpfpm_max_children_reached_total",
        "phpfpm_slow_requests_total",
        "phpfpm_process_requests_total",
        "phpfpm_process_last_request_memory",
        "phpfpm_process_last_request_cpu",
        "phpfpm_process_request_duration",
        "phpfpm_process_state",
    ):
        assert name in found, name
    children = {
        (labels["pool"], labels["child"]) for labels, _ in found["phpfpm_process_requests_total"]
    }
    assert len([c for c in children if c[0] == "unix"]) == 4  # pm.max_children = 4
    assert len([c for c in children if c[0] == "pool-1"]) == 1
    assert "process_cpu_seconds_total" in found  # the exporter's own, as every exporter has
    # The glob is expanded at every scrape: a socket that appears is found.
    (fpm.pools_dir / "late.sock").symlink_to(fpm.unix_path)
    found, _, _ = exporter.scrape()
    assert up_by_uri(found)[f"unix:{fpm.pools_dir}/late.sock"] == 1
    (fpm.pools_dir / "late.sock").unlink()
    assert f"unix:{fpm.pools_dir}/late.sock" not in up_by_uri(exporter.scrape()[0])
    assert exporter.stop() == 0


@pytest.mark.peer
def test_other_pages_and_usage_errors(fpm: peers.PhpFpm, run_exporter: type[Exporter]) -> None:
    exporter = run_exporter(fpm.unix_path, "--no-processes", "--path", STATUS_PATH)
    root = exporter.url.rsplit("/", 1)[0]
    with urllib.request.urlopen(root + "/", timeout=10) as answer:
        assert b'href="/metrics"' in answer.read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(root + "/nothing", timeout=10)
    assert refused.value.code == 404
    refused.value.close()
    found, _, _ = exporter.scrape()
    assert "phpfpm_process_state" not in found and up_by_uri(found) == {f"unix:{fpm.unix_path}": 1}
    taken = exporter.url.split("//")[1].split("/")[0]
    for argv, complaint in (
        (["--listen", taken, fpm.unix_path], "cannot listen on"),
        (["--listen", "/tmp/x.sock", fpm.unix_path], "--listen takes HOST:PORT"),
        (["--path", "status", fpm.unix_path], "--path must start with /"),
        (["no-port"], "is not host:port"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "fcgiproto_socket", "exporter", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done
        assert complaint in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.peer
def test_php_fpm_stopped_mid_scrape_is_down_within_the_deadline_and_recovers(
    fpm: peers.PhpFpm, run_exporter: type[Exporter]
) -> None:
    deadline = 1.0
    exporter = run_exporter(
        fpm.unix_path,
        fpm.tcp_address,
        f"{fpm.pools_dir}/*.sock",
        "--path",
        STATUS_PATH,
        "--timeout",
        str(deadline),
    )
    found, _, _ = exporter.scrape()
    everyone = up_by_uri(found)
    assert len(everyone) == 5 and set(everyone.values()) == {1}
    # Frozen: every process of php-fpm stops where it is, its sockets still
    # accepting. Each pool hangs; the scrape must not.
    pids = fpm.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        found, _, _ = exporter.scrape()
        took = time.monotonic() - started
        assert set(up_by_uri(found).values()) == {0}
        assert took < deadline + 1.5, took  # the pools were read at once, each within it
        failures = {labels["scrape_uri"]: v for labels, v in found["phpfpm_scrape_failures_total"]}
        assert set(failures.values()) == {1}
        # A pool that is down keeps its name.
        assert {labels["pool"] for labels, _ in found["phpfpm_up"]} >= {"unix", "tcp"}
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert set(up_by_uri(exporter.scrape()[0]).values()) == {1}
    # Stopped for good: refused, or the sockets gone; then started again.
    fpm.stop()
    started = time.monotonic()
    found, _, _ = exporter.scrape()
    assert time.monotonic() - started < deadline + 1.5
    assert set(up_by_uri(found).values()) == {0}
    fpm.start()
    assert set(up_by_uri(exporter.scrape()[0]).values()) == {1}


@pytest.mark.peer
def test_php_fpm_killed_while_a_scrape_waits_on_it(
    fpm: peers.PhpFpm, run_exporter: type[Exporter]
) -> None:
    deadline = 2.0
    exporter = run_exporter(
        fpm.unix_path, fpm.tcp_address, "--path", STATUS_PATH, "--timeout", str(deadline)
    )
    assert set(up_by_uri(exporter.scrape()[0]).values()) == {1}
    pids = fpm.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # the scrape's requests wait on php-fpm ...
    done: list[tuple[Samples, float]] = []
    started = time.monotonic()
    scraping = threading.Thread(
        target=lambda: done.append((exporter.scrape()[0], time.monotonic() - started))
    )
    scraping.start()
    time.sleep(0.5)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # ... when it dies under them
    fpm.stop()
    scraping.join(10)
    ((found, took),) = done
    assert set(up_by_uri(found).values()) == {0}
    assert took < deadline + 1.5, took
    fpm.start()
    assert set(up_by_uri(exporter.scrape()[0]).values()) == {1}


@pytest.mark.peer
def test_fifty_pools_in_one_scrape(tmp_path_factory: pytest.TempPathFactory) -> None:
    fpm = start_fpm(tmp_path_factory.mktemp("php-fpm-50"), 50)
    try:
        scraper = PoolScraper([f"unix:{fpm.pools_dir}/*.sock"], path=STATUS_PATH, deadline=3.0)
        try:
            scraper.exposition()  # threads started, imports done
            started = time.monotonic()
            text = scraper.exposition()
            took = time.monotonic() - started
        finally:
            scraper.close()
        up = samples(text)["phpfpm_up"]
        assert len(up) == 50 and {value for _, value in up} == {1}
        assert {labels["pool"] for labels, _ in up} == {f"pool-{n}" for n in range(1, 51)}
        assert took < 2.0, took
    finally:
        fpm.stop()


def test_a_scraper_needs_a_good_address() -> None:
    with pytest.raises(ValueError, match="no address"):
        PoolScraper([])
    with pytest.raises(ValueError, match="is not host:port"):
        PoolScraper(["nowhere"])
    scraper = PoolScraper(["unix:/nonexistent-dir/*.sock"])
    try:
        assert scraper.scrape() == []  # a glob that matches nothing is no pool
    finally:
        scraper.close()
