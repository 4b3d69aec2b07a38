"""CPU accounting and small statistics for benchmarks.

:class:`ProcessCpu` reads a process's user + system time from
``/proc/<pid>/stat`` (Linux only) and reports, over the interval between
:meth:`~ProcessCpu.start` and :meth:`~ProcessCpu.stop`, the share of **one core**
the process used: 100.0 is one core fully busy; a process with two busy threads
can show up to 200.0.  It counts all threads of the process but not its
children.  The kernel counts in clock ticks (usually 10 ms), so keep intervals
well above that (0.5 s gives about 2 % resolution).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by ``pid`` (default: this process)."""
    target = "self" if pid is None else str(pid)
    try:
        with open(f"/proc/{target}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {target}") from None
    # The command name (field 2) is in parentheses and may hold spaces or ')':
    # the fields that follow start after the last ')'. utime and stime are fields
    # 14 and 15 of the line, i.e. 11 and 12 after the state field.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class ProcessCpu:
    """Percent of one core used by a process between ``start()`` and ``stop()``."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid  # None: the current process
        self._cpu0: float | None = None
        self._wall0 = 0.0

    def start(self) -> None:
        self._cpu0 = process_cpu_seconds(self.pid)
        self._wall0 = time.monotonic()

    def stop(self) -> float:
        """Percent of one core since ``start()``; the sampler can be started again."""
        if self._cpu0 is None:
            raise RuntimeError("ProcessCpu.stop() called before start()")
        cpu = process_cpu_seconds(self.pid) - self._cpu0
        wall = time.monotonic() - self._wall0
        self._cpu0 = None
        if wall <= 0:
            return 0.0
        return 100.0 * cpu / wall


def median(xs: Sequence[float]) -> float:
    """Median; the mean of the two middle values for an even count."""
    return percentile(xs, 50)


def percentile(xs: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation between closest ranks.

    Same definition as numpy's default (``method="linear"``, Hyndman & Fan type 7):
    sorted values sit at positions 0..n-1 and the percentile is read at position
    ``p / 100 * (n - 1)``.  So ``percentile(xs, 0)`` is the minimum,
    ``percentile(xs, 100)`` the maximum and ``percentile(xs, 50)`` the median.
    """
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= p <= 100:  # also refuses NaN
        raise ValueError(f"percentile must be within 0..100, got {p}")
    ordered = sorted(xs)
    position = p / 100 * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction
