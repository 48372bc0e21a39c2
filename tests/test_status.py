"""php-fpm's status page: the parser, read_status() on both clients, and `fcgi status`."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import peers
import pytest
from helpers import no_new_thread_left
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import fcgiproto_anyio._status
import fcgiproto_socket._status
from fcgiproto.support import (
    PoolScrape,
    PoolStatus,
    ProcessStatus,
    StatusPageError,
    parse_status,
    prometheus_text,
    status_params,
)
from fcgiproto_anyio import AsyncClient
from fcgiproto_anyio import read_status as aread_status
from fcgiproto_socket import Client, Request, Server, Timeout, read_status
from fcgiproto_socket._cli import main
from fcgiproto_socket._cli_status import render_text, thresholds

STATUS_PATH = "/fpm-status"

# What php-fpm 8.2 answers for /status?full, byte for byte (two processes).
TEXT_FULL = """\
pool:                 www
process manager:      dynamic
start time:           07/Dec/2026:00:31:41 +0100
start since:          120
accepted conn:        17
listen queue:         2
max listen queue:     5
listen queue len:     4096
idle processes:       1
active processes:     1
total processes:      2
max active processes: 2
max children reached: 3
slow requests:        4

************************
pid:                  25647
state:                Idle
start time:           07/Dec/2026:00:31:41 +0100
start since:          120
requests:             9
request duration:     1503
request method:       POST
request URI:          /index.php?a=1
content length:       42
user:                 -
script:               /srv/www/index.php
last request cpu:     13.25
last request memory:  2097152

************************
pid:                  25648
state:                Running
start time:           07/Dec/2026:00:32:01 +0100
start since:          100
requests:             8
request duration:     365
request method:       GET
request URI:          /status?full
content length:       0
user:                 -
script:               -
last request cpu:     0.00
last request memory:  0
"""

START = datetime(2026, 12, 7, 0, 31, 41, tzinfo=timezone(timedelta(hours=1)))


def json_full(uri: str = "\\/index.php?a=1") -> str:
    """The same page in JSON, as php-fpm writes it; `uri` goes in unchanged."""
    epoch = int(START.timestamp())
    page = (
        '{"pool":"www","process manager":"dynamic","start time":EPOCH,"start since":120,'
        '"accepted conn":17,"listen queue":2,"max listen queue":5,"listen queue len":4096,'
        '"idle processes":1,"active processes":1,"total processes":2,'
        '"max active processes":2,"max children reached":3,"slow requests":4, "processes":['
        '{"pid":25647,"state":"Idle","start time":EPOCH,"start since":120,"requests":9,'
        '"request duration":1503,"request method":"POST","request uri":"URI",'
        '"content length":42,"user":"-","script":"\\/srv\\/www\\/index.php",'
        '"last request cpu":13.25,"last request memory":2097152},'
        '{"pid":25648,"state":"Running","start time":LATER,"start since":100,"requests":8,'
        '"request duration":365,"request method":"GET","request uri":"\\/status?full",'
        '"content length":0,"user":"-","script":"-","last request cpu":0.00,'
        '"last request memory":0}]}'
    )
    page = page.replace("EPOCH", str(epoch)).replace("LATER", str(epoch + 20))
    return page.replace("URI", uri)


# --- the parser ---


def test_text_and_json_give_the_same_typed_values() -> None:
    text, document = parse_status(TEXT_FULL), parse_status(json_full().encode())
    assert text == document
    assert text.pool == "www" and text.process_manager == "dynamic"
    assert text.start_time == START
    assert (text.accepted_conn, text.listen_queue, text.max_listen_queue) == (17, 2, 5)
    assert (text.listen_queue_len, text.idle_processes, text.active_processes) == (4096, 1, 1)
    assert (text.total_processes, text.max_active_processes) == (2, 2)
    assert (text.max_children_reached, text.slow_requests) == (3, 4)
    first = text.processes[0]
    assert first == ProcessStatus(
        pid=25647,
        state="Idle",
        start_time=START,
        start_since=120,
        requests=9,
        request_duration=1503,
        request_method="POST",
        request_uri="/index.php?a=1",
        content_length=42,
        user="-",
        script="/srv/www/index.php",
        last_request_cpu=13.25,
        last_request_memory=2097152,
    )
    assert text.processes[1].start_time == START + timedelta(seconds=20)


def test_times_in_any_offset_or_as_a_string_of_seconds() -> None:
    west = TEXT_FULL.replace("07/Dec/2026:00:31:41 +0100", "06/Dec/2026:18:01:41 -0530", 1)
    assert parse_status(west).start_time == START
    epoch = int(START.timestamp())
    quoted = json_full().replace(
        f'"start time":{epoch},"start since":120,"a', f'"start time":"{epoch}","start since":120,"a'
    )
    assert parse_status(quoted).start_time == START


def test_the_short_page_has_no_processes() -> None:
    short = TEXT_FULL.split("\n***")[0] + "\n"
    assert parse_status(short).processes == ()
    assert parse_status(short) == PoolStatus(
        **{**vars_of(parse_status(TEXT_FULL)), "processes": ()}
    )


def vars_of(status: PoolStatus) -> dict[str, object]:
    return {name: getattr(status, name) for name in PoolStatus.__dataclass_fields__}


@pytest.mark.parametrize(
    ("raw", "uri"),
    [
        ('/search?q="quoted"', '/search?q="quoted"'),
        ("/path\\with\\backslashes", "/path\\with\\backslashes"),
        ('/x?a=1","b', '/x?a=1","b'),
        ("/tab\there", "/tab\there"),
    ],
)
def test_json_before_php_8_2_with_raw_request_uris_is_repaired(raw: str, uri: str) -> None:
    # php-fpm before 8.2 wrote the request URI (and script, user) unescaped.
    with pytest.raises(ValueError):
        json.loads(json_full(raw))
    status = parse_status(json_full(raw))
    assert status.processes[0].request_uri == uri
    assert status.processes[0].content_length == 42


@pytest.mark.parametrize(
    ("page", "complaint"),
    [
        ("", "not a php-fpm status page"),
        ("File not found.\n", "not a php-fpm status page"),
        ("<html><body>hello</body></html>", "not a php-fpm status page"),
        ('{"pool": "www"}', "lacks 'process manager'"),
        ("[1, 2]", "not a php-fpm status page"),
        ('{"pool": "www"', "not valid JSON"),
        (TEXT_FULL.replace("accepted conn:        17", "accepted conn:        many"), "not a int"),
        (TEXT_FULL.replace("07/Dec/2026:00:31:41 +0100", "yesterday", 1), "'start time'"),
        (json_full().replace('"pid":25647', '"pid":[1]'), "'pid' of process 1"),
        (json_full().replace('"requests":9', '"requests":9.5'), "'requests' of process 1"),
        (json_full().replace('"processes":[', '"processes":{"a":[').replace("]}", "]}}"), "list"),
        ('{"pool": "www", "processes": [1]}', "not a list of objects"),
        (json_full().replace('"pool":"www"', '"pool":["www"]'), "'pool' of the pool"),
        (
            json_full().replace(
                f'"start time":{int(START.timestamp())},"start since":120,"a',
                '"start time":null,"start since":120,"a',
            ),
            "'start time' of the pool",
        ),
    ],
)
def test_what_is_not_a_status_page_is_a_typed_error(page: str, complaint: str) -> None:
    with pytest.raises(StatusPageError, match=complaint.replace("[", r"\[")):
        parse_status(page)


def test_a_page_too_large_is_refused_before_parsing() -> None:
    with pytest.raises(StatusPageError, match="too large"):
        parse_status(b" " * (4 * 1024 * 1024 + 1))


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_input_parses_or_is_a_status_page_error(page: str | bytes) -> None:
    with contextlib.suppress(StatusPageError):
        parse_status(page)


@given(st.text(max_size=40), st.sampled_from(["text", "json"]))
def test_any_request_uri_survives_a_round_trip(uri: str, form: str) -> None:
    # What `fcgi status --format json` and the text form print reads back the same.
    uri = uri.replace("\n", " ").strip() or "-"
    base = parse_status(TEXT_FULL)
    process = base.processes[0]
    status = PoolStatus(
        **{
            **vars_of(base),
            "processes": (ProcessStatus(**{**process.__dict__, "request_uri": uri}),),
        }
    )
    printed = json.dumps(status.to_json()) if form == "json" else render_text(status)
    assert parse_status(printed) == status


def test_status_params_ask_for_json() -> None:
    assert status_params("/status", full=True)["QUERY_STRING"] == "json&full"
    assert status_params("/fpm")["SCRIPT_NAME"] == "/fpm"
    with pytest.raises(ValueError, match="starts with /"):
        status_params("status")


def test_thresholds_each_have_their_exit_status() -> None:
    status = parse_status(TEXT_FULL)  # listen queue 2, idle 1, active 1 of 2
    assert thresholds(status, 2, 1, 0.5) == []
    assert [code for code, _ in thresholds(status, 1, 2, 0.4)] == [5, 6, 7]
    ((_, reason),) = thresholds(status, None, None, 0.25)
    assert reason == "active processes 1 of 2 (0.50) > --max-active-ratio 0.25"


# --- Prometheus ---


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """name -> [(sample name, labels, value)], by prometheus_client's own parser."""
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_the_exposition_has_php_fpm_exporter_names_and_parses() -> None:
    status = parse_status(TEXT_FULL)
    text = prometheus_text(
        [PoolScrape("unix:/run/php/www.sock", status), PoolScrape("127.0.0.1:9000", None, 2, "old")]
    )
    # Counters keep the names php-fpm_exporter gives them (no _total).
    assert 'phpfpm_accepted_connections{pool="www",scrape_uri="unix:/run/php/www.sock"} 17' in text
    assert "# TYPE phpfpm_accepted_connections counter" in text
    found = families(text)
    www = {"pool": "www", "scrape_uri": "unix:/run/php/www.sock"}
    down = {"pool": "old", "scrape_uri": "127.0.0.1:9000"}
    assert found["phpfpm_up"] == [("phpfpm_up", www, 1), ("phpfpm_up", down, 0)]
    assert ("phpfpm_scrape_failures_total", down, 2) in found["phpfpm_scrape_failures"]
    assert found["phpfpm_listen_queue"] == [("phpfpm_listen_queue", www, 2)]
    for name in (
        "start_since",
        "accepted_connections",
        "max_listen_queue",
        "listen_queue_length",
        "idle_processes",
        "active_processes",
        "total_processes",
        "max_active_processes",
        "max_children_reached",
        "slow_requests",
        "process_requests",
        "process_last_request_memory",
        "process_last_request_cpu",
        "process_request_duration",
        "process_state",
    ):
        assert f"phpfpm_{name}" in found, name
    cpu = found["phpfpm_process_last_request_cpu"]
    assert cpu[0] == ("phpfpm_process_last_request_cpu", {**www, "child": "0"}, 13.25)
    states = {s[1]["state"]: s[2] for s in found["phpfpm_process_state"] if s[1]["child"] == "1"}
    assert states["Running"] == 1 and states["Idle"] == 0 and sum(states.values()) == 1


def test_labels_are_escaped() -> None:
    status = PoolStatus(
        **{**vars_of(parse_status(TEXT_FULL)), "pool": 'a"b\\c\nd', "processes": ()}
    )
    found = families(prometheus_text([PoolScrape("x", status)]))
    assert found["phpfpm_up"][0][1]["pool"] == 'a"b\\c\nd'


# --- against php-fpm ---


@pytest.fixture(scope="module")
def fpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.PhpFpm]:
    """php-fpm of our own: a test here saturates its pools. Two workers a pool."""
    binary = peers.find_php_fpm()
    peers.require_peer("php-fpm", binary is not None)
    assert binary is not None
    server = peers.PhpFpm(
        binary, tmp_path_factory.mktemp("php-fpm-status"), pool_settings={"pm.max_children": "2"}
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    with no_new_thread_left():
        yield


@pytest.mark.peer
def test_read_status_over_tcp_and_unix_on_both_clients(fpm: peers.PhpFpm) -> None:
    for address, pool in ((fpm.unix_path, "unix"), (fpm.tcp_address, "tcp")):
        status = read_status(address, STATUS_PATH, full=True)
        assert status.pool == pool and status.process_manager == "static"
        assert len(status.processes) == 2
        assert any(p.request_uri == f"{STATUS_PATH}?json&full" for p in status.processes)
        with Client(address, multiplex=False) as client:
            assert read_status(client, STATUS_PATH).pool == pool

    async def on_anyio() -> PoolStatus:
        async with AsyncClient(fpm.tcp_address, multiplex=False) as client:
            return await aread_status(client, STATUS_PATH, full=True)

    assert anyio.run(on_anyio).pool == "tcp"
    assert anyio.run(lambda: aread_status(fpm.unix_path, STATUS_PATH)).pool == "unix"


@pytest.mark.peer
def test_a_path_that_is_not_the_status_page(fpm: peers.PhpFpm) -> None:
    with pytest.raises(StatusPageError, match="answered 404 Not Found for the status page /nope"):
        read_status(fpm.unix_path, "/nope")


@pytest.mark.peer
def test_status_command_in_each_format(
    fpm: peers.PhpFpm, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", fpm.unix_path, "--path", STATUS_PATH]) == 0
    text = capsys.readouterr().out
    assert text.startswith("pool:                 unix\n")
    assert parse_status(text).processes == ()
    assert main(["status", f"tcp://{fpm.tcp_address}", "--path", STATUS_PATH, "--full"]) == 0
    assert len(parse_status(capsys.readouterr().out).processes) == 2
    assert main(["status", fpm.tcp_address, "--path", STATUS_PATH, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["pool"] == "tcp" and isinstance(document["start time"], int)
    argv = ["status", fpm.unix_path, "--path", STATUS_PATH, "--format", "prometheus", "--full"]
    assert main(argv) == 0
    found = families(capsys.readouterr().out)
    assert found["phpfpm_up"] == [
        ("phpfpm_up", {"pool": "unix", "scrape_uri": f"unix:{fpm.unix_path}"}, 1)
    ]
    assert len({s[1]["child"] for s in found["phpfpm_process_requests"]}) == 2


@pytest.mark.peer
def test_status_command_failures_are_one_line(
    fpm: peers.PhpFpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", fpm.unix_path, "--path", "/nope"]) == 1
    assert "answered 404 Not Found" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "gone.sock")]) == 3
    assert "No such file" in capsys.readouterr().err
    assert main(["status", fpm.unix_path, "--max-active-ratio", "1.5"]) == 2
    assert main(["status", fpm.unix_path, "--min-idle", "-1"]) == 2
    assert main(["status", fpm.unix_path, "--path", "status"]) == 2
    capsys.readouterr()


def test_status_times_out_with_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = threading.Event()

    def stuck(request: Request) -> bytes:
        release.wait(5)
        return b"Content-Type: text/plain\r\n\r\nlate"

    with Server(stuck, str(tmp_path / "stuck.sock")) as server:
        try:
            started = time.monotonic()
            assert main(["status", str(server.address), "--timeout", "0.3"]) == 4
            assert time.monotonic() - started < 2
        finally:
            release.set()
    assert capsys.readouterr().err.startswith("fcgi status: timed out")


def test_status_asks_again_once_after_php_fpm_s_503(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = [b"Status: 503 Service Unavailable\r\n\r\nServer busy. Please try again later."]
    page = json_full().encode()

    def busy_once(request: Request) -> bytes:
        assert request.params["QUERY_STRING"] == "json"
        return answers.pop() if answers else b"Content-Type: application/json\r\n\r\n" + page

    with Server(busy_once, str(tmp_path / "busy.sock")) as server:
        assert main(["status", str(server.address)]) == 0
    assert capsys.readouterr().out.startswith("pool:                 www\n")


def busy_then(answers: list[bytes]) -> tuple[list[str], Callable[[Request], bytes]]:
    """A handler giving `answers` in turn, then the status page; the queries it saw."""
    seen: list[str] = []
    page = b"Content-Type: application/json\r\n\r\n" + json_full().encode()

    def handler(request: Request) -> bytes:
        seen.append(request.params["QUERY_STRING"])
        return answers.pop(0) if answers else page

    return seen, handler


BUSY = b"Status: 503 Service Unavailable\r\n\r\nServer busy. Please try again later."


def test_read_status_asks_again_once_on_both_clients(tmp_path: Path) -> None:
    answers = [BUSY]
    seen, handler = busy_then(answers)
    with Server(handler, str(tmp_path / "busy.sock")) as server:
        address = str(server.address)
        assert anyio.run(lambda: aread_status(address, full=True, timeout=5)).pool == "www"
        assert seen == ["json&full", "json&full"]

        async def without_a_total() -> PoolStatus:
            async with AsyncClient(address, multiplex=False, timeout=Timeout(total=None)) as c:
                return await aread_status(c)

        answers.append(BUSY)
        assert anyio.run(without_a_total).pool == "www"
        answers.append(BUSY)
        with Client(address, multiplex=False, timeout=Timeout(total=None)) as client:
            assert read_status(client).pool == "www"
        assert len(seen) == 6


def test_read_status_gives_up_on_a_503_when_no_time_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pause longer than the whole timeout: no second try fits.
    for module in (fcgiproto_socket._status, fcgiproto_anyio._status):
        monkeypatch.setattr(module, "SCOREBOARD_RETRY_PAUSE", 60.0)
    seen, handler = busy_then([BUSY, BUSY])
    with Server(handler, str(tmp_path / "busy.sock")) as server:
        started = time.monotonic()
        with pytest.raises(StatusPageError, match="answered 503 Service Unavailable"):
            read_status(str(server.address), timeout=10)
        assert len(seen) == 1
        with pytest.raises(StatusPageError, match="answered 503"):
            anyio.run(lambda: aread_status(str(server.address), timeout=10))
        assert len(seen) == 2
        assert time.monotonic() - started < 10


@pytest.mark.peer
def test_thresholds_on_an_idle_pool(fpm: peers.PhpFpm, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["status", fpm.tcp_address, "--path", STATUS_PATH]
    assert main([*base, "--max-listen-queue", "0"]) == 0
    # The worker answering is active: a pool of two never shows two idle.
    assert main([*base, "--min-idle", "3"]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "idle processes" in err and "< --min-idle 3" in err
    assert main([*base, "--max-active-ratio", "0.01"]) == 7
    assert "> --max-active-ratio 0.01" in capsys.readouterr().err


@pytest.mark.peer
def test_accepted_conn_rises_by_exactly_one_per_ping(
    fpm: peers.PhpFpm, capsys: pytest.CaptureFixture[str]
) -> None:
    # One connection per ping, no probe, and keep_conn off: php-fpm counts a
    # connection kept alive once more when the client closes it.
    before = read_status(fpm.unix_path, STATUS_PATH).accepted_conn
    for _ in range(3):
        assert main(["ping", fpm.unix_path, "--expect", "pong"]) == 0
    assert main(["status", fpm.unix_path, "--path", STATUS_PATH]) == 0
    after = read_status(fpm.unix_path, STATUS_PATH).accepted_conn
    assert after - before == 5  # three pings, one `fcgi status`, the read itself
    capsys.readouterr()


@pytest.mark.peer
def test_a_saturated_pool_shows_its_listen_queue_and_fires_the_thresholds(
    fpm: peers.PhpFpm, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two workers: two slow scripts hold them; the status request queues,
    # then four more slow scripts queue behind it. When a worker takes the
    # status request, the four (less one a worker took) wait in the queue.
    # php-fpm measures the queue of TCP sockets only (TCP_INFO).
    address = fpm.tcp_address

    def slow() -> None:
        with Client(address, multiplex=False, timeout=30) as client:
            client.request(fpm.params("sleep.php", query="s=3"))

    first = [threading.Thread(target=slow) for _ in range(2)]
    for thread in first:
        thread.start()
    time.sleep(1.0)  # a loaded machine may take a while to start threads
    status: list[int] = []
    argv = ["status", address, "--path", STATUS_PATH, "--timeout", "20"]
    argv += ["--max-listen-queue", "1", "--min-idle", "1", "--max-active-ratio", "0.9"]
    probe = threading.Thread(target=lambda: status.append(main(argv)))
    probe.start()
    time.sleep(0.5)
    later = [threading.Thread(target=slow) for _ in range(4)]
    for thread in later:
        thread.start()
    for thread in [*first, probe, *later]:
        thread.join(30)
    out, err = capsys.readouterr()
    assert status == [5], (out, err)
    page = parse_status(out)
    assert page.listen_queue >= 2 and page.max_listen_queue >= page.listen_queue
    assert err.count("\n") == 1 and err.startswith(f"fcgi status: {address} pool tcp: ")
    assert f"listen queue {page.listen_queue} > --max-listen-queue 1" in err
    assert "--min-idle 1" in err and "--max-active-ratio 0.9" in err
