"""Link emulator on real aiortc peer connections over loopback.

A data-channel ping-pong measures the round trip a user would feel. One pair
goes through a ``satellite`` emulator, a second pair in the same process must
not be affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

from media_server.linkemu import LinkEmulator, attach_to_peer_connection, attached_emulator

pytestmark = pytest.mark.timeout(60)


@dataclass
class Pair:
    client: RTCPeerConnection
    server: RTCPeerConnection
    channel: RTCDataChannel  # the client's end

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()


async def connect_pair(emulator: LinkEmulator | None = None) -> Pair:
    """Client offers a data channel; server echoes every message back."""
    config = RTCConfiguration(iceServers=[])
    client, server = RTCPeerConnection(config), RTCPeerConnection(config)
    if emulator is not None:
        attach_to_peer_connection(client, emulator)  # before gathering
    channel = client.createDataChannel("ping", ordered=False, maxRetransmits=0)
    opened = asyncio.Event()
    channel.on("open", opened.set)

    @server.on("datachannel")
    def on_datachannel(remote: RTCDataChannel) -> None:
        remote.on("message", remote.send)

    await client.setLocalDescription(await client.createOffer())
    await server.setRemoteDescription(client.localDescription)
    await server.setLocalDescription(await server.createAnswer())
    await client.setRemoteDescription(server.localDescription)
    await asyncio.wait_for(opened.wait(), timeout=20)
    return Pair(client, server, channel)


async def median_rtt_ms(channel: RTCDataChannel, count: int = 8, spacing: float = 0.05) -> float:
    """Send `count` pings `spacing` apart, return the median round trip in ms.

    The channel is unordered without retransmissions, so a lost ping is simply
    missing instead of holding the others back (SCTP head-of-line blocking).
    Pings not answered within a second of the last one are given up.
    """
    loop = asyncio.get_running_loop()
    sent: dict[str, float] = {}
    rtts: list[float] = []
    all_back = asyncio.Event()
    tag = f"{loop.time():.6f}"

    def on_message(message: str | bytes) -> None:
        key = message if isinstance(message, str) else message.decode()
        if key in sent:
            rtts.append((loop.time() - sent.pop(key)) * 1000)
            if len(rtts) == count:
                all_back.set()

    channel.on("message", on_message)
    try:
        for i in range(count):
            key = f"{tag}:{i}"
            sent[key] = loop.time()
            channel.send(key)
            await asyncio.sleep(spacing)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_back.wait(), timeout=1.0)
    finally:
        channel.remove_listener("message", on_message)
    assert len(rtts) > count // 2, f"only {len(rtts)} of {count} pings came back"
    return statistics.median(rtts)


@pytest.fixture
async def plain_pair() -> AsyncIterator[Pair]:
    pair = await connect_pair()
    yield pair
    await pair.close()


async def test_satellite_emulator_adds_its_rtt_to_one_pc_only(plain_pair: Pair) -> None:
    emulator = LinkEmulator("satellite", seed=11, name="feldsher")
    sat = await connect_pair(emulator)  # ICE, DTLS and SCTP all over the satellite link
    try:
        assert attached_emulator(plain_pair.client) is None

        satellite_rtt, plain_rtt = await asyncio.gather(
            median_rtt_ms(sat.channel), median_rtt_ms(plain_pair.channel)
        )
        # the emulator adds 600 ms; the shared test process's own loop latency may add
        # up to ~150 ms more late in a long suite, but a doubled delay would still fail
        assert 550 <= satellite_rtt <= 800, satellite_rtt
        assert plain_rtt < 50

        stats = emulator.stats()
        assert stats.up.delivered > 10 and stats.down.delivered > 10  # both directions
        assert stats.up.sent >= stats.up.delivered

        emulator.set_profile("lan")
        await asyncio.sleep(0.4)  # let packets already in flight arrive
        lan_rtt = await median_rtt_ms(sat.channel)
        assert lan_rtt < 50
    finally:
        emulator.close()
        await sat.close()


async def test_attach_after_connecting_takes_effect(plain_pair: Pair) -> None:
    before = await median_rtt_ms(plain_pair.channel, count=4)
    emulator = LinkEmulator("satellite", seed=12)
    attach_to_peer_connection(plain_pair.client, emulator)
    attach_to_peer_connection(plain_pair.client, emulator)  # idempotent
    with pytest.raises(ValueError):
        attach_to_peer_connection(plain_pair.client, LinkEmulator("lan"))
    try:
        after = await median_rtt_ms(plain_pair.channel)
        assert before < 50
        assert 550 <= after <= 800, after
    finally:
        emulator.close()
