"""The outer optimizer over gossip: DiLoCo's Nesterov step on the round's outer gradient.

A round starts at theta (the previous round's result), takes H inner steps, and mixes; the
outer gradient is g = theta - mix (DiLoCo's pseudo-gradient, averaged by the mix). The outer
step is SGD with momentum on g, as torch.optim.SGD defines it:
    m <- momentum * m + g
    theta' = theta - lr * (g + momentum * m)   (Nesterov)   or   theta - lr * m   (classical)
With lr = 1 and momentum = 0 this is theta' = mix: plain gossip. The momentum m is per peer,
checkpointed, and never sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from p2pfed.config import OuterSection


@dataclass
class OuterOptimizer:
    section: OuterSection
    momentum: torch.Tensor | None = field(default=None)

    def step(self, start: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The next round's start from this round's start and its mix."""
        gradient = start - mixed
        buffer = gradient.clone() if self.momentum is None else self.momentum.mul_(self.section.momentum).add_(gradient)
        self.momentum = buffer
        direction = gradient + self.section.momentum * buffer if self.section.nesterov else buffer
        return start - self.section.lr * direction

    def state(self) -> dict:
        return {"momentum": self.momentum}

    def restore(self, state: dict) -> None:
        momentum = state.get("momentum")
        if momentum is not None and not isinstance(momentum, torch.Tensor):
            raise TypeError(f"outer momentum of type {type(momentum).__name__}, expected a tensor")
        self.momentum = momentum
