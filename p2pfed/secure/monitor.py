"""Consensus monitoring in secure mode: the all-reduces carry only masked values.

An all-reduce moves pieces of each peer's vector through other peers (gloo's ring sends
one peer's raw chunk to the next), so the exact consensus distance would expose adapters
that secure mode hides. Here every peer adds zero-sum pair masks from all of the roster's
pairs to its fixed-point vector (64-bit words, 32 fractional bits); the masks cancel in the
sum, which is all anyone learns: the network mean and Xi^2, as in plain mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pfed.secure.keystream import prg_words
from p2pfed.secure.masks import PairwiseMasks, derive
from p2pfed.secure.session import Context, Purpose

SCALE = 2.0**32


class Summing:
    """The collective this needs (the transport's)."""

    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass
class MaskedSum:
    """Sums over all peers where no peer's own vector ever crosses the network."""

    masks: PairwiseMasks
    world_size: int
    session: bytes
    calls: int = 0

    def sum(self, values: torch.Tensor, transport: Summing) -> torch.Tensor:
        """The element-wise sum over all peers (float64), to 2^-32 per peer and value."""
        context = Context(self.session, Purpose.MONITOR, self.calls, 0, self.world_size)  # receiver: nobody
        self.calls += 1
        flat = values.detach().to(torch.float64).reshape(-1).numpy()
        words = np.round(flat * SCALE).astype(np.int64).view(np.uint64)
        me = self.masks.rank
        for k in range(self.world_size):
            if k != me:
                stream = prg_words(derive(self.masks.secret(k), b"monitor", context), words.size, width=8)
                words = words + stream if me < k else words - stream  # uint64 arithmetic wraps mod 2^64
        total = transport.all_reduce_sum(torch.from_numpy(words.view(np.int64)))
        return (torch.from_numpy(total.numpy().astype(np.int64).astype(np.float64)) / SCALE).reshape(values.shape)
