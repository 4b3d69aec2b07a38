"""Two real aiortc peers prove every hook end to end: packets, PLI, feedback taps."""

from __future__ import annotations

import asyncio

from aiortc import RTCPeerConnection

from media_server import hooks
from media_server.bot import ClipTrack
from media_server.clip import Clip
from media_server.packet import MediaPacket, is_vp8_keyframe
from media_server.rtc import prefer_forwardable_codecs, rtc_configuration


async def test_passthrough_delivers_packets_and_pli_reaches_the_sender(clip: Clip) -> None:
    hooks.install_passthrough()
    sender_pc = RTCPeerConnection(rtc_configuration())
    receiver_pc = RTCPeerConnection(rtc_configuration())
    video = ClipTrack("video", clip.video, 1 / clip.fps, 90000 // clip.fps)
    transceiver = sender_pc.addTransceiver(video, direction="sendonly")
    prefer_forwardable_codecs(transceiver)
    requests: list[int] = []
    hooks.tap_sender(
        transceiver.sender,
        hooks.SenderFeedback(on_keyframe_request=lambda: requests.append(1)),
    )
    received: list[object] = []
    got_track: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    receiver_pc.on("track", lambda t: got_track.done() or got_track.set_result(t))
    try:
        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)
        track = await asyncio.wait_for(got_track, 10)
        for _ in range(40):
            received.append(await asyncio.wait_for(track.recv(), 5))  # type: ignore[attr-defined]
        packets = [p for p in received if isinstance(p, MediaPacket)]
        assert len(packets) == 40, "passthrough decoder hook did not yield MediaPackets"
        assert packets[0].keyframe and is_vp8_keyframe(packets[0].data)
        assert all(p.kind == "video" for p in packets)
        # the payload is the publisher's VP8 frame, byte for byte
        sent = {p.data for p in clip.video}
        assert all(p.data in sent for p in packets)
        # keyframe request from the receiving side reaches the sender's tap
        receiver = receiver_pc.getTransceivers()[0].receiver
        assert hooks.media_ssrcs(receiver), "no publisher SSRC seen"
        assert hooks.send_pli(receiver)
        for _ in range(50):
            if requests:
                break
            await asyncio.sleep(0.05)
        assert requests, "PLI sent through the receiver hook never reached the sender tap"
    finally:
        await sender_pc.close()
        await receiver_pc.close()
