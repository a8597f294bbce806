"""A real ``redis-server`` (Debian's package) on a free loopback port in a directory of its own.

For the tests of the Redis session store and for load/bench_forecast_sessions.py, as
services/local_server.py is for ``bentoml serve``. AOF is on with ``appendfsync always`` by default,
so that a killed and restarted server has every write it acknowledged.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from services.local_server import free_port


class RedisServer:
    """``redis-server`` on 127.0.0.1:<free port>, its AOF and log under ``directory``."""

    def __init__(self, directory: Path, appendfsync: str = "always", appendonly: bool = True) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendfsync, self.appendonly = appendfsync, appendonly
        self.process: subprocess.Popen | None = None

    @staticmethod
    def available() -> str | None:
        """The ``redis-server`` binary, or None."""
        return shutil.which("redis-server")

    def start(self, timeout: float = 30.0) -> RedisServer:
        binary = self.available()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "redis.conf"
        config.write_text("\n".join([
            "bind 127.0.0.1", f"port {self.port}", f"dir {self.directory}", "save \"\"",
            f"appendonly {'yes' if self.appendonly else 'no'}", f"appendfsync {self.appendfsync}",
            f"logfile {self.directory / 'redis.log'}", "daemonize no", ""]))
        self.process = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited early:\n{self.log()}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server not answering after {timeout} s:\n{self.log()}")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync; only what the AOF already holds survives."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
