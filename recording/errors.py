"""The base class of the recording package's errors (its own module: no import cycles)."""

from __future__ import annotations


class RecordingError(Exception):
    """Base class of the recording package's errors."""
