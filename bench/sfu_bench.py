"""SFU benchmark: rooms of N bots publishing 640x360 VP8 ~500 kbit/s 30 fps, all-to-all.

For each N, in a fresh process, it starts a real ``konsilium serve`` process,
joins N bots (spread over ``--workers`` processes, see bench.bot_workers) one
after another, waits until everyone receives everyone, then measures for
``--seconds``:

* frames delivered / frames sent (video, over every ordered publisher→viewer pair;
  the bots count complete frames from RTP headers, see Bot(light=True))
* server CPU (% of one core, from /proc) and CPU per forwarded video stream
* join-to-first-frame p50/p95: for each viewer and each publisher already in
  the room when it joined, from the start of its join to its first video frame.

The same is run with ``--media-mode reencode`` (the way aiortc's server example
relays media: decode, then encode per subscriber) for the reference sizes, and
the ratio of CPU per forwarded stream is printed.

    python -m bench.sfu_bench --sizes 2 4 8 12 --reference-sizes 2 4 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from media_server.clip import load_clip
from recording.keyring import append_new_key

from .bot_workers import BotSpec, BotWorkers
from .cpu import ProcessCpu, median, percentile
from .server import KonsiliumServer


@dataclass
class RoomResult:
    mode: str
    n: int
    seconds: float
    frames_sent: int
    frames_expected: int
    frames_delivered: int
    server_cpu: float  # % of one core
    bots_cpu: float  # % of one core, all bot worker processes together
    join_to_first_frame: list[float]
    keyframe_requests: int = 0  # PLIs the server sent to publishers during the window
    overflows: int = 0  # DownTrack queue overflows during the window
    server_cpu_median: float = 0.0  # median of the window's one-second samples
    # % of a core the recording itself used (record modes): its writer threads' CPU
    # plus the time its sinks took on the event loop, measured in the server
    recording_cpu: float = 0.0

    @property
    def streams(self) -> int:
        return self.n * (self.n - 1)

    @property
    def delivered_ratio(self) -> float:
        return self.frames_delivered / self.frames_expected if self.frames_expected else 0.0

    @property
    def cpu_per_stream(self) -> float:
        """Median one-second server CPU / forwarded streams."""
        return self.server_cpu_median / self.streams if self.streams else 0.0

    def row(self) -> dict[str, object]:
        jf = self.join_to_first_frame
        return {
            "mode": self.mode,
            "n": self.n,
            "streams": self.streams,
            "delivered": round(self.delivered_ratio * 100, 2),
            "server_cpu": round(self.server_cpu, 1),
            "server_cpu_median": round(self.server_cpu_median, 1),
            "cpu_per_stream": round(self.cpu_per_stream, 3),
            "bots_cpu": round(self.bots_cpu, 1),
            "jff_p50": round(median(jf), 3) if jf else None,
            "jff_p95": round(percentile(jf, 95), 3) if jf else None,
            "plis": self.keyframe_requests,
            "overflows": self.overflows,
        }


async def run_room(
    mode: str, n: int, seconds: float, settle: float, audio: bool, workers: int
) -> RoomResult:
    """``mode``: forward | reencode | record (forward, with every track recorded)
    | record-encrypted (the same, encrypted at rest with a fresh key)."""
    record = mode.startswith("record")
    server_mode = "forward" if record else mode
    data_dir = Path(tempfile.mkdtemp(prefix=f"konsilium-bench-{mode}-{n}-"))
    extra: tuple[str, ...] = ("--media-mode", server_mode, "--log-level", "WARNING")
    if mode == "record-encrypted":
        key_file = data_dir / "recording.keys"
        append_new_key(key_file)
        extra += ("--recording-key-file", str(key_file))
    with KonsiliumServer(data_dir, extra_args=extra) as srv:
        pool = BotWorkers(max(1, min(workers, n)))
        try:
            subs = [f"bot-{i:02d}" for i in range(n)]
            join_started: dict[str, float] = {}
            present_before: dict[str, list[str]] = {}
            for i, sub in enumerate(subs):
                present_before[sub] = subs[:i]
                spec = BotSpec(srv.url, "bench", sub, srv.mint(sub, room="bench"), audio)
                join_started[sub] = await pool.join(spec)

            def received(snap: dict[str, Any], viewer: str, publisher: str) -> int:
                return int(snap[viewer]["received"].get(publisher, {}).get("frames", 0))

            deadline = time.monotonic() + 30
            while True:
                snap = await pool.snapshot()
                if all(received(snap, v, p) > 0 for v in subs for p in subs if p != v):
                    break
                if time.monotonic() > deadline:
                    print(f"  warning: not every pair connected within 30 s (N={n}, {mode})")
                    break
                await asyncio.sleep(0.2)
            recording_since = time.monotonic()
            if record:
                await _recording(srv, start=True)
            await asyncio.sleep(settle)
            server_cpu = ProcessCpu(srv.pid)
            bot_cpus = [ProcessCpu(pid) for pid in pool.pids]
            media0 = await _media_counters(srv)
            snap0 = await pool.snapshot()
            server_cpu.start()
            for cpu in bot_cpus:
                cpu.start()
            t0 = time.monotonic()
            per_second: list[float] = []
            while time.monotonic() - t0 < seconds:
                second = ProcessCpu(srv.pid)
                second.start()
                await asyncio.sleep(min(1.0, max(0.05, seconds - (time.monotonic() - t0))))
                per_second.append(second.stop())
            snap1 = await pool.snapshot()
            elapsed = time.monotonic() - t0
            server_pct = server_cpu.stop()
            bots_pct = sum(cpu.stop() for cpu in bot_cpus)
            media1 = await _media_counters(srv)
            recording_cpu = 0.0
            if record:
                stopped = await _recording(srv, start=False)
                took = time.monotonic() - recording_since
                spent = float(stopped.get("worker_cpu_s", 0.0)) + float(stopped.get("loop_s", 0.0))
                recording_cpu = 100.0 * spent / took
            sent = {v: int(snap1[v]["sent"]) - int(snap0[v]["sent"]) for v in subs}
            # frames queued before the window can arrive inside it: never count more than sent
            delivered = sum(
                min(received(snap1, v, p) - received(snap0, v, p), sent[p])
                for v in subs
                for p in subs
                if p != v
            )
            jff = []
            for v in subs:
                for p in present_before[v]:
                    first = snap1[v]["received"].get(p, {}).get("first_frame_at")
                    if first is not None:
                        jff.append(float(first) - join_started[v])
            return RoomResult(
                mode,
                n,
                elapsed,
                sum(sent.values()),
                sum(sent.values()) * (n - 1),
                delivered,
                server_pct,
                bots_pct,
                jff,
                keyframe_requests=media1[0] - media0[0],
                overflows=media1[1] - media0[1],
                server_cpu_median=median(per_second) if per_second else server_pct,
                recording_cpu=recording_cpu,
            )
        finally:
            await pool.stop()


async def _recording(srv: KonsiliumServer, *, start: bool) -> dict[str, Any]:
    headers = {"Authorization": "Bearer test-admin-key"}
    url = f"{srv.url}/api/rooms/bench/recording"
    async with aiohttp.ClientSession() as session:
        method = session.post if start else session.delete
        async with method(url, headers=headers, json={} if start else None) as resp:
            if resp.status >= 300:
                raise RuntimeError(
                    f"recording {'start' if start else 'stop'}: {resp.status} {await resp.text()}"
                )
            data: dict[str, Any] = await resp.json()
            return data


async def _media_counters(srv: KonsiliumServer) -> tuple[int, int]:
    """(keyframe requests sent to publishers, DownTrack overflows) so far, from the server."""
    headers = {"Authorization": "Bearer test-admin-key"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{srv.url}/api/rooms/bench/media", headers=headers) as resp:
            stats = await resp.json()
    plis = sum(int(t["keyframe_requests_sent"]) for t in stats["tracks"].values())
    overflows = sum(int(s["overflows"]) for slots in stats["subscribers"].values() for s in slots)
    return plis, overflows


def print_table(results: list[RoomResult]) -> None:
    cols = [
        "mode",
        "n",
        "streams",
        "delivered",
        "server_cpu",
        "server_cpu_median",
        "cpu_per_stream",
        "bots_cpu",
        "jff_p50",
        "jff_p95",
        "plis",
        "overflows",
    ]
    heads = [
        "mode",
        "N",
        "streams",
        "delivered %",
        "server CPU % (mean)",
        "median of 1 s",
        "CPU %/stream (median)",
        "bots CPU %",
        "join→frame p50 s",
        "p95 s",
        "PLIs",
        "overflows",
    ]
    rows = [[str(r.row()[c]) for c in cols] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def run_room_isolated(mode: str, n: int, args: argparse.Namespace) -> RoomResult:
    """One room size in a fresh process, so nothing of the previous size lingers."""
    cmd = [
        sys.executable,
        "-m",
        "bench.sfu_bench",
        "--single",
        mode,
        str(n),
        "--seconds",
        str(args.seconds),
        "--settle",
        str(args.settle),
    ]
    if args.audio:
        cmd.append("--audio")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"room {mode} N={n} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    data = json.loads(lines[-1])
    return RoomResult(**data)


async def single(args: argparse.Namespace) -> None:
    mode, n = args.single[0], int(args.single[1])
    result = await run_room(mode, n, args.seconds, args.settle, args.audio, args.workers)
    print(json.dumps(asdict(result)))


def main_plan(args: argparse.Namespace) -> list[RoomResult]:
    clip = load_clip()
    print(
        f"clip: {clip.width}x{clip.height} {clip.fps} fps, "
        f"{clip.video_bitrate / 1000:.0f} kbit/s video, {len(clip.video)} frames loop; "
        f"audio {'on' if args.audio else 'off'}"
    )
    results: list[RoomResult] = []
    plan = [("forward", n) for n in args.sizes] + [("reencode", n) for n in args.reference_sizes]
    plan += [("record", n) for n in args.record_sizes]
    if args.encrypted:
        plan += [("record-encrypted", n) for n in args.record_sizes]
    for mode, n in plan:
        print(f"running {mode} N={n} for {args.seconds:.0f} s ...", flush=True)
        result = run_room_isolated(mode, n, args)
        results.append(result)
        print_table([result])
    print("\nsummary")
    print_table(results)
    forward = {r.n: r for r in results if r.mode == "forward"}
    for rec in (r for r in results if r.mode.startswith("record")):
        fwd = forward.get(rec.n)
        if fwd is not None:
            print(
                f"N={rec.n}: {rec.mode} of every track costs "
                f"{rec.server_cpu - fwd.server_cpu:+.1f} % of a core "
                f"({rec.server_cpu:.1f} % vs {fwd.server_cpu:.1f} % unrecorded); "
                f"measured in the server: writer threads + sinks on the loop used "
                f"{rec.recording_cpu:.2f} % of a core"
            )
    for ref in (r for r in results if r.mode == "reencode"):
        fwd = forward.get(ref.n)
        if fwd is not None and fwd.cpu_per_stream > 0:
            print(
                f"N={ref.n}: re-encoding reference costs {ref.cpu_per_stream:.2f} %/stream vs "
                f"{fwd.cpu_per_stream:.3f} %/stream forwarded: "
                f"{ref.cpu_per_stream / fwd.cpu_per_stream:.1f}x; delivered "
                f"{ref.delivered_ratio * 100:.1f} % vs {fwd.delivered_ratio * 100:.1f} %"
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--reference-sizes", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after all connect")
    parser.add_argument(
        "--audio", action="store_true", help="bots also publish Opus audio (50 packets/s each)"
    )
    parser.add_argument(
        "--record-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also run these sizes with every track recorded (issue 4 cost)",
    )
    parser.add_argument(
        "--encrypted",
        action="store_true",
        help="also run the record sizes with recordings encrypted at rest",
    )
    parser.add_argument("--workers", type=int, default=2, help="bot processes")
    parser.add_argument("--json", type=Path, help="also write results here")
    parser.add_argument("--single", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.single:
        asyncio.run(single(args))
        return 0
    results = main_plan(args)
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(r), **r.row()} for r in results], indent=2), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
