"""Distributed noise under secure averaging, and what it is worth to the accountant.

Each sender j adds only a share of the noise to what it sends: variance sigma^2 C^2 / m_j,
m_j the fewest senders any of its receivers opens a sum with (all of them, or the secure
layer's `min_present` where a receiver recovers dropouts). A sum that opens then carries
at least the full noise (with equal weights, as Metropolis gives on regular graphs), if its
other senders added their shares. The sender's own term of the mix is topped up to the full
variance, since it goes on in the sender's next messages and in its final adapter.

What one round releases about j: every peer's own term O_k = x_k + e_k + f_k and every
receiver's sum S_r = sum_{k in P_r} w_rk (x_k + e_k) (e: shares, f: top-ups). It is one
Gaussian mechanism in j's update, whose strength against an adversary who sees all of
them (but no one's noise) is mu_j^2 = a_j^T Sigma^+ a_j, a_j j's column of the release map,
Sigma the releases' noise covariance; the ledger logs the noise multiplier 1 / mu_j. The
present sets P_r are the most revealing combination the secure layer may open (every
combination of sets of at least m_r senders is tried, j's receivers' with or without j:
its message may be refused there). If every other party colludes (or
skips its share), j's guarantee is its share alone: noise multiplier sigma / sqrt(m_j)
(`collusion_multiplier`), an upper bound on mu_j^2 whatever is released, used where there
are too many combinations to try (MAX_WORK).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from p2pfed.topology import Topology

MAX_WORK = 4096 * 16**3
"""Present-set combinations times (2n)^3 (one pseudo-inverse each) tried per peer and round:
4096 combinations at 8 peers; beyond, the collusion bound."""


def fewest_present(topology: Topology, epoch: int, floor: int, recovering: Callable[[int], bool]) -> list[int]:
    """Per receiver, the fewest senders its sum opens with: `floor` where it recovers dropouts, else all."""
    return [floor if recovering(r) else len(topology.in_neighbours(r, epoch)) for r in range(topology.n)]


def share_fractions(topology: Topology, epoch: int, fewest: Sequence[int]) -> np.ndarray:
    """Per sender, the fraction 1 / m_j of the full noise variance it adds to what it sends."""
    counts = [min((fewest[r] for r in topology.out_neighbours(j, epoch)), default=1) for j in range(topology.n)]
    return np.array([1.0 / max(1, c) for c in counts])


def collusion_multiplier(noise_multiplier: float, share: float) -> float:
    """j's noise multiplier if all other parties pool what they know: its share alone."""
    return noise_multiplier * math.sqrt(share)


def _mu_squared(weights: np.ndarray, present: Sequence[Sequence[int]], share: np.ndarray, j: int) -> float:
    """a_j^T Sigma^+ a_j for unit noise multiplier (sigma = C = 1)."""
    n = weights.shape[0]
    releases = np.zeros((2 * n, 2 * n))  # rows: sums S_0..S_n-1, own terms O_0..O_n-1; columns: shares e, top-ups f
    for r in range(n):
        for k in present[r]:
            releases[r, k] = weights[r, k]
        releases[n + r, r] = releases[n + r, n + r] = 1.0
    covariance = releases @ np.diag(np.concatenate([share, 1.0 - share])) @ releases.T
    signal = releases[:, j]  # j's update enters exactly as its share does
    return float(signal @ np.linalg.pinv(covariance, hermitian=True) @ signal)


def _present_choices(topology: Topology, epoch: int, fewest: Sequence[int]) -> list[list[tuple[int, ...]]]:
    """Per receiver, every present set its sum may open with. j's receivers too may open
    without j: its message can be refused there (a flipped byte on the wire) while the sum of
    the rest still opens, and two sums over the same other senders, one with j and one
    without, leave j's share alone."""
    choices: list[list[tuple[int, ...]]] = []
    for r in range(topology.n):
        senders = tuple(topology.in_neighbours(r, epoch))
        choices.append([subset for size in range(min(fewest[r], len(senders)), len(senders) + 1)
                        for subset in itertools.combinations(senders, size)])
    return choices


def release_multiplier(topology: Topology, epoch: int, noise_multiplier: float, fewest: Sequence[int], j: int) -> float:
    """Peer j's noise multiplier for the round as one Gaussian mechanism (1 / mu_j, scaled by
    the configured one), at the most revealing present sets the secure layer may open; never
    above what its share alone gives (the bound that holds whatever is released)."""
    share = share_fractions(topology, epoch, fewest)
    bound = collusion_multiplier(noise_multiplier, float(share[j]))
    choices = _present_choices(topology, epoch, fewest)
    if math.prod(len(c) for c in choices) * (2 * topology.n) ** 3 > MAX_WORK:  # too many to try: the bound
        return bound
    weights = np.asarray(topology.weights(epoch), dtype=np.float64)
    worst = max(_mu_squared(weights, present, share, j) for present in itertools.product(*choices))
    return max(bound, noise_multiplier / math.sqrt(worst)) if worst > 0 else math.inf


def release_multipliers(topology: Topology, epoch: int, noise_multiplier: float, fewest: Sequence[int]) -> list[float]:
    """`release_multiplier` for every peer."""
    return [release_multiplier(topology, epoch, noise_multiplier, fewest, j) for j in range(topology.n)]


@dataclass(frozen=True)
class NoisePlan:
    """One peer's distributed noise for every round of a (periodic) topology: its share of the
    variance, the noise multiplier the accountant logs, and the collusion figure."""

    shares: tuple[float, ...]
    multipliers: tuple[float, ...]
    collusion: tuple[float, ...]

    @classmethod
    def build(cls, topology: Topology, rank: int, noise_multiplier: float, floor: int,
              recovering: Callable[[int, int], bool]) -> "NoisePlan":
        """`recovering(receiver, epoch)`: whether that receiver's sum may open without every sender."""
        shares, multipliers, collusion = [], [], []
        for epoch in range(topology.period):
            fewest = fewest_present(topology, epoch, floor, lambda r: recovering(r, epoch))  # noqa: B023 (used at once)
            share = float(share_fractions(topology, epoch, fewest)[rank])
            shares.append(share)
            multipliers.append(release_multiplier(topology, epoch, noise_multiplier, fewest, rank))
            collusion.append(collusion_multiplier(noise_multiplier, share))
        return cls(tuple(shares), tuple(multipliers), tuple(collusion))

    def at(self, round: int) -> tuple[float, float]:
        """(share, logged noise multiplier) for 0-based `round`."""
        epoch = round % len(self.shares)
        return self.shares[epoch], self.multipliers[epoch]

    @property
    def planned(self) -> float:
        """The weakest round's multiplier: what a budget plans future rounds with."""
        return min(self.multipliers)
