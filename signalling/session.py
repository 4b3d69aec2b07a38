"""One participant's WebSocket: authenticate, then dispatch protocol messages."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from media_server.errors import MediaError

from .auth import AuthError, Grant, TokenAuthority
from .errors import KonsiliumError
from .liveness import CHECK_EVERY_S, Liveness, Verdict
from .protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ClientMessage,
    Consent,
    Join,
    Leave,
    Mute,
    Ping,
    ProtocolError,
    PublishOffer,
    RecordingStart,
    RecordingStop,
    SubscribeAnswer,
    error_message,
    parse_message,
)
from .rooms import Participant, RoomRegistry
from .store import AuditEvent, Store

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0
MAX_BAD_MESSAGES = 10
CLOSE_BAD_INPUT = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TIMEOUT = 4408
CLOSE_LINK_LOST = 4410
CLOSE_WAIT_S = 2.0  # how long a close waits for the peer's close frame

_AUTH_CLOSE = {"wrong_room": CLOSE_FORBIDDEN, "forbidden": CLOSE_FORBIDDEN}
_session_ids = itertools.count(1)


class Session:
    """Implements rooms.Connection for one WebSocket."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        registry: RoomRegistry,
        tokens: TokenAuthority,
        store: Store,
    ) -> None:
        self.ws = ws
        self.registry = registry
        self.tokens = tokens
        self.store = store
        self.label = f"ws#{next(_session_ids)}"
        self.participant: Participant | None = None
        self._send_lock = asyncio.Lock()
        self._bad_messages = 0
        self._leave_reason = "disconnected"
        self._closing: asyncio.Future[bool] | None = None
        self.liveness = Liveness(time.monotonic(), self._media_packets)

    def __repr__(self) -> str:
        return f"Session({self.label})"

    # -- rooms.Connection -------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_json(message)

    async def kick(self, code: str, message: str, close_code: int) -> None:
        self._leave_reason = code
        await self.send(error_message(code, message))
        await self.ws.close(code=close_code, message=code.encode())

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        try:
            join = await self._await_join()
            if join is None:
                return
            if not await self._authenticate(join):
                return
            watchdog = asyncio.create_task(self._watch(), name=f"{self.label} liveness")
            try:
                await self._loop()
            finally:
                watchdog.cancel()
        finally:
            participant, self.participant = self.participant, None
            if participant is not None:
                await self.registry.leave(participant, self._leave_reason, self)
            if not self.ws.closed:
                await self.ws.close()

    async def _await_join(self) -> Join | None:
        try:
            # an overall deadline: aiohttp restarts receive(timeout) on every heartbeat pong
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                msg = await self.ws.receive()
                while await self._control(msg):
                    msg = await self.ws.receive()
        except TimeoutError:
            await self.kick("join_timeout", "no join message within 10 s", CLOSE_TIMEOUT)
            return None
        if msg.type != WSMsgType.TEXT:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return None
            await self.kick("bad_message", "expected a JSON text message", CLOSE_BAD_INPUT)
            return None
        try:
            parsed = parse_message(msg.data)
        except ProtocolError as exc:
            await self.kick(exc.code, exc.message, CLOSE_BAD_INPUT)
            return None
        if not isinstance(parsed, Join):
            await self.kick("not_joined", "the first message must be 'join'", CLOSE_UNAUTHENTICATED)
            return None
        if parsed.v != PROTOCOL_VERSION:
            await self.kick(
                "unsupported_version",
                f"protocol version {PROTOCOL_VERSION} is supported",
                CLOSE_BAD_INPUT,
            )
            return None
        return parsed

    async def _authenticate(self, join: Join) -> bool:
        try:
            claims = self.tokens.verify(join.token, room=join.room, require=Grant.JOIN)
        except AuthError as exc:
            logger.info("%r: join refused for room %s: %s", self, join.room, exc.code)
            await self._audit("anonymous", "join_refused", join.room, exc.code)
            await self.kick(exc.code, exc.message, _AUTH_CLOSE.get(exc.code, CLOSE_UNAUTHENTICATED))
            return False
        self.label = f"{self.label}:{claims.sub}"
        self.participant = await self.registry.join(claims, self, self._media_failed)
        await self._audit(claims.sub, "join", claims.room, "ok")
        return True

    def _media_failed(self) -> None:
        """The publisher's peer connection failed: treat the participant as gone."""
        self._leave_reason = "disconnected"
        self._closing = asyncio.ensure_future(
            self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"media failed")
        )

    async def _control(self, msg: WSMessage) -> bool:
        """A sign of life; answers pings (autoping is off). True for ping/pong frames."""
        self.liveness.heard(time.monotonic())
        if msg.type == WSMsgType.PING:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.pong(msg.data)
            return True
        return msg.type == WSMsgType.PONG

    def _media_packets(self) -> int:
        participant = self.participant
        media = participant.media if participant is not None else None
        return media.packets_received() if media is not None else 0

    async def _watch(self) -> None:
        """Close the socket of a link that stopped answering (see signalling.liveness)."""
        while not self.ws.closed:
            await asyncio.sleep(CHECK_EVERY_S)
            now = time.monotonic()
            verdict = self.liveness.check(now)
            if verdict is Verdict.PING:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.ping()
            elif verdict is Verdict.DEAD:
                logger.info(
                    "%r: link lost: nothing on the websocket for %.1f s",
                    self,
                    self.liveness.silence(now),
                )
                self._leave_reason = "disconnected"
                await self.ws.close(code=CLOSE_LINK_LOST, message=b"link lost")
                return

    async def _loop(self) -> None:
        async for msg in self.ws:
            if await self._control(msg):
                continue
            if msg.type == WSMsgType.TEXT:
                if not await self._handle_text(msg.data):
                    break
            elif msg.type == WSMsgType.BINARY:
                if not await self._bad(ProtocolError("binary messages are not supported")):
                    break
            elif msg.type == WSMsgType.ERROR:
                logger.info("%r: websocket error: %r", self, self.ws.exception())
                break

    async def _handle_text(self, data: str) -> bool:
        try:
            message = parse_message(data)
        except ProtocolError as exc:
            return await self._bad(exc)
        try:
            return await self._dispatch(message)
        except ProtocolError as exc:
            return await self._bad(exc)
        except MediaError as exc:
            await self.send(error_message(exc.code, str(exc), _ref(message)))
            return True
        except KonsiliumError as exc:
            await self.send(error_message(exc.code, exc.message, _ref(message)))
            return True
        except Exception:
            logger.exception("%r: failed to handle %s", self, _ref(message))
            await self.send(error_message("internal", "the server could not handle this message"))
            return True

    async def _bad(self, exc: ProtocolError) -> bool:
        self._bad_messages += 1
        await self.send(error_message(exc.code, exc.message, exc.ref))
        if self._bad_messages >= MAX_BAD_MESSAGES:
            logger.info("%r: too many bad messages, disconnecting", self)
            self._leave_reason = "disconnected"
            await self.ws.close(code=CLOSE_BAD_INPUT, message=b"too many bad messages")
            return False
        return True

    async def _dispatch(self, message: ClientMessage) -> bool:
        participant = self.participant
        assert participant is not None
        if isinstance(message, PublishOffer):
            if not participant.claims.has(Grant.PUBLISH):
                raise ProtocolError(
                    "this token may not publish", code="forbidden", ref="publish_offer"
                )
            assert participant.media is not None
            answer = await participant.media.publish(message.sdp, message.sources)
            await self.send({"type": "publish_answer", "sdp": answer})
        elif isinstance(message, SubscribeAnswer):
            if participant.media is None or participant.media.subscriber is None:
                raise ProtocolError(
                    "this token may not subscribe", code="forbidden", ref="subscribe_answer"
                )
            await participant.media.subscribe_answer(message.sdp)
        elif isinstance(message, Mute):
            await self.registry.set_muted(participant, message.source, message.muted)
        elif isinstance(message, Ping):
            reply: dict[str, Any] = {"type": "pong"}
            if message.ts is not None:
                reply["ts"] = message.ts
            await self.send(reply)
        elif isinstance(message, RecordingStart | RecordingStop):
            await self._recording(participant, message)
        elif isinstance(message, Consent):
            await self.registry.recording_consent(participant, message.granted)
        elif isinstance(message, Leave):
            self._leave_reason = "left"
            await self.ws.close()
            return False
        elif isinstance(message, Join):
            raise ProtocolError("already joined", ref="join")
        return True

    async def _recording(
        self, participant: Participant, message: RecordingStart | RecordingStop
    ) -> None:
        ref = _ref(message)
        room = participant.claims.room
        if not participant.claims.has(Grant.RECORD):
            await self._audit(participant.id, ref, room, "forbidden")
            raise ProtocolError("this token may not record", code="forbidden", ref=ref)
        if isinstance(message, RecordingStart):
            await self.registry.start_recording(
                room,
                started_by=participant.id,
                consultation_id=message.consultation_id,
                patient_ref=message.patient_ref,
            )
        else:
            await self.registry.stop_recording(room, by=participant.id)

    async def _audit(self, actor: str, action: str, target: str, outcome: str) -> None:
        try:
            await self.store.append_audit(
                AuditEvent(
                    at=time.time(),
                    actor=actor,
                    action=action,
                    target=target,
                    outcome=outcome,
                    detail={},
                )
            )
        except Exception:
            logger.exception("%r: audit write failed", self)


def _ref(message: ClientMessage) -> str:
    return {
        Join: "join",
        PublishOffer: "publish_offer",
        SubscribeAnswer: "subscribe_answer",
        Mute: "mute",
        Leave: "leave",
        Ping: "ping",
        RecordingStart: "recording_start",
        RecordingStop: "recording_stop",
        Consent: "consent",
    }[type(message)]


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    from .appkeys import ROOMS, STORE, TOKENS

    # no aiohttp heartbeat: it drops a link whose pong is 1.5 s late (see signalling.liveness)
    ws = web.WebSocketResponse(autoping=False, timeout=CLOSE_WAIT_S, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    session = Session(ws, request.app[ROOMS], request.app[TOKENS], request.app[STORE])
    await session.run()
    return ws
