"""Kernel-level rate limiting of a whole process (or browser) in a network namespace.

This kernel has ``tbf``/``htb`` but no ``netem``: a namespace gives a real rate
limit and a real drop-tail queue for everything inside it (Chromium, a bot),
while delay, jitter and loss still need the userspace emulator.

Layout of :class:`ShapedNamespace` number N (1..254)::

    host  10.77.N.1/30  dev lemuNh  <== veth ==>  lemuNn  10.77.N.2/30  netns linkemu-N-PID

Only those two addresses, on this machine's own veth pair, are configured; the
namespace has no route beyond its peer. ``tbf`` on ``lemuNh`` shapes what the
host sends into the namespace (the participant's downlink), on ``lemuNn`` what
the namespace sends out (its uplink).

Everything shells out to ``ip`` and ``tc`` (iproute2) and needs root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Literal

__all__ = [
    "NetnsError",
    "ShapedNamespace",
    "apply_rate",
    "available",
    "cleanup_stale",
    "clear_rate",
]

Direction = Literal["both", "up", "down"]

_NS_PREFIX = "linkemu-"
_NS_RE = re.compile(r"^linkemu-(\d+)-(\d+)$")
_TIMEOUT_S = 10.0
# Messages of `tc qdisc del` when there is no root qdisc to delete.
_NO_QDISC = ("Cannot delete qdisc with handle of zero", "No such file or directory")


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed."""


def _run(argv: Sequence[str], *, netns: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def available() -> bool:
    """True if we are root, ``ip netns`` works and a ``tbf`` qdisc can be set."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    probe = f"lemuprobe{os.getpid() % 100000}"
    try:
        _run(["ip", "netns", "list"])
        # No `dummy` driver in this kernel; a veth pair is what we will use anyway.
        _run(["ip", "link", "add", probe, "type", "veth", "peer", "name", f"{probe}p"])
        try:
            _run(["tc", "qdisc", "replace", "dev", probe, "root", "tbf", "rate", "1mbit",
                  "burst", "4kb", "latency", "50ms"])  # fmt: skip
        finally:
            _run(["ip", "link", "del", probe])
    except NetnsError:
        return False
    return True


def default_burst(rate_bps: int) -> int:
    """Token bucket depth: 10 ms worth of bytes, at least two full-size packets."""
    return max(3200, rate_bps // 8 // 100)


def apply_rate(
    target: ShapedNamespace | str,
    rate_bps: int,
    *,
    burst: int | None = None,
    latency_ms: float = 300.0,
    direction: Direction = "both",
    netns: str | None = None,
) -> None:
    """Limit ``target`` to ``rate_bps`` with a ``tbf`` root qdisc (replacing any).

    ``target`` is a device name (in ``netns`` if given) or a
    :class:`ShapedNamespace` (then ``direction`` picks which end(s) to shape).
    ``latency_ms`` bounds the tbf queue in time: packets that would wait longer
    are dropped, like the emulator's ``queue_ms``.
    """
    if isinstance(target, ShapedNamespace):
        target.apply_rate(rate_bps, burst=burst, latency_ms=latency_ms, direction=direction)
        return
    if rate_bps <= 0:
        raise ValueError("rate_bps must be positive")
    burst_bytes = default_burst(rate_bps) if burst is None else burst
    _run(
        ["tc", "qdisc", "replace", "dev", target, "root", "tbf", "rate", f"{rate_bps}bit",
         "burst", str(burst_bytes), "latency", f"{latency_ms:g}ms"],
        netns=netns,
    )  # fmt: skip


def clear_rate(
    target: ShapedNamespace | str, *, direction: Direction = "both", netns: str | None = None
) -> None:
    """Remove the root qdisc set by :func:`apply_rate` (no error if there is none)."""
    if isinstance(target, ShapedNamespace):
        target.clear_rate(direction=direction)
        return
    try:
        _run(["tc", "qdisc", "del", "dev", target, "root"], netns=netns)
    except NetnsError as exc:
        if not any(msg in str(exc) for msg in _NO_QDISC):
            raise


def cleanup_stale() -> list[str]:
    """Delete namespaces (and host veths) left by dead processes; returns their names.

    Only touches ``linkemu-N-PID`` namespaces whose PID no longer exists.
    """
    removed = []
    for line in _run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NS_RE.match(name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        with contextlib.suppress(NetnsError):
            _run(["ip", "link", "del", f"lemu{match.group(1)}h"])
        with contextlib.suppress(NetnsError):
            _run(["ip", "netns", "del", name])
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShapedNamespace:
    """A network namespace joined to the host by a veth pair, cleaned up on exit.

    ``index`` picks N in 10.77.N.0/30; by default the first free one is used.
    Use as a context manager (``with ShapedNamespace() as ns:``) or call
    :meth:`create` / :meth:`delete` (idempotent, also after a failed create).
    Run a process inside with ``subprocess.Popen(ns.exec_args([...]))``.
    """

    def __init__(self, index: int | None = None) -> None:
        if index is not None and not 1 <= index <= 254:
            raise ValueError("index must be in 1..254")
        self._requested = index
        self.index = 0
        self.name = ""
        self._created = False

    def __repr__(self) -> str:
        return f"ShapedNamespace({self.name or 'not created'})"

    @property
    def host_dev(self) -> str:
        return f"lemu{self.index}h"

    @property
    def ns_dev(self) -> str:
        return f"lemu{self.index}n"

    @property
    def host_addr(self) -> str:
        return f"10.77.{self.index}.1"

    @property
    def ns_addr(self) -> str:
        return f"10.77.{self.index}.2"

    def create(self) -> ShapedNamespace:
        if self._created:
            return self
        candidates = [self._requested] if self._requested else self._free_indexes()
        last_error: NetnsError | None = None
        for index in candidates:
            self.index = index
            self.name = f"{_NS_PREFIX}{index}-{os.getpid()}"
            try:
                # `ip netns add` fails if the name exists: claims the index.
                _run(["ip", "netns", "add", self.name])
            except NetnsError as exc:
                if "File exists" not in str(exc):
                    raise
                last_error = exc
                continue
            self._created = True
            try:
                self._configure()
            except BaseException:
                self.delete()
                raise
            return self
        raise NetnsError(f"no free namespace index: {last_error}")

    def _free_indexes(self) -> list[int]:
        used = set()
        for line in _run(["ip", "netns", "list"]).splitlines():
            match = _NS_RE.match(line.split()[0]) if line.strip() else None
            if match:
                used.add(int(match.group(1)))
        addrs = _run(["ip", "-o", "addr", "show"])
        used.update(int(n) for n in re.findall(r"10\.77\.(\d+)\.", addrs))
        return [n for n in range(1, 255) if n not in used]

    def _configure(self) -> None:
        host, peer, ns = self.host_dev, self.ns_dev, self.name
        _run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns])
        _run(["ip", "addr", "add", f"{self.host_addr}/30", "dev", host])
        _run(["ip", "link", "set", host, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.ns_addr}/30", "dev", peer])
        _run(["ip", "-n", ns, "link", "set", peer, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def exec_args(self, argv: Sequence[str]) -> list[str]:
        """Command line that runs ``argv`` inside the namespace."""
        self._require()
        return ["ip", "netns", "exec", self.name, *argv]

    def apply_rate(
        self,
        rate_bps: int,
        *,
        burst: int | None = None,
        latency_ms: float = 300.0,
        direction: Direction = "both",
    ) -> None:
        """tbf on the host end ("down": into the namespace) and/or the namespace end ("up")."""
        self._require()
        if direction in ("both", "down"):
            apply_rate(self.host_dev, rate_bps, burst=burst, latency_ms=latency_ms)
        if direction in ("both", "up"):
            apply_rate(self.ns_dev, rate_bps, burst=burst, latency_ms=latency_ms, netns=self.name)

    def clear_rate(self, *, direction: Direction = "both") -> None:
        self._require()
        if direction in ("both", "down"):
            clear_rate(self.host_dev)
        if direction in ("both", "up"):
            clear_rate(self.ns_dev, netns=self.name)

    def delete(self) -> None:
        """Remove the veth pair and the namespace; safe to call twice."""
        if not self._created:
            return
        self._created = False
        # Deleting the host end removes its peer; deleting the namespace would too.
        with contextlib.suppress(NetnsError):
            _run(["ip", "link", "del", self.host_dev])
        with contextlib.suppress(NetnsError):
            _run(["ip", "netns", "del", self.name])

    def _require(self) -> None:
        if not self._created:
            raise NetnsError(f"{self!r} does not exist; call create() or use it with `with`")

    def __enter__(self) -> ShapedNamespace:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()
