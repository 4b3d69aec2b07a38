"""``konsilium recordings render ID``: the composite of one recording, with a progress bar.

The recording is ``DATA_DIR/recordings/ID``; the composite goes to ``--out`` or
``DATA_DIR/recordings/ID/composite.webm`` (next to the manifest, outside
``tracks/``, so ``verify`` does not take it for part of the record).  The
progress bar goes to stderr (redrawn in place on a terminal, one line per 10 %
otherwise); the summary line goes to stdout.  Exit codes: 0 done, 1 the
recording cannot be rendered, 2 bad arguments or settings, 130 interrupted.

Wiring (in ``signalling.cli``)::

    p = recordings.add_parser("render", help="make the composite (grid) video")
    add_render_arguments(p)
    p.set_defaults(handler=run_render)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import TextIO

import av

from recording.composite import RenderError, RenderResult, render_composite
from recording.errors import RecordingError
from recording.keyring import EncryptionKeyError, Keyring

RECORDINGS_DIR = "recordings"
COMPOSITE_NAME = "composite.webm"
_RECORDING_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="recording id (a folder of DATA_DIR/recordings)")
    parser.add_argument(
        "--out", type=Path, help=f"output file (default DATA_DIR/recordings/ID/{COMPOSITE_NAME})"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="keys, recordings and documents (default konsilium-data)"
    )
    parser.add_argument("--size", type=_size, default=(1280, 720), help="WxH (default 1280x720)")
    parser.add_argument("--fps", type=int, default=15, help="frames per second (default 15)")
    parser.add_argument(
        "--threads", type=int, default=1, help="codec threads (default 1: one core)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--recording-key-file",
        type=Path,
        help="recording encryption keys (default: the recording_key_file setting); "
        "with keys, the composite is written encrypted too",
    )


def _size(text: str) -> tuple[int, int]:
    m = _SIZE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1280x720")
    return int(m.group(1)), int(m.group(2))


def run_render(args: argparse.Namespace) -> int:
    prog = "konsilium recordings render"
    if not _RECORDING_ID_RE.match(args.id):
        print(f"{prog}: {args.id!r} is not a recording id", file=sys.stderr)
        return 2
    loaded = _load(args.data_dir, getattr(args, "recording_key_file", None))
    if loaded is None:
        return 2
    data_dir, keyring = loaded
    directory = data_dir / RECORDINGS_DIR / args.id
    if not directory.is_dir():
        print(f"{prog}: no recording {args.id} in {data_dir / RECORDINGS_DIR}", file=sys.stderr)
        return 1
    out: Path = args.out or directory / COMPOSITE_NAME
    width, height = args.size
    bar = ProgressBar(sys.stderr, enabled=not args.quiet)
    try:
        result = render_composite(
            directory,
            out,
            width=width,
            height=height,
            fps=args.fps,
            progress=bar.update,
            threads=args.threads,
            keyring=keyring,
        )
    except KeyboardInterrupt:
        bar.abort()
        print(f"{prog}: interrupted, nothing written", file=sys.stderr)
        return 130
    except (RenderError, RecordingError, OSError, av.FFmpegError) as exc:
        bar.abort()
        print(f"{prog}: {args.id}: {exc}", file=sys.stderr)
        return 1
    bar.finish()
    _report(result)
    return 0


def _load(data_dir: Path | None, key_file: Path | None) -> tuple[Path, Keyring | None] | None:
    """The data dir and the recording keys, from the flags, else KONSILIUM_DATA_DIR /
    KONSILIUM_RECORDING_KEY_FILE / the config file / the defaults, as ``serve``."""
    from signalling.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            {"data_dir": data_dir, "recording_key_file": key_file}, os.environ, None
        )
        keyring = None
        if settings.recording_key_file is not None:
            keyring = Keyring.load(settings.recording_key_file)
    except (SettingsError, EncryptionKeyError) as exc:
        print(f"konsilium recordings render: {exc}", file=sys.stderr)
        return None
    return settings.data_dir, keyring


def _report(result: RenderResult) -> None:
    print(
        f"{result.out_path}: {_clock(result.duration_s)}, {result.frames} frames, "
        f"rendered in {result.seconds_taken:.1f} s ({result.speed_x:.1f}x real time)"
    )
    if result.skipped_segments:
        print(
            f"warning: {len(result.skipped_segments)} unreadable segment(s) shown as gaps: "
            + ", ".join(result.skipped_segments[:3]),
            file=sys.stderr,
        )


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class ProgressBar:
    """``[#####-----]  50%  0:00:12 left`` redrawn in place on a terminal; 10 % lines otherwise."""

    WIDTH = 30

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self._stream = stream
        self._enabled = enabled
        self._tty = stream.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last_step = -1
        self._drawn = False

    def update(self, fraction: float) -> None:
        if not self._enabled:
            return
        fraction = min(1.0, max(0.0, fraction))
        if self._tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or fraction >= 1.0:
                self._last_draw = now
                self._stream.write("\r" + self._line(fraction))
                self._stream.flush()
                self._drawn = True
        else:
            step = int(fraction * 10)
            if step > self._last_step:
                self._last_step = step
                self._stream.write(self._line(fraction) + "\n")
                self._stream.flush()

    def finish(self) -> None:
        self.update(1.0)
        self._end_line()

    def abort(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _line(self, fraction: float) -> str:
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        elapsed = time.monotonic() - self._started
        if fraction >= 1.0:
            tail = f"done in {_clock(elapsed)}"
        elif fraction > 0.01:
            tail = f"{_clock(elapsed / fraction - elapsed)} left"
        else:
            tail = ""
        return f"rendering [{bar}] {fraction:4.0%}  {tail}".rstrip()
