#!/usr/bin/env python3
"""Differential fuzzing: what one side sends, the other receives unchanged, in any chunking.

    uv run --group fuzz python fuzz/fuzz_roundtrip.py fuzz/corpus/roundtrip -max_total_time=600

A ClientConnection sends requests to a ServerConnection; the server answers
with send_stdout / send_stderr / end_request calls that the input dictates;
the client reads the answers. Both directions are fed in the chunking the
setup chooses.

Input: 4 setup bytes, then operations.

- byte 0, flags: 0x01 multiplex; 0x02 the client sees EOF at the end; 0x04
  the client aborts a request before reading; 0x08 a single request is
  keep_conn=False.
- byte 1: low 2 bits + 1 requests (1 unless multiplexed), bits 4-7 which one
  0x04 aborts.
- bytes 2-3: the chunking, see _harness.Feeding.
- then operations of 3 bytes, ``op arg_hi arg_lo``: op bits 0-1 the kind
  (0 STDOUT of the next ``arg`` input bytes, 1 STDERR likewise, 2
  end_request with app_status ``arg`` and protocol status op bits 4-5,
  3 ``4 * arg`` bytes of STDOUT made up, to cross 65528-byte record
  boundaries), op bits 2-3 which request. Requests still open at the end are
  ended with app_status 0.

Checks: the server sees each request's params and body exactly as sent and
the abort; the client sees each STDOUT and STDERR exactly as sent (nothing
for the aborted request) and one END_REQUEST with the status sent, last;
nothing raises; no request is left in flight; EOF then is clean.
"""

from __future__ import annotations

from contextlib import nullcontext

try:
    import atheris
except ImportError:  # replaying inputs (tests/test_fuzz_corpus.py) needs no atheris
    atheris = None

with (
    atheris.instrument_imports(include=["fcgiproto"])
    if atheris is not None and __name__ == "__main__"
    else nullcontext()
):
    from fcgiproto import (
        AbortRequest,
        BeginRequest,
        ClientConnection,
        EndRequest,
        Params,
        ProtocolStatus,
        Role,
        ServerConnection,
        StderrData,
        StdinData,
        StdinEnd,
        StdoutData,
    )

if __package__:
    from . import _harness as h
else:  # run as a script: fuzz/ is sys.path[0]
    import _harness as h

#: The answers stop growing past this many bytes: several 65528-byte records...
MAX_OUTPUT = 160 * 1024
#: ...unless they are fed in small chunks: this many receive_data() calls at most.
MAX_CALLS = 2048
PATTERN = bytes(range(256))


def request_input(index: int) -> tuple[dict, bytes]:
    """Params with short and long (4-byte length) pairs, non-UTF-8 bytes, and a body."""
    params = {
        b"REQUEST_INDEX": str(index).encode(),
        b"HTTP_X_LONG": b"v" * (130 * index),
        b"\xff\xfe": bytes(range(index * 3)),
    }
    return params, b"body %d " % index * (index * 10)


def ops(payload: bytes):
    """(kind, request index, arg, data) of each operation in the payload."""
    pos = 0
    while pos + 3 <= len(payload):
        op, arg = payload[pos], int.from_bytes(payload[pos + 1 : pos + 3], "big")
        pos += 3
        data = b""
        if op & 3 < 2:
            data = payload[pos : pos + arg]
            pos += len(data)
        yield op, arg, data


def one_input(data: bytes) -> None:
    raw_setup, payload = h.split_input(data)
    flags, counts = raw_setup[0], raw_setup[1]
    multiplex = bool(flags & 1)
    feeding = h.Feeding.decode(raw_setup[2], raw_setup[3])
    count = (counts & 3) + 1 if multiplex else 1
    keep_conn = not (flags & 8 and count == 1)

    client = ClientConnection(multiplex=multiplex)
    server = ServerConnection(multiplex=multiplex, max_requests=8)
    ids = []
    for i in range(count):
        params, stdin = request_input(i)
        ids.append(client.send_request(params, stdin, keep_conn=keep_conn))
    aborted = ids[(counts >> 4) % count] if flags & 4 else None
    if aborted is not None:
        client.abort_request(aborted)

    # Client to server.
    events = []
    for piece in feeding.pieces(client.data_to_send()):
        events += server.receive_data(piece)
    events = h.merge_stream_events(events)
    for i, rid in enumerate(ids):
        params, stdin = request_input(i)
        mine = [e for e in events if e.request_id == rid]
        expected = [BeginRequest(rid, Role.RESPONDER, keep_conn), Params(rid, params)]
        if stdin:
            expected.append(StdinData(rid, stdin))
        expected.append(StdinEnd(rid))
        if rid == aborted:
            expected.append(AbortRequest(rid))
        assert mine == expected, f"request {rid}: the server saw {mine}, not {expected}"
    assert server.active_requests == frozenset(ids)

    # The answers.
    stdout = {rid: bytearray() for rid in ids}
    stderr = {rid: bytearray() for rid in ids}
    ends: dict[int, EndRequest] = {}
    size = 0
    if feeding.schedule == h.BYTEWISE:
        max_output = MAX_CALLS
    elif feeding.schedule == h.FIXED:
        max_output = min(MAX_OUTPUT, MAX_CALLS * (feeding.param + 1))
    else:
        max_output = MAX_OUTPUT
    for op, arg, chunk in ops(payload):
        rid = ids[(op >> 2 & 3) % count]
        kind = op & 3
        budget = max_output - size
        if rid in ends or budget <= 0:
            continue
        if kind == 2:
            status = ProtocolStatus(op >> 4 & 3)
            server.end_request(rid, arg, status)
            ends[rid] = EndRequest(rid, arg, status)
            continue
        if kind == 3:
            chunk = (PATTERN[op:] + PATTERN * (4 * arg // 256 + 1))[: 4 * arg]
        chunk = chunk[:budget]
        size += len(chunk)
        if kind == 1:
            server.send_stderr(rid, chunk)
            stderr[rid] += chunk
        else:
            server.send_stdout(rid, chunk)
            stdout[rid] += chunk
    for rid in ids:
        if rid not in ends:
            server.end_request(rid)
            ends[rid] = EndRequest(rid, 0, ProtocolStatus.REQUEST_COMPLETE)
    assert server.active_requests == frozenset()
    assert server.closed == (not keep_conn)

    # Server to client.
    wire = server.data_to_send()
    h.parse_wire(wire)
    received = []
    for piece in feeding.pieces(wire):
        received += h.measured(client.receive_data, piece, len(piece))
    if flags & 2:
        received += client.receive_data(b"")
        assert client.closed
    received = h.merge_stream_events(received)
    for rid in ids:
        mine = [e for e in received if e.request_id == rid]
        expected = []
        if rid != aborted:
            # STDOUT and STDERR interleave as they were sent: compare each stream whole.
            out = b"".join(e.data for e in mine if isinstance(e, StdoutData))
            err = b"".join(e.data for e in mine if isinstance(e, StderrData))
            assert out == stdout[rid], f"request {rid}: STDOUT differs"
            assert err == stderr[rid], f"request {rid}: STDERR differs"
            expected = [e for e in mine if not isinstance(e, EndRequest)]
        expected.append(ends[rid])
        assert mine == expected, (
            f"request {rid}: the client saw {mine[-3:]}, not ...{expected[-3:]}"
        )
    assert client.active_requests == frozenset()
    assert client.closed == (not keep_conn or bool(flags & 2))
    assert client.can_send_request == (not client.closed)


if __name__ == "__main__":
    h.fuzz(one_input)
