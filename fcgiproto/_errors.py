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
    pass


class ReadError(TransportError):
    pass


class WriteError(TransportError):
    pass


class TimeoutException(TransportError, TimeoutError):
    """A deadline passed; also a builtins.TimeoutError."""


class ConnectTimeout(TimeoutException):
    pass


class ReadTimeout(TimeoutException):
    pass


class WriteTimeout(TimeoutException):
    pass


class PoolTimeout(TimeoutException):
    pass


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
