"""Differential privacy for what leaves a peer: the clipped, noised local update
(`mechanism`), the accountant over its releases (`accountant`), and the durable count of
releases that survives crashes and restarts (`releaselog`)."""

from p2pfed.privacy.accountant import Accountant, affordable_rounds
from p2pfed.privacy.ledger import PrivacyLedger
from p2pfed.privacy.mechanism import Release, clip_update, gaussian_noise, privatize
from p2pfed.privacy.releaselog import ReleaseLog

__all__ = ["Accountant", "PrivacyLedger", "Release", "ReleaseLog", "affordable_rounds", "clip_update", "gaussian_noise", "privatize"]
