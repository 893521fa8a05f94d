"""AES-256-CTR keystream as words: the one pseudo-random generator behind pair masks, self
masks, masked monitoring and the rounding noise of fixed point. Measured here (OpenSSL
through `cryptography`, AES-NI/VAES): 1.8 MB in 0.25 ms, against 0.37 ms for ChaCha20 and
ten times that for `torch.rand` in float64; a secure ring exchange draws seven of them."""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_ZERO_COUNTER = bytes(16)
"""Every key is derived for one use only, so each stream may start from counter 0."""
_CHUNK = 1 << 16
_ZEROS = bytes(_CHUNK)
"""Keystream is the encryption of zeros: one warm 64 KiB block of them, reused (a fresh zero
buffer as large as the output costs twice the cipher in page faults)."""


def prg_words(key: bytes, count: int, width: int = 4, out: np.ndarray | None = None) -> np.ndarray:
    """`count` little-endian words of `width` bytes (2, 4 or 8) of AES-256-CTR keystream; every key
    is derived for one use only. Written into `out` when given (a reused buffer of `count`
    words: no fresh pages to fault in), else a fresh array, the caller's to keep or add into."""
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    if out is None:
        out = np.empty(count, dtype=f"<u{width}")
    elif out.size != count or out.dtype != np.dtype(f"<u{width}") or not out.flags.c_contiguous:
        raise ValueError(f"keystream buffer of {out.size} {out.dtype} words, expected {count} contiguous <u{width}")
    view = memoryview(out).cast("B")
    for offset in range(0, len(view), _CHUNK):
        size = min(_CHUNK, len(view) - offset)
        encryptor.update_into(_ZEROS if size == _CHUNK else _ZEROS[:size], view[offset:offset + size])
    return out


def rounding_words(generator: torch.Generator, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """`count` uniform uint16 words (rounding noise in units of 2^-16 of a step), from a key
    drawn from `generator`, so a seeded run rounds the same way and a checkpoint resumes it."""
    key = torch.randint(0, 2**62, (4,), generator=generator, dtype=torch.int64).numpy().tobytes()
    return prg_words(key, count, width=2, out=out)
