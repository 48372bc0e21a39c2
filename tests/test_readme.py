"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import mypy_strict

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_readme_has_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block: str) -> None:
    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """A user who copies an example gets code that mypy --strict accepts."""
    pytest.importorskip("mypy.api")
    status, report = mypy_strict(BLOCKS, tmp_path, "readme")
    assert status == 0, report


def _shown(name: str, value: object) -> str:
    """A default as the README's Limits table writes it."""
    if name.endswith("_timeout"):
        return f"{value:g} s"
    assert isinstance(value, int)
    if name.endswith("_size"):
        for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size} {unit}"
    return f"{value:,}"


def test_the_limits_table_lists_every_server_option_with_its_default() -> None:
    from dataclasses import fields

    from fcgiproto.support import ServerOptions

    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Limits") :]
    table = table[: table.index("\n## ")]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, re.MULTILINE))
    defaults = ServerOptions()
    wanted = {
        f.name: _shown(f.name, getattr(defaults, f.name))
        for f in fields(ServerOptions)
        if f.name not in ("multiplex", "roles", "allowed_peers", "decode_params")
    }
    assert {name: rows.get(name) for name in wanted} == wanted
