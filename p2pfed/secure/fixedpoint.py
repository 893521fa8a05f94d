"""Fixed point in Z_2^32: what a secure-mode sender encodes before it masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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
        """enc(w * values) for each receiver's weight w. One float64 copy and one draw of
        rounding noise serve every receiver (each sum is still rounded without bias), and
        receivers with equal weights share one encoding: treat the words as read-only."""
        base = values.detach().to("cpu", torch.float64).reshape(-1).numpy()
        noise = torch.rand(base.shape, generator=generator, dtype=torch.float64).numpy()
        encoded: dict[float, tuple[np.ndarray, int]] = {}
        for weight in dict.fromkeys(weights.values()):
            encoded[weight] = self._scaled(base, weight, noise)
        return {i: encoded[w] for i, w in weights.items()}

    def _scaled(self, base: np.ndarray, weight: float, noise: np.ndarray) -> tuple[np.ndarray, int]:
        limit = self.bound * self.scale
        scaled = base * (weight * self.scale)
        clipped = int(np.count_nonzero((scaled > limit) | (scaled < -limit)))
        np.clip(scaled, -limit, limit, out=scaled)
        scaled += noise
        np.floor(scaled, out=scaled)
        return scaled.astype(np.int64).astype(np.uint32), clipped  # int64 -> uint32 wraps mod 2^32

    def decode(self, words: np.ndarray) -> torch.Tensor:
        """Signed reading of uint32 words, back to floats."""
        signed = np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)
        return torch.from_numpy(signed * (1.0 / self.scale)).to(torch.float32)
