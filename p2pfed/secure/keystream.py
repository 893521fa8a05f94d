"""ChaCha20 keystream as words: the one pseudo-random generator behind pair masks, self
masks, masked monitoring and the rounding noise of fixed point (several GB/s, where
`torch.rand` in float64 is a tenth of that)."""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_ZERO_NONCE = bytes(16)
_CHUNK = 1 << 16
_ZEROS = bytes(_CHUNK)
"""Keystream is the encryption of zeros: one warm 64 KiB block of them, reused (a fresh zero
buffer as large as the output costs twice the cipher in page faults)."""


def prg_words(key: bytes, count: int, width: int = 4) -> np.ndarray:
    """`count` little-endian words of `width` bytes (4 or 8) of ChaCha20 keystream; every key
    is derived for one use only. A fresh array, the caller's to keep or add into."""
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    out = bytearray(width * count)
    view = memoryview(out)
    for offset in range(0, len(out), _CHUNK):
        size = min(_CHUNK, len(out) - offset)
        encryptor.update_into(_ZEROS if size == _CHUNK else _ZEROS[:size], view[offset:offset + size])
    return np.frombuffer(out, dtype=f"<u{width}")


def rounding_words(generator: torch.Generator, count: int) -> np.ndarray:
    """`count` uniform uint32 words (rounding noise in units of 2^-32 of a step), from a key
    drawn from `generator`, so a seeded run rounds the same way and a checkpoint resumes it."""
    key = torch.randint(0, 2**62, (4,), generator=generator, dtype=torch.int64).numpy().tobytes()
    return prg_words(key, count)
