"""Pair masks and self masks: AES-256-CTR keystreams under keys bound to one context.

Pair secret of peers j, k: X25519 between their roster keys through HKDF-SHA256 (the same
at both ends, no round trip). Each use derives a fresh key from it with the context and
a label ("mask", "share"), so a keystream is never reused across rounds, steps,
receivers, purposes, sessions (runs, restarts) or labels. A self mask comes from a fresh
16-byte seed per context, expanded by HKDF the same way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pfed.identity import Identity, Roster
from p2pfed.secure.fixedpoint import SecureError
from p2pfed.secure.keystream import prg_words
from p2pfed.secure.session import Context

PAIR_SALT = b"p2pfed pairwise secret v2"
KEY_SALT = b"p2pfed context key v2"


def derive(secret: bytes, label: bytes, context: Context, extra: bytes = b"") -> bytes:
    """A 32-byte key for one (label, context) from a long-lived or per-context secret."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=KEY_SALT, info=label + context.encode() + extra).derive(secret)


def self_mask(seed: bytes, context: Context, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """PRG(b_j) for the context: the mask only b_j's holders can help remove."""
    return prg_words(derive(seed, b"self", context), count, out=out)


@dataclass
class PairwiseMasks:
    """This peer's pairwise secrets with every other peer, and the masks made from them."""

    identity: Identity
    roster: Roster
    secrets: dict[int, bytes] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.identity.rank

    def secret(self, other: int) -> bytes:
        """s_{me,other} = HKDF(X25519(me, other)), the same at both ends."""
        if other not in self.secrets:
            keys = self.roster.get(other)
            if keys is None:
                raise SecureError(f"peer {other} is not in the roster, so no mask can be agreed with it")
            low, high = sorted((self.rank, other))
            try:
                shared = self.identity.agreement.exchange(keys.agreement)
            except ValueError as err:  # a small-order public key gives an all-zero secret
                raise SecureError(f"peer {other}'s X25519 roster key gives no shared secret ({err})", "roster") from None
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=PAIR_SALT, info=b"pair" + struct.pack("<II", low, high))
            self.secrets[other] = hkdf.derive(shared)
        return self.secrets[other]

    def share_key(self, other: int, context: Context) -> bytes:
        """The AEAD key for shares travelling between me and `other` in this context."""
        return derive(self.secret(other), b"share", context)

    def release_key(self, other: int, context: Context) -> bytes:
        """The AEAD key of a helper's release to a receiver: only the receiver reads shares and corrections."""
        return derive(self.secret(other), b"release", context)

    def receiver_mask(self, other: int, context: Context, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """PRG(s_{sender,receiver}, context): what a sender adds for a receiver that needs every
        sender, so that only the receiver (never the wire) can read its sum."""
        return prg_words(derive(self.secret(other), b"receiver", context), count, out=out)

    def mask(self, context: Context, others: list[int], count: int, onto: np.ndarray | None = None,
             stream: np.ndarray | None = None) -> np.ndarray:
        """sum over k in `others` (k != me) of sign(me, k) * PRG(s_{me,k}, context), mod 2^32;
        added in place to `onto` when given (no copy of a large vector); each keystream is
        written into `stream` when given (a reused buffer of `count` uint32 words)."""
        total = np.zeros(count, dtype=np.uint32) if onto is None else onto
        for k in others:
            if k == self.rank:
                continue
            words = prg_words(derive(self.secret(k), b"mask", context), count, out=stream)
            if self.rank < k:
                total += words
            else:
                total -= words
        return total
