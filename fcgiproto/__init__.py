"""fcgiproto: the FastCGI protocol as a sans-I/O state machine.

Bytes in, typed events out; method calls in, bytes out. No I/O, no clock.
"""

from ._client import ClientConnection
from ._errors import *  # noqa: F403
from ._errors import __all__ as _errors_all
from ._events import *  # noqa: F403
from ._events import __all__ as _events_all
from ._records import ParamsInput, ProtocolStatus, RecordType, Role
from ._server import DEFAULT_MAX_PARAMS_PAIRS, DEFAULT_MAX_PARAMS_SIZE, ServerConnection
from ._version import __version__

__all__ = [
    *_errors_all,
    *_events_all,
    "DEFAULT_MAX_PARAMS_PAIRS",
    "DEFAULT_MAX_PARAMS_SIZE",
    "ClientConnection",
    "ParamsInput",
    "ProtocolStatus",
    "RecordType",
    "Role",
    "ServerConnection",
    "__version__",
]
