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

import numpy as np
import torch

from p2pfed.config import Config, ConfigError, OuterSection
from p2pfed.topology import Topology


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

    def restore(self, state: dict, like: torch.Tensor) -> None:
        """The checkpointed momentum, which must be a finite float32 vector shaped like the adapter."""
        momentum = state.get("momentum")
        if momentum is not None:
            if not isinstance(momentum, torch.Tensor) or momentum.dtype != torch.float32 or momentum.shape != like.shape:
                raise ValueError(f"outer momentum {getattr(momentum, 'dtype', type(momentum).__name__)} "
                                 f"{tuple(getattr(momentum, 'shape', ()))}, expected float32 {tuple(like.shape)}")
            if not bool(torch.isfinite(momentum).all()):
                raise ValueError("outer momentum holds non-finite values")
            momentum = momentum.detach().clone()
        self.momentum = momentum


def growth(section: OuterSection, eigenvalue: float) -> float:
    """Spectral radius of one round of the outer step on a disagreement along an eigenvector of
    W with `eigenvalue` (outer gradient h x, h = 1 - eigenvalue): (x, m) -> (x', m') with
    m' = mu m + h x and x' = x - lr (h x + mu m') (Nesterov) or x - lr m' (classical)."""
    lr, mu, h = section.lr, section.momentum, 1.0 - eigenvalue
    if section.nesterov:
        step = np.array([[1 - lr * h * (1 + mu), -lr * mu * mu], [h, mu]])
    else:
        step = np.array([[1 - lr * h, -lr * mu], [h, mu]])
    return float(np.max(np.abs(np.linalg.eigvals(step))))


def check_stability(section: OuterSection, matrices: list[np.ndarray], where: str) -> None:
    """Refuse outer settings under which disagreement between peers grows from round to round on
    this topology (one rounding error or hostile message would then blow up)."""
    for matrix in matrices:
        eigenvalues = np.linalg.eigvals(matrix).real
        worst = max((growth(section, float(e)) for e in eigenvalues if e < 1 - 1e-9), default=0.0)
        if worst >= 1.0:
            raise ConfigError(f"[outer] lr = {section.lr}, momentum = {section.momentum}: on {where} the outer step makes "
                              f"disagreement between peers grow {worst:.3f}x a round; lower lr or momentum (DiLoCo's 0.7 and 0.9 are stable "
                              "on every shipped topology)")


def check_outer(config: Config, topology: Topology | None) -> None:
    """check_stability on the run's mixing: the topology's matrices, or allreduce's exact mean."""
    n = config.run.peers
    matrices = topology.matrices if topology is not None else [np.full((n, n), 1.0 / n)]
    check_stability(config.outer, matrices, config.gossip.topology if topology is not None else f"{config.gossip.mode} mode")
