"""Consensus distance: how far peers are from their network average.

Xi^2 = (1/n) sum_i ||x_i - xbar||^2. The exact figure uses two monitoring all-reduces;
the mean it computes is never written back into any peer's adapter.
"""

from __future__ import annotations

import torch

from p2pfed.transport import Transport


def exact_consensus_distance(vector: torch.Tensor, transport: Transport) -> float:
    """Xi^2 over all peers, the same value on every peer."""
    n = transport.world_size
    mean = transport.all_reduce_sum(vector.to(torch.float64)) / n
    own = (vector.to(torch.float64) - mean).pow(2).sum().reshape(1)
    return float(transport.all_reduce_sum(own)) / n


def consensus_distance_of(vectors: list[torch.Tensor]) -> float:
    """Xi^2 computed directly from gathered vectors (reference for tests and analysis)."""
    stacked = torch.stack([v.to(torch.float64) for v in vectors])
    return float((stacked - stacked.mean(dim=0)).pow(2).sum(dim=1).mean())
