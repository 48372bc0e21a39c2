"""A real PHP application behind the gateway: DokuWiki from Debian's package.

The package's files are copied to a temporary directory (its code, its
configuration from /etc/dokuwiki and its data from /var/lib/dokuwiki, with the
paths rewritten), so the test never writes to the host's wiki. It is driven
by httpx through its main pages: the start page with its CSS and JavaScript
(PHP) and its images (static), login with a session cookie and a form token,
editing a page and reading it back.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_peers import FpmPool, Gateway
from peers import ci_requires_peers, find_php_fpm, require_peer

pytestmark = pytest.mark.peer

PACKAGE = Path("/usr/share/dokuwiki")
CONF = Path("/etc/dokuwiki")
VAR = Path("/var/lib/dokuwiki")
PASSWORD = "gateway-test-pw"


def install_copy(base: Path) -> Path:
    """DokuWiki's three directories under `base`, pointing at each other; the docroot."""
    www, conf, var = base / "www", base / "conf", base / "var"
    shutil.copytree(PACKAGE, www, symlinks=False, ignore=shutil.ignore_patterns(".htaccess"))
    shutil.copytree(CONF, conf, symlinks=False)
    shutil.copytree(VAR, var, symlinks=False)
    for path in [www / "inc" / "preload.php", www / "inc" / "init.php", conf / "dokuwiki.php"]:
        text = path.read_text()
        text = text.replace("/etc/dokuwiki", str(conf)).replace("/var/lib/dokuwiki", str(var))
        path.write_text(text)
    digest = hashlib.md5(PASSWORD.encode()).hexdigest()
    (conf / "users.auth.php").write_text(
        f"admin:{digest}:Wiki Admin:admin@example.org:admin,user\n"
    )
    # Pretty URLs off, as the package ships; the gateway needs no rewrite rules.
    return www


@pytest.fixture(scope="module")
def wiki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    binary = find_php_fpm()
    require_peer("php-fpm", binary is not None)
    if not (PACKAGE / "doku.php").exists():
        if ci_requires_peers():
            pytest.fail("CI installs dokuwiki (.ci/run); /usr/share/dokuwiki is missing")
        pytest.skip("dokuwiki is not installed (apt-get install dokuwiki)")
    assert binary is not None
    base = tmp_path_factory.mktemp("dokuwiki")
    root = install_copy(base)
    pool = FpmPool(binary, base, "wiki", host_ini=True)
    pool.start()
    gateway = Gateway(base, root, [pool.address], "--index", "doku.php").start()
    try:
        yield gateway
    finally:
        gateway.stop()
        pool.stop()


def form_token(html: str) -> str:
    match = re.search(r'name="sectok" value="([0-9a-f]*)"', html)
    assert match, html[:2000]
    return match[1]


def test_start_page_with_its_css_js_and_images(wiki: Gateway) -> None:
    with httpx.Client(base_url=wiki.url, timeout=30) as http:
        page = http.get("/")
        assert page.status_code == 200, page.text[:2000]
        assert "Debian DokuWiki" in page.text
        css = http.get("/lib/exe/css.php", params={"t": "dokuwiki"})
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
        js = http.get("/lib/exe/js.php", params={"t": "dokuwiki"})
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        logo = http.get("/lib/tpl/dokuwiki/images/logo.png")
        assert logo.status_code == 200 and logo.content.startswith(b"\x89PNG")


def test_login_edit_and_read_back(wiki: Gateway) -> None:
    with httpx.Client(base_url=wiki.url, timeout=30) as http:
        login_page = http.get("/doku.php", params={"id": "start", "do": "login"})
        assert login_page.status_code == 200
        logged_in = http.post(
            "/doku.php",
            params={"id": "start", "do": "login"},
            data={"u": "admin", "p": PASSWORD, "sectok": form_token(login_page.text)},
            follow_redirects=True,
        )
        assert "Logged in as" in logged_in.text or "Log Out" in logged_in.text, logged_in.text[
            :3000
        ]
        editor = http.get("/doku.php", params={"id": "gateway_test", "do": "edit"})
        assert editor.status_code == 200 and "wiki__text" in editor.text
        text = "====== Through the gateway ======\n\nServed by php-fpm via fcgiproto.\n"
        saved = http.post(
            "/doku.php",
            params={"id": "gateway_test"},
            data={
                "id": "gateway_test",
                "do[save]": "1",
                "wikitext": text,
                "summary": "test",
                "sectok": form_token(editor.text),
                "date": re.search(r'name="date" value="(\d*)"', editor.text)[1],  # type: ignore[index]
                "prefix": "",
                "suffix": "",
                "changecheck": re.search(r'name="changecheck" value="([^"]*)"', editor.text)[1],  # type: ignore[index]
                "target": "section",
            },
            follow_redirects=True,
        )
        assert saved.status_code == 200
        page = http.get("/doku.php", params={"id": "gateway_test"})
        assert "Through the gateway" in page.text
        assert "Served by php-fpm via fcgiproto." in page.text
