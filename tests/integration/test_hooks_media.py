"""Two real aiortc peers prove every hook end to end: packets, PLI, feedback taps."""

from __future__ import annotations

import asyncio

from aiortc import MediaStreamTrack, RTCPeerConnection

from media_server import hooks
from media_server.bot import ClipTrack
from media_server.clip import Clip
from media_server.linkemu import LinkEmulator, LinkProfile, attach_to_peer_connection
from media_server.packet import MediaPacket, is_vp8_keyframe
from media_server.rtc import prefer_forwardable_codecs, rtc_configuration


class VideoPair:
    """A sender pc with the clip's video and a receiver pc, not yet connected."""

    def __init__(self, clip: Clip, link: LinkEmulator | None = None) -> None:
        hooks.install_passthrough()
        self.sender_pc = RTCPeerConnection(rtc_configuration())
        self.receiver_pc = RTCPeerConnection(rtc_configuration())
        if link is not None:
            attach_to_peer_connection(self.receiver_pc, link)  # before gathering
        video = ClipTrack("video", clip.video, 1 / clip.fps, 90000 // clip.fps)
        self.transceiver = self.sender_pc.addTransceiver(video, direction="sendonly")
        prefer_forwardable_codecs(self.transceiver)
        self._track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

        @self.receiver_pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if not self._track.done():
                self._track.set_result(track)

    async def connect(self) -> MediaStreamTrack:
        """Offer/answer; returns the receiver's remote track."""
        sender_pc, receiver_pc = self.sender_pc, self.receiver_pc
        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)
        return await asyncio.wait_for(self._track, 10)

    async def close(self) -> None:
        await self.sender_pc.close()
        await self.receiver_pc.close()


async def test_passthrough_delivers_packets_and_pli_reaches_the_sender(clip: Clip) -> None:
    pair = VideoPair(clip)
    transceiver, receiver_pc = pair.transceiver, pair.receiver_pc
    requests: list[int] = []
    hooks.tap_sender(
        transceiver.sender,
        hooks.SenderFeedback(on_keyframe_request=lambda: requests.append(1)),
    )
    received: list[object] = []
    try:
        track = await pair.connect()
        for _ in range(40):
            received.append(await asyncio.wait_for(track.recv(), 5))
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
        await pair.close()


async def test_repeated_packets_reach_the_receiver_twice_and_its_frames_once(clip: Clip) -> None:
    """repeat_packets: every packet goes again on the RTX stream; the receiver keeps one."""
    pair = VideoPair(clip)
    transceiver, receiver_pc = pair.transceiver, pair.receiver_pc
    copies: list[int] = []
    try:
        track = await pair.connect()
        hooks.repeat_packets(transceiver.sender, 2, spacing_s=0.01, on_copy=copies.append)
        assert hooks.repeated_copies(transceiver.sender) == 2
        packets: list[MediaPacket] = []
        while len(packets) < 60:
            item = await asyncio.wait_for(track.recv(), 5)
            if isinstance(item, MediaPacket):
                packets.append(item)
        pts = [p.pts for p in packets]
        assert pts == sorted(set(pts)), "a repeated packet became a second frame"
        assert len(copies) >= 50, f"only {len(copies)} copies went out"
        assert all(n > 28 for n in copies)  # each counted with its headers
        # the copies arrived as RTX (their own SSRC) as often as the originals
        receiver = receiver_pc.getTransceivers()[0].receiver
        streams = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]  # observe only
        media = set(hooks.media_ssrcs(receiver))
        counts = {ssrc: s.packets_received for ssrc, s in streams.items()}
        rtx = [n for ssrc, n in counts.items() if ssrc not in media]
        assert rtx and rtx[0] >= 0.8 * sum(counts[s] for s in media), counts
        # one copy again: nothing more is repeated
        hooks.repeat_packets(transceiver.sender, 1)
        assert hooks.repeated_copies(transceiver.sender) == 1
        await asyncio.sleep(0.1)
        before = len(copies)
        for _ in range(15):
            await asyncio.wait_for(track.recv(), 5)
        assert len(copies) == before
    finally:
        await pair.close()


async def test_round_trip_samples_keep_coming_when_the_round_trip_exceeds_the_sr_interval(
    clip: Clip,
) -> None:
    """A 1.6 s round trip: a block rarely answers the sender's latest SR (sent every
    0.5-1.5 s), so the tap must remember earlier SRs to give each block's sample."""
    long_link = LinkProfile(
        "long", rate_bps=None, rtt_ms=1600.0, jitter_ms=0.0, loss=0.0, queue_ms=0.0
    )
    pair = VideoPair(clip, LinkEmulator(long_link, seed=1))
    samples: list[float] = []

    def on_report(report: hooks.ReceiverReport) -> None:
        if report.rtt_sample_s is not None:
            samples.append(report.rtt_sample_s)

    hooks.tap_sender(
        pair.transceiver.sender,
        hooks.SenderFeedback(on_keyframe_request=lambda: None, on_report=on_report),
    )
    try:
        track = await pair.connect()
        await asyncio.wait_for(track.recv(), 20)  # media flows (ICE takes round trips)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10.0
        while loop.time() < end:  # keep the receiver reading, so it reports
            await asyncio.wait_for(track.recv(), 5)
        # the receiver reports every 0.5-1.5 s; matching only the latest SR gave none
        assert len(samples) >= 5, f"only {len(samples)} round-trip samples in 10 s"
        assert all(1.5 <= s <= 1.9 for s in samples), samples
    finally:
        await pair.close()
