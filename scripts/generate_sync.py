"""Generate the blocking client from the async one, or check that the copy is current.

The client's control flow is written once, async, in fcgiproto_anyio; the
blocking client in fcgiproto_socket is the same code with `async` and
`await` taken out and the async names swapped for their blocking namesakes
(fcgiproto_anyio/_primitives.py and fcgiproto_socket/_primitives.py hold
what really differs). CI runs `--check`, which fails when a generated file is
stale or was edited by hand.

    python scripts/generate_sync.py          # regenerate
    python scripts/generate_sync.py --check  # exit 1 if anything would change
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import unasync

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "fcgiproto_anyio"
TARGET = ROOT / "fcgiproto_socket"
#: The modules written once: the backend interface, a connection, the shared
#: connection, the client with its pool and its streaming response, and the
#: in-memory backend; the client over several applications; and the reading of
#: php-fpm's status page.
MODULES = (
    "_interface.py",
    "_connection.py",
    "_mux.py",
    "_client.py",
    "_memory.py",
    "_balanced.py",
    "_status.py",
)
NAMES = {
    "AnyioBackend": "SocketBackend",
    "AsyncBackground": "Background",
    "AsyncBalancedClient": "BalancedClient",
    "AsyncBalancedStream": "BalancedStream",
    "AsyncClient": "Client",
    "AsyncConnection": "Connection",
    "AsyncFlag": "Flag",
    "AsyncInbox": "Inbox",
    "AsyncLock": "Lock",
    "AsyncMemoryBackend": "MemoryBackend",
    "AsyncMemoryStream": "MemoryStream",
    "AsyncMuxConnection": "MuxConnection",
    "AsyncNetworkBackend": "NetworkBackend",
    "AsyncNetworkStream": "NetworkStream",
    "AsyncStreamResponse": "StreamResponse",
    "aclose": "close",
    "aiter_body": "iter_body",
    "aiter_stderr": "iter_stderr",
    "aiter_stdout": "iter_stdout",
    "aread": "read",
}
HEADER = "# Generated from fcgiproto_anyio/{name} by scripts/generate_sync.py: do not edit.\n"


def generate(into: Path) -> list[Path]:
    """Write the blocking modules under `into`; their paths."""
    rule = unasync.Rule(str(SOURCE) + "/", str(into) + "/", additional_replacements=NAMES)
    unasync.unasync_files([str(SOURCE / name) for name in MODULES], [rule])
    paths = [into / name for name in MODULES]
    for path in paths:
        path.write_text(HEADER.format(name=path.name) + path.read_text())
    config = ["--config", str(ROOT / "pyproject.toml")]
    ruff = [sys.executable, "-m", "ruff"]
    subprocess.run([*ruff, "check", "--quiet", "--fix-only", *config, *map(str, paths)], check=True)
    subprocess.run([*ruff, "format", "--quiet", *config, *map(str, paths)], check=True)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        stale = []
        for path in fresh:
            target = TARGET / path.name
            new = path.read_text()
            old = target.read_text() if target.exists() else ""
            if new == old:
                continue
            stale.append(target)
            if args.check:
                sys.stdout.writelines(
                    difflib.unified_diff(
                        old.splitlines(keepends=True),
                        new.splitlines(keepends=True),
                        str(target.relative_to(ROOT)),
                        "generated",
                    )
                )
            else:
                shutil.copyfile(path, target)
    if args.check and stale:
        names = ", ".join(str(path.relative_to(ROOT)) for path in stale)
        print(f"stale generated files: {names}; run: uv run python scripts/generate_sync.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
