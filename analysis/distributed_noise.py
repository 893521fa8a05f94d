"""Distributed noise against local noise in gossip, at equal epsilon (README, Differential privacy).

Distributed: each sender j adds a share N_j (variance sigma^2 / n, n the fewest senders of
its receivers) to what it sends, and tops its own term of the mix up to the full sigma^2
(that term goes on in its next messages). One round releases every receiver's sum and every
peer's own term; against an adversary who sees all of them but no one's shares, peer j's
round is a Gaussian mechanism with mu^2 = a^T Sigma^+ a (a: how j's update enters each
release, Sigma: the releases' noise covariance). Local: each peer adds the full noise to
the one value it sends and keeps (mu^2 = 1 / sigma^2). At equal mu, compare the noise
variance left in each peer's mix. Run: `.venv/bin/python analysis/distributed_noise.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2pfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]


def compare(name: str, n: int) -> tuple[float, float, float]:
    """(mu^2 sigma^2 of distributed, its mix noise at the local design's epsilon, local mix noise), sigma = 1."""
    w = load_topology(ROOT / "topologies" / f"{name}.toml", n).weights(0)
    senders = [[k for k in range(n) if k != r and w[r, k] > 0] for r in range(n)]
    receivers = [[r for r in range(n) if r != j and w[r, j] > 0] for j in range(n)]
    share = np.array([1.0 / min(len(senders[r]) for r in receivers[j]) for j in range(n)])
    mixing = np.zeros((2 * n, 2 * n))  # releases (sums, own terms) x noise parts (shares, top-ups)
    for r in range(n):
        for k in senders[r]:
            mixing[r, k] = w[r, k]
        mixing[n + r, r] = mixing[n + r, n + r] = 1.0
    covariance = mixing @ np.diag(np.concatenate([share, 1 - share])) @ mixing.T
    worst = 0.0
    for j in range(n):
        a = np.zeros(2 * n)
        a[receivers[j]] = w[receivers[j], j]
        a[n + j] = 1.0
        worst = max(worst, float(a @ np.linalg.pinv(covariance) @ a))
    distributed = np.mean([w[r, r] ** 2 + sum(w[r, k] ** 2 * share[k] for k in senders[r]) for r in range(n)])
    local = np.mean([float(np.sum(w[r] ** 2)) for r in range(n)])
    return worst, float(distributed * worst), float(local)


if __name__ == "__main__":
    print("| graph | peers | mu^2 sigma^2 (distributed) | mix noise, distributed | mix noise, local | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n in (("ring", 4), ("ring", 8), ("complete", 4), ("complete", 8), ("exponential", 8)):
        mu2, distributed, local = compare(name, n)
        print(f"| {name} | {n} | {mu2:.2f} | {distributed:.4f} | {local:.4f} | {distributed / local:.2f}x |")
