"""fcgiproto: the FastCGI protocol as a sans-I/O state machine."""

from ._errors import *  # noqa: F403
from ._errors import __all__ as _errors_all
from ._records import ProtocolStatus, RecordType, Role

__all__ = [*_errors_all, "ProtocolStatus", "RecordType", "Role"]
