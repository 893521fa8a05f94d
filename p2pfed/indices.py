"""Compact encoding of sorted coordinate indices (for top-k messages).

Sorted indices become gaps; gaps are written as LEB128 varints (one byte for a gap under
128, which is every gap when 1% or more of the coordinates are kept), or as a bitmap
when that is smaller. Decoding checks everything, so a malformed index list is refused.
"""

from __future__ import annotations

import numpy as np

VARINT, BITMAP = 0, 1
MAX_VARINT_BYTES = 5  # indices are below 2^32


class IndexBlockError(ValueError):
    """An index block does not decode to k strictly increasing indices below n."""


def encode_indices(indices: np.ndarray, n: int) -> bytes:
    """One format byte, then the smaller of the varint-gap and bitmap encodings."""
    indices = np.asarray(indices, dtype=np.int64)
    varint = _varint_encode(np.diff(indices, prepend=-1) - 1)  # gaps >= 0
    if len(varint) <= (n + 7) // 8:
        return bytes([VARINT]) + varint
    bitmap = np.zeros(n, dtype=bool)
    bitmap[indices] = True
    return bytes([BITMAP]) + np.packbits(bitmap, bitorder="little").tobytes()


def decode_indices(data: bytes, k: int, n: int) -> np.ndarray:
    """The k sorted indices written by `encode_indices`, or IndexBlockError."""
    if not data:
        raise IndexBlockError("empty index block")
    kind, body = data[0], np.frombuffer(data, dtype=np.uint8, offset=1)
    if kind == BITMAP:
        if len(body) != (n + 7) // 8:
            raise IndexBlockError(f"bitmap of {len(body)} bytes, expected {(n + 7) // 8}")
        bits = np.unpackbits(body, bitorder="little")
        if bits[n:].any():
            raise IndexBlockError("bitmap marks coordinates past the end")
        indices = np.flatnonzero(bits[:n])
    elif kind == VARINT:
        indices = np.cumsum(_varint_decode(body) + 1) - 1
    else:
        raise IndexBlockError(f"unknown index format {kind}")
    if len(indices) != k:
        raise IndexBlockError(f"{len(indices)} indices, expected {k}")
    if k and indices[-1] >= n:
        raise IndexBlockError(f"index {indices[-1]} out of range for {n} coordinates")
    return indices.astype(np.int64)


def max_index_bytes(k: int, n: int) -> int:
    """The largest block `encode_indices` can write for k of n coordinates."""
    return 1 + min(MAX_VARINT_BYTES * k, (n + 7) // 8)


def _varint_encode(values: np.ndarray) -> bytes:
    values = values.astype(np.uint64)
    sizes = np.ones(len(values), dtype=np.int64)
    for bits in (7, 14, 21, 28):
        sizes += values >= (1 << bits)
    starts = np.cumsum(sizes) - sizes
    out = np.zeros(int(sizes.sum()), dtype=np.uint8)
    for b in range(MAX_VARINT_BYTES):
        rows = sizes > b
        chunk = (values[rows] >> np.uint64(7 * b)) & np.uint64(0x7F)
        more = (sizes[rows] > b + 1).astype(np.uint64) << np.uint64(7)
        out[starts[rows] + b] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _varint_decode(body: np.ndarray) -> np.ndarray:
    if len(body) and body[-1] & 0x80:
        raise IndexBlockError("index block ends inside a number")
    ends = np.flatnonzero((body & 0x80) == 0)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    sizes = ends - starts + 1
    if len(sizes) and sizes.max() > MAX_VARINT_BYTES:
        raise IndexBlockError("index gap longer than 5 bytes")
    values = np.zeros(len(ends), dtype=np.uint64)
    for b in range(MAX_VARINT_BYTES):
        rows = sizes > b
        values[rows] |= (body[starts[rows] + b].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * b)
    if len(values) and values.max() >= 1 << 32:
        raise IndexBlockError("index gap beyond 2^32")
    return values.astype(np.int64)
