"""The I/O-free parts of the PHP gateway: the path router and the balancer.

Each known bypass of a PHP front end is here as a case that a naive router
(decode to text, split with a regex or a Unicode-lowered copy, join with the
root, hand it to php-fpm) gets wrong.
"""

from __future__ import annotations

import random
import re
from urllib.parse import unquote

import pytest

from fcgiproto.support import (
    Balancer,
    FileKind,
    PhpRouter,
    Policy,
    Redirect,
    Refusal,
    Script,
    StaticFile,
    may_retry,
)

ROOT = b"/srv/www"


class FakeFileSystem:
    """Files and directories by absolute path; symlinks as a map to their targets."""

    def __init__(self, files: set[bytes], links: dict[bytes, bytes] | None = None) -> None:
        self.files = set(files)
        self.links = links or {}
        self.dirs = {ROOT}
        for path in [*self.files, *self.links]:
            parts = path.split(b"/")
            for i in range(2, len(parts)):
                self.dirs.add(b"/".join(parts[:i]))

    def realpath(self, path: bytes) -> bytes:
        for link, target in self.links.items():
            if path == link or path.startswith(link + b"/"):
                return target + path[len(link) :]
        return path

    def kind(self, path: bytes) -> FileKind:
        real = self.realpath(path)
        if real in self.files:
            return FileKind.FILE
        if real in self.dirs:
            return FileKind.DIRECTORY
        return FileKind.MISSING


def make_router(
    *names: str, links: dict[bytes, bytes] | None = None, **options: object
) -> PhpRouter:
    files = {ROOT + name.encode() if name.startswith("/") else name.encode() for name in names}
    return PhpRouter(ROOT, FakeFileSystem(files, links), **options)  # type: ignore[arg-type]


APP = ("/index.php", "/info.php", "/upload.jpg", "/admin/index.php", "/style.css", "/.env")


def test_script_with_path_info() -> None:
    router = make_router(*APP)
    assert router.route(b"/info.php/a/b") == Script(ROOT + b"/info.php", b"/info.php", b"/a/b")
    assert router.route(b"/info.php") == Script(ROOT + b"/info.php", b"/info.php", b"")


def test_front_controller_takes_unknown_paths() -> None:
    router = make_router(*APP)
    assert router.route(b"/blog/2024/hello") == Script(ROOT + b"/index.php", b"/index.php", b"")


def test_directory_gets_its_slash_with_308_and_keeps_the_query() -> None:
    router = make_router(*APP)
    assert router.route(b"/admin", b"x=1") == Redirect(b"/admin/?x=1")
    assert router.route(b"/admin/") == Script(ROOT + b"/admin/index.php", b"/admin/index.php", b"")


def test_redirect_never_points_to_another_host() -> None:
    router = make_router("/evil.com/index.php")
    location = router.route(b"//evil.com")
    assert location == Redirect(b"/evil.com/")


def test_static_files_are_routed_as_static_never_as_scripts() -> None:
    router = make_router(*APP)
    assert router.route(b"/style.css") == StaticFile(ROOT + b"/style.css")
    assert router.route(b"/upload.jpg") == StaticFile(ROOT + b"/upload.jpg")


def test_dotfiles_are_never_served() -> None:
    router = make_router(*APP)
    assert isinstance(router.route(b"/.env"), Refusal)
    assert isinstance(router.route(b"/%2eenv"), Refusal)


def test_fix_pathinfo_bypass_never_runs_the_upload() -> None:
    """/upload.jpg/x.php: php-fpm's cgi.fix_pathinfo would walk back to upload.jpg."""
    router = make_router(*APP)
    route = router.route(b"/upload.jpg/x.php")
    assert isinstance(route, Script)
    assert route.filename == ROOT + b"/index.php"  # the front controller, never upload.jpg
    naive = ROOT + unquote("/upload.jpg/x.php").encode()
    assert naive != route.filename


def test_script_must_end_in_a_split_extension() -> None:
    router = make_router("/index.php", "/shell.php.jpg", "/x.phpx")
    assert router.route(b"/shell.php.jpg") == StaticFile(ROOT + b"/shell.php.jpg")
    assert router.route(b"/x.phpx/y") == Script(ROOT + b"/index.php", b"/index.php", b"")


@pytest.mark.parametrize(
    "path",
    [b"/index.php\n", b"/index.php%0a", b"/index.php%0A/x", b"/a%00.php", b"/a\x00.php",
     b"/x.php%0d%0aSet-Cookie:x", b"/info.php/%0a"],
)  # fmt: skip
def test_nul_cr_lf_are_refused_with_400(path: bytes) -> None:
    """CVE-2019-11043: a %0a defeated nginx's fastcgi_split_path_info regex."""
    router = make_router(*APP)
    assert router.route(path) == Refusal(400, router.route(path).reason)  # type: ignore[union-attr]
    # What nginx's documented regex does with the same path: PATH_INFO empty,
    # the split lost. The router never gets there.
    text = unquote(path.decode("latin-1"))
    match = re.match(r"^(.+?\.php)(/.*)$", text)
    assert match is None or "\n" in text or "\x00" in text or "\r" in text


@pytest.mark.parametrize(
    "path",
    [b"/../etc/passwd", b"/%2e%2e/etc/passwd", b"/a/../../etc/passwd.php", b"/%2E%2E%2Fetc.php",
     b"/..%2f..%2fetc/passwd"],
)  # fmt: skip
def test_traversal_cannot_leave_the_root(path: bytes) -> None:
    router = make_router(*APP, "/etc/passwd.php")
    route = router.route(path)
    assert isinstance(route, Refusal) and route.status == 400


def test_dot_segments_inside_the_root_are_resolved() -> None:
    router = make_router(*APP)
    assert router.route(b"/admin/../info.php") == Script(ROOT + b"/info.php", b"/info.php", b"")


def _reference_normalize(path: bytes) -> bytes | None:
    """Dot segments resolved one at a time, as RFC 3986 does; None if it climbs out."""
    out: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if segment == b"..":
            if not out:
                return None
            out.pop()
        elif segment not in (b"", b"."):
            out.append(segment)
    slash = path.endswith((b"/", b"/.", b"/..")) and bool(out)
    return b"/" + b"/".join(out) + (b"/" if slash else b"")


def test_normalize_matches_the_reference_on_random_paths() -> None:
    # Most paths take the router's shortcut (no "//", no "/."); these mix both kinds.
    router = make_router(*APP)
    rng = random.Random(7)
    pieces = [b"a", b"b.php", b".", b"..", b"", b".env", b"x.y", b"..a", b"a.."]
    for _ in range(5000):
        path = b"/" + b"/".join(rng.choices(pieces, k=rng.randint(0, 6)))
        expected = _reference_normalize(path)
        got = router.normalize(path, decoded=True)
        if expected is None:
            assert isinstance(got, Refusal) and got.status == 400, path
        else:
            assert got == expected, path
            # route() takes a normalized path for the "{path}" candidate as it is.
            assert router.normalize(got, decoded=True) == got, path


def test_split_is_ascii_case_insensitive_on_the_bytes() -> None:
    router = make_router("/index.php", "/Shop.PHP")
    assert router.route(b"/Shop.PHP/cart") == Script(ROOT + b"/Shop.PHP", b"/Shop.PHP", b"/cart")


@pytest.mark.parametrize("prefix", ["\u212a", "\u0130", "\u023a", "\u1e9e\u212a\u212a"])
def test_unicode_case_folding_never_moves_the_split(prefix: str) -> None:
    """Caddy CVE-2026-27590 / CVE-2026-45135: the split index came from a lowered copy.

    Lowering these characters changes their UTF-8 length, so an index found in
    the lowered text cuts the original somewhere else.
    """
    name = f"/{prefix}x.php"
    router = make_router("/index.php", name, "/secret.txt")
    raw = (name + "/secret.txt").encode()
    route = router.route(raw)
    assert route == Script(ROOT + name.encode(), name.encode(), b"/secret.txt")
    # The naive split: find ".php" in the lowered text, cut the bytes there.
    lowered = raw.decode().lower().encode()
    cut = lowered.find(b".php") + 4
    assert raw[:cut] != name.encode()  # the naive gateway runs the wrong file


def test_symlink_leaving_the_root_is_refused() -> None:
    links = {ROOT + b"/evil.php": b"/tmp/evil.php", ROOT + b"/out": b"/etc"}
    files = {ROOT + b"/index.php", b"/tmp/evil.php", b"/etc/motd"}
    router = PhpRouter(ROOT, FakeFileSystem(files, links))
    route = router.route(b"/evil.php")
    assert isinstance(route, Script) and route.filename == ROOT + b"/index.php"
    assert isinstance(router.route(b"/out/motd"), Refusal)


def test_index_off_means_no_redirect_and_no_front_controller() -> None:
    router = make_router(*APP, index=None)
    assert router.route(b"/admin") == Refusal(404, "no file matches the request path")
    assert router.route(b"/info.php/x") == Script(ROOT + b"/info.php", b"/info.php", b"/x")


def test_custom_try_files_and_split_path() -> None:
    router = make_router(
        "/app.php5", "/front.php5", split_path=[".php5"], try_files=["{path}", "front.php5"]
    )
    assert router.route(b"/app.php5/x") == Script(ROOT + b"/app.php5", b"/app.php5", b"/x")
    assert router.route(b"/nothing") == Script(ROOT + b"/front.php5", b"/front.php5", b"")


def test_relative_root_is_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        PhpRouter("www", FakeFileSystem(set()))


# --- the balancer ---


def test_round_robin_and_first() -> None:
    balancer = Balancer(["a", "b", "c"])
    assert [balancer.choose(0.0) for _ in range(4)] == [0, 1, 2, 0]
    assert Balancer(["a", "b"], "first").choose(0.0) == 0


def test_least_conn_moves_load_away_from_a_busy_backend() -> None:
    balancer = Balancer(["a", "b"], Policy.LEAST_CONN)
    balancer.started(0)
    balancer.started(0)
    balancer.started(1)
    assert balancer.choose(0.0) == 1


def test_passive_health_takes_a_backend_out_for_fail_timeout() -> None:
    balancer = Balancer(["a", "b"], "first", max_fails=2, fail_timeout=10.0)
    balancer.failed(0, 1.0)
    assert balancer.choose(1.5) == 0
    balancer.failed(0, 2.0)
    assert balancer.choose(2.5) == 1
    assert balancer.choose(11.5) == 0  # the first failure is older than fail_timeout


def test_active_health_takes_out_and_brings_back() -> None:
    balancer = Balancer(["a", "b"], "first")
    balancer.checked(0, False)
    assert balancer.choose(0.0) == 1
    balancer.checked(0, True)
    assert balancer.choose(0.0) == 0


def test_none_when_every_backend_is_down_or_tried() -> None:
    balancer = Balancer(["a", "b"])
    balancer.failed(0, 0.0)
    assert balancer.choose(0.0, exclude=[1]) is None


def test_cap_prefers_a_backend_with_room() -> None:
    balancer = Balancer(["a", "b"], "first", max_active=1)
    balancer.started(0)
    assert balancer.choose(0.0) == 1
    balancer.started(1)
    assert balancer.choose(0.0) == 0  # all full: the pool queues


def test_hash_keeps_keys_and_moves_only_the_lost_backends_keys() -> None:
    balancer = Balancer(["a", "b", "c"], "hash")
    keys = [str(i).encode() for i in range(300)]
    before = {k: balancer.choose(0.0, key=k) for k in keys}
    assert len(set(before.values())) == 3
    balancer.checked(2, False)
    after = {k: balancer.choose(0.0, key=k) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != 2)
    assert all(after[k] != 2 for k in keys)


def test_random_uses_the_given_generator() -> None:
    balancer = Balancer(["a", "b", "c"], "random", rng=random.Random(1))
    assert {balancer.choose(0.0) for _ in range(50)} == {0, 1, 2}


def test_retry_rule() -> None:
    assert may_retry(connect_failed=True, idempotent=False, body_sent=True, answer_started=False)
    assert may_retry(connect_failed=False, idempotent=True, body_sent=False, answer_started=False)
    assert not may_retry(
        connect_failed=False, idempotent=False, body_sent=False, answer_started=False
    )
    assert not may_retry(
        connect_failed=False, idempotent=True, body_sent=False, answer_started=True
    )
    assert not may_retry(
        connect_failed=False, idempotent=True, body_sent=True, answer_started=False
    )
