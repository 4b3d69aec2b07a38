"""Real services the tests start themselves (never mocks): a throwaway redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bench.server import KonsiliumServer, ServiceError, free_port

REDIS_SERVER_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    for path in REDIS_SERVER_PATHS:
        if Path(path).is_file():
            return path
    raise ServiceError(
        "redis-server is not installed: run scripts/install-system "
        "(or apt-get install redis-server) and try again"
    )


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server of its own on a free loopback port, in a temp dir, nothing saved.

    ``with RedisServer() as server: ... server.url ...``, or ``start()``/``stop()``.
    """

    def __init__(self, *, startup_timeout: float = 10.0) -> None:
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._port: int | None = None

    def __repr__(self) -> str:
        return f"<RedisServer port={self._port} running={self._proc is not None}>"

    @property
    def port(self) -> int:
        if self._port is None or self._proc is None:
            raise ServiceError("redis-server is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if self._proc is not None:
            return self
        binary = find_redis_server()
        self._dir = tempfile.TemporaryDirectory(prefix="konsilium-redis-")
        error = "did not start"
        for _ in range(3):  # the free port may be taken before redis binds it
            error = self._try_start(binary, free_port())
            if not error:
                return self
        self.stop()
        raise ServiceError(f"redis-server {error}")

    def _try_start(self, binary: str, port: int) -> str:
        assert self._dir is not None
        workdir = Path(self._dir.name)
        logfile = workdir / f"redis-{port}.log"
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]
        with logfile.open("wb") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _answers_ping(port):
                self._proc, self._port = proc, port
                return ""
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            reason = f"did not answer PING within {self._startup_timeout:.0f} s"
        else:
            reason = f"exited with code {proc.returncode}"
        tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        return f"on port {port} {reason}:\n" + "\n".join(tail)

    def stop(self) -> None:
        """Stop the server and remove its directory; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        workdir, self._dir = self._dir, None
        if workdir is not None:
            workdir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = ["KonsiliumServer", "RedisServer", "ServiceError", "free_port"]
