"""Put a :class:`LinkEmulator` on all UDP traffic of one aiortc RTCPeerConnection.

Every hook into aiortc/aioice private API used by the link emulator lives in
this module. They are checked by :func:`check_hooks` (called by
:func:`attach_to_peer_connection` and by a test), which raises ``RuntimeError``
when the internals it relies on changed; aiortc is pinned to 1.16.* and
aioice is the version it pulls in (0.13 when this was written).

How it works: each aioice ``Connection`` (one per ICE transport of the pc) owns
one ``StunProtocol`` per local candidate in ``Connection._protocols``. For each
of those we replace, on that instance only,

* ``protocol.transport.sendto`` -> ``emulator.up`` -> the real ``sendto``;
* ``protocol.datagram_received`` -> ``emulator.down`` -> the real handler.

Everything the connection sends or receives goes through those two points:
STUN connectivity checks and consent refreshes (realistic: they see the same
link), DTLS, SRTP/SRTCP and SCTP. Not emulated: server-reflexive discovery
queries made while gathering, and TURN allocation/refresh traffic of relay
candidates (it runs on aioice's inner TURN client socket).

Protocols only exist once the pc has gathered candidates (inside
``setLocalDescription``), so the pc's private ``__gather`` coroutine is wrapped,
on that pc instance only, to wrap the new protocols as soon as gathering
returns and before any peer can know the candidates. Protocols that already
exist when attaching are wrapped immediately, so attaching works before or
after gathering. Other peer connections in the process are untouched.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from aioice.ice import Connection, StunProtocol
from aiortc import RTCPeerConnection
from aiortc.rtcicetransport import RTCIceTransport

from .emulator import Address, LinkEmulator

__all__ = ["attach_to_peer_connection", "attached_emulator", "check_hooks"]

logger = logging.getLogger(__name__)

# aiortc RTCPeerConnection private (name-mangled) attributes:
# - ``__iceTransports``: set[RTCIceTransport], all ICE transports of the pc.
# - ``__gather()``: coroutine awaited by ``setLocalDescription`` that gathers
#   candidates for every ICE transport of the pc.
_PC_ICE_TRANSPORTS = "_RTCPeerConnection__iceTransports"
_PC_GATHER = "_RTCPeerConnection__gather"
# Our own marks, set on the instances we hook.
_PC_MARK = "_konsilium_linkemu"
_PROTOCOL_MARK = "_konsilium_linkemu"


def check_hooks() -> None:
    """Raise ``RuntimeError`` if the aiortc/aioice internals we hook have changed.

    Cheap (inspects code objects, creates nothing); called on every attach.
    """
    problems: list[str] = []

    def uses(func: Any, name: str, what: str) -> None:
        code = getattr(inspect.unwrap(func), "__code__", None)
        if code is None or name not in code.co_names:
            problems.append(what)

    # aiortc.RTCPeerConnection: ICE transports set, and the gather coroutine
    # awaited by setLocalDescription.
    uses(RTCPeerConnection.__init__, _PC_ICE_TRANSPORTS, "RTCPeerConnection.__iceTransports")
    gather = getattr(RTCPeerConnection, _PC_GATHER, None)
    if gather is None or not inspect.iscoroutinefunction(gather):
        problems.append("RTCPeerConnection.__gather() coroutine")
    else:
        uses(gather, _PC_ICE_TRANSPORTS, "RTCPeerConnection.__gather() over __iceTransports")
    uses(
        RTCPeerConnection.setLocalDescription,
        _PC_GATHER,
        "RTCPeerConnection.setLocalDescription() awaiting __gather()",
    )
    # aiortc.RTCIceTransport._connection: the aioice Connection.
    uses(RTCIceTransport.__init__, "_connection", "RTCIceTransport._connection")
    # aioice.ice.Connection._protocols: one StunProtocol per local candidate,
    # filled while gathering.
    uses(Connection.__init__, "_protocols", "aioice Connection._protocols")
    uses(
        Connection.get_component_candidates,
        "_protocols",
        "aioice Connection.get_component_candidates() filling _protocols",
    )
    # aioice.ice.StunProtocol: sends only through self.transport.sendto and
    # receives through datagram_received (called by asyncio / TurnClient).
    uses(StunProtocol.send_data, "sendto", "aioice StunProtocol.send_data() -> transport.sendto")
    uses(StunProtocol.send_stun, "sendto", "aioice StunProtocol.send_stun() -> transport.sendto")
    # media_server.hooks.enlarge_udp_buffers may wrap connection_made: look at the original
    connection_made = (
        getattr(StunProtocol, "_konsilium_original_connection_made", None)
        or StunProtocol.connection_made
    )
    uses(connection_made, "transport", "aioice StunProtocol.transport")
    if not callable(getattr(StunProtocol, "datagram_received", None)):
        problems.append("aioice StunProtocol.datagram_received()")

    if problems:
        raise RuntimeError(
            "media_server.linkemu.attach: aiortc/aioice internals changed, the link "
            "emulator hooks would not see the traffic; update attach.py. Missing: "
            + "; ".join(problems)
        )


def attach_to_peer_connection(pc: RTCPeerConnection, emulator: LinkEmulator) -> None:
    """Route all UDP traffic of ``pc`` through ``emulator`` (``up`` = what pc
    sends, ``down`` = what it receives). Call before or after gathering.

    Attaching the same emulator twice is a no-op; attaching a different one to
    an already attached pc raises ``ValueError`` (change the profile instead).
    Closing the emulator cuts the link: later packets are dropped.
    """
    check_hooks()
    current = attached_emulator(pc)
    if current is emulator:
        return
    if current is not None:
        raise ValueError(f"{pc!r} already has {current!r}; use set_profile() on it")
    _ice_transports(pc)  # fail now, not at gather time, if the attribute is missing
    setattr(pc, _PC_MARK, emulator)

    # aiortc private: RTCPeerConnection.__gather, wrapped on this instance only.
    original_gather: Callable[[], Awaitable[None]] = getattr(pc, _PC_GATHER)

    async def gather_then_wrap() -> None:
        await original_gather()
        _wrap_pc(pc, emulator)

    setattr(pc, _PC_GATHER, gather_then_wrap)
    _wrap_pc(pc, emulator)
    logger.debug("%r attached to %r", emulator, pc)


def attached_emulator(pc: RTCPeerConnection) -> LinkEmulator | None:
    """The emulator attached to ``pc``, if any."""
    found = getattr(pc, _PC_MARK, None)
    return found if isinstance(found, LinkEmulator) else None


def _ice_transports(pc: RTCPeerConnection) -> Iterable[RTCIceTransport]:
    # aiortc private: RTCPeerConnection.__iceTransports (set of RTCIceTransport).
    transports = getattr(pc, _PC_ICE_TRANSPORTS, None)
    if not isinstance(transports, set):
        raise RuntimeError(
            "media_server.linkemu.attach: RTCPeerConnection has no __iceTransports set; "
            "aiortc internals changed"
        )
    return tuple(transports)


def _wrap_pc(pc: RTCPeerConnection, emulator: LinkEmulator) -> None:
    for ice_transport in _ice_transports(pc):
        # aiortc private: RTCIceTransport._connection (aioice Connection);
        # aioice private: Connection._protocols (list of StunProtocol).
        connection = ice_transport._connection
        for protocol in list(connection._protocols):
            _wrap_protocol(protocol, emulator)


def _wrap_protocol(protocol: StunProtocol, emulator: LinkEmulator) -> None:
    if getattr(protocol, _PROTOCOL_MARK, None) is not None:
        return
    # aioice: StunProtocol.transport is set in connection_made; for host
    # candidates it is asyncio's datagram transport, for relay candidates
    # aioice's TurnTransport. Both accept instance attributes.
    transport = protocol.transport
    real_sendto: Callable[..., None] = transport.sendto
    real_received: Callable[..., None] = protocol.datagram_received
    is_closing: Callable[[], bool] = getattr(transport, "is_closing", lambda: False)

    def deliver_out(data: bytes, addr: Address) -> None:
        if not is_closing():
            real_sendto(data, addr)

    def deliver_in(data: bytes, addr: Address) -> None:
        if not is_closing():
            real_received(data, addr)

    def sendto(data: bytes, addr: Address = None) -> None:
        emulator.up.send(data, addr, deliver_out)

    def datagram_received(data: bytes | str, addr: tuple[Any, ...]) -> None:
        emulator.down.send(cast(bytes, data), addr, deliver_in)

    setattr(transport, "sendto", sendto)  # noqa: B010 - instance monkeypatch, on purpose
    setattr(protocol, "datagram_received", datagram_received)  # noqa: B010
    setattr(protocol, _PROTOCOL_MARK, emulator)
    logger.debug("%r wraps %r", emulator, protocol)
