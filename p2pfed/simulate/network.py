"""The emulated network's clock: what a round would have taken on the configured links.

Each peer keeps a simulated clock. Its own work (the time it held the baton, times its
`slowdown` if it is a straggler) moves it on; a message leaves when the sender's uplink is
free (size / bandwidth after the one before it), arrives `latency` later (plus a
retransmission timeout per loss), and a receiver's exchange ends when its last message has
arrived and its own have left. Collectives (start-up, monitoring) end at the last peer's
clock plus one latency. Compute is measured with the whole machine to one peer at a time."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from p2pfed.config import NetworkSection


@dataclass
class Network:
    section: NetworkSection
    seed: int = 0
    arrivals: dict[tuple[int, int, int], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def scale(self, rank: int) -> float:
        return self.section.slowdown if rank in self.section.slow_peers else 1.0

    def transfer_s(self, size: int) -> float:
        return 0.0 if self.section.bandwidth_mbit <= 0 else size * 8 / (self.section.bandwidth_mbit * 1e6)

    def lost_tries(self, source: int, dest: int, tag: int, sent: int) -> int:
        """How many times this message is lost before it gets through (a fixed draw per message)."""
        if self.section.loss <= 0:
            return 0
        draw, tries = random.Random(f"{self.seed}/{source}/{dest}/{tag}/{sent}"), 0
        while draw.random() < self.section.loss and tries < 1000:
            tries += 1
        return tries

    def post(self, source: int, dest: int, tag: int, arrival: float) -> None:
        with self.lock:
            self.arrivals[(source, dest, tag)] = arrival

    def arrival(self, source: int, dest: int, tag: int) -> float | None:
        with self.lock:
            return self.arrivals.pop((source, dest, tag), None)


@dataclass
class Clock:
    """One peer's simulated time, split into its own work and waiting on the network."""

    now: float = 0.0
    compute: float = 0.0
    comm: float = 0.0
    marks: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def work(self, seconds: float) -> None:
        self.now += seconds
        self.compute += seconds

    def wait_until(self, when: float) -> None:
        if when > self.now:
            self.comm += when - self.now
            self.now = when

    def since_mark(self) -> dict[str, float]:
        """The round's emulated seconds since the last call (a metrics line each)."""
        now, compute, comm = self.marks
        self.marks = (self.now, self.compute, self.comm)
        return {"sim_round_s": self.now - now, "sim_compute_s": self.compute - compute, "sim_comm_s": self.comm - comm,
                "sim_clock_s": self.now}
