"""Privacy accounting with Google's dp-accounting: each release is one Gaussian mechanism on
the party's data (no subsampling: a party takes part in every round with all its data),
composed over the releases actually made, redone rounds and earlier attempts included, each at
the noise multiplier it was made with.

Sensitivity: the clip bounds the update of any dataset against no data at all (add/remove the
party), so a release is a Gaussian mechanism of noise multiplier sigma. Two datasets of the
party (one record changed, or all of it replaced) can move the update by twice the clip:
sigma / 2 (`replace=True`).

Per round the metrics carry the RDP bound (dp-accounting's RdpAccountant, microseconds);
the summary adds the tighter PLD figure (PLDAccountant, seconds), computed only where its
discretisation fits in memory (Gaussian-DP mu <= 10, epsilon below ~90 at delta = 1e-5;
past that it would allocate tens of GB). RDP is never below PLD.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PLD_LIMIT_MU = 10.0
"""The largest Gaussian-DP mu (sqrt(sum of 1 / sigma^2)) the PLD accountant is asked about."""


def _event(sigmas: Sequence[float]) -> Any:
    """The composed event (dp_accounting is imported here: seconds of scipy that runs without DP skip)."""
    import dp_accounting

    return dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(s), n)
                                          for s, n in sorted(Counter(sigmas).items())])


def gaussian_mu(sigmas: Sequence[float]) -> float:
    """Composed Gaussian mechanisms are mu-GDP with mu = sqrt(sum 1 / sigma_i^2) (Dong et al. 2019)."""
    try:
        return math.sqrt(sum(1.0 / s**2 for s in sigmas)) if all(s > 0 for s in sigmas) else math.inf
    except (OverflowError, ZeroDivisionError):  # a multiplier so small its square underflows: no privacy to speak of
        return math.inf


def epsilon_rdp(sigmas: Sequence[float], delta: float) -> float:
    if not sigmas:
        return 0.0
    if not all(s > 0 for s in sigmas):
        return math.inf
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(_event(sigmas))
    return float(accountant.get_epsilon(delta))


def epsilon_pld(sigmas: Sequence[float], delta: float) -> float | None:
    """The PLD figure (tighter), or None where it would not fit in memory."""
    if not sigmas:
        return 0.0
    if gaussian_mu(sigmas) > PLD_LIMIT_MU:
        return None
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(_event(sigmas))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class Accountant:
    """Releases at one noise multiplier (the run's), on top of any made before."""

    noise_multiplier: float
    delta: float

    def sigmas(self, releases: int, earlier: Sequence[float] = (), replace: bool = False) -> list[float]:
        all_sigmas = [*earlier, *([self.noise_multiplier] * releases)]
        return [s / 2 for s in all_sigmas] if replace else all_sigmas

    def epsilon(self, releases: int, earlier: Sequence[float] = (), replace: bool = False) -> float:
        """The RDP bound on epsilon at `delta` after `releases` more releases (inf without noise)."""
        return epsilon_rdp(self.sigmas(releases, earlier, replace), self.delta)

    def epsilon_pld(self, releases: int, earlier: Sequence[float] = (), replace: bool = False) -> float | None:
        return epsilon_pld(self.sigmas(releases, earlier, replace), self.delta)


def affordable_rounds(accountant: Accountant, budget: float, releases_so_far: Sequence[float] | int, rounds_left: int) -> int:
    """How many of the next `rounds_left` rounds fit in an epsilon budget after the releases
    made so far (their noise multipliers, or a count at the run's); RDP, so never past it.
    `budget` 0 means no budget."""
    if budget <= 0:
        return rounds_left
    made = [accountant.noise_multiplier] * releases_so_far if isinstance(releases_so_far, int) else list(releases_so_far)
    rounds = 0
    while rounds < rounds_left and accountant.epsilon(rounds + 1, made) <= budget:
        rounds += 1
    return rounds
