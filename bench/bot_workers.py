"""Bots spread over worker processes, so the load generator is not the bottleneck.

A bot's receive path costs about as much CPU as the server's forwarding of the
same streams; one Python process with a dozen all-to-all bots saturates a core
on its own.  Each worker runs its share of bots on its own event loop; the
benchmark drives them through a pipe: join one bot, take a snapshot of counters,
stop.  ``time.monotonic()`` is system-wide on Linux, so join and first-frame
times from different workers are comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from media_server.bot import Bot
from media_server.clip import load_clip


@dataclass(frozen=True)
class BotSpec:
    url: str
    room: str
    sub: str
    token: str
    audio: bool


def _worker_main(conn: Connection) -> None:
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve(conn))


async def _serve(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    clip = await loop.run_in_executor(None, load_clip)
    bots: dict[str, Bot] = {}
    while True:
        command, arg = await loop.run_in_executor(None, conn.recv)
        if command == "join":
            spec: BotSpec = arg
            bot = Bot(
                spec.url, spec.room, spec.token, clip=clip, audio=spec.audio, remb=False, light=True
            )
            started = loop.time()
            await bot.start()
            bots[spec.sub] = bot
            conn.send(started)
        elif command == "snapshot":
            conn.send(_snapshot(bots))
        elif command == "stop":
            for bot in bots.values():
                with contextlib.suppress(Exception):
                    await bot.stop()
            conn.send(None)
            return


def _snapshot(bots: dict[str, Bot]) -> dict[str, Any]:
    return {
        sub: {
            "sent": bot.sent("video"),
            "received": {
                pid: {"frames": t.frames, "first_frame_at": t.first_frame_at}
                for (pid, kind), t in bot.stats.received.items()
                if kind == "video"
            },
        }
        for sub, bot in bots.items()
    }


class BotWorkers:
    """``count`` worker processes; bots are assigned round-robin."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self.processes: list[Any] = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self.processes.append(proc)
        self._joined = 0

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.processes]

    async def _call(self, pipe: Connection, command: str, arg: Any = None) -> Any:
        loop = asyncio.get_running_loop()
        pipe.send((command, arg))
        return await loop.run_in_executor(None, pipe.recv)

    async def join(self, spec: BotSpec) -> float:
        """Join one bot; returns the monotonic time its join started."""
        pipe = self._pipes[self._joined % len(self._pipes)]
        self._joined += 1
        return float(await self._call(pipe, "join", spec))

    async def snapshot(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in await asyncio.gather(*(self._call(p, "snapshot") for p in self._pipes)):
            merged.update(part)
        return merged

    async def stop(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(pipe, "stop"), 20)
        for proc in self.processes:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
