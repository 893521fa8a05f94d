"""The in-process transport a simulated peer talks through: LocalTransport's mailboxes,
letting go of the baton while it waits (so the neighbour it waits for can compute), and
the emulated network's clock (p2pfed.simulate.network)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from p2pfed.simulate.baton import Baton
from p2pfed.simulate.network import Clock, Network
from p2pfed.transport import LocalTransport, Rank

T = TypeVar("T")


class SimTransport:
    def __init__(self, inner: LocalTransport, baton: Baton, network: Network) -> None:
        self.inner = inner
        self.baton = baton
        self.network = network
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.clock = Clock()
        self.sent = 0
        self.resumed = time.perf_counter()
        """When this peer last got the baton back: its own work since then is compute."""

    @property
    def refused(self) -> dict[Rank, str]:
        return self.inner.refused

    def _waiting(self, call: Callable[[], T]) -> T:
        self.clock.work((time.perf_counter() - self.resumed) * self.network.scale(self.rank))
        self.baton.release()
        try:
            return call()
        finally:
            self.baton.acquire(self.rank)
            self.resumed = time.perf_counter()

    def exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, partial: bool = False,
                 patience: int = 1, max_length: int | None = None, head: int = 0) -> dict[Rank, bytes]:
        def call() -> dict[Rank, bytes]:
            net, latency = self.network, self.network.section.latency_ms / 1e3
            leaves = self.clock.now
            for j, data in outgoing.items():  # one uplink: messages leave one after another
                leaves += net.transfer_s(len(data))
                self.sent += 1
                retries = net.lost_tries(self.rank, j, tag, self.sent) * net.section.retransmit_ms / 1e3
                net.post(self.rank, j, tag, leaves + latency + retries)
            got = self.inner.exchange(outgoing, incoming_from, tag, partial, patience, max_length, head)
            arrivals = [a for j in incoming_from if (a := net.arrival(j, self.rank, tag)) is not None]
            self.clock.wait_until(max([leaves, *arrivals]))
            return got

        return self._waiting(call)

    def _synchronised(self, call: Callable[[], T]) -> T:
        """A collective ends when the last peer has joined it, one latency later."""
        def both() -> T:
            result = call()
            last = self.inner._collective("clock", self.clock.now, max)
            self.clock.wait_until(last + self.network.section.latency_ms / 1e3)
            return result

        return self._waiting(both)

    def all_reduce_sum(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._synchronised(lambda: self.inner.all_reduce_sum(tensor, dtype))

    def all_gather_bytes(self, data: bytes, max_length: int | None = None) -> list[bytes]:
        return self._synchronised(lambda: self.inner.all_gather_bytes(data, max_length))

    def barrier(self) -> None:
        self._synchronised(lambda: self.inner._collective("barrier", True))

    def emulated(self) -> dict[str, float]:
        """This round's seconds on the emulated network (since the last call)."""
        self.clock.work((time.perf_counter() - self.resumed) * self.network.scale(self.rank))
        self.resumed = time.perf_counter()
        return self.clock.since_mark()

    def bare_exchange(self, *args: Any, **kwargs: Any) -> float:
        raise NotImplementedError("bare send/recv probes measure a real network; not in simulation")
