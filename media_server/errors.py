"""Typed errors raised by the media layer; signalling maps them to protocol error codes."""


class MediaError(Exception):
    code = "internal"


class BadSdp(MediaError):
    code = "bad_sdp"


class NegotiationError(MediaError):
    code = "bad_sdp"
