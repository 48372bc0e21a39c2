"""What both adapters share: address forms, timeouts, the response object."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcgiproto import (
    CantMultiplex,
    EndRequest,
    Overloaded,
    ProtocolStatus,
    RemoteProtocolError,
    TimeoutException,
    UnknownRole,
)
from fcgiproto.support import Address, Response, Timeout, parse_address, raise_for_protocol_status


@pytest.mark.parametrize(
    ("given", "expected", "shown"),
    [
        ("127.0.0.1:9000", Address(host="127.0.0.1", port=9000), "127.0.0.1:9000"),
        ("localhost:1", Address(host="localhost", port=1), "localhost:1"),
        ("[::1]:9000", Address(host="::1", port=9000), "[::1]:9000"),
        (("10.0.0.1", 9000), Address(host="10.0.0.1", port=9000), "10.0.0.1:9000"),
        ("unix:/run/php/fpm.sock", Address(path="/run/php/fpm.sock"), "unix:/run/php/fpm.sock"),
        ("/run/php/fpm.sock", Address(path="/run/php/fpm.sock"), "unix:/run/php/fpm.sock"),
        (Path("/tmp/a.sock"), Address(path="/tmp/a.sock"), "unix:/tmp/a.sock"),
    ],
)
def test_every_address_form(given: object, expected: Address, shown: str) -> None:
    address = parse_address(given)  # type: ignore[arg-type]
    assert address == expected
    assert str(address) == shown


@pytest.mark.parametrize(
    "bad", ["9000", "host:", "host:http", "host:70000", "[::1]9000", "[::1", "unix:", ":9000"]
)
def test_bad_addresses_are_refused_clearly(bad: str) -> None:
    with pytest.raises(ValueError, match=r"address|port"):
        parse_address(bad)


def test_a_plain_number_sets_every_limit_including_the_total() -> None:
    assert Timeout.of(2) == Timeout(2, 2, 2, 2, 2)
    assert Timeout.of(None) == Timeout(None, None, None, None, None)
    limits = Timeout(connect=1)
    assert Timeout.of(limits) is limits
    with pytest.raises(ValueError, match="positive number"):
        Timeout.of(0)


def test_timeouts_are_also_builtin_timeout_errors() -> None:
    assert issubclass(TimeoutException, TimeoutError)


def test_response_parses_cgi_stdout_on_demand() -> None:
    response = Response(
        b"Status: 403 Forbidden\r\nVariable-User: ann\r\nX-A: 1\r\n\r\nno",
        b"warn",
        0,
        ProtocolStatus.REQUEST_COMPLETE,
    )
    assert (response.status, response.reason, response.body) == (403, "Forbidden", b"no")
    assert response.header("x-a") == "1"
    assert response.header("missing") is None
    assert response.variables == {"User": "ann"}


def test_response_that_is_not_cgi_raises_when_parsed_only() -> None:
    response = Response(b"no head at all", b"", 0, ProtocolStatus.REQUEST_COMPLETE)
    assert response.stdout == b"no head at all"
    with pytest.raises(RemoteProtocolError):
        response.status  # noqa: B018


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (ProtocolStatus.CANT_MPX_CONN, CantMultiplex),
        (ProtocolStatus.OVERLOADED, Overloaded),
        (ProtocolStatus.UNKNOWN_ROLE, UnknownRole),
    ],
)
def test_abnormal_end_raises_its_own_error(status: ProtocolStatus, error: type[Exception]) -> None:
    address = parse_address("127.0.0.1:9000")
    with pytest.raises(error, match=f"127.0.0.1:9000 ended request 3 with {status.name}"):
        raise_for_protocol_status(EndRequest(3, 0, status), address)
    raise_for_protocol_status(EndRequest(3, 0, ProtocolStatus.REQUEST_COMPLETE), address)


def test_port_zero_is_an_address_to_listen_on_only() -> None:
    assert parse_address("127.0.0.1:0", listening=True) == Address(host="127.0.0.1", port=0)
    assert parse_address(("::1", 0), listening=True) == Address(host="::1", port=0)
    with pytest.raises(ValueError, match="port 0 out of range"):
        parse_address("127.0.0.1:0")


def test_an_address_object_passes_through() -> None:
    address = Address(host="127.0.0.1", port=9000)
    assert parse_address(address) is address
