"""Peers of the PHP gateway tests: php-fpm pools of our own, and `fcgi php` under uvicorn.

Each pool is a php-fpm master of its own, so a test can stop one and leave
the others. Their docroot is a copy of tests/php_app. The pools are lax on
purpose (security.limit_extensions allows .jpg, as old or careless setups
do), so that the gateway is the only guard the bypass tests meet.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from peers import ManagedProcess, format_logs, free_port, socket_dir, wait_until_ready

APP_SOURCE = Path(__file__).parent / "php_app"


def copy_app(target: Path) -> Path:
    """tests/php_app copied to `target` (the pools and the gateway serve the copy)."""
    shutil.copytree(APP_SOURCE, target, dirs_exist_ok=True)
    return target


class FpmPool:
    """One php-fpm master with one pool of static workers on a Unix socket."""

    def __init__(
        self,
        binary: str,
        base: Path,
        name: str,
        *,
        workers: int = 4,
        env: dict[str, str] | None = None,
        extra_config: Sequence[str] = (),
        host_ini: bool = False,
    ) -> None:
        self.binary = binary
        self.name = name
        self.base = base / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.socket = str(socket_dir(self.base) / f"{name}.sock")
        self.address = f"unix:{self.socket}"
        self.error_log = self.base / "php-fpm.log"
        self.config_path = self.base / "php-fpm.conf"
        tmp = self.base / "tmp"
        tmp.mkdir(exist_ok=True)
        lines = [
            "[global]",
            f"pid = {self.base / 'php-fpm.pid'}",
            f"error_log = {self.error_log}",
            "daemonize = no",
            "",
            f"[{name}]",
            f"listen = {self.socket}",
            "listen.mode = 0666",
            "pm = static",
            f"pm.max_children = {workers}",
            "ping.path = /ping",
            "ping.response = pong",
            "clear_env = no",
            "catch_workers_output = no",
            "security.limit_extensions = .php .jpg",
            f"env[POOL] = {name}",
            "php_admin_value[post_max_size] = 64M",
            "php_admin_value[upload_max_filesize] = 64M",
            "php_admin_value[memory_limit] = 256M",
            "php_admin_value[output_buffering] = 0",
            "php_admin_value[max_execution_time] = 0",
            "php_admin_flag[display_errors] = off",
            "php_admin_flag[log_errors] = on",
            f"php_admin_value[sys_temp_dir] = {tmp}",
            f"php_admin_value[upload_tmp_dir] = {tmp}",
            *(f"env[{k}] = {v}" for k, v in (env or {}).items()),
            *extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        self._proc = ManagedProcess(
            f"php-fpm {name}",
            # -n: no php.ini, so the host's settings do not leak in; a real
            # application (host_ini) gets the host's php.ini and extensions.
            [
                binary,
                "-F",
                *([] if host_ini else ["-n"]),
                "-R",
                "-y",
                str(self.config_path),
                "-p",
                str(self.base),
            ],
            output_log=self.base / "php-fpm.out",
            env={k: v for k, v in os.environ.items() if k != "FPM_SOCKETS"},
        )

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> None:
        offset = self.error_log.stat().st_size if self.error_log.exists() else 0

        def logged_ready() -> bool:
            with open(self.error_log, "rb") as log:
                log.seek(offset)
                return b"ready to handle connections" in log.read()

        self._proc.start()
        wait_until_ready(
            self._proc,
            [self.socket],
            logs=[self.error_log],
            ready=lambda: self.error_log.exists() and logged_ready(),
        )

    def stop(self) -> None:
        """SIGTERM: php-fpm's master kills its workers at once, requests in flight too."""
        self._proc.stop()
        # The socket file stays behind; connecting to it is refused, as after a crash.

    def logs(self) -> str:
        return format_logs([self.error_log, self._proc.output_log])


class Gateway:
    """`fcgi php` (PhpGateway under uvicorn) in a process of its own."""

    def __init__(self, base: Path, root: Path, upstreams: Sequence[str], *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / f"gateway-{self.port}.log"
        argv = [
            sys.executable,
            "-m",
            "fcgiproto_socket",
            "php",
            "--root",
            str(root),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--upstream",
            *upstreams,
            *options,
        ]
        self._proc = ManagedProcess("fcgi php", argv, output_log=self.log)

    @property
    def pid(self) -> int:
        assert self._proc.process is not None
        return self._proc.process.pid

    def start(self) -> Gateway:
        self._proc.start()
        wait_until_ready(self._proc, [f"127.0.0.1:{self.port}"], logs=[self.log])
        return self

    def stop(self) -> None:
        self._proc.stop()

    def output(self) -> str:
        return self._proc.read_output()

    def rss_kib(self) -> int:
        """Resident memory now, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    """Poll `predicate()` until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False
