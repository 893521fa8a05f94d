"""Pairwise-masked secure averaging: a receiver learns only the weighted sum of what its
neighbours sent, never one neighbour's adapter.

Sender j, writing to receiver i, sends enc(W_ij x_j) + sum_{k in S(i), k != j} sign(j,k) PRG(s_jk, round, step, i)
in Z_2^32, where S(i) are i's senders, sign(j,k) = +1 if j < k else -1, and s_jk is an
X25519 shared secret (both ends compute it from the roster, no extra round trip) passed
through HKDF-SHA256. The PRG is ChaCha20 with a nonce made of (round, step, receiver), so
no mask ever repeats. The masks cancel in i's sum. If a sender drops out, each remaining
sender returns the sum of its masks shared with the missing ones, which completes the sum
without unmasking anyone as long as two or more senders remain.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pfed.config import ConfigError
from p2pfed.identity import Identity, Roster
from p2pfed.topology import Topology

MASK_SALT = b"p2pfed pairwise mask v1"
SECURE_CODEC = 0xE0
"""Envelope codec ids: SECURE_CODEC + structure index for masked data (0 dense, 2 random-k)."""
ABSTAIN, REQUEST, CORRECTION = 0xF0, 0xF1, 0xF2
"""Envelope codec ids of the control messages: an explicit abstain, a receiver naming the
missing senders, a sender's correction."""
MODULUS_BITS = 32


class SecureError(ValueError):
    """A secure-mode setting that would hide nothing or overflow; the message says which."""


@dataclass(frozen=True)
class FixedPoint:
    """Clip to [-bound, bound], scale by 2^frac_bits, round stochastically, wrap into Z_2^32."""

    bound: float
    frac_bits: int

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    @property
    def resolution(self) -> float:
        """The largest rounding error of one encoded value (one step)."""
        return 1.0 / self.scale

    def largest_sum(self, senders: int) -> int:
        """The largest magnitude a sum of `senders` encoded values can reach (weights <= 1)."""
        return senders * (math.ceil(self.bound * self.scale) + 1)

    def check(self, senders: int, where: str = "[secure]") -> None:
        """Refuse a setting whose neighbourhood sum could wrap around Z_2^32."""
        if self.largest_sum(senders) >= 2 ** (MODULUS_BITS - 1):
            raise SecureError(f"{where} bound = {self.bound}, frac_bits = {self.frac_bits}: a neighbourhood of {senders} senders "
                              f"could sum to {self.largest_sum(senders):,}, past the signed 32-bit range (2^31); lower frac_bits or bound")

    def encode(self, values: torch.Tensor, generator: torch.Generator) -> tuple[np.ndarray, int]:
        """(uint32 words, how many values were clipped)."""
        values = values.detach().to("cpu", torch.float64)
        clipped = int((values.abs() > self.bound).sum())
        scaled = values.clamp(-self.bound, self.bound) * self.scale
        noise = torch.rand(scaled.shape, generator=generator, dtype=torch.float64)
        integers = torch.floor(scaled + noise).to(torch.int64)
        return (integers.numpy() & 0xFFFFFFFF).astype(np.uint32), clipped

    def decode(self, words: np.ndarray) -> torch.Tensor:
        """Signed reading of uint32 words, back to floats."""
        return torch.from_numpy(words.astype(np.uint32).view(np.int32).astype(np.float64) / self.scale).to(torch.float32)


def prg_words(key: bytes, round: int, step: int, receiver: int, count: int) -> np.ndarray:
    """`count` uint32 words of ChaCha20 keystream for (round, step, receiver) under `key`."""
    nonce = struct.pack("<IIII", 0, round, step, receiver)  # block counter 0, then a 96-bit nonce unique per use
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * count)), dtype="<u4").astype(np.uint32)


@dataclass
class PairwiseMasks:
    """This peer's pairwise secrets with every other peer, and the masks made from them."""

    identity: Identity
    roster: Roster
    secrets: dict[int, bytes] = field(default_factory=dict)

    def secret(self, other: int) -> bytes:
        """s_{me,other} = HKDF(X25519(me, other)), the same at both ends."""
        if other not in self.secrets:
            keys = self.roster.get(other)
            if keys is None:
                raise SecureError(f"peer {other} is not in the roster, so no mask can be agreed with it")
            low, high = sorted((self.identity.rank, other))
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=MASK_SALT, info=b"pair" + struct.pack("<II", low, high))
            self.secrets[other] = hkdf.derive(self.identity.agreement.exchange(keys.agreement))
        return self.secrets[other]

    def mask(self, receiver: int, others: list[int], round: int, step: int, count: int) -> np.ndarray:
        """sum over k in `others` (k != me) of sign(me, k) * PRG(s_{me,k}, round, step, receiver), mod 2^32."""
        me = self.identity.rank
        total = np.zeros(count, dtype=np.uint32)
        for k in others:
            if k == me:
                continue
            words = prg_words(self.secret(k), round, step, receiver, count)
            if me < k:
                total += words
            else:
                total -= words
        return total


def check_secure_topology(topology: Topology, fixed: FixedPoint) -> None:
    """Every receiver needs two or more senders in every round, and its sum must not wrap."""
    for epoch in range(topology.period):
        for i in range(topology.n):
            senders = topology.in_neighbours(i, epoch)
            if len(senders) < 2:
                raise ConfigError(f"{topology.source}: secure mode needs two or more senders per peer, but peer {i} hears only "
                                  f"{senders or 'nobody'}{f' in round {epoch} of the schedule' if topology.period > 1 else ''}: "
                                  "its sum would be one neighbour's adapter")
    widest = max(len(topology.in_neighbours(i, e)) for e in range(topology.period) for i in range(topology.n))
    try:
        fixed.check(widest)
    except SecureError as err:
        raise ConfigError(str(err)) from None


def encode_missing(ranks: list[int]) -> bytes:
    return np.asarray(sorted(ranks), dtype="<u4").tobytes()


def decode_missing(payload: bytes, allowed: list[int]) -> list[int]:
    """The ranks a request names; SecureError unless they are distinct senders of that receiver."""
    if len(payload) % 4:
        raise SecureError(f"request of {len(payload)} bytes is not a list of 32-bit ranks")
    ranks = np.frombuffer(payload, dtype="<u4").astype(int).tolist()
    if len(set(ranks)) != len(ranks) or any(r not in allowed for r in ranks):
        raise SecureError(f"request names {ranks}, not distinct senders among {allowed}")
    return ranks


@dataclass
class SecureCost:
    """What masking cost in one round, for the metrics."""

    mask_s: float = 0.0
    clipped: int = 0
    dropouts: int = 0
    abandoned: bool = False


class SecureNeighbourhood:
    """One peer's side of a masked round: as a sender to its out-neighbours, as a receiver
    of its in-neighbours' sum, and as a helper when a receiver reports a dropout.

    `exchange(outgoing, incoming_from)` moves bytes; `seal(receiver, codec, payload)` and
    `open(message, source, senders, max_payload, codecs)` wrap the envelope for this
    (round, step). Three exchanges per round: the masked data; each receiver's list of
    missing senders (empty in a clean round); and, only where a list is not empty, the
    senders' corrections.
    """

    def __init__(self, identity: Identity, roster: Roster, topology: Topology, fixed: FixedPoint, structure_id: int, seed: int) -> None:
        self.rank = identity.rank
        self.masks = PairwiseMasks(identity, roster)
        self.topology = topology
        self.fixed = fixed
        self.codec_id = SECURE_CODEC + structure_id
        self.generator = torch.Generator().manual_seed(seed)

    def contributions(self, values: torch.Tensor, round: int, step: int, cost: SecureCost) -> dict[int, bytes]:
        """enc(W_ij x_me) + mask for every receiver i (values: this peer's selected coordinates)."""
        weights = self.topology.weights(round)
        out = {}
        for i in self.topology.out_neighbours(self.rank, round):
            words, clipped = self.fixed.encode(values * float(weights[i, self.rank]), self.generator)
            cost.clipped += clipped
            start = time.perf_counter()
            words += self.masks.mask(i, self.topology.in_neighbours(i, round), round, step, values.numel())
            cost.mask_s += time.perf_counter() - start
            out[i] = words.tobytes()
        return out

    def corrections(self, requests: dict[int, list[int]], round: int, step: int, count: int, cost: SecureCost) -> dict[int, bytes]:
        """For each receiver that reported missing senders (and still has two or more): my masks shared with them."""
        out = {}
        for i, missing in requests.items():
            if self.rank in missing or not self.expects_corrections(self.topology.in_neighbours(i, round), missing):
                continue  # nothing to fix, or a fix would leave too few senders to hide behind
            start = time.perf_counter()
            out[i] = self.masks.mask(i, missing, round, step, count).tobytes()
            cost.mask_s += time.perf_counter() - start
        return out

    @staticmethod
    def expects_corrections(senders: list[int], missing: list[int]) -> bool:
        """Whether a receiver missing `missing` gets corrections: only with two or more senders left."""
        return bool(missing) and len(senders) - len(missing) >= 2

    @staticmethod
    def unmask(payloads: list[bytes], corrections: list[bytes], fixed: FixedPoint, count: int) -> torch.Tensor:
        """The sum of the masked payloads, minus the corrections, decoded from fixed point."""
        total = np.zeros(count, dtype=np.uint32)
        for data in payloads:
            total += _words(data, count)
        for data in corrections:
            total -= _words(data, count)
        return fixed.decode(total)


def _words(data: bytes, count: int) -> np.ndarray:
    if len(data) != 4 * count:
        raise SecureError(f"masked payload of {len(data)} bytes, expected {4 * count}")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)
