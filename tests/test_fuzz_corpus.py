"""The fuzz targets of fuzz/ replayed over their corpus, and what fuzzing found.

No atheris needed: each target's ``one_input`` runs as plain Python, with
tracemalloc bounding what every receive_data() call allocates. Each corpus
file is replayed as it is (its own setup bytes), and each captured seed once
more fed in small pieces. fuzz/README.md tells how to run the fuzzers.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fcgiproto import ClientConnection, ServerConnection, StdinData, StdoutData
from fuzz import (
    _harness,
    fuzz_client,
    fuzz_exchange,
    fuzz_pool,
    fuzz_response_parser,
    fuzz_roundtrip,
    fuzz_server,
)
from tests.helpers import begin_body, raw_record

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
#: The source distribution (an unpacked one has PKG-INFO, a checkout has not) leaves the
#: corpus out; everywhere else a missing corpus is a failure.
CORPUS_LEFT_OUT = not CORPUS.is_dir() and (ROOT / "PKG-INFO").is_file()
needs_corpus = pytest.mark.skipif(
    CORPUS_LEFT_OUT, reason="the source distribution leaves fuzz/corpus out"
)
#: Inputs that atheris found to fail, as it wrote them, named <bug>-<hash>.
CRASHERS = CORPUS.parent / "crashers"
TARGETS: dict[str, Callable[[bytes], None]] = {
    "client": fuzz_client.one_input,
    "server": fuzz_server.one_input,
    "response_parser": fuzz_response_parser.one_input,
    "roundtrip": fuzz_roundtrip.one_input,
    "exchange": fuzz_exchange.one_input,
    "pool": fuzz_pool.one_input,
}
#: Targets whose setup bytes 2-3 are a _harness.Feeding, and whose seeds are captures.
FED_TARGETS = ("client", "server", "response_parser")
#: Setup bytes 2-3 that make a target feed its payload one byte at a time...
BYTEWISE = _harness.Feeding(_harness.BYTEWISE).encode()
#: ...or, for the big captures, 256 bytes at a time, which is faster.
SMALL_FEEDS = _harness.Feeding(_harness.FIXED, _harness.BYTES, 255).encode()


def corpus_files() -> list[tuple[str, Path]]:
    if CORPUS_LEFT_OUT:
        return []
    return [
        (target, path)
        for target in TARGETS
        for path in sorted((CORPUS / target).iterdir())
        if path.is_file()
    ]


@pytest.fixture(autouse=True)
def bounded_memory() -> Iterator[None]:
    """Check every receive_data() call's allocations; stop tracing afterwards."""
    was_tracing = tracemalloc.is_tracing()
    _harness.set_trace_memory(True)
    try:
        yield
    finally:
        _harness.set_trace_memory(False)
        if not was_tracing:
            tracemalloc.stop()


@needs_corpus
def test_every_target_has_a_seed_corpus() -> None:
    for target in TARGETS:
        assert len(list((CORPUS / target).iterdir())) >= 5, target


@needs_corpus
@pytest.mark.parametrize(
    ("target", "path"), corpus_files(), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_corpus_replays_cleanly(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def is_seed(path: Path) -> bool:
    """A capture of fuzz/capture.py (named), not an input atheris added (a SHA-1)."""
    return not (len(path.name) == 40 and all(c in "0123456789abcdef" for c in path.name))


@needs_corpus
@pytest.mark.parametrize(
    ("target", "path"),
    [(t, p) for t, p in corpus_files() if t in FED_TARGETS and is_seed(p)],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_corpus_replays_cleanly_fed_in_small_pieces(target: str, path: Path) -> None:
    data = path.read_bytes()
    feeding = BYTEWISE if len(data) <= 2048 else SMALL_FEEDS
    TARGETS[target](data[:2] + feeding + data[4:])


def test_the_targets_take_any_bytes() -> None:
    for one_input in TARGETS.values():
        for data in (b"", b"\x00", b"\xff" * 4, b"\xff" * 40, bytes(range(256))):
            one_input(data)


# --- what fuzzing found ---------------------------------------------------------
#
# Each crasher as fuzz_*.one_input got it, kept under fuzz/crashers/<target>/ and
# replayed here, next to the smallest reproduction against the API.
#
# abort-tail: abort_request() (client) and end_request() (server) forgot the
# request's streams but not the record being read, so the rest of a STDOUT or
# STDIN record begun in an earlier chunk, and the records of that stream after
# it in the same chunk, were still delivered for the aborted or ended request.
#
# mux-body-after-end (fuzz_exchange): on a multiplexed connection the request
# sent its whole streamed body before looking at its inbox; an application that
# answered (or refused with OVERLOADED) before reading it ended the request
# meanwhile, and the next piece raised LocalProtocolError from request(). The
# reproductions against the API are in tests/test_client_logic.py.


def crashers() -> list[Any]:
    return [
        pytest.param(target.name, path, id=f"{target.name}-{path.name}")
        for target in sorted(CRASHERS.iterdir())
        for path in sorted(target.iterdir())
    ]


@pytest.mark.parametrize(("target", "path"), crashers())
def test_crasher_found_by_atheris(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def test_client_drops_the_rest_of_a_record_begun_before_abort_request() -> None:
    conn = ClientConnection()
    rid = conn.send_request({})
    conn.data_to_send()
    stdout = raw_record(6, rid, b"0123456789")
    assert conn.receive_data(stdout[:13]) == [StdoutData(rid, b"01234")]
    conn.abort_request(rid)
    events = conn.receive_data(stdout[13:] + raw_record(6, rid, b"more"))
    assert events == []  # "Output for the request that arrives meanwhile is dropped too."


def test_server_drops_the_rest_of_a_record_begun_before_end_request() -> None:
    conn = ServerConnection()
    wire = raw_record(1, 1, begin_body()) + raw_record(4, 1) + raw_record(5, 1, b"0123456789")
    assert conn.receive_data(wire[:-5])[-1] == StdinData(1, b"01234")
    conn.end_request(1)
    assert conn.receive_data(wire[-5:] + raw_record(5, 1, b"more")) == []


def test_fuzz_client_crasher_abort_tail() -> None:
    # Setup I\x12\x02\x0c: multiplexed, 2 requests, request 2 aborted up front
    # and, reactive, each aborted at its first STDOUT byte; fed 13 bytes at a
    # time, so request 1's STDOUT record straddles two feeds.
    fuzz_client.one_input(
        b"I\x12\x02\x0c"
        b"\x01\x06\x00\x01\x00\n\x00\x000123456789"
        b"\x01\x03\x00\x01\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    )


def test_fuzz_server_crasher_end_tail() -> None:
    # Setup \x0c\x00\x02$: the application ends each request as soon as its
    # PARAMS arrive; fed 37 bytes at a time, so the STDIN record straddles two
    # feeds and its second half arrives after end_request().
    fuzz_server.one_input(
        b"\x0c\x00\x02$"
        b"\x01\x01\x00\x01\x00\x08\x00\x00\x00\x01\x01\x00\x00\x00\x00\x00"
        b"\x01\x04\x00\x01\x00\x00\x00\x00"
        b"\x01\x05\x00\x01\x00\n\x00\x000123456789"
        b"\x01\x05\x00\x01\x00\x00\x00\x00"
    )
