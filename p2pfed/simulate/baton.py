"""One peer at a time computes on the shared base model.

Peers are threads. The baton is held whenever a peer runs its own code and let go only
while it waits on the network (p2pfed.simulate.transport), so the shared model's adapter
parameters and torch's global RNG always belong to the holder: taking the baton puts the
previous holder's values aside and the new holder's in place. What is per peer stays per
peer: adapter values and RNG state here; optimizer, scheduler, sampler, averager and
identity in each peer's own objects."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class Slot:
    """A peer's adapter values and RNG state while another peer holds the model."""

    values: list[torch.Tensor]
    rng: torch.Tensor


class Baton:
    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.initial = [p.detach().clone() for p in params]
        """The common initial adapter: every peer starts from it, as every torchrun peer does."""
        self.lock = threading.Lock()
        self.slots: dict[int, Slot] = {}
        self.loaded: int | None = None
        """Whose values the model holds now."""
        self.swaps = 0

    def acquire(self, rank: int) -> None:
        self.lock.acquire()
        if self.loaded == rank:
            return
        with torch.no_grad():
            if self.loaded is not None:
                slot = self.slots[self.loaded]
                for kept, param in zip(slot.values, self.params):
                    kept.copy_(param)
                slot.rng = torch.get_rng_state()
            slot = self.slots.get(rank)
            if slot is None:
                slot = self.slots[rank] = Slot([v.clone() for v in self.initial], torch.get_rng_state())
            for kept, param in zip(slot.values, self.params):
                param.copy_(kept)
                param.grad = None
            torch.set_rng_state(slot.rng)
        self.loaded = rank
        self.swaps += 1

    def release(self) -> None:
        self.lock.release()

    def per_peer_bytes(self) -> int:
        """What a slot holds (adapter values; the RNG state is 5 KB)."""
        return sum(v.numel() * v.element_size() for v in self.initial)
