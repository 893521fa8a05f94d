"""Start-up check: a topology where secure mode would hide nothing, or overflow, is refused."""

from __future__ import annotations

from p2pfed.config import ConfigError
from p2pfed.secure.fixedpoint import FixedPoint, SecureError
from p2pfed.topology import Topology


def check_secure_topology(topology: Topology, fixed: FixedPoint, min_present: int = 2) -> None:
    """Every receiver needs two or more senders (and `min_present`) in every round, and its sum must not wrap."""
    for epoch in range(topology.period):
        for i in range(topology.n):
            senders = topology.in_neighbours(i, epoch)
            if len(senders) < 2:
                raise ConfigError(f"{topology.source}: secure mode needs two or more senders per peer, but peer {i} hears only "
                                  f"{senders or 'nobody'}{f' in round {epoch} of the schedule' if topology.period > 1 else ''}: "
                                  "its sum would be one neighbour's adapter")
            if len(senders) < min_present:
                raise ConfigError(f"[secure] min_present = {min_present}, but peer {i} hears only {len(senders)} senders on "
                                  f"{topology.source}: its sum could never complete")
    widest = max(len(topology.in_neighbours(i, e)) for e in range(topology.period) for i in range(topology.n))
    try:
        fixed.check(widest)
    except SecureError as err:
        raise ConfigError(str(err)) from None
