"""Shamir shares of a sender's self-mask seed, sealed for the holder they travel to.

Splitting and combining are pycryptodome's (GF(2^128), 16-byte secrets); sealing is
ChaCha20-Poly1305 from `cryptography` under the pair's share key for the context, with
the direction (sender, holder) as nonce and the context as associated data, so a share
cannot be moved to another holder, sender, round or session.
"""

from __future__ import annotations

import struct

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2pfed.secure.fixedpoint import SecureError
from p2pfed.secure.session import Context

SEED_SIZE = 16
SHARE_SIZE = 16
SEALED_SHARE_SIZE = SHARE_SIZE + 16


def threshold(senders: int) -> int:
    """Shares needed to rebuild a seed: more than half of the d - 1 other senders (d = 2 gives 1)."""
    return (senders - 1) // 2 + 1


def split_seed(seed: bytes, holders: int, needed: int) -> list[bytes]:
    """`holders` shares of `seed`, any `needed` of which rebuild it; share i is for x = i + 1."""
    return [share for _, share in sorted(Shamir.split(needed, holders, seed))]


def combine(shares: dict[int, bytes]) -> bytes:
    """The seed from shares keyed by their x coordinate (1-based); give exactly the threshold."""
    return Shamir.combine(sorted(shares.items()))


def _nonce(sender: int, holder: int) -> bytes:
    return struct.pack("<III", sender, holder, 0)


TAG_SIZE = 16


def seal_for(key: bytes, data: bytes, context: Context, sender: int, recipient: int) -> bytes:
    """Encrypt and authenticate `data` from `sender` for `recipient` (a share, or a release)."""
    return ChaCha20Poly1305(key).encrypt(_nonce(sender, recipient), data, context.encode())


def open_from(key: bytes, sealed: bytes, context: Context, sender: int, recipient: int, what: str = "share") -> bytes:
    """What `sealed` carries, or SecureError(`what`) when it was altered, misdirected or too short."""
    if len(sealed) < TAG_SIZE:
        raise SecureError(f"sealed {what} of {len(sealed)} bytes, shorter than its tag", what)
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(sender, recipient), sealed, context.encode())
    except InvalidTag:
        raise SecureError(f"peer {sender}'s {what} for peer {recipient} does not authenticate", what) from None


def seal_share(key: bytes, share: bytes, context: Context, sender: int, holder: int) -> bytes:
    """One Shamir share from `sender` for `holder`, readable by the holder only."""
    return seal_for(key, share, context, sender, holder)


def open_share(key: bytes, sealed: bytes, context: Context, sender: int, holder: int) -> bytes:
    """The share inside `sealed`, or SecureError('share')."""
    if len(sealed) != SEALED_SHARE_SIZE:
        raise SecureError(f"sealed share of {len(sealed)} bytes, expected {SEALED_SHARE_SIZE}", "share")
    return open_from(key, sealed, context, sender, holder)
