"""Which file a request for a PHP document root means: I/O-free, on bytes.

The gateway asks `PhpRouter.route` what to do with a request path; the
answer is a `Script` to run through FastCGI, a `StaticFile` to send (or
refuse), a `Redirect` (the trailing slash of a directory), or a `Refusal`.
The filesystem is reached only through the small `FileSystem` interface the
adapter passes in, so every rule here is tested without a disk.

The rules are the ones Caddy's ``php_fastcgi`` and nginx's ``fastcgi_split_path_info``
are meant to follow, kept where their bugs were:

- The path is percent-decoded once, to bytes, and every later step (the
  split, the checks, SCRIPT_NAME, PATH_INFO) slices those same bytes. The
  split looks for the extension ASCII-case-insensitively (``bytes.lower``
  never changes a length); Caddy's CVE-2026-27590 and CVE-2026-45135 came
  from finding the split in a Unicode-lowered copy whose lengths differ and
  cutting the original at that index.
- NUL, CR and LF, raw or percent-encoded, are refused with 400: a ``%0a``
  broke nginx's split regex and gave remote code execution in php-fpm
  (CVE-2019-11043).
- ``.`` and ``..`` segments are resolved on the decoded path; one that would
  climb above the root is refused, not clamped.
- SCRIPT_FILENAME is a regular file inside the root whose name ends in a split
  extension: ``/upload.jpg/x.php`` can never run ``upload.jpg`` (php-fpm's
  ``cgi.fix_pathinfo`` would walk back to it if it were sent there).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "DEFAULT_TRY_FILES",
    "FileKind",
    "FileSystem",
    "PhpRouter",
    "Redirect",
    "Refusal",
    "Route",
    "Script",
    "StaticFile",
]

#: Caddy's default for php_fastcgi: the file, the directory's index, then the
#: front controller.
DEFAULT_TRY_FILES = ("{path}", "{path}/index.php", "index.php")

_FORBIDDEN_BYTES = re.compile(b"[\x00\r\n]")


class FileKind(enum.Enum):
    """What a path names, after following symbolic links."""

    MISSING = "missing"
    FILE = "file"
    DIRECTORY = "directory"
    OTHER = "other"  # a socket, a device, a FIFO: never run, never served


class FileSystem(Protocol):
    """The two questions the router asks the disk (the adapter answers them)."""

    def kind(self, path: bytes) -> FileKind:
        """What ``path`` is, symbolic links followed; MISSING for any error."""

    def realpath(self, path: bytes) -> bytes:
        """``path`` with every symbolic link resolved (os.path.realpath)."""


@dataclass(frozen=True, slots=True)
class Script:
    """Run ``filename`` through FastCGI.

    script_name and path_info are slices of the decoded request path (after
    any try_files rewrite); filename is the root joined with script_name.
    """

    filename: bytes
    script_name: bytes
    path_info: bytes


@dataclass(frozen=True, slots=True)
class StaticFile:
    """A file under the root that is not a script: send it, or refuse it."""

    filename: bytes


@dataclass(frozen=True, slots=True)
class Redirect:
    """A permanent redirect (308) to ``location``: a directory asked for without its slash."""

    location: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """No file for this request: answer ``status`` (400, 403 or 404)."""

    status: int
    reason: str


Route = Script | StaticFile | Redirect | Refusal


def _bad(reason: str) -> Refusal:
    return Refusal(400, reason)


class PhpRouter:
    """Maps request paths to files of one document root.

    :param root: the document root, an absolute path (str or bytes). With
        ``resolve_root_symlink`` the adapter passes it resolved already (see
        `resolved_root`); SCRIPT_FILENAME is then under the real directory,
        as Caddy's option of that name does (opcache keys on it).
    :param split_path: the extensions that mark a script; the path is split
        after the first one that ends a segment, ASCII-case-insensitively.
    :param index: the directory index (Caddy's default ``index.php``), or
        None for ``index off``: no trailing-slash redirect, no default
        try_files.
    :param try_files: candidates in order; ``{path}`` is the decoded request
        path. The first that names a file wins (a script candidate is
        checked at its split, so ``{path}`` matches ``/index.php/x``). None
        means ``{path} {path}/<index> <index>`` (or just ``{path}`` without an
        index). A candidate not starting with "/" is relative to the root.
    :param filesystem: answers what a path is.
    :param hide_dotfiles: refuse (404) any path with a segment starting with
        a dot, such as ``.git`` or ``.env``, except ``.well-known``: never
        served as a static file nor run.
    """

    def __init__(
        self,
        root: str | bytes,
        filesystem: FileSystem,
        *,
        split_path: Iterable[str | bytes] = (".php",),
        index: str | bytes | None = "index.php",
        try_files: Sequence[str | bytes] | None = None,
        hide_dotfiles: bool = True,
    ) -> None:
        root_b = root.encode() if isinstance(root, str) else bytes(root)
        if not root_b.startswith(b"/"):
            raise ValueError(f"the document root must be an absolute path: {root!r}")
        self.root = root_b.rstrip(b"/") or b"/"
        self.filesystem = filesystem
        self.split_path = tuple(
            (ext.encode() if isinstance(ext, str) else bytes(ext)).lower() for ext in split_path
        )
        if not self.split_path or any(not ext or b"/" in ext for ext in self.split_path):
            raise ValueError(f"split_path needs extensions without '/': {split_path!r}")
        self.index = index.encode() if isinstance(index, str) else index
        if self.index is not None and (not self.index or b"/" in self.index):
            raise ValueError(f"index must be a file name: {index!r}")
        if try_files is None:
            if self.index is None:
                try_files = ("{path}",)
            else:
                name = self.index.decode("latin-1")
                try_files = ("{path}", "{path}/" + name, name)
        self.try_files = tuple(t.encode() if isinstance(t, str) else bytes(t) for t in try_files)
        self.hide_dotfiles = hide_dotfiles
        self._real_root = filesystem.realpath(self.root)
        self._inside_prefix = self._real_root.rstrip(b"/") + b"/"

    # --- the request path ---

    def route(self, raw_path: bytes, query: bytes = b"") -> Route:
        """What to do with a request for ``raw_path`` (as sent, percent-encoded)."""
        path = self.normalize(raw_path)
        if isinstance(path, Refusal):
            return path
        # What the path itself is, asked once: the directory check below and
        # the "{path}" candidate (nearly always the first) both need it.
        known: tuple[bytes, FileKind] | None = None
        if self.index is not None and not path.endswith(b"/"):
            filename = self._join(path)
            known = (filename, self.filesystem.kind(filename))
            # Only a directory can hold an index: anything else spares a stat.
            index = self._join(path + b"/" + self.index)
            if (
                known[1] is FileKind.DIRECTORY
                and self.filesystem.kind(index) is FileKind.FILE
                and self._inside(index)
            ):
                # A directory without its slash: relative links in its index
                # page would resolve against the parent otherwise.
                # Built from the normalized path, never the raw one: "//host"
                # would be a redirect to another site.
                location = quote(path, safe="/!$&'()*+,;=:@~-._").encode() + b"/"
                return Redirect(location + b"?" + query if query else location)
        for candidate in self.try_files:
            target: bytes | Refusal
            if candidate == b"{path}":
                target = path  # normalized already, and normalizing is idempotent
            else:
                expanded = candidate.replace(b"{path}", path)
                if not expanded.startswith(b"/"):
                    expanded = b"/" + expanded
                target = self.normalize(expanded, decoded=True)
            if isinstance(target, Refusal):
                return target
            found = self._match(target, known)
            if found is not None:
                return found
        return Refusal(404, "no file matches the request path")

    def normalize(self, raw_path: bytes, *, decoded: bool = False) -> bytes | Refusal:
        """The request path decoded once and with dot segments resolved, or why not.

        Bytes in, bytes out: nothing here decodes text, so every length stays
        what the split will see.
        """
        if _FORBIDDEN_BYTES.search(raw_path):
            return _bad("the path holds NUL, CR or LF")
        # Without a "%" there is nothing to decode, nor anything new to check.
        if not decoded and b"%" in raw_path:
            path = unquote_to_bytes(raw_path)
            if _FORBIDDEN_BYTES.search(path):
                return _bad("the path holds an encoded NUL, CR or LF")
        else:
            path = raw_path
        if not path.startswith(b"/"):
            return _bad("the path does not start with '/'")
        if b"//" not in path and b"/." not in path:
            # No empty, "." or ".." segment (each follows a "/"): the loop
            # below would give the path back as it is.
            return path
        segments: list[bytes] = []
        parts = path.split(b"/")
        for segment in parts[1:]:
            if segment in (b"", b"."):
                continue
            if segment == b"..":
                if not segments:
                    return _bad("the path climbs above the document root")
                segments.pop()
                continue
            segments.append(segment)
        slash = path.endswith(b"/") or parts[-1] in (b".", b"..")
        return b"/" + b"/".join(segments) + (b"/" if slash and segments else b"")

    def split(self, path: bytes) -> tuple[bytes, bytes] | None:
        """(script_name, path_info) at the first split extension that ends a segment.

        The extension is found in ``path.lower()``, which for bytes changes
        ASCII letters only, so the index found is an index into ``path``.
        """
        lowered = path.lower()
        best: int | None = None
        for ext in self.split_path:
            start = 0
            while (at := lowered.find(ext, start)) != -1:
                end = at + len(ext)
                # It must end a segment, and a segment that is the extension
                # alone is a dot file, not a script.
                if (end == len(path) or path[end] == 0x2F) and path[at - 1] != 0x2F:  # "/"
                    if best is None or end < best:
                        best = end
                    break
                start = at + 1
        if best is None:
            return None
        return path[:best], path[best:]

    # --- the filesystem ---

    def _match(self, path: bytes, known: tuple[bytes, FileKind] | None = None) -> Route | None:
        """The route for a try_files candidate if it names a file, else None.

        ``known`` is a filename whose kind route() has asked already.
        """
        split = self.split(path)
        if split is not None:
            script_name, path_info = split
            filename = self._join(script_name)
            if self._hidden(script_name):
                return None
            if self._kind(filename, known) is FileKind.FILE and self._inside(filename):
                return Script(filename, script_name, path_info)
            return None
        if path.endswith(b"/"):
            return None  # a directory is never a file; its index is a candidate of its own
        filename = self._join(path)
        if self._kind(filename, known) is not FileKind.FILE:
            return None
        if self._hidden(path) or not self._inside(filename):
            return Refusal(404, "the file is hidden or outside the document root")
        return StaticFile(filename)

    def _kind(self, filename: bytes, known: tuple[bytes, FileKind] | None) -> FileKind:
        if known is not None and known[0] == filename:
            return known[1]
        return self.filesystem.kind(filename)

    def _join(self, path: bytes) -> bytes:
        return self.root + path if self.root != b"/" else path

    def _inside(self, filename: bytes) -> bool:
        """The file, symbolic links resolved, is inside the (resolved) root."""
        return self.filesystem.realpath(filename).startswith(self._inside_prefix)

    def _hidden(self, path: bytes) -> bool:
        if not self.hide_dotfiles or (b"/." not in path and not path.startswith(b".")):
            return False  # no segment starts with "."
        return any(
            segment.startswith(b".") and segment != b".well-known" for segment in path.split(b"/")
        )
