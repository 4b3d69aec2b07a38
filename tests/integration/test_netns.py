"""Kernel shaping: a veth into a network namespace with a tbf rate limit.

Needs root and iproute2 (``ip netns``, ``tc``); skipped with the reason otherwise.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from media_server.linkemu import ShapedNamespace, apply_rate, available, clear_rate

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not available(), reason="needs root, iproute2 `ip netns` and the tbf qdisc"),
]

# Tiny TCP/UDP peers, run as separate processes (some inside the namespace).
#   sink HOST PORT       accept one TCP connection, read to EOF, reply the byte count
#   send HOST PORT N     send N bytes, wait for the reply, print seconds taken
#   echo HOST PORT       answer one UDP datagram with the same bytes
PEER = r"""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "sink":
    srv = socket.create_server((host, port))
    print("ready", flush=True)
    conn, _ = srv.accept()
    total = 0
    while chunk := conn.recv(65536):
        total += len(chunk)
    conn.sendall(str(total).encode())
    conn.close()
elif mode == "send":
    payload = b"k" * int(sys.argv[4])
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=20) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        assert int(conn.recv(64)) == len(payload)
    print(time.monotonic() - start, flush=True)
elif mode == "echo":
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print("ready", flush=True)
    data, addr = sock.recvfrom(2048)
    sock.sendto(data, addr)
"""

PORT = 47311
SIZE = 125_000  # 1 Mbit: one second at 1 Mbit/s


def peer(args: list[str], ns: ShapedNamespace | None = None) -> list[str]:
    argv = [sys.executable, "-c", PEER, *args]
    return ns.exec_args(argv) if ns is not None else argv


def transfer_seconds(sink_cmd: list[str], send_cmd: list[str]) -> float:
    with subprocess.Popen(sink_cmd, stdout=subprocess.PIPE, text=True) as sink:
        try:
            assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            out = subprocess.run(send_cmd, capture_output=True, text=True, timeout=30, check=True)
            return float(out.stdout)
        finally:
            sink.kill()


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_udp_echo_between_host_and_namespace() -> None:
    with ShapedNamespace() as ns:
        assert ns.name in namespaces()
        cmd = peer(["echo", ns.ns_addr, str(PORT)], ns)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as echo:
            try:
                assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(5)
                    sock.bind((ns.host_addr, 0))
                    start = time.monotonic()
                    sock.sendto(b"hello clinic", (ns.ns_addr, PORT))
                    data, addr = sock.recvfrom(2048)
                    rtt = time.monotonic() - start
            finally:
                echo.kill()
        assert (data, addr) == (b"hello clinic", (ns.ns_addr, PORT))
        assert rtt < 0.05
    assert ns.name not in namespaces()


def test_tbf_limits_throughput_both_ways() -> None:
    with ShapedNamespace() as ns:
        into_ns = (
            peer(["sink", ns.ns_addr, str(PORT)], ns),
            peer(["send", ns.ns_addr, str(PORT), str(SIZE)]),
        )
        out_of_ns = (
            peer(["sink", ns.host_addr, str(PORT)]),
            peer(["send", ns.host_addr, str(PORT), str(SIZE)], ns),
        )

        unshaped = transfer_seconds(*into_ns)
        assert unshaped < 0.3

        apply_rate(ns, 1_000_000)
        down = transfer_seconds(*into_ns)
        up = transfer_seconds(*out_of_ns)
        # 125 kB at 1 Mbit/s = 1.0 s, plus TCP/IP headers, minus the bucket.
        assert 0.85 < down < 1.4, down
        assert 0.85 < up < 1.4, up

        clear_rate(ns, direction="down")
        assert transfer_seconds(*into_ns) < 0.3
        clear_rate(ns)  # no qdisc left on the host end: must not fail


def test_namespace_is_removed_even_when_the_body_fails() -> None:
    ns = ShapedNamespace()
    with pytest.raises(RuntimeError, match="boom"), ns:
        assert ns.name in namespaces()
        raise RuntimeError("boom")
    assert ns.name not in namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"{ns.host_dev}@" not in links
    ns.delete()  # idempotent
