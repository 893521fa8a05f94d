"""Fault injection: a chosen peer corrupts what it sends, after the honest path built it.

The receivers' defences are exercised through the real code path (the same envelope,
transport and verifier); nothing is mocked. Each corrupted message is counted so a test
can check that every one was refused.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfed.config import VALUE_FAULTS, FaultSection
from p2pfed.identity import Identity
from p2pfed.secure.protocol import ABSTAIN
from p2pfed.transport import LyingLength
from p2pfed.wire import HEADER_STRUCT, OVERHEAD, seal

DEFAULT_STRENGTH = {"scale": 100.0, "noise": 1.0, "alie": 1.5, "slow": 3.0}
HUGE_LENGTH = 2**62
log = logging.getLogger("p2pfed.faults")


ENVELOPE_FAULTS = ("flip", "replay", "abstain", "foreign_key", "misaddress", "hugelength")
"""Fault kinds that rewrite a sealed message."""


class FaultInjector:
    """Rewrites one peer's outgoing messages according to `kind`."""

    def __init__(self, section: FaultSection, identity: Identity, world_size: int, seed: int) -> None:
        self.kind = section.kind
        self.strength = section.strength or DEFAULT_STRENGTH.get(section.kind, 0.0)
        self.from_round = section.from_round
        self.until_round = section.until_round
        self.identity = identity
        self.world_size = world_size
        self.random = random.Random(seed)
        self.foreign = Ed25519PrivateKey.generate()  # a key no roster lists
        self.previous: dict[int, bytes] = {}
        self.injected = 0
        self.heard: list[torch.Tensor] = []
        """What it heard from its neighbours last round (ALIE shapes its lie from it)."""
        self.noise = torch.Generator().manual_seed(seed)

    def maybe_crash(self, round: int, restart: int) -> None:
        """kind 'crash': die like `kill -9` at the start of `from_round`, the first time only;
        'vanish': leave then, the first time only, exiting with status 0 and no goodbye (no
        checkpoint, no end of stream, no summary: the OS closes its connections)."""
        if round != self.from_round or restart != 0:
            return
        if self.kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "vanish":
            log.warning("peer %d: fault injection 'vanish': leaving the run at the start of round %d", self.identity.rank, round)
            logging.shutdown()
            os._exit(0)

    def straggle(self, compute_s: float, round: int) -> float:
        """kind 'slow': sleep so that this round's local steps take `strength` times as long; the seconds slept."""
        if self.kind != "slow" or not self.active(round):
            return 0.0
        pause = (self.strength - 1.0) * compute_s
        time.sleep(pause)
        return pause

    def active(self, round: int) -> bool:
        """Whether metrics `round` (1-based) misbehaves."""
        return self.kind not in ("crash", "vanish") and round >= self.from_round and (not self.until_round or round <= self.until_round)

    def observe(self, heard: list[torch.Tensor]) -> None:
        """Remember the neighbours' values of this round (plain mode; secure mode shows none)."""
        self.heard = [h.detach().clone() for h in heard]

    def poison(self, vector: torch.Tensor, round: int) -> torch.Tensor:
        """The adapter a Byzantine peer sends instead of its own (it keeps training its own)."""
        if self.kind not in VALUE_FAULTS or not self.active(round):
            return vector
        self.injected += 1
        if self.kind == "nan":
            bad = vector.clone()
            bad[0] = float("nan")
            return bad
        if self.kind == "scale":
            return vector * self.strength
        if self.kind == "signflip":
            return -vector
        if self.kind == "noise":
            return vector + self.strength * torch.randn(vector.shape, generator=self.noise, dtype=vector.dtype)
        seen = torch.stack([vector, *self.heard]) if self.heard else vector.unsqueeze(0)  # alie
        return seen.mean(dim=0) - self.strength * seen.std(dim=0, unbiased=False)

    def mangle(self, payload: bytes, round: int) -> bytes:
        """'shortpayload': a truncated payload, signed as if whole."""
        if self.kind != "shortpayload" or not self.active(round):
            return payload
        self.injected += 1
        return payload[: max(0, len(payload) // 2 - 1)]

    def corrupt(self, outgoing: dict[int, bytes], round: int) -> dict[int, bytes]:
        """Return the messages this peer really sends for metrics `round` (1-based)."""
        honest = dict(outgoing)
        if self.kind in ENVELOPE_FAULTS and self.active(round):
            outgoing = {j: self._corrupt_one(j, m) for j, m in outgoing.items()}
            self.injected += sum(outgoing[j] != honest[j] or isinstance(outgoing[j], LyingLength) for j in outgoing)
        self.previous = honest
        return outgoing

    def _corrupt_one(self, receiver: int, message: bytes) -> bytes:
        if self.kind == "hugelength":
            return LyingLength.of(message, HUGE_LENGTH)
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


