"""Fixed point at the edges a float32 encoding could get wrong (found by review): a bound
whose scaled value float32 rounds up, and the dither lost to float32 rounding at large |t|."""

import math

import numpy as np
import torch

from p2pfed.secure import FixedPoint


def test_a_bound_float32_rounds_up_never_lets_a_word_past_the_checked_range():
    """bound * 2^30 = 2^30 - 16 rounds to 2^30 in float32: words must stay <= 2^30 - 16, so two
    senders' sum stays below 2^31 as check() promised (it wrapped to -2.0 before the fix)."""
    fixed = FixedPoint((2**30 - 16) / 2**30, 30)
    fixed.check(2)
    values = torch.tensor([fixed.bound, -fixed.bound, 0.999, float("inf")], dtype=torch.float32)
    words, _ = fixed.encode(values, torch.Generator().manual_seed(0))
    signed = words.view(np.int32).astype(np.int64)
    assert int(np.abs(signed).max()) <= math.floor(fixed.bound * 2**30)
    total = (words.astype(np.uint64) * 2 % 2**32).astype(np.uint32)  # the same value from two senders
    assert float(fixed.decode(total)[0]) > 0


def test_rounding_stays_unbiased_where_float32_cannot_hold_the_dither_next_to_the_value():
    """t = 2^21 + 0.25 steps (float32 keeps 2 fractional bits there, far fewer than the dither's 16):
    the mean of 100,000 encodings is within 5 standard errors of t, computed in float64 from
    the float32 input (the value float32 holds is the value to round)."""
    fixed = FixedPoint(4.0, 20)
    value = np.float32((2**21 + 0.25) / 2**20)
    exact = float(value) * 2**20
    count = 100_000
    words, _ = fixed.encode(torch.full((count,), float(value)), torch.Generator().manual_seed(5))
    mean = float(words.view(np.int32).astype(np.float64).mean())
    frac = exact - math.floor(exact)
    assert abs(mean - exact) <= 5 * math.sqrt(frac * (1 - frac) / count)
