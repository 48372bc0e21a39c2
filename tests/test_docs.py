"""The documentation's Python examples run as written, and every public name has a docstring.

Every ```python block under docs/ runs, as a program of its own (``__name__`` is
``"__main__"``). A comment line right before a block may say how:

- ``<!-- docs-test: php-fpm -->``: the block talks to php-fpm at
  ``unix:/run/php/php-fpm.sock`` with scripts under ``/var/www/html``, as the
  page says; the test runs it against the ``php_fpm`` fixture, those two
  strings replaced by the fixture's socket and docroot.
- ``<!-- docs-test: skip REASON -->``: the block is not run (a fragment, or
  one that needs what no test can give it). Few blocks may say so.

The blocks that run also pass ``mypy --strict``, as the README's do. A ```sh
block marked ``php-fpm`` holds ``fcgi`` commands, each run against the fixture
and required to succeed.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import peers
import pytest
from helpers import mypy_strict

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PHP_FPM_SOCKET = "unix:/run/php/php-fpm.sock"
PHP_DOCROOT = "/var/www/html"
# At most this many blocks may be skipped: a page is read to be copied from.
MAX_SKIPPED = 3

_BLOCK = re.compile(
    r"^(?:<!-- docs-test: (?P<mode>[\w-]+)(?P<reason>[^>]*)-->\n)?```python\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    mode: str  # "run", "php-fpm" or "skip"
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            mode = match["mode"] or "run"
            assert mode in ("run", "php-fpm", "skip"), f"{path}: unknown docs-test mode {mode!r}"
            if mode == "skip":
                assert match["reason"].strip(), f"{path}: a skipped block says why"
            line = text.count("\n", 0, match.start("code")) + 1
            found.append(Block(str(path.relative_to(ROOT)), line, mode, match["code"]))
    return found


BLOCKS = _blocks()
RUN = [block for block in BLOCKS if block.mode == "run"]
PHP = [block for block in BLOCKS if block.mode == "php-fpm"]


def _run(block: Block, code: str) -> None:
    exec(compile(code, block.id, "exec"), {"__name__": "__main__"})


def test_the_docs_have_examples_and_few_are_skipped() -> None:
    assert RUN and PHP and COMMANDS
    assert len(BLOCKS) - len(RUN) - len(PHP) <= MAX_SKIPPED


@pytest.mark.parametrize("block", RUN, ids=[block.id for block in RUN])
def test_docs_example_runs(block: Block) -> None:
    _run(block, block.code)


@pytest.mark.parametrize("block", PHP, ids=[block.id for block in PHP])
def test_docs_example_runs_against_php_fpm(block: Block, php_fpm: peers.PhpFpm) -> None:
    assert PHP_FPM_SOCKET in block.code, "a php-fpm example names the socket it uses"
    code = block.code.replace(PHP_FPM_SOCKET, f"unix:{php_fpm.unix_path}")
    _run(block, code.replace(PHP_DOCROOT, str(php_fpm.docroot)))


_COMMANDS = re.compile(r"^<!-- docs-test: php-fpm -->\n```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMANDS = [
    (str(path.relative_to(ROOT)), line)
    for path in sorted(DOCS.rglob("*.md"))
    for block in _COMMANDS.findall(path.read_text(encoding="utf-8"))
    for line in block.splitlines()
    if line.strip()
]


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_docs_command_succeeds_against_php_fpm(
    page: str, command: str, php_fpm: peers.PhpFpm, capsys: pytest.CaptureFixture[str]
) -> None:
    from fcgiproto_socket._cli import main

    argv = shlex.split(command, comments=True)
    assert argv[0] == "fcgi", f"{page}: a command block holds fcgi commands"
    argv = [
        arg.replace(PHP_FPM_SOCKET, f"unix:{php_fpm.unix_path}").replace(
            PHP_DOCROOT, str(php_fpm.docroot)
        )
        for arg in argv[1:]
    ]
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, f"{page}: {command} exited {status}: {err}"
    assert out


def test_the_php_scripts_shown_are_those_the_examples_run() -> None:
    page = (DOCS / "php-fpm.md").read_text(encoding="utf-8")
    shown = re.findall(r"```php\n<\?php // /var/www/html/([\w.]+)[^\n]*\n(.*?)```", page, re.DOTALL)
    assert shown
    for name, body in shown:
        assert peers.PHP_SCRIPTS[name] == "<?php\n" + body, name


def test_docs_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """A user who copies an example gets code that mypy --strict accepts."""
    pytest.importorskip("mypy.api")
    status, report = mypy_strict([block.code for block in RUN + PHP], tmp_path, "docs")
    assert status == 0, report


# --- the API reference: mkdocstrings renders docstrings, so every public name needs one ---

PUBLIC_MODULES = ["fcgiproto", "fcgiproto.cgi", "fcgiproto.support", "fcgiproto_socket"]
PUBLIC_MODULES.append("fcgiproto_anyio")

# Implementations of a backend Protocol: their methods are documented once, on the Protocol.
_PROTOCOL_METHODS = frozenset(
    {"connect", "read", "write_some", "write_or_read", "looks_alive", "close", "aclose"}
)
_BACKEND_IMPLEMENTATIONS = frozenset(
    {
        "SocketBackend",
        "SocketStream",
        "MemoryBackend",
        "MemoryStream",
        "AnyioBackend",
        "AnyioStream",
        "AsyncMemoryBackend",
        "AsyncMemoryStream",
    }
)


def _own_docstring(cls: type) -> str:
    doc = vars(cls).get("__doc__") or ""
    # A dataclass without a docstring gets its signature as one.
    return "" if doc.startswith(f"{cls.__name__}(") else doc.strip()


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            if not _own_docstring(obj):
                missing.append(name)
            for member_name, member in vars(obj).items():
                if member_name.startswith("_"):
                    continue
                if name in _BACKEND_IMPLEMENTATIONS and member_name in _PROTOCOL_METHODS:
                    continue
                function = member.fget if isinstance(member, property) else member
                if inspect.isfunction(function) and not (function.__doc__ or "").strip():
                    missing.append(f"{name}.{member_name}")
        elif inspect.isfunction(obj) and not (obj.__doc__ or "").strip():
            missing.append(name)
    return missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    assert _undocumented(module_name) == []


def test_every_public_module_has_an_api_page() -> None:
    pages = "".join(path.read_text(encoding="utf-8") for path in (DOCS / "api").glob("*.md"))
    for module_name in PUBLIC_MODULES:
        assert f"::: {module_name}\n" in pages, module_name
