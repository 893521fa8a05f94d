"""Fault injection: a chosen peer corrupts what it sends, after the honest path built it.

The receivers' defences are exercised through the real code path (the same envelope,
transport and verifier); nothing is mocked. Each corrupted message is counted so a test
can check that every one was refused.
"""

from __future__ import annotations

import os
import random
import signal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfed.config import FaultSection
from p2pfed.identity import Identity
from p2pfed.secure.protocol import ABSTAIN
from p2pfed.wire import HEADER_STRUCT, OVERHEAD, seal


class FaultInjector:
    """Rewrites one peer's outgoing messages according to `kind`."""

    def __init__(self, section: FaultSection, identity: Identity, world_size: int, seed: int) -> None:
        self.kind = section.kind
        self.from_round = section.from_round
        self.until_round = section.until_round
        self.identity = identity
        self.world_size = world_size
        self.random = random.Random(seed)
        self.foreign = Ed25519PrivateKey.generate()  # a key no roster lists
        self.previous: dict[int, bytes] = {}
        self.injected = 0

    def maybe_crash(self, round: int, restart: int) -> None:
        """kind 'crash': die like `kill -9` at the start of `from_round`, the first time only."""
        if self.kind == "crash" and round == self.from_round and restart == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def corrupt(self, outgoing: dict[int, bytes], round: int) -> dict[int, bytes]:
        """Return the messages this peer really sends for metrics `round` (1-based)."""
        honest = dict(outgoing)
        if self.kind != "crash" and round >= self.from_round and (not self.until_round or round <= self.until_round):
            outgoing = {j: self._corrupt_one(j, m) for j, m in outgoing.items()}
            self.injected += sum(outgoing[j] != honest[j] for j in outgoing)
        self.previous = honest
        return outgoing

    def _corrupt_one(self, receiver: int, message: bytes) -> bytes:
        if self.kind == "flip":
            position = self.random.randrange(OVERHEAD, len(message)) if len(message) > OVERHEAD else self.random.randrange(len(message))
            return message[:position] + bytes([message[position] ^ (1 << self.random.randrange(8))]) + message[position + 1 :]
        if self.kind == "replay":
            return self.previous.get(receiver, message)
        header = list(HEADER_STRUCT.unpack_from(message))
        key = self.identity.signing
        if self.kind == "abstain":  # a well-formed, signed "I have nothing for this round"
            _, _, _, purpose, sender, to, round, step, epoch, _, _, session = header
            return seal(key, sender, to, round, step, epoch, ABSTAIN, b"", session=session, purpose=purpose)
        if self.kind == "foreign_key":
            key = self.foreign
        else:  # misaddress: a message meant for a peer that is not this link's receiver
            header[5] = next(k for k in range(self.world_size) if k not in (receiver, self.identity.rank))
        packed = HEADER_STRUCT.pack(*header)
        return packed + key.sign(packed) + message[OVERHEAD:]


