"""The lazy packages name each public name three times; they must agree.

``fcgiproto.support`` and ``fcgiproto_socket`` load names on first use
(PEP 562): the imports under ``if TYPE_CHECKING:`` are what type checkers and
editors see, ``_SOURCES`` is what ``__getattr__`` loads, and ``__all__`` is what
``from ... import *`` and the docs take. A name added to one list and not the
others would type-check and fail at run time, or the other way round.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

LAZY_PACKAGES = ["fcgiproto.support", "fcgiproto_socket"]


def type_checking_imports(package: str) -> dict[str, str]:
    """name -> module, as imported under ``if TYPE_CHECKING:``, relative modules kept relative."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom)
                module = "." * statement.level + (statement.module or "")
                for alias in statement.names:
                    found[alias.asname or alias.name] = module
    return found


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_type_checking_imports_sources_and_all_name_the_same(package: str) -> None:
    module = importlib.import_module(package)
    sources: dict[str, str] = module._SOURCES
    # fcgiproto.support writes its sources without the leading dot.
    normalised = {
        name: source if source.startswith(("fcgiproto", ".")) else "." + source
        for name, source in sources.items()
    }
    assert type_checking_imports(package) == normalised
    assert sorted(module.__all__) == sorted(sources)
    assert len(module.__all__) == len(set(module.__all__))


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazy_name_loads_from_where_it_is_said_to_live(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
