"""Privacy accounting with Google's dp-accounting: each round is one Gaussian mechanism of
noise multiplier sigma on the party's data (no subsampling: a party takes part in every round
with all its data), composed over the releases actually made, redone rounds included.

Per round the metrics carry the RDP bound (dp-accounting's RdpAccountant, microseconds);
the summary adds the tighter PLD figure (PLDAccountant, seconds), computed only where its
discretisation fits in memory (mu = sqrt(releases) / sigma <= 10, epsilon below ~90 at
delta = 1e-5; past that it would allocate tens of GB). RDP is never below PLD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PLD_LIMIT_MU = 10.0
"""The largest Gaussian-DP mu (sqrt(releases) / sigma) the PLD accountant is asked about."""


@dataclass(frozen=True)
class Accountant:
    noise_multiplier: float
    delta: float

    def event(self, releases: int) -> Any:
        """The composed event (dp_accounting is imported here: seconds of scipy that runs without DP skip)."""
        import dp_accounting

        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(self.noise_multiplier), releases)

    def epsilon(self, releases: int) -> float:
        """The RDP bound on epsilon at `delta` after `releases` releases (inf without noise)."""
        if releases == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        from dp_accounting.rdp import rdp_privacy_accountant

        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(self.event(releases))
        return float(accountant.get_epsilon(self.delta))

    def epsilon_pld(self, releases: int) -> float | None:
        """The PLD figure (tighter), or None where it would not fit in memory."""
        if releases == 0:
            return 0.0
        if self.noise_multiplier <= 0 or math.sqrt(releases) / self.noise_multiplier > PLD_LIMIT_MU:
            return None
        from dp_accounting.pld import pld_privacy_accountant

        accountant = pld_privacy_accountant.PLDAccountant()
        accountant.compose(self.event(releases))
        return float(accountant.get_epsilon(self.delta))


def affordable_rounds(accountant: Accountant, budget: float, releases_so_far: int, rounds_left: int) -> int:
    """How many of the next `rounds_left` rounds fit in an epsilon budget (RDP, so never past
    it); `budget` 0 means no budget."""
    if budget <= 0:
        return rounds_left
    rounds = 0
    while rounds < rounds_left and accountant.epsilon(releases_so_far + rounds + 1) <= budget:
        rounds += 1
    return rounds
