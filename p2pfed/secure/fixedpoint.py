"""Fixed point in Z_2^32: what a secure-mode sender encodes before it masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.secure.keystream import rounding_words

MODULUS_BITS = 32


class SecureError(ValueError):
    """A secure-mode setting that would hide nothing or overflow, or a malformed secure
    message; the message says which."""

    def __init__(self, detail: str, reason: str = "secure") -> None:
        super().__init__(detail)
        self.reason = reason


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
        return self.encode_weighted(values, {0: 1.0}, generator)[0]

    def encode_weighted(self, values: torch.Tensor, weights: dict[int, float], generator: torch.Generator) -> dict[int, tuple[np.ndarray, int]]:
        """enc(w * values) for each receiver's weight w. One draw of rounding noise serves every
        receiver (each sum is still rounded without bias), and receivers with equal weights
        share one encoding: treat the words as read-only."""
        flat = values.detach().to("cpu", torch.float32).reshape(-1).numpy()
        peak = max(float(flat.max()), -float(flat.min())) if flat.size else 0.0  # NaN when any value is NaN
        noise = rounding_words(generator, flat.size)
        encoded: dict[float, tuple[np.ndarray, int]] = {}
        for weight in dict.fromkeys(weights.values()):
            encoded[weight] = self._scaled(flat, weight, peak, noise)
        return {i: encoded[w] for i, w in weights.items()}

    def _scaled(self, flat: np.ndarray, weight: float, peak: float, noise: np.ndarray) -> tuple[np.ndarray, int]:
        """Stochastic rounding in integers: floor((v * 2^32 + u) / 2^32) with u uniform on
        [0, 2^32) rounds v up with probability frac(v) (v * 2^32 is truncated first: a bias
        below 2^-32 of a step). Clipping runs only when some value needs it; a non-finite value
        is clipped too (NaN to 0, infinities to the bound) and counted, so no word ever leaves
        the signed range the overflow check guarantees."""
        fine = weight * self.scale * 2.0**32
        limit = self.bound * self.scale * 2.0**32
        scaled = np.multiply(flat, fine, dtype=np.float64)
        clipped = 0
        if not peak * fine <= limit:  # true for a NaN peak as well
            clipped = int(np.count_nonzero(~(np.abs(scaled) <= limit)))
            np.nan_to_num(scaled, copy=False, nan=0.0, posinf=limit, neginf=-limit)
            np.clip(scaled, -limit, limit, out=scaled)
        fixed = scaled.astype(np.int64)  # |v| * 2^32 < 2^63 where check() passed (|v| < 2^31)
        fixed += noise
        fixed >>= 32  # arithmetic shift: a floor, negatives included
        return fixed.astype(np.int32).view(np.uint32), clipped  # two's complement: the words mod 2^32

    def decode(self, words: np.ndarray) -> torch.Tensor:
        """Signed reading of uint32 words, back to floats."""
        signed = np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)
        values = signed.astype(np.float32)  # one rounding to float32; the power-of-two scale is exact
        values *= np.float32(1.0 / self.scale)
        return torch.from_numpy(values)
