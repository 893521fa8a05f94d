"""The envelope every gossip message travels in: a fixed binary header plus the payload.

The header is canonical (fixed-width little-endian fields, a version byte, the payload's
SHA-256), so it can be signed as-is. Parsing is strict and never raises anything but
`WireError`, whose `reason` is a short word the metrics count.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

MAGIC = b"P2PF"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIIIIIQ32s")
HEADER_SIZE = _HEADER.size


class WireError(ValueError):
    """A message was refused; `reason` names why in one word (for counting)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """Who sent what to whom, for which round and gossip step."""

    sender: int
    receiver: int
    round: int
    step: int
    epoch: int
    codec: int
    payload_length: int
    digest: bytes


def seal(sender: int, receiver: int, round: int, step: int, epoch: int, codec: int, payload: bytes) -> bytes:
    """Serialise header + payload."""
    header = _HEADER.pack(MAGIC, VERSION, codec, 0, sender, receiver, round, step, epoch, len(payload), hashlib.sha256(payload).digest())
    return header + payload


def open_envelope(data: bytes, max_payload: int) -> tuple[Header, bytes]:
    """Parse and check framing and digest; lengths are checked before anything is read."""
    if len(data) < HEADER_SIZE:
        raise WireError("truncated", f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, codec, _, sender, receiver, round, step, epoch, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("malformed", "not a p2pfed envelope (bad magic)")
    if version != VERSION:
        raise WireError("version", f"protocol version {version}, expected {VERSION}")
    if length > max_payload:
        raise WireError("oversized", f"payload of {length} bytes exceeds the {max_payload} allowed")
    if len(data) != HEADER_SIZE + length:
        raise WireError("truncated", f"header announces {length} payload bytes, got {len(data) - HEADER_SIZE}")
    payload = data[HEADER_SIZE:]
    if hashlib.sha256(payload).digest() != digest:
        raise WireError("digest", "payload does not match its SHA-256 digest")
    return Header(sender, receiver, round, step, epoch, codec, length, digest), payload
