"""The in-process transport a simulated peer talks through: LocalTransport's mailboxes,
letting go of the baton while it waits, so the neighbour it waits for can compute."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from p2pfed.simulate.baton import Baton
from p2pfed.transport import LocalTransport, Rank

T = TypeVar("T")


class SimTransport:
    def __init__(self, inner: LocalTransport, baton: Baton) -> None:
        self.inner = inner
        self.baton = baton
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.bytes_out = 0
        """Every byte this peer handed to the network (the emulated clock charges them)."""

    @property
    def refused(self) -> dict[Rank, str]:
        return self.inner.refused

    def _waiting(self, call: Callable[[], T]) -> T:
        self.baton.release()
        try:
            return call()
        finally:
            self.baton.acquire(self.rank)

    def exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, partial: bool = False,
                 patience: int = 1, max_length: int | None = None) -> dict[Rank, bytes]:
        self.bytes_out += sum(len(d) for d in outgoing.values())
        return self._waiting(lambda: self.inner.exchange(outgoing, incoming_from, tag, partial, patience, max_length))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._waiting(lambda: self.inner.all_reduce_sum(tensor))

    def all_gather_bytes(self, data: bytes, max_length: int | None = None) -> list[bytes]:
        return self._waiting(lambda: self.inner.all_gather_bytes(data, max_length))

    def barrier(self) -> None:
        self._waiting(lambda: self.inner._collective("barrier", True))

    def bare_exchange(self, *args: Any, **kwargs: Any) -> float:
        raise NotImplementedError("bare send/recv probes measure a real network; not in simulation")
