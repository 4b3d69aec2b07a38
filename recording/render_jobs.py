"""Composite renders as background jobs: at most one per recording, one at a time.

Renders run in a single worker thread (``ThreadPoolExecutor(max_workers=1)``), so
they never take more than one core from forwarding; a job started while another
recording renders waits its turn (status ``running``, progress 0).  A job is
cancelled by making its ``progress`` callback raise, which makes
``render_composite`` remove its partial output.  ``close`` cancels everything and
waits for the worker.

Status of a job: ``running`` → ``done`` | ``failed`` | ``cancelled``; the registry
keeps the latest job of each recording.  Status fields are written by the worker
thread (single assignments, the result fields before the status) and read on the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recording.composite import RenderResult, render_composite
from recording.keyring import Keyring
from recording.segments import RecordingError
from recording.storage import media_size

log = logging.getLogger(__name__)

COMPOSITE_NAME = "composite.webm"
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


class RenderBusy(RecordingError):
    """A render of this recording is already running."""


class RenderCancelled(Exception):
    """Raised inside the progress callback to stop a render."""


@dataclass(slots=True)
class RenderJob:
    job_id: str
    recording_id: str
    recording_dir: Path
    out_path: Path
    width: int
    height: int
    fps: int
    status: str = RUNNING
    progress: float = 0.0
    error: str | None = None
    result: RenderResult | None = None
    size: int | None = None  # of the composite as played (decrypted)
    keyring: Keyring | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "recording_id": self.recording_id,
            "status": self.status,
            "progress": round(self.progress, 4),
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.result is not None:
            out["duration_s"] = round(self.result.duration_s, 3)
            out["speed_x"] = round(self.result.speed_x, 3)
        if self.size is not None:
            out["size"] = self.size
        return out

    # ------------------------------------------------------------ worker thread

    def _progress(self, fraction: float) -> None:
        if self.cancel_event.is_set():
            raise RenderCancelled
        self.progress = max(self.progress, min(1.0, fraction))

    def run(self) -> None:
        if self.cancel_event.is_set():
            self.status = CANCELLED
            return
        try:
            result = render_composite(
                self.recording_dir,
                self.out_path,
                width=self.width,
                height=self.height,
                fps=self.fps,
                progress=self._progress,
                threads=1,
                keyring=self.keyring,
            )
        except RenderCancelled:
            log.info("render of %s (%s) cancelled", self.recording_id, self.job_id)
            self.status = CANCELLED
            return
        except Exception as exc:
            log.exception("render of %s (%s) failed", self.recording_id, self.job_id)
            self.error = str(exc) or type(exc).__name__
            self.status = FAILED
            return
        self.result = result
        self.size = media_size(self.out_path, self.keyring)
        self.progress = 1.0
        self.status = DONE
        log.info(
            "render of %s done: %.1f s at %.2fx, %d bytes",
            self.recording_id,
            result.duration_s,
            result.speed_x,
            self.size,
        )


class RenderJobs:
    """The registry of render jobs of this process; see the module docstring."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        self._jobs: dict[str, RenderJob] = {}  # recording id -> latest job
        self._closed = False

    def __repr__(self) -> str:
        running = sum(job.running for job in self._jobs.values())
        return f"RenderJobs(jobs={len(self._jobs)}, running={running})"

    def get(self, recording_id: str) -> RenderJob | None:
        return self._jobs.get(recording_id)

    def start(
        self,
        recording_id: str,
        recording_dir: Path,
        *,
        width: int,
        height: int,
        fps: int,
        keyring: Keyring | None = None,
    ) -> RenderJob:
        """Queue a render of ``recording_dir`` into its ``composite.webm``; RenderBusy if one runs.

        ``keyring`` decrypts the recording and encrypts the composite (``render_composite``).
        Call on the event loop (the check and the insert are not separated by an await).
        """
        if self._closed:
            raise RecordingError("the render jobs are closed")
        current = self._jobs.get(recording_id)
        if current is not None and current.running:
            raise RenderBusy(f"a render of {recording_id} is already running")
        job = RenderJob(
            job_id=uuid.uuid4().hex,
            recording_id=recording_id,
            recording_dir=recording_dir,
            out_path=recording_dir / COMPOSITE_NAME,
            width=width,
            height=height,
            fps=fps,
            keyring=keyring,
        )
        job.future = self._executor.submit(job.run)
        self._jobs[recording_id] = job
        return job

    def cancel(self, recording_id: str) -> RenderJob | None:
        """Ask the running job of ``recording_id`` to stop; the latest job, or None."""
        job = self._jobs.get(recording_id)
        if job is None or not job.running:
            return job
        job.cancel_event.set()
        if job.future is not None and job.future.cancel():  # still queued: never starts
            job.status = CANCELLED
        return job

    async def wait(self, job: RenderJob, timeout: float) -> None:
        """Wait up to ``timeout`` s for ``job`` to leave ``running``."""
        if job.future is None or job.future.cancelled():
            return
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), timeout)
        except TimeoutError:
            pass

    async def close(self) -> None:
        """Cancel every job and wait for the worker thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for recording_id in list(self._jobs):
            self.cancel(recording_id)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._executor.shutdown, True)
