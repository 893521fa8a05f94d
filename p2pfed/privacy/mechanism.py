"""The Gaussian mechanism on a party's local update (DP-FedAvg, McMahan et al. 2018).

Each round a peer releases start + clip(trained - start) + N(0, (noise_multiplier * clip)^2 I)
in place of its trained adapter, and keeps that released value as its own term of the mix.
`start` is the previous round's mix, itself built only from released values, so everything
a peer sends or holds after a round is post-processing of releases: one release per round is
all the accountant has to count, whoever sees the messages (neighbours, the wire, all of
them together). The unit protected is a party's whole data: the update of any dataset has
norm at most `clip` after clipping.

The noise comes from AES-256-CTR under a fresh key from os.urandom per release (Box-Muller
in float64): a seeded torch generator would let anyone who knows the config's seed subtract it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.secure.keystream import prg_words


@dataclass(frozen=True)
class Release:
    """What a peer shares this round, and what the metrics say about it."""

    vector: torch.Tensor
    """What is sent."""
    own: torch.Tensor
    """What the peer keeps as its own term of the mix: `vector`, or with distributed noise
    `vector` plus the rest of the full noise."""
    update_norm: float
    """L2 norm of the local update before clipping (NaN: the update was not finite and was dropped)."""
    clipped: bool


def clip_update(update: torch.Tensor, clip: float) -> tuple[torch.Tensor, float, bool]:
    """(update scaled to L2 norm <= clip, its norm before, whether it was scaled). A non-finite
    update is replaced by zeros (it carries no usable signal, and NaN would travel)."""
    norm = float(torch.linalg.vector_norm(update.double()))
    if not math.isfinite(norm):
        return torch.zeros_like(update), float("nan"), True
    if norm <= clip:
        return update, norm, False
    # the scale is computed in float64 and the product rounded to float32: allow for that rounding
    scaled = update * (clip / norm)
    for _ in range(64):
        if float(torch.linalg.vector_norm(scaled.double())) <= clip:
            return scaled, norm, True
        scaled = scaled * (1 - 2**-20)
    return torch.zeros_like(update), norm, True  # a clip so small float32 cannot get under it (denormals): send nothing


def gaussian_noise(count: int, std: float, key: bytes | None = None) -> torch.Tensor:
    """`count` float32 samples of N(0, std^2) from a cryptographic keystream (a fresh random
    key unless one is given, as the tests do). Box-Muller on 53-bit uniforms: the tail reaches
    8.6 std (32-bit ones stop at 6.7, and a coordinate past the sampler's reach would prove the
    update was there)."""
    key = os.urandom(32) if key is None else key
    return torch.from_numpy((normal_from_words(prg_words(key, 2 * count, width=8)) * std).astype(np.float32))


def normal_from_words(words: np.ndarray) -> np.ndarray:
    """Standard normals from pairs of uniform 64-bit words (the first half radii, the second angles)."""
    count = words.size // 2
    top = words >> np.uint64(11)  # 53 bits: all a float64 holds
    u1 = (top[:count].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log never sees 0
    u2 = top[count:].astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _within_clip(start: torch.Tensor, update: torch.Tensor, clip: float) -> tuple[torch.Tensor, bool]:
    """start + update as float32 with what actually leaves, (start + update) - start, inside the
    clip: float32 rounds the sum onto its grid, which next to a large `start` (a hostile mix
    can make it so) would give back part of what clipping took. Shrinks until it fits, else
    sends no update at all."""
    for _ in range(8):
        released = start + update
        if float(torch.linalg.vector_norm(released.double() - start.double())) <= clip:
            return released, False
        update = update * 0.5
    return start.clone(), True


def privatize(trained: torch.Tensor, start: torch.Tensor, clip: float, noise_multiplier: float,
              key: bytes | None = None, share: float = 1.0) -> Release:
    """start + clip(trained - start) + N(0, share * (noise_multiplier * clip)^2): the value to
    send; the own term tops it up to the full variance with independent noise (share < 1: the
    distributed noise of p2pfed.privacy.distributed, whose sums carry the rest)."""
    if not 0 < share <= 1:
        raise ValueError(f"noise share: expected a fraction in (0, 1], got {share}")
    update, norm, clipped = clip_update(trained - start, clip)
    released, dropped = _within_clip(start, update, clip)
    clipped = clipped or dropped
    own = released
    if noise_multiplier > 0:
        std = noise_multiplier * clip
        released = released + gaussian_noise(released.numel(), std * math.sqrt(share), key).to(released.device)
        own = released
        if share < 1:
            top_up = None if key is None else bytes(b ^ 0xFF for b in key)  # a test's fixed key: an independent stream
            own = released + gaussian_noise(released.numel(), std * math.sqrt(1 - share), top_up).to(released.device)
    return Release(released, own, norm, clipped)
