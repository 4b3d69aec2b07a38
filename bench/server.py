"""A real ``konsilium serve`` process for tests and benchmarks."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp


class ServiceError(RuntimeError):
    """A service could not be started."""


ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class KonsiliumServer:
    """A real ``konsilium serve`` process on a free port with its own data directory.

    Tokens are minted with the key the server created in that directory.
    """

    def __init__(
        self, data_dir: Path, *, extra_args: tuple[str, ...] = (), startup_timeout: float = 20.0
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._extra = extra_args
        self._timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> KonsiliumServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("konsilium")
        cmd = [
            str(exe),
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--admin-api-key",
            ADMIN_KEY,
            *self._extra,
        ]
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceError(f"konsilium exited early:\n{self.log_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise ServiceError(f"konsilium did not listen in time:\n{self.log_text()[-3000:]}")
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def mint(
        self,
        sub: str,
        *,
        room: str = "room-1",
        grants: tuple[str, ...] = ("join", "publish", "subscribe"),
        name: str | None = None,
        clinic: str = "ЦРБ",
        tier: str = "regional",
        ttl_s: int = 3600,
    ) -> str:
        from signalling.auth import Grant, Tier, TokenAuthority

        authority = TokenAuthority.load_or_create(self.data_dir)
        return authority.mint(
            sub=sub,
            name=name or f"Участник {sub}",
            clinic=clinic,
            tier=Tier(tier),
            room=room,
            grants=frozenset(Grant(g) for g in grants),
            ttl_s=ttl_s,
        )

    async def media(self, room: str = "room-1") -> dict[str, Any]:
        """``GET /api/rooms/{room}/media``: forwarding counters, layers, audio modes."""
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.url}/api/rooms/{room}/media", headers=headers) as r:
                if r.status != 200:
                    raise ServiceError(f"media stats of {room}: HTTP {r.status}")
                data: dict[str, Any] = await r.json()
                return data

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> KonsiliumServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
