"""docs/serving.md shows the web server configurations the tests run, not look-alikes.

Each config block on the page follows a marker naming the configuration:

    <!-- config-test: NAME -->
    ```nginx
    ...
    ```

NAME is one of CONFIGS below, each rendered by the fixture that the tests of
the apps behind that web server start (tests/peers.py's Nginx,
tests/webservers.py's), with the paths and ports of a test run replaced by the
page's placeholders. A block is excerpts of that configuration: its lines, in
order, with `# ...` where the page leaves out lines that only concern a test
run (pid files, log paths, how few processes to start). Indentation is not
compared.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
import webservers as web
from test_python_apps_fronts import serve_argv

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "serving.md"
GAP = "# ..."

#: The page's placeholders.
HTTP = "127.0.0.1:8080"
APP_SOCKET = "/run/app/app.sock"
WEB_DIR = "/srv/web"
APP_DIR = "/srv/app"
PYTHON = "/usr/bin/python3"
APP = "hello:app"
APACHE_MODULES = "/usr/lib/apache2/modules"

_MARKED = re.compile(
    r"^<!-- config-test: (?P<name>[\w-]+) -->\n```\w*\n(?P<text>.*?)^```", re.MULTILINE | re.DOTALL
)


def _placeholders(text: str, server: web.WebServer | peers.Nginx, base: Path) -> str:
    port = server.http_address.rsplit(":", 1)[1]
    pairs = [
        (str(base), WEB_DIR),
        (server.http_address, HTTP),
        (f"server.port = {port}", "server.port = 8080"),  # lighttpd's
    ]
    for actual, placeholder in sorted(pairs, key=lambda pair: -len(pair[0])):
        text = text.replace(actual, placeholder)
    return text


def _web(tmp: Path) -> Path:
    base = tmp / "web"
    base.mkdir(exist_ok=True)
    return base


def _spawned(tmp: Path) -> web.SpawnedApp:
    """The program mod_fcgid and lighttpd start, installed as test_python_apps_fronts does."""
    dest = tmp / "app"
    return web.install_app(dest, args=serve_argv("python_apps:flask_app", "--app-dir", str(dest)))


def _app_text(text: str, tmp: Path) -> str:
    python = web.python_for(web.web_user())
    text = text.replace(str(tmp / "app"), APP_DIR).replace("python_apps:flask_app", APP)
    return text.replace(python, PYTHON)


def render_nginx(tmp: Path) -> str:
    nginx = peers.Nginx("nginx", _web(tmp), f"unix:{APP_SOCKET}")
    return _placeholders(nginx.config_path.read_text(), nginx, _web(tmp))


def render_apache_proxy(tmp: Path) -> str:
    server = web.ApacheProxyFcgi("apache2", _web(tmp), f"unix:{APP_SOCKET}")
    return _placeholders(server._config(), server, _web(tmp))


def render_apache_fcgid(tmp: Path) -> str:
    app = _spawned(tmp)
    server = web.ApacheFcgid("apache2", _web(tmp), app)
    return _app_text(_placeholders(server._config(), server, _web(tmp)), tmp)


def render_fcgid_script(tmp: Path) -> str:
    app = _spawned(tmp)
    return _app_text(Path(app.argv[0]).read_text(), tmp)


def render_lighttpd_socket(tmp: Path) -> str:
    server = web.Lighttpd("lighttpd", _web(tmp), fastcgi_address=f"unix:{APP_SOCKET}")
    return _placeholders(server._config(), server, _web(tmp))


def render_lighttpd_spawn(tmp: Path) -> str:
    app = _spawned(tmp)
    server = web.Lighttpd("lighttpd", _web(tmp), app=app)
    return _app_text(_placeholders(server._config(), server, _web(tmp)), tmp)


def render_haproxy(tmp: Path) -> str:
    server = web.HAProxy("haproxy", _web(tmp), f"unix:{APP_SOCKET}")
    return _placeholders(server._config(), server, _web(tmp))


CONFIGS: dict[str, Callable[[Path], str]] = {
    "nginx": render_nginx,
    "apache-proxy": render_apache_proxy,
    "apache-fcgid": render_apache_fcgid,
    "fcgid-script": render_fcgid_script,
    "lighttpd-socket": render_lighttpd_socket,
    "lighttpd-spawn": render_lighttpd_spawn,
    "haproxy": render_haproxy,
}


def _page_blocks() -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    for match in _MARKED.finditer(PAGE.read_text(encoding="utf-8")):
        assert match["name"] not in blocks, f"{match['name']} is shown twice"
        blocks[match["name"]] = match["text"].splitlines()
    return blocks


def _missing(shown: list[str], config: str) -> str | None:
    """Where `shown` is not excerpts of `config` in order: the first line not found, or None."""
    lines = [line.strip() for line in config.splitlines()]
    segments: list[list[str]] = [[]]
    for line in shown:
        if line.strip() == GAP:
            segments.append([])
        else:
            segments[-1].append(line.strip())
    at = 0
    for segment in filter(None, segments):
        for start in range(at, len(lines) - len(segment) + 1):
            if lines[start : start + len(segment)] == segment:
                at = start + len(segment)
                break
        else:
            return segment[0] if len(segment) == 1 else "\n".join(segment)
    return None


@pytest.fixture(autouse=True)
def _anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    # The page shows Debian's module paths; render them so whatever is installed.
    monkeypatch.setattr(web, "find_apache_module", lambda name: f"{APACHE_MODULES}/mod_{name}.so")


def test_the_page_shows_every_configuration() -> None:
    assert sorted(_page_blocks()) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_configuration_shown_is_the_one_tested(name: str, tmp_path: Path) -> None:
    shown = _page_blocks()[name]
    rendered = CONFIGS[name](tmp_path)
    missing = _missing(shown, rendered)
    assert missing is None, (
        f"docs/serving.md's {name} block is not what the tests run; first lines not found:\n"
        f"{missing}\n\nthe tests' configuration, with the page's placeholders:\n{rendered}"
    )
