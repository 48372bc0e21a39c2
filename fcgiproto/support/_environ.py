"""From CGI params to a WSGI environ or an ASGI http scope, and back to a CGI response head.

A web server hands a FastCGI application the request as CGI variables; WSGI
(PEP 3333) and ASGI (the HTTP connection scope) each want their own shape of
it. Both are built here from the params a server received, with no I/O, so the
blocking and the anyio server agree on every field.

Where the path is: nginx sends the whole request path as SCRIPT_NAME and no
PATH_INFO (``fastcgi_param SCRIPT_NAME $fastcgi_script_name``), Apache and
lighttpd split it into the mount point and the rest. A request whose
PATH_INFO is missing or empty is taken to be all path: the app is mounted at
`root_path` (the server's option, "" by default), which is cut off its front.
"""

from __future__ import annotations

import http
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeAlias
from urllib.parse import unquote_to_bytes

__all__ = [
    "ASGI_VERSION",
    "asgi_scope",
    "asgi_scope_from_bytes",
    "cgi_head",
    "request_path",
    "url_scheme",
    "wsgi_environ",
]

#: What the scope's "asgi" key says: ASGI 3, HTTP spec 2.4 (send() after a
#: disconnect raises an OSError instead of being silently dropped).
ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}


def _raw(value: str) -> bytes:
    """The bytes the web server sent for a param (params are decoded with surrogateescape)."""
    return value.encode("utf-8", "surrogateescape")


def _native(value: str) -> str:
    """A param as PEP 3333's native string: its bytes, each as one latin-1 character."""
    if value.isascii():
        return value
    return _raw(value).decode("latin-1")


#: HTTP_ACCEPT_LANGUAGE -> b"accept-language", for the names seen so far; a
#: client's made-up names stop being remembered past HEADER_NAMES_KEPT.
_header_names: dict[str, bytes] = {}
HEADER_NAMES_KEPT = 512


def _header_name(param: str) -> bytes:
    """The ASGI header name of an HTTP_* param (or CONTENT_TYPE, CONTENT_LENGTH)."""
    name = _header_names.get(param)
    if name is None:
        start = 5 if param.startswith("HTTP_") else 0
        # The bytes the web server sent, ASCII letters lowered (as it raised
        # them): a name that is not ASCII, which no HTTP header's is, comes
        # through as it came rather than failing the request.
        name = _raw(param[start:]).lower().replace(b"_", b"-")
        if len(_header_names) < HEADER_NAMES_KEPT:
            _header_names[param] = name
    return name


def _port(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


def request_path(params: Mapping[str, str], root_path: str = "") -> tuple[str, str]:
    """(SCRIPT_NAME, PATH_INFO) as PEP 3333 means them, decoded (not yet native strings).

    When the web server split them (PATH_INFO not empty), they are kept. When
    it sent all of the path as SCRIPT_NAME (nginx's default), `root_path` is
    the mount point: cut off the front of the path where the path starts with it.
    """
    script_name = params.get("SCRIPT_NAME", "")
    path_info = params.get("PATH_INFO", "")
    if path_info:
        return script_name, path_info
    path = script_name or _uri_path(params)
    root = root_path.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return root, path[len(root) :]
    return "", path or "/"


def _uri_path(params: Mapping[str, str]) -> str:
    """The decoded path of REQUEST_URI, for a server that sent no SCRIPT_NAME nor PATH_INFO."""
    uri = params.get("REQUEST_URI", "")
    raw = _raw(uri).split(b"?", 1)[0]
    return unquote_to_bytes(raw).decode("utf-8", "surrogateescape") if raw else ""


def url_scheme(params: Mapping[str, str]) -> str:
    """http or https: HTTPS set to anything but "off" (as CGI has it), else REQUEST_SCHEME."""
    https = params.get("HTTPS", "").lower()
    if https and https != "off":
        return "https"
    scheme = params.get("REQUEST_SCHEME", "").lower()
    return scheme if scheme in ("http", "https") else "http"


def wsgi_environ(
    params: Mapping[str, str],
    *,
    root_path: str = "",
    input: Any,
    errors: Any,
    multithread: bool,
    multiprocess: bool,
) -> dict[str, Any]:
    """The PEP 3333 environ of a request: every CGI param as a native string, and wsgi.*.

    The required CGI keys are there even when the web server left them out
    (SERVER_NAME "localhost", SERVER_PORT "80" or "443", REQUEST_METHOD "GET");
    CONTENT_TYPE and CONTENT_LENGTH only when not empty.
    """
    # Most params are ASCII, native already: _native() only for the others,
    # and when all are (one check of them joined), one copy of them all.
    environ: dict[str, Any]
    if "".join(params.values()).isascii():
        environ = dict(params)
    else:
        environ = {
            name: value if value.isascii() else _native(value) for name, value in params.items()
        }
    if not environ.get("CONTENT_TYPE"):
        environ.pop("CONTENT_TYPE", None)
    if not environ.get("CONTENT_LENGTH"):
        environ.pop("CONTENT_LENGTH", None)
    # Headers the CGI variables above carry; PEP 3333 has no HTTP_ form of them.
    environ.pop("HTTP_CONTENT_TYPE", None)
    environ.pop("HTTP_CONTENT_LENGTH", None)
    scheme = url_scheme(params)
    script_name, path_info = request_path(params, root_path)
    environ["SCRIPT_NAME"] = script_name if script_name.isascii() else _native(script_name)
    environ["PATH_INFO"] = path_info if path_info.isascii() else _native(path_info)
    environ.setdefault("QUERY_STRING", "")
    environ["REQUEST_METHOD"] = environ.get("REQUEST_METHOD") or "GET"
    if not environ.get("SERVER_NAME"):
        environ["SERVER_NAME"] = _native(
            params.get("HTTP_HOST", "").rsplit(":", 1)[0] or "localhost"
        )
    if not environ.get("SERVER_PORT"):
        environ["SERVER_PORT"] = "443" if scheme == "https" else "80"
    environ.setdefault("SERVER_PROTOCOL", "HTTP/1.1")
    environ["wsgi.version"] = (1, 0)
    environ["wsgi.url_scheme"] = scheme
    environ["wsgi.input"] = input
    environ["wsgi.errors"] = errors
    environ["wsgi.multithread"] = multithread
    environ["wsgi.multiprocess"] = multiprocess
    environ["wsgi.run_once"] = False
    environ["wsgi.input_terminated"] = True
    return environ


def _http_version(protocol: str) -> str:
    version = protocol.upper().removeprefix("HTTP/")
    if version in ("2", "2.0"):
        return "2"
    if version in ("3", "3.0"):
        return "3"
    return version if version in ("1.0", "1.1") else "1.1"


def asgi_scope(
    params: Mapping[str, str], *, root_path: str = "", state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ASGI http connection scope of a request.

    `path` is the whole decoded path, `root_path` included (as the spec has
    it since its clarification, and as Starlette expects); `raw_path` is the
    path of REQUEST_URI as the client sent it, percent-escapes kept.
    """
    script_name, path_info = request_path(params, root_path)
    uri = _raw(params.get("REQUEST_URI", ""))
    raw_path = uri.split(b"?", 1)[0] or None
    headers: list[tuple[bytes, bytes]] = []
    for name, value in params.items():
        if name.startswith("HTTP_"):
            if name in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue
        elif not (value and name in ("CONTENT_TYPE", "CONTENT_LENGTH")):
            continue
        headers.append((_header_name(name), value.encode("utf-8", "surrogateescape")))
    remote = params.get("REMOTE_ADDR")
    client = [remote, _port(params.get("REMOTE_PORT")) or 0] if remote else None
    server_host = params.get("SERVER_ADDR") or params.get("SERVER_NAME")
    server_port = _port(params.get("SERVER_PORT"))
    server = [server_host, server_port] if server_host and server_port is not None else None
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": dict(ASGI_VERSION),
        "http_version": _http_version(params.get("SERVER_PROTOCOL", "HTTP/1.1")),
        "method": (params.get("REQUEST_METHOD") or "GET").upper(),
        "scheme": url_scheme(params),
        "path": script_name + path_info,
        "raw_path": raw_path,
        "query_string": _raw(params.get("QUERY_STRING", "")),
        "root_path": script_name,
        "headers": headers,
        "client": client,
        "server": server,
        "extensions": {},
    }
    if state is not None:
        scope["state"] = dict(state)
    return scope


#: What each param name seen so far is in the scope's headers: b"HTTP_ACCEPT"
#: -> b"accept", False for a name that is none (b"HTTP_CONTENT_TYPE", b"SCRIPT_NAME");
#: CONTENT_TYPE and CONTENT_LENGTH, headers when not empty, are never in it.
_raw_header_names: dict[bytes, bytes | Literal[False]] = {}
_CONTENT_HEADERS = {b"CONTENT_TYPE": b"content-type", b"CONTENT_LENGTH": b"content-length"}
#: The params of the scope's method, http_version, scheme and server, which
#: are the same from request to request: what they make is worked out once
#: for each combination seen (at most SERVER_FACTS_KEPT of them).
_SERVER_PARAMS = (
    "REQUEST_METHOD",
    "SERVER_PROTOCOL",
    "HTTPS",
    "REQUEST_SCHEME",
    "SERVER_ADDR",
    "SERVER_NAME",
    "SERVER_PORT",
)
_server_facts: dict[tuple[bytes | None, ...], tuple[str, str, str, tuple[str, int] | None]] = {}
SERVER_FACTS_KEPT = 256


def _raw_header_name(param: bytes) -> bytes | Literal[False]:
    """The header name of a param name (not CONTENT_TYPE, CONTENT_LENGTH), False if none."""
    name: bytes | Literal[False]
    if param[:5] != b"HTTP_" or param in (b"HTTP_CONTENT_TYPE", b"HTTP_CONTENT_LENGTH"):
        name = False
    elif param.isascii():  # bytes.lower() is str.lower() on ASCII
        name = param[5:].lower().replace(b"_", b"-")
    else:  # as the text builder has it
        name = _header_name(_text(param))
    if len(_raw_header_names) < HEADER_NAMES_KEPT:
        _raw_header_names[param] = name
    return name


_HeaderPlan: TypeAlias = (
    "tuple[tuple[bytes, ...], tuple[bytes, ...], Callable[[Any], tuple[bytes, ...]] | None, "
    "tuple[int, ...]]"
)
#: How the headers come out of params with these names, in this order (a web
#: server sends the same names request after request): the params that are
#: headers, their names in the scope, what takes their values at once, and
#: where CONTENT_TYPE and CONTENT_LENGTH are among them, last first.
_header_plans: dict[tuple[bytes, ...], _HeaderPlan] = {}
HEADER_PLANS_KEPT = 64


def _header_plan(params: tuple[bytes, ...]) -> _HeaderPlan:
    keys: list[bytes] = []
    names: list[bytes] = []
    contents: list[int] = []
    for param in params:
        name = _CONTENT_HEADERS.get(param)
        if name is not None:
            contents.append(len(keys))
        else:
            known = _raw_header_names.get(param)
            if known is None:
                known = _raw_header_name(param)
            if known is False:
                continue
            name = known
        keys.append(param)
        names.append(name)
    values_of = operator.itemgetter(*keys) if len(keys) > 1 else None
    return tuple(keys), tuple(names), values_of, tuple(reversed(contents))


def _text(value: bytes) -> str:
    """A param's bytes as the servers decode them: UTF-8, surrogateescape where it is not."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("utf-8", "surrogateescape")


def _server_facts_of(
    key: tuple[bytes | None, ...],
) -> tuple[str, str, str, tuple[str, int] | None]:
    """(method, http_version, scheme, server) of _SERVER_PARAMS' values, as asgi_scope has them."""
    text = {
        name: _text(value)
        for name, value in zip(_SERVER_PARAMS, key, strict=True)
        if value is not None
    }
    server_host = text.get("SERVER_ADDR") or text.get("SERVER_NAME")
    server_port = _port(text.get("SERVER_PORT"))
    return (
        (text.get("REQUEST_METHOD") or "GET").upper(),
        _http_version(text.get("SERVER_PROTOCOL", "HTTP/1.1")),
        url_scheme(text),
        (server_host, server_port) if server_host and server_port is not None else None,
    )


def asgi_scope_from_bytes(
    params: Mapping[bytes, bytes], *, root_path: str = "", state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """asgi_scope of the params as the web server sent them, names and values bytes.

    The same scope asgi_scope gives for the params decoded as UTF-8 with
    surrogateescape, for less: the headers and the query string are bytes in
    the scope, and are taken as they are; only the params the scope holds as
    str are decoded.
    """
    get = params.get
    # request_path(), on the bytes.
    uri = get(b"REQUEST_URI", b"")
    try:
        script_name = get(b"SCRIPT_NAME", b"").decode()
        path_info = get(b"PATH_INFO", b"").decode()
    except UnicodeDecodeError:
        script_name = _text(get(b"SCRIPT_NAME", b""))
        path_info = _text(get(b"PATH_INFO", b""))
    if not path_info:
        path = script_name
        if not path:
            raw = uri.split(b"?", 1)[0]
            path = _text(unquote_to_bytes(raw)) if raw else ""
        root = root_path.rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            script_name, path_info = root, path[len(root) :]
        else:
            script_name, path_info = "", path or "/"
    shape = tuple(params)
    plan = _header_plans.get(shape)
    if plan is None:
        plan = _header_plan(shape)
        if len(_header_plans) >= HEADER_PLANS_KEPT:
            _header_plans.clear()  # what is seen now is more likely to come again
        _header_plans[shape] = plan
    keys, names, values_of, contents = plan
    headers: list[tuple[bytes, bytes]]
    if values_of is not None:
        headers = list(zip(names, values_of(params), strict=True))
    else:
        headers = [(names[0], params[keys[0]])] if keys else []
    for position in contents:  # from the last: CONTENT_TYPE and CONTENT_LENGTH when not empty
        if not headers[position][1]:
            del headers[position]
    key = (
        get(b"REQUEST_METHOD"),
        get(b"SERVER_PROTOCOL"),
        get(b"HTTPS"),
        get(b"REQUEST_SCHEME"),
        get(b"SERVER_ADDR"),
        get(b"SERVER_NAME"),
        get(b"SERVER_PORT"),
    )
    facts = _server_facts.get(key)
    if facts is None:
        facts = _server_facts_of(key)
        if len(_server_facts) < SERVER_FACTS_KEPT:
            _server_facts[key] = facts
    method, http_version, scheme, server = facts
    remote = get(b"REMOTE_ADDR")
    client: list[Any] | None = None
    if remote:
        port = get(b"REMOTE_PORT")
        if port is None:
            client = [_text(remote), 0]
        elif port.isdigit():  # ASCII digits: as str.isdigit() and int() take them
            client = [_text(remote), int(port) or 0]
        else:
            client = [_text(remote), (_port(_text(port)) if not port.isascii() else None) or 0]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": dict(ASGI_VERSION),
        "http_version": http_version,
        "method": method,
        "scheme": scheme,
        "path": script_name + path_info,
        "raw_path": uri.split(b"?", 1)[0] or None,
        "query_string": get(b"QUERY_STRING", b""),
        "root_path": script_name,
        "headers": headers,
        "client": client,
        "server": list(server) if server is not None else None,
        "extensions": {},
    }
    if state is not None:
        scope["state"] = dict(state)
    return scope


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


#: b"Status: 200 OK" by status code (at most 900 of them), made once each.
_status_lines: dict[int, bytes] = {}


def cgi_head(status: int | str, headers: Iterable[tuple[bytes | str, bytes | str]]) -> bytes:
    """A CGI response head: the Status line, the headers, the blank line.

    `status` is an int (its reason phrase is added) or WSGI's "200 OK". Names
    and values are bytes, or str of latin-1 characters; a CR or LF in either
    is refused (ValueError): it would let the app forge headers.
    """
    if type(status) is str and type(headers) is list:
        # WSGI's case, all str: one text, one encode, one count of line ends.
        try:
            text = "".join([name + ": " + value + "\r\n" for name, value in headers])
        except TypeError:  # bytes among them
            pass
        else:
            head = ("Status: " + status + "\r\n" + text).encode("latin-1")
            ends = len(headers) + 1  # the line ends put here
            if head.count(b"\r") != ends or head.count(b"\n") != ends:
                raise ValueError("a response header contains CR or LF")
            return head + b"\r\n"
    if type(status) is int and type(headers) is list:
        # ASGI's case, all bytes: one join, one count of line ends (as the
        # str case above); str among them go the general way below.
        first = _status_lines.get(status)
        if first is not None:
            try:
                joined = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
            except TypeError:
                pass
            else:
                ends = len(headers)
                if joined.count(b"\r") != ends or joined.count(b"\n") != ends:
                    raise ValueError("a response header contains CR or LF")
                return first + b"\r\n" + joined + b"\r\n"
    if isinstance(status, int):
        first = _status_lines.get(status)
        if first is None:
            first = b"Status: " + f"{status} {_reason(status)}".rstrip().encode("latin-1")
            if 100 <= status <= 999:
                _status_lines[status] = first
    else:
        first = b"Status: " + status.encode("latin-1")
    lines = [first]
    for name, value in headers:
        raw_name = name.encode("latin-1") if isinstance(name, str) else bytes(name)
        raw_value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
        lines.append(raw_name + b": " + raw_value)
    whole = b"".join(lines)
    if b"\r" in whole or b"\n" in whole:
        raise ValueError("a response header contains CR or LF")
    return b"\r\n".join(lines) + b"\r\n\r\n"
