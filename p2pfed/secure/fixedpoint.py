"""Fixed point in Z_2^32: what a secure-mode sender encodes before it masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.secure.keystream import rounding_words
from p2pfed.secure.scratch import Scratch

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

    def encode(self, values: torch.Tensor, generator: torch.Generator, scratch: Scratch | None = None) -> tuple[np.ndarray, int]:
        """(uint32 words, how many values were clipped)."""
        return self.encode_weighted(values, {0: 1.0}, generator, scratch)[0]

    def encode_weighted(self, values: torch.Tensor, weights: dict[int, float], generator: torch.Generator,
                        scratch: Scratch | None = None) -> dict[int, tuple[np.ndarray, int]]:
        """enc(w * values) for each receiver's weight w. One draw of rounding noise serves every
        receiver (each sum is still rounded without bias), and receivers with equal weights
        share one encoding: treat the words as read-only. With `scratch`, temporaries and
        words live in its reused buffers (valid until its next encode)."""
        flat = values.detach().to("cpu", torch.float32).reshape(-1).numpy()
        peak = max(float(flat.max()), -float(flat.min())) if flat.size else 0.0  # NaN when any value is NaN
        scratch = scratch or Scratch()
        noise = rounding_words(generator, flat.size, out=scratch.array("rounding", flat.size, np.uint16))
        dither = np.multiply(noise, np.float32(2.0**-16), out=scratch.array("dither", flat.size, np.float32))  # u on [0, 1)
        encoded: dict[float, tuple[np.ndarray, int]] = {}
        for n, weight in enumerate(dict.fromkeys(weights.values())):
            encoded[weight] = self._scaled(flat, weight, peak, dither, scratch, f"encoded{n}")
        return {i: encoded[w] for i, w in weights.items()}

    def _scaled(self, flat: np.ndarray, weight: float, peak: float, dither: np.ndarray, scratch: Scratch,
                name: str) -> tuple[np.ndarray, int]:
        """Stochastic rounding of t = w * v * 2^frac_bits: floor(t) + [frac(t) + u >= 1], with u
        uniform on the multiples of 2^-16 in [0, 1), rounds up with probability frac(t) (a bias
        below 2^-16 of a step). The integer part is split off first, so the dither is added to
        the fraction alone and float32 cannot round it away at large |t|. In float32, the
        precision plain gossip mixes in (float64/int64 temporaries cost three times as much).
        Values are clipped to the largest float32 integer at most bound * 2^frac_bits before
        rounding (an integer never rounds up), so no word leaves the range check() allows; a
        non-finite value is clipped too (NaN to 0, infinities to the bound) and counted."""
        fine = np.float32(weight * self.scale)
        top = _float32_at_most(math.floor(self.bound * self.scale))
        with np.errstate(over="ignore", invalid="ignore"):  # huge or non-finite inputs are clipped and counted below
            scaled = np.multiply(flat, fine, out=scratch.array("scaled", flat.size, np.float32))
        clipped = 0
        if not peak * float(fine) * (1 + 2**-20) <= float(top):  # true for a NaN peak as well
            limit = _float32_at_most(self.bound * self.scale)
            clipped = int(np.count_nonzero(~(np.abs(scaled) <= limit)))
            np.nan_to_num(scaled, copy=False, nan=0.0, posinf=top, neginf=-top)
            np.clip(scaled, -top, top, out=scaled)
        whole = np.floor(scaled, out=scratch.array("whole", flat.size, np.float32))
        np.subtract(scaled, whole, out=scaled)  # the fraction, exactly
        np.add(scaled, dither, out=scaled)  # in [0, 2): >= 1 rounds up
        np.floor(scaled, out=scaled)
        np.add(whole, scaled, out=whole)
        words = scratch.array(name, flat.size, np.int32)
        np.copyto(words, whole, casting="unsafe")  # integers below 2^31 in magnitude: exact
        return words.view(np.uint32), clipped  # two's complement: the words mod 2^32

    def decode(self, words: np.ndarray, out: np.ndarray | None = None) -> torch.Tensor:
        """Signed reading of uint32 words, back to floats (into `out`, float32, when given)."""
        signed = np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)
        values = np.empty(signed.size, dtype=np.float32) if out is None else out
        np.copyto(values, signed, casting="unsafe")  # one rounding to float32; the power-of-two scale is exact
        values *= np.float32(1.0 / self.scale)
        return torch.from_numpy(values)


def _float32_at_most(value: float) -> np.float32:
    """The largest float32 not above `value` (float32(value) may round up past it)."""
    nearest = np.float32(value)
    return nearest if float(nearest) <= value else np.nextafter(nearest, np.float32(-np.inf))
