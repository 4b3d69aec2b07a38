"""A call over a satellite link must outlive aioice's consent checks (30 s without the hook)."""

from __future__ import annotations

import asyncio

from aiortc import RTCPeerConnection

from media_server import hooks
from media_server.linkemu import LinkEmulator, attach_to_peer_connection, get_profile
from media_server.rtc import rtc_configuration


async def test_a_satellite_connection_survives_consent_checks() -> None:
    hooks.patient_consent_checks()
    clinic = RTCPeerConnection(rtc_configuration())
    server = RTCPeerConnection(rtc_configuration())
    link = LinkEmulator(get_profile("satellite"), seed=3)
    attach_to_peer_connection(clinic, link)
    clinic.createDataChannel("keepalive")
    try:
        await clinic.setLocalDescription(await clinic.createOffer())
        await server.setRemoteDescription(clinic.localDescription)
        await server.setLocalDescription(await server.createAnswer())
        await clinic.setRemoteDescription(server.localDescription)
        for _ in range(100):
            if clinic.connectionState == "connected":
                break
            await asyncio.sleep(0.1)
        assert clinic.connectionState == "connected"
        # six failed checks ~5 s apart close an unpatched connection after ~30-35 s
        await asyncio.sleep(40)
        assert clinic.connectionState == "connected", "consent expired on a 600 ms RTT link"
        assert server.connectionState == "connected"
    finally:
        await clinic.close()
        await server.close()
        link.close()
