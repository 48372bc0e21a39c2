"""One exception tree shared by the core and both adapters."""

from __future__ import annotations

__all__ = [
    "CantMultiplex",
    "ConnectError",
    "ConnectTimeout",
    "FastCGIError",
    "LocalProtocolError",
    "Overloaded",
    "PoolTimeout",
    "ProtocolError",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "RequestAborted",
    "RequestError",
    "ResponseTooLarge",
    "TimeoutException",
    "TransportError",
    "UnknownRole",
    "WriteError",
    "WriteTimeout",
]


class FastCGIError(Exception):
    """Base of every error fcgiproto raises."""


class ProtocolError(FastCGIError):
    """The protocol was broken, by our caller or by the peer."""


class LocalProtocolError(ProtocolError):
    """The caller misused the API; the connection's state is unchanged."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; the connection is dead afterwards."""


class TransportError(FastCGIError):
    """The connection to the peer could not be made or used."""


class ConnectError(TransportError):
    """The connection could not be opened (refused, no such socket, unreachable)."""


class ReadError(TransportError):
    """Reading from the connection failed, or the peer closed it mid-response."""


class WriteError(TransportError):
    """Writing to the connection failed (reset, broken pipe)."""


class TimeoutException(TransportError, TimeoutError):
    """A deadline passed; also a builtins.TimeoutError."""


class ConnectTimeout(TimeoutException):
    """The connection was not open within `Timeout.connect`."""


class ReadTimeout(TimeoutException):
    """No byte arrived within `Timeout.read`, or `Timeout.total` ran out."""


class WriteTimeout(TimeoutException):
    """The peer took no byte within `Timeout.write`."""


class PoolTimeout(TimeoutException):
    """No connection of the pool came free within `Timeout.pool`."""


class RequestError(FastCGIError):
    """The application ended a request abnormally."""


class CantMultiplex(RequestError):
    """END_REQUEST with FCGI_CANT_MPX_CONN."""


class Overloaded(RequestError):
    """END_REQUEST with FCGI_OVERLOADED."""


class UnknownRole(RequestError):
    """END_REQUEST with FCGI_UNKNOWN_ROLE."""


class RequestAborted(RequestError):
    """The request was aborted before it completed."""


class ResponseTooLarge(RequestError):
    """The application sent more stdout or stderr than the client's max_response_size.

    Raised as the bytes arrive, before they are kept; the request is aborted
    (its connection closed, or the request aborted on a shared connection).
    """
