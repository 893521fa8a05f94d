"""One peer's privacy bookkeeping during a run: the mechanism applied to each round's
update, every release logged before it leaves, epsilon after each, and the number of rounds
the budget still affords (agreed by all peers, since gossip is lockstep)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pfed.config import PrivacySection
from p2pfed.privacy.accountant import Accountant, affordable_rounds
from p2pfed.privacy.mechanism import privatize
from p2pfed.privacy.releaselog import ReleaseLog
from p2pfed.transport import Transport

_COUNT_BYTES = 8


@dataclass
class PrivacyLedger:
    section: PrivacySection
    log: ReleaseLog
    accountant: Accountant = field(init=False)

    def __post_init__(self) -> None:
        self.accountant = Accountant(self.section.noise_multiplier, self.section.delta)

    @classmethod
    def open(cls, section: PrivacySection, directory: Path) -> "PrivacyLedger":
        return cls(section, ReleaseLog.open(directory))

    @property
    def releases(self) -> int:
        return self.log.count

    def agreed_rounds(self, rounds_left: int, transport: Transport) -> int:
        """The rounds every peer's budget affords (the fewest any peer can afford: a round is
        run by all or none). A peer's claim is a count it sends; one that is not is ignored."""
        own = affordable_rounds(self.accountant, self.section.epsilon, self.releases, rounds_left)
        claims = transport.all_gather_bytes(own.to_bytes(_COUNT_BYTES, "little"), max_length=_COUNT_BYTES)
        counts = [int.from_bytes(c, "little") for c in claims if len(c) == _COUNT_BYTES]
        return min([own, *(c for c in counts if c <= rounds_left)])

    def release(self, trained: torch.Tensor, start: torch.Tensor, round: int, attempt: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The value to share this round and its metrics; the release is on disk first."""
        release = privatize(trained, start, self.section.clip, self.section.noise_multiplier)
        self.log.record(round, attempt)
        epsilon = self.accountant.epsilon(self.releases)
        return release.vector, {"update_norm": None if math.isnan(release.update_norm) else release.update_norm,
                                "update_clipped": release.clipped, "epsilon": epsilon if math.isfinite(epsilon) else None,
                                "dp_releases": self.releases}

    def summary(self, stopped_at: int | None) -> dict[str, Any]:
        """Final epsilon (RDP and, where it fits, PLD) for the summary row."""
        rdp = self.accountant.epsilon(self.releases)
        return {"epsilon": rdp if math.isfinite(rdp) else None, "epsilon_pld": self.accountant.epsilon_pld(self.releases),
                "dp_releases": self.releases, "budget_stop": stopped_at}
