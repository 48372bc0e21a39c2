"""php-fpm's status page (pm.status_path), parsed into typed values: no I/O.

php-fpm answers its status path in plain text (the default), JSON (`?json`),
XML, HTML or OpenMetrics; `?full` adds one entry per worker process. This
reads the text and the JSON forms, which are the two every php-fpm release
has, including the JSON of releases before 8.2, which writes request URIs,
scripts and users without escaping them, so a URI with a quote or a
backslash in it makes the document invalid JSON: those values are repaired
before the document is read again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any

from fcgiproto import FastCGIError

__all__ = [
    "PROCESS_STATES",
    "PoolScrape",
    "PoolStatus",
    "ProcessStatus",
    "StatusPageError",
    "parse_status",
    "prometheus_text",
    "status_params",
]

#: Bounds what a status page may hold before parsing: 64 KiB carries over
#: 150 processes with full=True; a pool of pm.max_children = 1000 needs ~420 KiB.
MAX_STATUS_PAGE = 4 * 1024 * 1024


class StatusPageError(FastCGIError):
    """The application's answer is not a php-fpm status page this can read."""


@dataclass(frozen=True)
class ProcessStatus:
    """One worker process of a pool, as `?full` reports it."""

    pid: int
    state: str  # Idle, Running, Reading headers, Getting request information, Finishing, Ending
    start_time: datetime
    start_since: int  # seconds
    requests: int
    request_duration: int  # microseconds: of the request running, or else of the last one
    request_method: str  # "-" when none
    request_uri: str
    content_length: int
    user: str
    script: str
    last_request_cpu: float  # percent
    last_request_memory: int  # bytes

    def to_json(self) -> dict[str, object]:
        """The process as php-fpm's own JSON names it (times as Unix seconds)."""
        return _to_json(self)


@dataclass(frozen=True)
class PoolStatus:
    """One pool's status page. `processes` is empty unless it was asked with full=True."""

    pool: str
    process_manager: str  # static, dynamic or ondemand
    start_time: datetime
    start_since: int  # seconds
    accepted_conn: int
    listen_queue: int
    max_listen_queue: int
    listen_queue_len: int
    idle_processes: int
    active_processes: int
    total_processes: int
    max_active_processes: int
    max_children_reached: int
    slow_requests: int
    processes: tuple[ProcessStatus, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The page as php-fpm's own JSON names it (times as Unix seconds)."""
        out = _to_json(self)
        if self.processes:
            out["processes"] = [_to_json(process) for process in self.processes]
        return out


def status_params(path: str = "/status", *, full: bool = False) -> dict[str, str]:
    """CGI params that ask php-fpm for the status page at `path`, as JSON.

    php-fpm answers its status path before looking for a file, matching
    SCRIPT_NAME; SCRIPT_FILENAME is set to the same for applications that
    route on it.
    """
    if not path.startswith("/"):
        raise ValueError(f"a status path starts with /: {path!r}")
    query = "json&full" if full else "json"
    return {
        "SCRIPT_NAME": path,
        "SCRIPT_FILENAME": path,
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": f"{path}?{query}",
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
    }


def parse_status(page: bytes | str) -> PoolStatus:
    """Read a status page in php-fpm's text or JSON form; StatusPageError if it is neither."""
    if len(page) > MAX_STATUS_PAGE:
        raise StatusPageError(f"a status page of {len(page)} bytes is too large to read")
    text = page.decode("utf-8", "replace") if isinstance(page, bytes) else page
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return _from_json(stripped)
    return _from_text(text)


# --- the names php-fpm uses ---

# (attribute, name in JSON, name in text, kind); the text form spells "request URI".
_INT, _STR, _FLOAT, _TIME = "int", "str", "float", "time"
_POOL_FIELDS = (
    ("pool", "pool", _STR),
    ("process_manager", "process manager", _STR),
    ("start_time", "start time", _TIME),
    ("start_since", "start since", _INT),
    ("accepted_conn", "accepted conn", _INT),
    ("listen_queue", "listen queue", _INT),
    ("max_listen_queue", "max listen queue", _INT),
    ("listen_queue_len", "listen queue len", _INT),
    ("idle_processes", "idle processes", _INT),
    ("active_processes", "active processes", _INT),
    ("total_processes", "total processes", _INT),
    ("max_active_processes", "max active processes", _INT),
    ("max_children_reached", "max children reached", _INT),
    ("slow_requests", "slow requests", _INT),
)
_PROCESS_FIELDS = (
    ("pid", "pid", _INT),
    ("state", "state", _STR),
    ("start_time", "start time", _TIME),
    ("start_since", "start since", _INT),
    ("requests", "requests", _INT),
    ("request_duration", "request duration", _INT),
    ("request_method", "request method", _STR),
    ("request_uri", "request uri", _STR),
    ("content_length", "content length", _INT),
    ("user", "user", _STR),
    ("script", "script", _STR),
    ("last_request_cpu", "last request cpu", _FLOAT),
    ("last_request_memory", "last request memory", _INT),
)
# The free-text values of a process and the key php-fpm writes after each:
# before 8.2 they went out unescaped (php-src GH-8191 and earlier reports).
_UNESCAPED = (
    ("request method", "request uri"),
    ("request uri", "content length"),
    ("user", "script"),
    ("script", "last request cpu"),
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
# php-fpm's text time: %d/%b/%Y:%H:%M:%S %z, in English whatever the locale.
_TEXT_TIME = re.compile(r"(\d\d)/([A-Z][a-z]{2})/(\d{4}):(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")


def _from_json(text: str) -> PoolStatus:
    try:
        document = json.loads(text)
    except ValueError:
        try:
            document = json.loads(_repair(text))
        except ValueError as exc:
            raise StatusPageError(f"the status page is not valid JSON: {exc}") from None
    processes = document.get("processes", [])
    if not isinstance(processes, list) or not all(isinstance(p, dict) for p in processes):
        raise StatusPageError("the status page's processes are not a list of objects")
    return PoolStatus(
        **_typed(document, _POOL_FIELDS, "the pool"),
        processes=tuple(
            ProcessStatus(**_typed(p, _PROCESS_FIELDS, f"process {i + 1}"))
            for i, p in enumerate(processes)
        ),
    )


def _repair(text: str) -> str:
    """Escape the free-text values that php-fpm before 8.2 wrote raw into its JSON."""
    for key, following in _UNESCAPED:
        pattern = re.compile(rf'("{key}":)"(.*?)"(,"{following}":)', flags=re.DOTALL)
        text = pattern.sub(lambda m: m[1] + json.dumps(m[2], ensure_ascii=False) + m[3], text)
    return text


def _from_text(text: str) -> PoolStatus:
    blocks = re.split(r"\n\*{5,}\n", text.replace("\r\n", "\n"))
    pool = _text_fields(blocks[0])
    if "pool" not in pool:
        raise StatusPageError(f"not a php-fpm status page: {text[:60]!r}")
    processes = [_text_fields(block) for block in blocks[1:] if block.strip()]
    return PoolStatus(
        **_typed(pool, _POOL_FIELDS, "the pool"),
        processes=tuple(
            ProcessStatus(**_typed(p, _PROCESS_FIELDS, f"process {i + 1}"))
            for i, p in enumerate(processes)
        ),
    )


def _text_fields(block: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in block.split("\n"):
        name, colon, value = line.partition(":")
        if colon and name.strip():
            # Values are padded to a column; "request URI" is the one odd name.
            found[name.strip().lower()] = value.strip()
    return found


def _typed(
    source: Mapping[str, object], table: tuple[tuple[str, str, str], ...], what: str
) -> dict[str, Any]:
    """The fields of `table` from `source`, converted; the dataclass checks nothing itself."""
    out: dict[str, Any] = {}
    for attribute, name, kind in table:
        if name not in source:
            raise StatusPageError(f"the status page lacks {name!r} for {what}")
        out[attribute] = _convert(source[name], kind, name, what)
    return out


def _convert(value: object, kind: str, name: str, what: str) -> object:
    try:
        if kind == _STR:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if kind == _TIME:
            return _time(value)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        if kind == _FLOAT:
            return float(value)
        if isinstance(value, float):
            raise ValueError
        return int(value)
    except (ValueError, OverflowError):
        raise StatusPageError(f"{name!r} of {what} is not a {kind}: {value!r:.40}") from None


def _time(value: object) -> datetime:
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, str):
        if value.isdigit():
            return datetime.fromtimestamp(int(value), timezone.utc)
        match = _TEXT_TIME.fullmatch(value)
        if match and match[2] in _MONTHS:
            day, month, year = int(match[1]), _MONTHS[match[2]], int(match[3])
            offset = timedelta(hours=int(match[8]), minutes=int(match[9]))
            zone = timezone(-offset if match[7] == "-" else offset)
            hour, minute, second = int(match[4]), int(match[5]), int(match[6])
            return datetime(year, month, day, hour, minute, second, tzinfo=zone)
    raise ValueError


def _to_json(status: PoolStatus | ProcessStatus) -> dict[str, object]:
    table = _POOL_FIELDS if isinstance(status, PoolStatus) else _PROCESS_FIELDS
    names = {attribute: name for attribute, name, _ in table}
    out: dict[str, object] = {}
    for field in fields(status):
        if field.name in names:
            value = getattr(status, field.name)
            out[names[field.name]] = (
                int(value.timestamp()) if isinstance(value, datetime) else value
            )
    return out


# --- Prometheus ---


@dataclass(frozen=True)
class PoolScrape:
    """One pool's part of an exposition: its status, or None when it could not be read.

    `address` becomes the scrape_uri label; `pool` names a pool that is down
    (its last known name, or ""); `failures` counts the failed scrapes so far.
    """

    address: str
    status: PoolStatus | None
    failures: int = 0
    pool: str = ""


# Names, help and types as hipages/php-fpm_exporter exposes them, so that
# dashboards and alerts written for it work unchanged.
_GAUGE, _COUNTER = "gauge", "counter"
_POOL_METRICS = (
    ("start_since", "The number of seconds since FPM has started.", _COUNTER, "start_since"),
    (
        "accepted_connections",
        "The number of requests accepted by the pool.",
        _COUNTER,
        "accepted_conn",
    ),
    (
        "listen_queue",
        "The number of requests in the queue of pending connections.",
        _GAUGE,
        "listen_queue",
    ),
    (
        "max_listen_queue",
        "The maximum number of requests in the queue of pending connections since FPM has started.",
        _COUNTER,
        "max_listen_queue",
    ),
    (
        "listen_queue_length",
        "The size of the socket queue of pending connections.",
        _GAUGE,
        "listen_queue_len",
    ),
    ("idle_processes", "The number of idle processes.", _GAUGE, "idle_processes"),
    ("active_processes", "The number of active processes.", _GAUGE, "active_processes"),
    ("total_processes", "The number of idle + active processes.", _GAUGE, "total_processes"),
    (
        "max_active_processes",
        "The maximum number of active processes since FPM has started.",
        _COUNTER,
        "max_active_processes",
    ),
    (
        "max_children_reached",
        "The number of times, the process limit has been reached, when pm tries to start more "
        "children (works only for pm 'dynamic' and 'ondemand').",
        _COUNTER,
        "max_children_reached",
    ),
    (
        "slow_requests",
        "The number of requests that exceeded your 'request_slowlog_timeout' value.",
        _COUNTER,
        "slow_requests",
    ),
)
_PROCESS_METRICS = (
    ("process_requests", "The number of requests the process has served.", _COUNTER, "requests"),
    (
        "process_last_request_memory",
        "The max amount of memory the last request consumed.",
        _GAUGE,
        "last_request_memory",
    ),
    (
        "process_last_request_cpu",
        "The %cpu the last request consumed.",
        _GAUGE,
        "last_request_cpu",
    ),
    (
        "process_request_duration",
        "The duration in microseconds of the requests.",
        _GAUGE,
        "request_duration",
    ),
)
#: The states php_fpm_exporter reports a 0 or 1 for, per process.
PROCESS_STATES = (
    "Idle",
    "Running",
    "Finishing",
    "Reading headers",
    "Getting request information",
    "Ending",
)


def prometheus_text(scrapes: Sequence[PoolScrape], *, namespace: str = "phpfpm") -> str:
    """The Prometheus text exposition (format 0.0.4) of some pools' status pages.

    Counters keep php_fpm_exporter's names, without the `_total` that
    OpenMetrics would add. Per-process metrics come from pages read with
    full=True; a `child` label numbers a pool's processes from 0.
    """
    lines: list[str] = []

    def family(name: str, help_text: str, kind: str, samples: Sequence[tuple[str, object]]) -> None:
        full = f"{namespace}_{name}"
        lines.append(f"# HELP {full} {_escape_help(help_text)}")
        lines.append(f"# TYPE {full} {kind}")
        lines.extend(f"{full}{{{labels}}} {_number(value)}" for labels, value in samples)

    def pool_labels(scrape: PoolScrape) -> str:
        name = scrape.status.pool if scrape.status is not None else scrape.pool
        return _labels(pool=name, scrape_uri=scrape.address)

    up = [(pool_labels(s), 1 if s.status is not None else 0) for s in scrapes]
    family("up", "Could PHP-FPM be reached?", _GAUGE, up)
    failures = [(pool_labels(s), s.failures) for s in scrapes]
    family("scrape_failures", "The number of failures scraping from PHP-FPM.", _COUNTER, failures)
    read = [s for s in scrapes if s.status is not None]
    for name, help_text, kind, attribute in _POOL_METRICS:
        samples = [(pool_labels(s), getattr(s.status, attribute)) for s in read]
        family(name, help_text, kind, samples)
    children = [
        (s, str(number), process)
        for s in read
        for number, process in enumerate(s.status.processes if s.status else ())
    ]
    if not children:
        return "\n".join(lines) + "\n"
    for name, help_text, kind, attribute in _PROCESS_METRICS:
        samples = [
            (_child_labels(s, child), getattr(process, attribute)) for s, child, process in children
        ]
        family(name, help_text, kind, samples)
    states: list[tuple[str, object]] = []
    for s, child, process in children:
        known = (
            PROCESS_STATES if process.state in PROCESS_STATES else (*PROCESS_STATES, process.state)
        )
        for state in known:
            labels = _child_labels(s, child, state=state)
            states.append((labels, 1 if state == process.state else 0))
    family("process_state", "The state of the process (Idle, Running, ...).", _GAUGE, states)
    return "\n".join(lines) + "\n"


def _child_labels(scrape: PoolScrape, child: str, **extra: str) -> str:
    assert scrape.status is not None
    return _labels(pool=scrape.status.pool, child=child, **extra, scrape_uri=scrape.address)


def _labels(**labels: str) -> str:
    return ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels.items())


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: object) -> str:
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else str(value)
    return str(value)
