"""CPU sampling and statistics used by the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.cpu import ProcessCpu, median, percentile, process_cpu_seconds

BUSY = """
import sys, time
print("ready", flush=True)
end = time.monotonic() + 5
while time.monotonic() < end:
    pass
"""
SLEEPY = """
import sys, time
print("ready", flush=True)
time.sleep(5)
"""


@contextmanager
def _child(code: str) -> Iterator[subprocess.Popen[str]]:
    """A Python child that has finished starting up (it said so) and is killed after."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _schedstat(pid: int | None) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one), in ns precision.

    An independent counter to check ProcessCpu against, and a way to tell a busy
    loop that was starved by other load on this shared machine.
    """
    with open(f"/proc/{'self' if pid is None else pid}/schedstat") as fh:
        on_cpu, waiting, _ = fh.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _busy_here(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _sample(pid: int | None, seconds: float) -> tuple[float, float, float]:
    """ProcessCpu's percent, and schedstat's on-CPU and waiting percent, over one interval."""
    cpu = ProcessCpu(pid)
    run0, wait0 = _schedstat(pid)
    wall0 = time.monotonic()
    cpu.start()
    if pid is None:
        _busy_here(seconds)
    else:
        time.sleep(seconds)
    percent = cpu.stop()
    run1, wait1 = _schedstat(pid)
    wall = time.monotonic() - wall0
    return percent, 100 * (run1 - run0) / wall, 100 * (wait1 - wait0) / wall


def _assert_busy(percent: float, on_cpu: float, waiting: float) -> None:
    assert percent == pytest.approx(on_cpu, abs=10)  # ticks vs nanoseconds
    assert on_cpu + waiting > 80  # it always wanted the CPU
    # More than half a core, unless other load on this 2-core machine held it back.
    assert percent > 50 or waiting > 40, (percent, on_cpu, waiting)


def test_busy_child_uses_most_of_a_core() -> None:
    with _child(BUSY) as proc:
        _assert_busy(*_sample(proc.pid, 0.5))


def test_sleeping_child_uses_almost_nothing() -> None:
    with _child(SLEEPY) as proc:
        percent, on_cpu, _ = _sample(proc.pid, 0.5)
    assert percent < 10
    assert on_cpu < 10


def test_current_process_busy_loop() -> None:
    _assert_busy(*_sample(None, 0.5))


def test_stop_before_start_and_gone_process() -> None:
    with pytest.raises(RuntimeError):
        ProcessCpu().stop()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its /proc entry is gone
    with pytest.raises(ProcessLookupError):
        process_cpu_seconds(proc.pid)


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([7.0]) == 7.0
    with pytest.raises(ValueError):
        median([])


def test_percentile_linear_between_ranks() -> None:
    xs = [float(v) for v in range(1, 11)]  # 1..10
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 10.0
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(list(reversed(xs)), 25) == pytest.approx(3.25)
    with pytest.raises(ValueError):
        percentile(xs, 101)
    with pytest.raises(ValueError):
        percentile(xs, float("nan"))
