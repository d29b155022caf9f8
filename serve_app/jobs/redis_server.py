"""The embedded Redis of `serve run`: a deployment that runs the system's `redis-server` on
127.0.0.1 with a password, append-only persistence fsynced on every write (a restart loses no
accepted job) and its data under the cache directory. Its health check restarts the server if it
died; it stops with the app. Without a `redis-server` binary the app still runs: job submissions
answer 503 saying what to install.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger("ray.serve")

MISSING = (
    "no redis-server binary: install it (Debian/Ubuntu: apt-get install redis-server) or set "
    "jobs.redis_url / $SERVE_APP_REDIS_URL to a Redis server"
)


class EmbeddedRedis:
    def __init__(self, url: str, port: int, directory: str) -> None:
        """`url` (with the password) as every deployment uses it; data in `directory`."""
        self.url, self.port = url, port
        self.password = urlsplit(url).password or ""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.binary = shutil.which("redis-server")
        self.restarts = 0
        if self.binary is None:
            logger.error("embedded Redis not started: %s", MISSING)
        else:
            self._start()

    def _conf(self) -> str:
        path = self.directory / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"requirepass {self.password}",
            f"dir {self.directory}",
            "appendonly yes",
            "appendfsync always",
            'save ""',
            f"pidfile {self.directory / 'redis.pid'}",
            f"logfile {self.directory / 'redis.log'}",
        ]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("\n".join(lines) + "\n")
        return str(path)

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except Exception:  # noqa: BLE001 - not up
            return False

    def _start(self) -> None:
        if self._ping():  # one left running by a replica that was killed: keep it
            logger.info("embedded Redis already answers on port %d", self.port)
            return
        self.process = subprocess.Popen([self.binary, self._conf()], start_new_session=True)
        deadline = time.monotonic() + 10
        while not self._ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start (see {self.directory / 'redis.log'})"
                )
            time.sleep(0.05)
        logger.info("embedded Redis on 127.0.0.1:%d, data in %s", self.port, self.directory)

    def check_health(self) -> None:
        """Restart the server if it died (its append-only file has every accepted job)."""
        if self.binary is None or self._ping():
            return
        logger.warning("embedded Redis is down: restarting it")
        self.restarts += 1
        self._start()

    def pid(self) -> int | None:
        """The server's process id (tests kill it)."""
        try:
            return int((self.directory / "redis.pid").read_text())
        except (OSError, ValueError):
            return None

    def __del__(self) -> None:
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
