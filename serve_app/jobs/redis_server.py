"""The embedded Redis of `serve run`: a deployment that runs the system's `redis-server` on
127.0.0.1 with a password, append-only persistence fsynced on every write (a restart loses no
accepted job) and its data under the cache directory. Its health check restarts the server if it
died; it stops with the app, and with the replica's process however that ends (the kernel sends
the server SIGTERM when its parent dies: `serve run` killed, the replica killed). Without a
`redis-server` binary, or with the port held by another server, the app still runs: job
submissions answer 503 and `/health` says why.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.config import AppArgs

logger = logging.getLogger("ray.serve")

MISSING = (
    "no redis-server binary: install it (Debian/Ubuntu: apt-get install redis-server) or set "
    "jobs.redis_url / $SERVE_APP_REDIS_URL to a Redis server"
)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it goes (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the replica's __del__ still stops it
        pass


class EmbeddedRedis:
    """The `redis-server` of one machine; bound by `app.build_app` when jobs use it."""

    @staticmethod
    def deployment_options(args: AppArgs) -> dict[str, Any]:
        """Options for `serve.deployment`: one replica that computes nothing (the server is a
        process of its own), health-checked often, so a dead server is back within seconds."""
        return {
            "name": "EmbeddedRedis",
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0},
            "health_check_period_s": 2,  # restarts a dead redis-server within seconds
            "logging_config": {"enable_access_log": args.access_log},
        }

    def __init__(self, port: int, password_file: str, directory: str) -> None:
        """The server on 127.0.0.1:`port` with the password in `password_file` (0600; never
        passed through Ray); data in `directory`."""
        self.port = port
        self.password = Path(password_file).read_text().strip()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server")
        self.restarts = 0
        self.error: str | None = None  # why the server is not ours to use
        self.adopted = False  # a server of ours left by a replica that was killed
        # The parent-death signal follows the *thread* that started the child, so one thread
        # that lives as long as the replica starts every server.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-starter")
        if self.binary is None:
            self.error = MISSING
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

    def _probe(self) -> str:
        """'ours' (answers with our password), 'down' (nothing listens), or 'foreign'
        (a Redis with another password, or not Redis at all, holds the port)."""
        import redis

        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=1,
            socket_timeout=2,
        )  # fmt: skip
        try:
            return "ours" if client.ping() else "foreign"
        except redis.ConnectionError as exc:
            if isinstance(exc, redis.AuthenticationError) or "refused" not in str(exc).lower():
                return "foreign"
            return "down"
        except (redis.ResponseError, redis.TimeoutError):  # NOAUTH/WRONGPASS, or not Redis
            return "foreign"
        finally:
            client.close()

    def _start(self) -> None:
        state = self._probe()
        if state == "ours":  # one left running by a replica that was killed: keep it
            logger.info("embedded Redis already answers on port %d", self.port)
            self.error, self.adopted = None, True
            return
        if state == "foreign":
            self.error = (
                f"port {self.port} on 127.0.0.1 is held by another server (a Redis with another "
                "password, e.g. one left by another app or cache directory, or not Redis at "
                "all): stop it, or set jobs.embedded_port to a free port"
            )
            logger.error("embedded Redis not started: %s", self.error)
            return
        if self.binary is None:
            raise RuntimeError(MISSING)
        command = [self.binary, self._conf()]

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)

        self.process = self._starter.submit(spawn).result()
        deadline = time.monotonic() + 10
        while self._probe() != "ours":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.error = f"redis-server did not start (see {self.directory / 'redis.log'})"
                raise RuntimeError(self.error)
            time.sleep(0.05)
        self.error = None
        logger.info("embedded Redis on 127.0.0.1:%d, data in %s", self.port, self.directory)

    def check_health(self) -> None:
        """Restart the server if it died (its append-only file has every accepted job). A
        missing binary or a foreign server on the port is reported by `/health`, not here: the
        rest of the app keeps serving."""
        if self.binary is None:
            return
        if self.process is None and self.error:  # the port was taken: has it been freed?
            self._start()
            return
        if self._probe() == "ours":
            return
        logger.warning("embedded Redis is down: restarting it")
        self.restarts += 1
        self._start()

    def status(self) -> str | None:
        """None when the server answers; else why jobs cannot use it."""
        return self.error

    def pid(self) -> int | None:
        """The server's process id (tests kill it)."""
        try:
            return int((self.directory / "redis.pid").read_text())
        except (OSError, ValueError):
            return None

    def __del__(self) -> None:
        """Stop our server (never a foreign one on the port)."""
        if self.process is not None:
            try:
                self.process.terminate()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        elif self.adopted and (pid := self.pid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
