"""The session and context every secure key is bound to, so no mask is ever used twice.

A session is drawn at every process start: each peer contributes 16 fresh random bytes,
an all-gather gives everyone all of them, and the session is their hash, so no single
party chooses it and a restart or a second run with the same keys never repeats one. A
context names one secure exchange: (session, purpose, round, step, receiver).
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from p2pfed.secure.fixedpoint import SecureError

SESSION_SIZE = 16
_SESSION_LABEL = b"p2pfed session v1"
_CONTEXT_LABEL = b"p2pfed context v1"


class Purpose(IntEnum):
    """Why an exchange happens; part of every key derivation and of the signed header."""

    TRAIN = 0
    """The gossip step of a training round."""
    CONSENSUS = 1
    """An extra gossip step taken by consensus control within a round."""
    PROBE = 2
    """A benchmark probe of the exchange after the last round."""
    MONITOR = 3
    """A masked all-reduce of consensus monitoring."""


class Gathers(Protocol):
    """The one collective a session needs."""

    world_size: int

    def all_gather_bytes(self, data: bytes, max_length: int | None = None) -> list[bytes]: ...


def establish_session(transport: Gathers) -> bytes:
    """SHA-256 of every peer's fresh nonce, truncated to 16 bytes; the same on every peer."""
    nonces = transport.all_gather_bytes(secrets.token_bytes(SESSION_SIZE), max_length=SESSION_SIZE)
    for rank, nonce in enumerate(nonces):
        if len(nonce) != SESSION_SIZE:
            raise SecureError(f"peer {rank} sent a session nonce of {len(nonce)} bytes, expected {SESSION_SIZE}", "session")
    return hashlib.sha256(_SESSION_LABEL + b"".join(nonces)).digest()[:SESSION_SIZE]


@dataclass(frozen=True)
class Context:
    """One secure exchange: whose sum (receiver), when (round, step), why (purpose), which session."""

    session: bytes
    purpose: int
    round: int
    step: int
    receiver: int

    def encode(self) -> bytes:
        """Canonical bytes for key derivation, associated data and consent signatures."""
        return _CONTEXT_LABEL + self.session + struct.pack("<HIII", self.purpose, self.round, self.step, self.receiver)
