"""Byte layouts of the secure phases' payloads; every decoder checks lengths, counts and
ranks against what the reader itself expects before it reads, and raises only
SecureError with a one-word reason."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from p2pfed.secure.fixedpoint import SecureError
from p2pfed.secure.shares import SEALED_SHARE_SIZE, SHARE_SIZE

SIGNATURE_SIZE = 64
_COUNT = struct.Struct("<I")


@dataclass(frozen=True)
class Survivors:
    """A receiver's account of one exchange: `present` senders are in the sum, `helpers`
    (present ones and those whose message arrived but was refused) help unmask it."""

    present: tuple[int, ...]
    helpers: tuple[int, ...]

    def missing(self, senders: list[int]) -> list[int]:
        """Senders whose masks must be corrected away: everyone not present."""
        return [j for j in senders if j not in self.present]

    def encode(self) -> bytes:
        return _ranks(self.present) + _ranks(self.helpers)


def _ranks(ranks: tuple[int, ...] | list[int]) -> bytes:
    return _COUNT.pack(len(ranks)) + np.asarray(sorted(ranks), dtype="<u4").tobytes()


def _read_ranks(data: bytes, offset: int, allowed: list[int], what: str) -> tuple[tuple[int, ...], int]:
    """A count-prefixed, strictly increasing list of ranks drawn from `allowed`."""
    if len(data) < offset + _COUNT.size:
        raise SecureError(f"{what}: {len(data)} bytes end before its count", "malformed")
    (count,) = _COUNT.unpack_from(data, offset)
    offset += _COUNT.size
    if count > len(allowed) or len(data) < offset + 4 * count:
        raise SecureError(f"{what}: names {count} ranks, at most {len(allowed)} possible in {len(data)} bytes", "malformed")
    ranks = tuple(int(r) for r in np.frombuffer(data, dtype="<u4", count=count, offset=offset))
    if list(ranks) != sorted(set(ranks)) or any(r not in allowed for r in ranks):
        raise SecureError(f"{what}: {list(ranks)} is not a sorted list of distinct senders among {allowed}", "malformed")
    return ranks, offset + 4 * count


COMMITMENT_SIZE = 32


@dataclass(frozen=True)
class Data:
    """A sender's masked words, the hash that commits it to its self-mask seed, and the
    seed's sealed shares by holder."""

    words: np.ndarray
    commitment: bytes
    sealed: dict[int, bytes]


def encode_data(words: np.ndarray, commitment: bytes, sealed_shares: list[bytes]) -> bytes:
    """Masked words, seed commitment, then the seed's sealed shares in holder order."""
    return b"".join([memoryview(np.ascontiguousarray(words, dtype="<u4")).cast("B"), commitment, *sealed_shares])  # one copy


def data_length(count: int, holders: int) -> int:
    return 4 * count + COMMITMENT_SIZE + SEALED_SHARE_SIZE * holders


def decode_data(payload: bytes, count: int, holders: list[int] | None) -> Data:
    """The parts of a data message, its length checked first. `holders` None: pair-masked
    words alone (a receiver that needs every sender: no seed, no shares)."""
    expected = 4 * count if holders is None else data_length(count, len(holders))
    if len(payload) != expected:
        raise SecureError(f"masked message of {len(payload)} bytes, expected {expected}", "malformed")
    words = np.frombuffer(payload, dtype="<u4", count=count)  # read-only view of the payload
    if holders is None:
        return Data(words, b"", {})
    start = 4 * count + COMMITMENT_SIZE
    sealed = {k: payload[start + n * SEALED_SHARE_SIZE: start + (n + 1) * SEALED_SHARE_SIZE] for n, k in enumerate(holders)}
    return Data(words, payload[4 * count: start], sealed)


def encode_survivors(survivors: Survivors, forwarded: list[bytes]) -> bytes:
    """The list, then the sealed shares addressed to this helper, in sender order."""
    return survivors.encode() + b"".join(forwarded)


def decode_survivors(payload: bytes, senders: list[int], me: int) -> tuple[Survivors, dict[int, bytes]]:
    """(the receiver's survivor list, {sender: sealed share for me}); checks the list's shape."""
    present, offset = _read_ranks(payload, 0, senders, "survivor list")
    helpers, offset = _read_ranks(payload, offset, senders, "helper list")
    if not set(present) <= set(helpers):
        raise SecureError(f"survivor list: present {list(present)} not all among helpers {list(helpers)}", "malformed")
    owners = [j for j in present if j != me] if me in helpers else []
    if len(payload) != offset + SEALED_SHARE_SIZE * len(owners):
        raise SecureError(f"survivor list of {len(payload)} bytes, expected {offset + SEALED_SHARE_SIZE * len(owners)}", "malformed")
    forwarded = {j: payload[offset + n * SEALED_SHARE_SIZE: offset + (n + 1) * SEALED_SHARE_SIZE] for n, j in enumerate(owners)}
    return Survivors(present, helpers), forwarded


def decode_consents(payload: bytes, helpers: tuple[int, ...]) -> dict[int, bytes]:
    """{helper: its consent signature}, in helper order."""
    if len(payload) != SIGNATURE_SIZE * len(helpers):
        raise SecureError(f"consent bundle of {len(payload)} bytes, expected {SIGNATURE_SIZE * len(helpers)}", "malformed")
    return {k: payload[n * SIGNATURE_SIZE: (n + 1) * SIGNATURE_SIZE] for n, k in enumerate(helpers)}


def release_length(owners: int, count: int, corrects: bool) -> int:
    return SHARE_SIZE * owners + (4 * count if corrects else 0)


def encode_release(shares: list[bytes], correction: np.ndarray | None) -> bytes:
    """A helper's shares of the present senders' seeds, then (if any sender is missing) its correction."""
    return b"".join([*shares, b"" if correction is None else np.ascontiguousarray(correction, dtype="<u4").tobytes()])


def decode_release(payload: bytes, owners: list[int], count: int, corrects: bool) -> tuple[dict[int, bytes], np.ndarray | None]:
    """({present sender: my share of its seed}, correction words or None)."""
    if len(payload) != release_length(len(owners), count, corrects):
        raise SecureError(f"release of {len(payload)} bytes, expected {release_length(len(owners), count, corrects)}", "malformed")
    shares = {j: payload[n * SHARE_SIZE: (n + 1) * SHARE_SIZE] for n, j in enumerate(owners)}
    start = SHARE_SIZE * len(owners)
    correction = np.frombuffer(payload, dtype="<u4", count=count, offset=start) if corrects else None
    return shares, correction
