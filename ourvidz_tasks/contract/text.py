"""``as_text``: the one bytes -> str conversion for values read from Redis (and other raw input)."""

from __future__ import annotations


def as_text(value: object) -> str:
    """``value`` as text: bytes decoded as UTF-8 (undecodable bytes replaced), anything else ``str()``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
