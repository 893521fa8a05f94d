"""One peer's privacy bookkeeping during a run: the mechanism applied to each round's
update, every release logged before it leaves, epsilon after each, and the number of rounds
the budget still affords (agreed by all peers, since gossip is lockstep)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pfed.config import ConfigError, PrivacySection
from p2pfed.privacy.accountant import Accountant, affordable_rounds, epsilon_rdp
from p2pfed.privacy.distributed import NoisePlan
from p2pfed.privacy.mechanism import privatize
from p2pfed.privacy.releaselog import ReleaseLog
from p2pfed.transport import Transport

_COUNT_BYTES = 8


@dataclass
class PrivacyLedger:
    section: PrivacySection
    log: ReleaseLog
    unprotected: list[int] = field(default_factory=list)
    """Rounds of this run (resumed from) that released an adapter with no log entry: without DP."""
    plan: NoisePlan | None = None
    """Distributed noise (privacy.noise = 'distributed'): this peer's shares and what each round is worth."""
    accountant: Accountant = field(init=False)

    def __post_init__(self) -> None:
        planned = self.plan.planned if self.plan is not None else self.section.noise_multiplier
        self.accountant = Accountant(planned, self.section.delta)

    @classmethod
    def open(cls, section: PrivacySection, directory: Path, resume: int = 0, private_rounds: Sequence[int] = (),
             plan: NoisePlan | None = None) -> "PrivacyLedger":
        """The log so far. `private_rounds`: the rounds the resumed checkpoint's history ran with
        [privacy] (carried in every checkpoint, under its MAC); rounds 1..resume not among them
        ran without it (switched off in some attempt, or on only now): their adapters already left
        raw, so epsilon is infinite, and a budget cannot be kept at all. (The log alone cannot
        tell: an earlier attempt's lines for a round do not say the attempt kept was private.)"""
        log = ReleaseLog.open(directory)
        private = set(private_rounds)
        unprotected = [r for r in range(1, resume + 1) if r not in private]
        if unprotected and section.epsilon > 0:
            raise ConfigError(f"[privacy] epsilon = {section.epsilon}: rounds {unprotected[0]}-{unprotected[-1]} of this run released "
                              f"adapters without [privacy] (no entry in {log.path}), so no epsilon budget can hold; start afresh "
                              "with --overwrite")
        return cls(section, log, unprotected, plan)

    @property
    def releases(self) -> int:
        return self.log.count

    def made(self) -> list[float]:
        return self.log.noise_multipliers(self.accountant.noise_multiplier)

    def epsilon(self, replace: bool = False) -> float:
        return math.inf if self.unprotected else self.accountant.epsilon(0, self.made(), replace)

    def agreed_rounds(self, rounds_left: int, transport: Transport) -> int:
        """The rounds every peer's budget affords (the fewest any peer can afford: a round is
        run by all or none). Only with a budget; a claim that is not a count is ignored."""
        if self.section.epsilon <= 0:
            return rounds_left
        own = affordable_rounds(self.accountant, self.section.epsilon, self.made(), rounds_left)
        claims = transport.all_gather_bytes(own.to_bytes(_COUNT_BYTES, "little"), max_length=_COUNT_BYTES)
        counts = [int.from_bytes(c, "little") for c in claims if len(c) == _COUNT_BYTES]
        return min([own, *(c for c in counts if c <= rounds_left)])

    def release(self, trained: torch.Tensor, start: torch.Tensor, round: int,
                attempt: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(the value to send, this peer's own term of the mix where it differs from what it sends
        (distributed noise), the metrics); the release is on disk first."""
        share, logged = self.plan.at(round - 1) if self.plan is not None else (1.0, self.section.noise_multiplier)
        release = privatize(trained, start, self.section.clip, self.section.noise_multiplier, share=share)
        self.log.record(round, attempt, logged)
        epsilon = self.epsilon()
        own = None if release.own is release.vector else release.own  # a separate own term only under distributed noise
        return release.vector, own, {"update_norm": None if math.isnan(release.update_norm) else release.update_norm,
                                             "update_clipped": release.clipped, "epsilon": epsilon if math.isfinite(epsilon) else None,
                                             "dp_releases": self.releases}

    def summary(self, stopped_at: int | None) -> dict[str, Any]:
        """Final epsilon (RDP and, where it fits, PLD; add/remove and replace-one) for the summary row."""
        finite = lambda x: x if x is not None and math.isfinite(x) else None  # noqa: E731
        pld = None if self.unprotected else self.accountant.epsilon_pld(0, self.made())
        collusion = None
        if self.plan is not None and not self.unprotected:  # every other party pooling its noise: each release at its weakest share
            collusion = finite(epsilon_rdp([min(self.plan.collusion)] * self.releases, self.section.delta))
        return {"epsilon": finite(self.epsilon()), "epsilon_pld": finite(pld), "epsilon_replace": finite(self.epsilon(replace=True)),
                "epsilon_collusion": collusion, "dp_releases": self.releases, "budget_stop": stopped_at,
                "dp_unprotected_rounds": len(self.unprotected)}
