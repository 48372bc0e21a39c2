"""What a plain ``pip install fcgiproto-ng`` gives, without the ``[anyio]`` extra."""

from __future__ import annotations

import subprocess
import sys

#: Run first in a fresh interpreter: anyio cannot be imported, as in a venv without it.
WITHOUT_ANYIO = "import sys; sys.modules['anyio'] = None; sys.modules['trio'] = None\n"


def run_without_anyio(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_ANYIO + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_core_and_the_blocking_adapter_need_no_anyio() -> None:
    done = run_without_anyio(
        "import fcgiproto, fcgiproto.cgi, fcgiproto.support\n"
        "import fcgiproto_socket, fcgiproto_socket._cli\n"
    )
    assert done.returncode == 0, done.stderr


def test_the_async_adapter_without_anyio_names_the_extra_to_install() -> None:
    done = run_without_anyio(
        "try:\n"
        "    import fcgiproto_anyio\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc.name)\n"
        "    print(exc)\n"
        "    print(type(exc.__cause__).__name__)\n"
    )
    assert done.returncode == 0, done.stderr
    kind, message, cause = done.stdout.splitlines()
    assert kind == "ModuleNotFoundError anyio"
    assert "pip install 'fcgiproto-ng[anyio]'" in message
    assert "'fcgiproto-ng[trio]'" in message
    assert cause == "ModuleNotFoundError"  # the original error stays chained for debugging
