"""Consensus distance: how far peers are from their network average, and steering it.

Xi^2 = (1/n) sum_i ||x_i - xbar||^2. The exact figure uses two monitoring all-reduces
(of masked values in secure mode, see p2pfed.secure.monitor); the mean it computes is
never written back into any peer's adapter. Consensus control
(Kong et al., ICML 2021) uses the same figure, which every peer receives identically, so
all peers take the same number of extra gossip steps without a coordinator.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from p2pfed.config import ConsensusSection
from p2pfed.gossip import Averager, RoundStats
from p2pfed.secure import Purpose
from p2pfed.secure.monitor import MaskedSum
from p2pfed.transport import PeerLost, Transport

log = logging.getLogger("p2pfed.consensus")


def _sum(values: torch.Tensor, transport: Transport, masked: MaskedSum | None) -> torch.Tensor:
    """All peers' float64 sum: plain, or (secure mode) of masked values so no one's own crosses
    the wire. The float64 copy is the transport's to make (a simulation then holds one running
    total, not one copy per peer)."""
    return transport.all_reduce_sum(values, torch.float64) if masked is None else masked.sum(values, transport)


def _plausible(value: float, what: str) -> float | None:
    """A sum of squares some peer made negative or non-finite is a lie: None, and one log line.
    (A lie within the plausible range cannot be told from the truth: monitoring trusts its peers.)"""
    if math.isfinite(value) and value >= 0:
        return value
    log.warning("%s came out as %r, which no honest peers can produce: ignored this time", what, value)
    return None


def exact_consensus_distance(vector: torch.Tensor, transport: Transport, masked: MaskedSum | None = None) -> float | None:
    """Xi^2 over all peers, the same value on every peer (None when a peer made it impossible)."""
    n = transport.world_size
    mean = _sum(vector, transport, masked) / n
    own = (vector.to(torch.float64) - mean).pow(2).sum().reshape(1)
    del mean  # not held while waiting for the slowest peer's second sum
    return _plausible(float(_sum(own, transport, masked)) / n, "the consensus distance")


def mean_squared_norm(vector: torch.Tensor, transport: Transport, masked: MaskedSum | None = None) -> float | None:
    """(1/n) sum_i ||x_i||^2: the scale a relative consensus target is read against."""
    own = vector.to(torch.float64).pow(2).sum().reshape(1)
    return _plausible(float(_sum(own, transport, masked)) / transport.world_size, "the mean squared norm")


def consensus_distance_of(vectors: list[torch.Tensor]) -> float:
    """Xi^2 computed directly from gathered vectors (reference for tests and analysis)."""
    stacked = torch.stack([v.to(torch.float64) for v in vectors])
    return float((stacked - stacked.mean(dim=0)).pow(2).sum(dim=1).mean())


def is_measured(round: int, section: ConsensusSection, rounds: int) -> bool:
    """Whether the exact figure is computed after `round`: every E rounds and after the last."""
    return section.every > 0 and (round % section.every == 0 or round == rounds)


@dataclass
class GossipRound:
    """What one round's gossip did: the mixed vector, its steps, and the consensus reached."""

    vector: torch.Tensor
    stats: RoundStats
    steps: int
    consensus: float | None
    target: float | None
    monitoring_skipped: bool = False
    """The exact figure was due but skipped: a peer is gone (on_peer_loss = 'continue')."""


def gossip_round(averager: Averager, vector: torch.Tensor, round: int, transport: Transport,
                 section: ConsensusSection, measure: bool, own: torch.Tensor | None = None) -> GossipRound:
    """One gossip step, then (with a target) more while Xi^2 is above it, up to the cap.
    `own`: this peer's own term of the first step where it is not what it sends (distributed noise)."""
    vector, first = averager.average(vector, round, 0, own=own)
    steps, masked = [first], averager.monitor()
    control = section.target > 0 and averager.mode == "gossip"
    if control and averager.secure is not None:  # the config refuses it too; this guards the library path
        raise ValueError("consensus control re-exchanges the adapters whose network mean monitoring revealed: not in secure mode")
    try:
        distance = exact_consensus_distance(vector, transport, masked) if measure or control else None
    except PeerLost:  # a gone peer cannot take part: monitoring stops, gossip goes on (control is refused with 'continue')
        return GossipRound(vector, first, 1, None, None, monitoring_skipped=True)
    target = None
    if control:
        scale = mean_squared_norm(vector, transport, masked) if section.relative else 1.0
        target = None if scale is None else section.target * scale
        while distance is not None and target is not None and distance > target and len(steps) < section.max_steps:
            vector, stats = averager.average(vector, round, len(steps), Purpose.CONSENSUS)
            steps.append(stats)
            distance = exact_consensus_distance(vector, transport, masked)
    return GossipRound(vector, RoundStats.combine(steps), len(steps), distance, target)
