"""Distributed noise against local noise in gossip, at equal epsilon (README, Differential privacy).

Distributed (p2pfed.privacy.distributed): each sender adds a share of the variance to what
it sends and tops its own term up to the full noise; the accountant's noise multiplier for
the round is 1 / mu_j (mu_j^2 sigma^2 below, every sender present). Local: every release
carries the full noise (mu^2 sigma^2 = 1). At equal epsilon, compare the noise variance
left in each peer's mix (sigma = 1). Run: `.venv/bin/python analysis/distributed_noise.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2pfed.privacy.distributed import release_multipliers, share_fractions
from p2pfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]


def compare(name: str, n: int) -> tuple[float, float, float]:
    """(worst mu^2 sigma^2 of distributed, its mix noise at the local design's epsilon, local mix noise)."""
    topology = load_topology(ROOT / "topologies" / f"{name}.toml", n)
    w = np.asarray(topology.weights(0))
    everyone = [len(topology.in_neighbours(r, 0)) for r in range(n)]
    share = share_fractions(topology, 0, everyone)
    worst = max(1.0 / m**2 for m in release_multipliers(topology, 0, 1.0, everyone))
    distributed = np.mean([w[r, r] ** 2 + sum(w[r, k] ** 2 * share[k] for k in topology.in_neighbours(r, 0)) for r in range(n)])
    local = np.mean([float(np.sum(w[r] ** 2)) for r in range(n)])
    return worst, float(distributed * worst), float(local)


if __name__ == "__main__":
    print("| graph | peers | mu^2 sigma^2 (distributed) | mix noise, distributed | mix noise, local | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n in (("ring", 4), ("ring", 8), ("complete", 4), ("complete", 8), ("exponential", 8)):
        mu2, distributed, local = compare(name, n)
        print(f"| {name} | {n} | {mu2:.2f} | {distributed:.4f} | {local:.4f} | {distributed / local:.2f}x |")
