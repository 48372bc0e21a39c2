"""Events: what each side of a connection receives, as frozen value objects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ._records import ProtocolStatus, Role

__all__ = [
    "AbortRequest",
    "BeginRequest",
    "EndRequest",
    "Event",
    "FilterData",
    "FilterDataEnd",
    "GetValuesResult",
    "Params",
    "StderrData",
    "StdinData",
    "StdinEnd",
    "StdoutData",
    "UnknownType",
]


class Event:
    """Base of every event; events compare by value."""

    __slots__ = ()


# --- what the client receives from the application ---


@dataclass(frozen=True, slots=True)
class StdoutData(Event):
    """Some bytes of a request's STDOUT stream; record boundaries mean nothing."""

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StderrData(Event):
    """Some bytes of a request's STDERR stream."""

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class EndRequest(Event):
    """The application ended the request; its id is free again."""

    request_id: int
    app_status: int
    protocol_status: ProtocolStatus


@dataclass(frozen=True, slots=True)
class GetValuesResult(Event):
    """The answer to a GET_VALUES query."""

    values: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class UnknownType(Event):
    """The application did not understand a record type we sent."""

    record_type: int


# --- what the application receives from the client ---


@dataclass(frozen=True, slots=True)
class BeginRequest(Event):
    """A request begins; `keep_conn` False means close the connection once it ends."""

    request_id: int
    role: Role
    keep_conn: bool


@dataclass(frozen=True, slots=True)
class Params(Event):
    """The whole PARAMS stream of a request, decoded once it has ended.

    Names and values are bytes as sent; a repeated name keeps its last value.
    """

    request_id: int
    params: Mapping[bytes, bytes]


@dataclass(frozen=True, slots=True)
class StdinData(Event):
    """Some bytes of a request's STDIN stream (the request body), as they arrive."""

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StdinEnd(Event):
    """The request's STDIN stream ended: the whole body has arrived."""

    request_id: int


@dataclass(frozen=True, slots=True)
class FilterData(Event):
    """Bytes of the FCGI_DATA stream (filter role)."""

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FilterDataEnd(Event):
    """The request's FCGI_DATA stream ended (filter role)."""

    request_id: int


@dataclass(frozen=True, slots=True)
class AbortRequest(Event):
    """The client asked to abort the request; answer with end_request."""

    request_id: int


def stream_event_maker(cls: type[Event]) -> Callable[[int, bytes], Event]:
    """A fast constructor for the reader's hot path, equal to calling `cls`.

    A frozen dataclass's __init__ goes through object.__setattr__ for each
    field; writing the slots directly costs about half as much.
    """
    new = object.__new__
    set_request_id = vars(cls)["request_id"].__set__
    set_data = vars(cls)["data"].__set__

    def make(request_id: int, data: bytes) -> Event:
        event = new(cls)
        set_request_id(event, request_id)
        set_data(event, data)
        return event

    return make


def end_request_maker() -> Callable[[int, int, ProtocolStatus], EndRequest]:
    """A fast constructor of EndRequest, equal to calling it (see stream_event_maker)."""
    new = object.__new__
    slots = vars(EndRequest)
    set_request_id = slots["request_id"].__set__
    set_app_status = slots["app_status"].__set__
    set_protocol_status = slots["protocol_status"].__set__

    def make(request_id: int, app_status: int, protocol_status: ProtocolStatus) -> EndRequest:
        event = new(EndRequest)
        set_request_id(event, request_id)
        set_app_status(event, app_status)
        set_protocol_status(event, protocol_status)
        return event

    return make


def request_head_makers() -> tuple[
    Callable[[int, Role, bool], BeginRequest],
    Callable[[int, Mapping[bytes, bytes]], Params],
    Callable[[int], StdinEnd],
]:
    """Fast constructors of BeginRequest, Params and StdinEnd, equal to calling them.

    For the server's request head, which every request has (see stream_event_maker).
    """
    new = object.__new__
    begin_slots, params_slots = vars(BeginRequest), vars(Params)
    set_begin_id = begin_slots["request_id"].__set__
    set_role = begin_slots["role"].__set__
    set_keep_conn = begin_slots["keep_conn"].__set__
    set_params_id = params_slots["request_id"].__set__
    set_params = params_slots["params"].__set__
    set_stdin_end_id = vars(StdinEnd)["request_id"].__set__

    def begin_request(request_id: int, role: Role, keep_conn: bool) -> BeginRequest:
        event = new(BeginRequest)
        set_begin_id(event, request_id)
        set_role(event, role)
        set_keep_conn(event, keep_conn)
        return event

    def params(request_id: int, pairs: Mapping[bytes, bytes]) -> Params:
        event = new(Params)
        set_params_id(event, request_id)
        set_params(event, pairs)
        return event

    def stdin_end(request_id: int) -> StdinEnd:
        event = new(StdinEnd)
        set_stdin_end_id(event, request_id)
        return event

    return begin_request, params, stdin_end
