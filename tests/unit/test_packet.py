"""What a frame costs on the wire (the adaptation's unit of account)."""

from __future__ import annotations

from media_server.packet import PACKET_OVERHEAD_BYTES, RTP_PAYLOAD_MAX, wire_bps, wire_bytes


def test_one_packet_frames_pay_one_header() -> None:
    assert wire_bytes(80) == 80 + PACKET_OVERHEAD_BYTES  # one Opus frame


def test_large_frames_are_split_into_packets() -> None:
    size = 3 * RTP_PAYLOAD_MAX + 10  # four packets
    assert wire_bytes(size) == size + 4 * PACKET_OVERHEAD_BYTES


def test_opus_at_32_kbits_costs_about_56_on_the_wire() -> None:
    assert 52_000 <= wire_bps(32_000, 50) <= 60_000


def test_headers_matter_little_for_a_large_video() -> None:
    assert 500_000 < wire_bps(500_000, 30) < 540_000
