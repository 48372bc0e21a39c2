"""CGI helpers: request params as nginx sends them, and the CGI response in STDOUT.

Sans-I/O like the rest of the core: `build_params` returns a dict for
`send_params`, and `ResponseParser` turns STDOUT bytes into a `ResponseHead`
followed by body bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

from ._errors import LocalProtocolError, RemoteProtocolError
from ._version import __version__

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE",
    "SERVER_SOFTWARE",
    "ResponseHead",
    "ResponseParser",
    "authorizer_variables",
    "build_params",
]

#: Sent as SERVER_SOFTWARE, as nginx sends "nginx/<version>".
SERVER_SOFTWARE = f"fcgiproto/{__version__}"

#: nginx refuses a FastCGI response head larger than fastcgi_buffer_size (4 or
#: 8 KiB by default); 64 KiB leaves room for many Set-Cookie lines while
#: bounding what a peer that never ends its head can make us hold.
DEFAULT_MAX_HEADER_SIZE = 65536

_Text = str | bytes
_Headers = Iterable[tuple[_Text, _Text]] | Mapping[str, _Text] | Mapping[bytes, _Text]

# RFC 9110 token: what a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters a header value may not hold (TAB is allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# CR, LF or NUL in a path broke nginx's fastcgi_split_path_info and let
# php-fpm be exploited (CVE-2019-11043); in any other value they break what
# reads lines or C strings behind the application. Refused in every value.
_LINE_BREAKERS = re.compile(r"[\r\n\x00]")
# A whole response head in CRLF lines, each "name: value" with a token name
# and no control characters in the value (TAB allowed); and one such line,
# its value stripped of spaces and tabs as _parse_header_line strips it.
_HEAD_LINES = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)+")
_HEAD_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*\r\n")
# "404", "404 Not Found", and the sloppy "404: Not Found" some scripts send.
_STATUS = re.compile(r"([0-9]{3})(?:[ \t:]+(.*))?")
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
# A client-supplied "Proxy" header would become HTTP_PROXY, which many HTTP
# libraries read as their proxy setting (httpoxy). The content headers travel
# as CONTENT_TYPE and CONTENT_LENGTH instead, and an underscore spelling of
# them must not smuggle a second value in.
_NOT_FORWARDED = frozenset({"HTTP_PROXY", "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"})


# Checked by a regex only when not one of these.
_COMMON_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Header name (str or bytes, as received) -> (its param, whether it has "_"):
# "CONTENT_TYPE" or "CONTENT_LENGTH", "HTTP_<NAME>", or "" for one never
# forwarded. Only tokens are kept, and at most _HEADER_KEYS_MAX of them, so
# that clients sending ever new names cannot grow it.
_HEADER_KEYS: dict[_Text, tuple[str, bool]] = {}
_HEADER_KEYS_MAX = 512


class _Unusual(Exception):
    """Input build_params leaves to _build_params_general."""


def _header_key(raw_name: _Text) -> tuple[str, bool]:
    name = _text(raw_name)
    if not _TOKEN.fullmatch(name):
        raise _Unusual
    lower = name.lower()
    if lower in ("content-type", "content-length"):
        key = lower.upper().replace("-", "_")
    else:
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in _NOT_FORWARDED:
            key = ""
    entry = (key, "_" in name)
    if len(_HEADER_KEYS) < _HEADER_KEYS_MAX:
        _HEADER_KEYS[raw_name] = entry
    return entry


def _text(value: _Text) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _pairs(headers: _Headers) -> Iterable[tuple[_Text, _Text]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def _line(what: str, value: _Text | int) -> str:
    """A value for a param: text, with no CR, LF or NUL (named `what` if it has one)."""
    text = _text(value) if isinstance(value, (str, bytes)) else str(value)
    if _LINE_BREAKERS.search(text):
        raise LocalProtocolError(f"{what} contains CR, LF or NUL: {text[:100]!r}")
    return text


def build_params(
    method: _Text,
    path: _Text,
    *,
    query: _Text = b"",
    headers: _Headers = (),
    script_filename: _Text,
    document_root: _Text = "",
    script_name: _Text | None = None,
    server_name: _Text = "localhost",
    server_port: int = 80,
    server_addr: _Text = "127.0.0.1",
    remote_addr: _Text = "127.0.0.1",
    remote_port: int = 0,
    https: bool = False,
    server_protocol: _Text = "HTTP/1.1",
    content_length: int | None = None,
    extra: Mapping[str, _Text] | Mapping[bytes, _Text] | None = None,
    underscores_in_headers: bool = False,
) -> dict[str, str]:
    """The CGI/1.1 params nginx's ``fastcgi_params`` (plus SCRIPT_FILENAME) sends.

    Every str-or-bytes argument may be either; bytes are decoded as UTF-8 with
    surrogateescape, which send_params encodes back to the very same bytes.
    No value written may hold CR, LF or NUL: each breaks a line-based
    consumer behind the application (a log, a header it echoes, a C string
    cut short), and nginx never sends them.

    :param method: the request method, an HTTP token (REQUEST_METHOD).
    :param path: the request path as it is to appear in REQUEST_URI,
        DOCUMENT_URI and, by default, SCRIPT_NAME; no CR, LF or NUL.
    :param query: the query string without its "?" (QUERY_STRING); no CR, LF or NUL.
    :param headers: the request headers, as (name, value) pairs or a mapping.
        Content-Type and Content-Length become CONTENT_TYPE and CONTENT_LENGTH
        (each at most once); the others become HTTP_<NAME> with "-" read as "_",
        repeats joined with ", " (Cookie with "; "). Proxy is dropped
        (httpoxy). A name with "_" is dropped, as nginx does by default: in
        HTTP_<NAME> it reads as the dash spelling, so ``X_Remote_User`` would
        pass a front proxy that strips ``X-Remote-User`` and arrive as the
        very variable the proxy meant to control.
    :param script_filename: the file the application runs (SCRIPT_FILENAME).
    :param document_root: DOCUMENT_ROOT.
    :param script_name: SCRIPT_NAME; defaults to ``path``. No CR, LF or NUL.
    :param server_name: SERVER_NAME.
    :param server_port: SERVER_PORT.
    :param server_addr: SERVER_ADDR.
    :param remote_addr: REMOTE_ADDR, the client's address.
    :param remote_port: REMOTE_PORT, the client's port.
    :param https: sends HTTPS=on and REQUEST_SCHEME=https; otherwise no HTTPS
        and REQUEST_SCHEME=http.
    :param server_protocol: SERVER_PROTOCOL.
    :param content_length: CONTENT_LENGTH; overrides a Content-Length header.
    :param extra: merged last; overrides anything above.
    :param underscores_in_headers: keep header names with "_" (nginx's
        ``underscores_in_headers on``): for headers the caller wrote itself,
        not ones relayed from an HTTP client. A name with "_" is then still
        dropped when its dash spelling is also present.
    :raises LocalProtocolError: for a method or header name that is not a
        token, a header value with control characters, any other value
        (path, query, script name, script filename, document root, server and
        remote names and addresses, server protocol, extra names and values)
        with CR, LF or NUL, a repeated or non-numeric Content-Length, a
        repeated Content-Type, or a negative content_length.
    """
    # The common case in bulk: values converted inline, one scan of them all
    # for CR, LF and NUL and one of all header values for control characters,
    # header names looked up in a memo. Anything unusual (a check failing, a
    # repeated header, a generator of headers, a value neither str nor bytes)
    # goes to _build_params_general, which does the same one value at a time:
    # it returns the same dict or raises the precise error. A generator of
    # headers goes there too: it can be read only once.
    if isinstance(headers, (list, tuple, Mapping)):
        try:
            method_s = (
                method.decode("utf-8", "surrogateescape") if isinstance(method, bytes) else method
            )
            if method_s not in _COMMON_METHODS and not _TOKEN.fullmatch(method_s):
                raise _Unusual
            path_s = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
            query_s = (
                query.decode("utf-8", "surrogateescape") if isinstance(query, bytes) else query
            )
            if script_name is None:
                script_s = path_s
            elif isinstance(script_name, bytes):
                script_s = script_name.decode("utf-8", "surrogateescape")
            else:
                script_s = script_name
            lines = [
                path_s,
                query_s,
                script_s,
                script_filename.decode("utf-8", "surrogateescape")
                if isinstance(script_filename, bytes)
                else script_filename,
                document_root.decode("utf-8", "surrogateescape")
                if isinstance(document_root, bytes)
                else document_root,
                server_protocol.decode("utf-8", "surrogateescape")
                if isinstance(server_protocol, bytes)
                else server_protocol,
                remote_addr.decode("utf-8", "surrogateescape")
                if isinstance(remote_addr, bytes)
                else remote_addr,
                server_addr.decode("utf-8", "surrogateescape")
                if isinstance(server_addr, bytes)
                else server_addr,
                server_name.decode("utf-8", "surrogateescape")
                if isinstance(server_name, bytes)
                else server_name,
            ]
            if server_port.__class__ is not int or remote_port.__class__ is not int:
                raise _Unusual  # str(), as below, gives what _line gives only for an int

            forwarded: dict[str, str] = {}
            header_values = []
            for raw_name, raw_value in headers.items() if isinstance(headers, Mapping) else headers:
                entry = _HEADER_KEYS.get(raw_name)
                if entry is None:
                    entry = _header_key(raw_name)
                if isinstance(raw_value, bytes):
                    value = raw_value.decode("utf-8", "surrogateescape")
                else:
                    value = raw_value
                header_values.append(value)
                key, underscore = entry
                if underscore and not underscores_in_headers:
                    continue
                if key in forwarded:
                    raise _Unusual  # joined, a spelling preferred, or a repeated content header
                forwarded[key] = value
            if _CONTROL.search("".join(header_values)):
                raise _Unusual
            forwarded.pop("", None)  # httpoxy and the underscore content spellings
            content_type = forwarded.pop("CONTENT_TYPE", "")
            length = _content_length(forwarded.pop("CONTENT_LENGTH", ""), content_length)
            params = _cgi_params(
                method_s,
                path_s,
                query_s,
                script_s,
                content_type,
                length,
                lines[3],  # script_filename, document_root, server_protocol,
                lines[4],  # remote_addr, server_addr, server_name: as listed above
                lines[5],
                lines[6],
                lines[7],
                lines[8],
                str(remote_port),
                str(server_port),
                https,
            )
            params.update(forwarded)
            if extra is not None:
                for raw_name, raw_value in extra.items():
                    name = (
                        raw_name.decode("utf-8", "surrogateescape")
                        if isinstance(raw_name, bytes)
                        else raw_name
                    )
                    if isinstance(raw_value, bytes):
                        value = raw_value.decode("utf-8", "surrogateescape")
                    else:
                        value = raw_value
                    lines += (name, value)
                    params[name] = value
            # join raises TypeError for a value that is not text: _line would str() it.
            if not _LINE_BREAKERS.search("".join(lines)):
                return params
        except Exception:
            pass  # _build_params_general raises the error, with its message
    return _build_params_general(
        method,
        path,
        query=query,
        headers=headers,
        script_filename=script_filename,
        document_root=document_root,
        script_name=script_name,
        server_name=server_name,
        server_port=server_port,
        server_addr=server_addr,
        remote_addr=remote_addr,
        remote_port=remote_port,
        https=https,
        server_protocol=server_protocol,
        content_length=content_length,
        extra=extra,
        underscores_in_headers=underscores_in_headers,
    )


def _build_params_general(
    method: _Text,
    path: _Text,
    *,
    query: _Text = b"",
    headers: _Headers = (),
    script_filename: _Text,
    document_root: _Text = "",
    script_name: _Text | None = None,
    server_name: _Text = "localhost",
    server_port: int = 80,
    server_addr: _Text = "127.0.0.1",
    remote_addr: _Text = "127.0.0.1",
    remote_port: int = 0,
    https: bool = False,
    server_protocol: _Text = "HTTP/1.1",
    content_length: int | None = None,
    extra: Mapping[str, _Text] | Mapping[bytes, _Text] | None = None,
    underscores_in_headers: bool = False,
) -> dict[str, str]:
    """`build_params` one value at a time: the reference, and where every error is raised."""
    method_s = _text(method)
    if not _TOKEN.fullmatch(method_s):
        raise LocalProtocolError(f"method is not an HTTP token: {method_s[:100]!r}")
    path_s = _line("path", path)
    query_s = _line("query", query)
    script_s = path_s if script_name is None else _line("script_name", script_name)

    content: dict[str, str] = {}
    grouped: dict[str, list[tuple[str, str]]] = {}
    for raw_name, raw_value in _pairs(headers):
        name, value = _text(raw_name), _text(raw_value)
        if not _TOKEN.fullmatch(name):
            raise LocalProtocolError(f"header name is not an HTTP token: {name[:100]!r}")
        if _CONTROL.search(value):
            raise LocalProtocolError(f"{name} header value has control characters: {value[:100]!r}")
        if "_" in name and not underscores_in_headers:
            continue
        lower = name.lower()
        if lower in ("content-type", "content-length"):
            if lower in content:
                raise LocalProtocolError(f"repeated {name} header")
            content[lower] = value
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        if key not in _NOT_FORWARDED:
            grouped.setdefault(key, []).append((name, value))

    params = _cgi_params(
        method_s,
        path_s,
        query_s,
        script_s,
        content.get("content-type", ""),
        _content_length(content.get("content-length", ""), content_length),
        _line("script_filename", script_filename),
        _line("document_root", document_root),
        _line("server_protocol", server_protocol),
        _line("remote_addr", remote_addr),
        _line("server_addr", server_addr),
        _line("server_name", server_name),
        _line("remote_port", remote_port),
        _line("server_port", server_port),
        https,
    )
    for key, items in grouped.items():
        if len(items) == 1:  # most headers: no spelling to prefer, nothing to join
            params[key] = items[0][1]
            continue
        # With underscores_in_headers, X-A-B and X-A_B both become
        # HTTP_X_A_B; nginx keeps the dash spelling, so a client cannot
        # forge a header a proxy added.
        dashed = [value for name, value in items if "_" not in name]
        values = dashed or [value for _, value in items]
        params[key] = ("; " if key == "HTTP_COOKIE" else ", ").join(values)
    if extra is not None:
        for raw_name, raw_value in _pairs(extra):
            name = _line("extra param name", raw_name)
            value = _text(raw_value) if isinstance(raw_value, (str, bytes)) else str(raw_value)
            if _LINE_BREAKERS.search(value):  # named only then: an f-string a param costs
                _line(f"extra param {name}", value)
            params[name] = value
    return params


def _content_length(header: str, content_length: int | None) -> str:
    """CONTENT_LENGTH: `content_length` if given, else the header's (a number, or empty)."""
    if content_length is not None:
        if content_length < 0:
            raise LocalProtocolError(f"content_length is negative: {content_length}")
        return str(content_length)
    if header and not (header.isascii() and header.isdigit()):
        raise LocalProtocolError(f"Content-Length is not a number: {header[:100]!r}")
    return header


def _cgi_params(
    method: str,
    path: str,
    query: str,
    script_name: str,
    content_type: str,
    content_length: str,
    script_filename: str,
    document_root: str,
    server_protocol: str,
    remote_addr: str,
    server_addr: str,
    server_name: str,
    remote_port: str,
    server_port: str,
    https: bool,
) -> dict[str, str]:
    """The params of build_params before the headers and `extra`, from checked text."""
    params = {
        "QUERY_STRING": query,
        "REQUEST_METHOD": method,
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": content_length,
        "SCRIPT_FILENAME": script_filename,
        "SCRIPT_NAME": script_name,
        "REQUEST_URI": f"{path}?{query}" if query else path,
        "DOCUMENT_URI": path,
        "DOCUMENT_ROOT": document_root,
        "SERVER_PROTOCOL": server_protocol,
        "REQUEST_SCHEME": "https" if https else "http",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "REMOTE_ADDR": remote_addr,
        "REMOTE_PORT": remote_port,
        "SERVER_ADDR": server_addr,
        "SERVER_PORT": server_port,
        "SERVER_NAME": server_name,
        # php-fpm built with cgi.force_redirect refuses requests without it.
        "REDIRECT_STATUS": "200",
    }
    if https:
        params["HTTPS"] = "on"
    return params


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The head of a CGI response: status, reason and the other headers in order."""

    status: int
    reason: str
    headers: list[tuple[str, str]]


class ResponseParser:
    """Parses the CGI response an application writes to STDOUT.

    ``feed`` returns the `ResponseHead` once it is complete, then body bytes as
    they arrive; ``close`` marks the end of STDOUT. Any chunking of the same
    bytes gives the same events. A malformed head raises `RemoteProtocolError`,
    and so does every later call.
    """

    def __init__(self, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        self.head: ResponseHead | None = None
        self._buf = bytearray()  # the head line not yet complete
        self._scan = 0  # where in _buf to resume looking for LF
        self._head_size = 0  # bytes of complete head lines already consumed
        self._headers: list[tuple[str, str]] = []
        self._received = 0
        self._closed = False
        self._error: RemoteProtocolError | None = None

    def feed(self, data: bytes) -> list[ResponseHead | bytes]:
        """STDOUT bytes in; the head (once it is complete) and body bytes out."""
        self._check_usable()
        self._received += len(data)
        if self.head is not None:
            return [bytes(data)] if data else []  # bytes(b) is b itself: no copy
        try:
            if self._received == len(data):  # the first bytes: may hold the whole head
                whole = self._parse_whole_head(data)
                if whole is not None:
                    return whole
            self._buf += data
            return self._parse_head()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def close(self) -> list[ResponseHead | bytes]:
        """STDOUT ended; raises `RemoteProtocolError` if the head never completed."""
        if self._error is not None:
            raise RemoteProtocolError(str(self._error))
        self._closed = True
        if self.head is None:
            if self._received == 0:
                error = RemoteProtocolError("no CGI response: STDOUT ended empty")
            else:
                error = RemoteProtocolError(
                    f"CGI response ended inside its head after {self._received} bytes"
                )
            self._error = error
            raise error
        return []

    def _check_usable(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(str(self._error))
        if self._closed:
            raise LocalProtocolError("feed() after close()")

    def _parse_whole_head(self, data: bytes) -> list[ResponseHead | bytes] | None:
        """The head at once when one chunk holds all of it in CRLF lines, as php-fpm sends it.

        None when anything is unusual (a bare LF, a malformed line, a head
        too large or not complete): _parse_head then goes line by line and
        raises the precise error.
        """
        end = data.find(b"\r\n\r\n")
        if end == -1 or end + 4 > self.max_header_size:
            return None
        text = data[: end + 2].decode("latin-1")
        if not _HEAD_LINES.fullmatch(text):
            return None
        self._headers = _HEAD_LINE.findall(text)
        return self._finish_head(data[end + 4 :])

    def _parse_head(self) -> list[ResponseHead | bytes]:
        buf = self._buf
        while (lf := buf.find(b"\n", self._scan)) != -1:
            self._head_size += lf + 1
            self._check_size(self._head_size)
            line = bytes(buf[:lf]).removesuffix(b"\r")
            del buf[: lf + 1]  # cheap: bytearray drops its front without moving the rest
            self._scan = 0
            if not line:
                body = bytes(buf)
                self._buf = bytearray()
                return self._finish_head(body)
            self._headers.append(_parse_header_line(line))
        self._scan = len(buf)
        self._check_size(self._head_size + len(buf))
        return []

    def _check_size(self, size: int) -> None:
        if size > self.max_header_size:
            raise RemoteProtocolError(
                f"CGI response head exceeds max_header_size={self.max_header_size} bytes"
            )

    def _finish_head(self, body: bytes) -> list[ResponseHead | bytes]:
        if not self._headers:
            raise RemoteProtocolError("CGI response has no header lines before its blank line")
        headers: list[tuple[str, str]] = []
        status, reason, seen_status = 200, "OK", False
        for name, value in self._headers:
            if name.lower() == "status":
                if seen_status:
                    raise RemoteProtocolError("CGI response has more than one Status header")
                seen_status = True
                status, reason = _parse_status(value)
            else:
                headers.append((name, value))
        if not seen_status and any(name.lower() == "location" for name, _ in headers):
            status, reason = 302, "Found"  # RFC 3875 6.2.3: a client redirect
        self.head = ResponseHead(status, reason, headers)
        self._headers = []
        return [self.head, body] if body else [self.head]


def _parse_header_line(line: bytes) -> tuple[str, str]:
    name, colon, value = line.decode("latin-1").partition(":")
    if not colon or not _TOKEN.fullmatch(name):
        raise RemoteProtocolError(f"malformed CGI header line: {line[:100]!r}")
    value = value.strip(" \t")
    if _CONTROL.search(value):
        raise RemoteProtocolError(f"control characters in CGI header line: {line[:100]!r}")
    return name, value


def _parse_status(value: str) -> tuple[int, str]:
    match = _STATUS.fullmatch(value)
    if match is None or int(match[1]) < 100:
        raise RemoteProtocolError(f"malformed CGI Status header: {value[:100]!r}")
    code = int(match[1])
    return code, match[2] or _PHRASES.get(code, "")


def authorizer_variables(headers: Iterable[tuple[str, str]] | Mapping[str, str]) -> dict[str, str]:
    """The ``Variable-<name>`` headers of an authorizer's 200 response, prefix removed.

    The prefix matches in any case; the rest of the name is kept as sent. The
    web server passes these variables on to the request it then forwards.
    """
    prefix = len("variable-")
    variables = {}
    for name, value in headers.items() if isinstance(headers, Mapping) else headers:
        if name[:prefix].lower() == "variable-" and len(name) > prefix:
            variables[name[prefix:]] = value
    return variables
