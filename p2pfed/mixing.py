"""Mixing rules: how a peer combines its adapter with what its neighbours sent.

Each rule is one small class with `mix(own, heard, weights)`; the averager picks one.
`heard` holds the decoded adapters of the neighbours whose messages were accepted this
round; a neighbour missing from it gives its weight back to the peer's own term.

The robust rules bound what a Byzantine neighbour (valid key, harmful adapter) can do:
- ClippedGossip (He, Karimireddy, Jaggi 2022): x_i + sum_j W_ij clip(x_j - x_i, tau_i),
  self-centred clipping; tau_i adapts each round so that the `byzantine` farthest
  neighbours are clipped to the distance of the next one. Each round's pull of an attacker
  is bounded, not removed: an attacker pushing the same way every round still drifts the
  honest mean by up to W_ij tau_i per round.
- Coordinate-wise trimmed mean and median over the peer's own value and its neighbours'.
They need individual values, so they do not combine with secure mode (which sums masked
messages) or CHOCO (which mixes public copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from p2pfed.config import ConfigError
from p2pfed.topology import Topology

ROBUST_RULES = ("none", "clip", "trimmed", "median")


class MixingRule(Protocol):
    def mix(self, own: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """The peer's new adapter from its own and the neighbours' it heard (weights: its row of W)."""
        ...


SLICE = 1 << 18
"""Values per slice of a fused pass (1 MiB of fp32): the slices of the own vector, the
neighbours' and the result stay in cache while every operation on them runs."""


class WeightedAverage:
    """Plain gossip: W_ii x_i + sum_j W_ij x_j, a missing neighbour's weight going to self."""

    def mix(self, own: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        return self.mix_with_distance(own, heard, weights)[0]

    def mix_with_distance(self, own: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The mix and the local consensus estimate 1/2 sum_j W_ij |x_i - x_j|^2 in one pass, slice
        by slice: each vector is read from memory once, where a whole-vector operation at a time
        reads each one per operation (and needs a temporary the size of the adapter). Each value of
        the mix is computed by the same operations in the same order as over whole vectors."""
        shape, own = own.shape, own.reshape(-1)
        heard = {j: h.reshape(-1) for j, h in heard.items()}
        order = sorted(heard)
        alphas = [float(weights[j]) for j in order]
        mixed = torch.empty_like(own)
        difference = torch.empty(min(SLICE, own.numel()), dtype=own.dtype, device=own.device)
        squares = [0.0] * len(order)
        for start in range(0, own.numel(), SLICE):
            end = min(own.numel(), start + SLICE)
            mine, out, gap = own[start:end], mixed[start:end], difference[: end - start]
            torch.mul(mine, 1.0 - sum(alphas), out=out)
            for k, j in enumerate(order):
                theirs = heard[j][start:end]
                out.add_(theirs, alpha=alphas[k])
                torch.sub(mine, theirs, out=gap)
                squares[k] += float(torch.dot(gap, gap))
        return mixed.reshape(shape), 0.5 * sum(alpha * square for alpha, square in zip(alphas, squares))


@dataclass(frozen=True)
class ClippedGossip:
    """Self-centred clipping with an adaptive radius: at most `byzantine` neighbours are cut short."""

    byzantine: int

    def radius(self, distances: list[float]) -> float:
        """tau_i: the (byzantine + 1)-th largest distance (0 when every neighbour may be Byzantine)."""
        ordered = sorted(distances, reverse=True)
        return ordered[self.byzantine] if len(ordered) > self.byzantine else 0.0

    def mix(self, own: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        pulls = {j: heard[j] - own for j in sorted(heard)}
        norms = {j: float(p.norm()) for j, p in pulls.items()}
        tau = self.radius(list(norms.values()))
        mixed = own.clone()
        for j, pull in pulls.items():
            scale = min(1.0, tau / norms[j]) if norms[j] > 0 else 0.0
            mixed.add_(pull, alpha=float(weights[j]) * scale)
        return mixed


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise: drop the `byzantine` largest and smallest of own + heard, average the rest."""

    byzantine: int

    def mix(self, own: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([own, *(heard[j] for j in sorted(heard))])
        b = self.byzantine
        if stacked.shape[0] <= 2 * b:
            return own.clone()  # too few heard this round to trim safely
        ordered = stacked.sort(dim=0).values
        return ordered[b: stacked.shape[0] - b].mean(dim=0)


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median of own + heard (the lower middle for an even count)."""

    byzantine: int

    def mix(self, own: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        if len(heard) + 1 < 2 * self.byzantine + 1:
            return own.clone()
        return torch.stack([own, *(heard[j] for j in sorted(heard))]).median(dim=0).values


def build_rule(robust: str, byzantine: int) -> MixingRule:
    """The rule a `[gossip] robust` setting names."""
    if robust == "clip":
        return ClippedGossip(byzantine)
    if robust == "trimmed":
        return TrimmedMean(byzantine)
    if robust == "median":
        return CoordinateMedian(byzantine)
    return WeightedAverage()


def check_topology(robust: str, byzantine: int, topology: Topology) -> None:
    """`check_tolerance` on each peer's fewest senders over the topology's schedule."""
    degrees = {i: min(len(topology.in_neighbours(i, e)) for e in range(topology.period)) for i in range(topology.n)}
    check_tolerance(robust, byzantine, degrees, topology.source)


def check_tolerance(robust: str, byzantine: int, degrees: dict[int, int], source: str) -> None:
    """Refuse, with a sentence, a graph where some peer's neighbourhood cannot outvote `byzantine` attackers."""
    if robust == "none":
        return
    # honest neighbours must outnumber the attackers: clipping takes its radius from them, and a
    # trimmed mean or median of own + d values needs honest values on both sides after trimming
    need = 2 * byzantine + 1 if robust == "clip" else 2 * byzantine + 2
    for rank, degree in sorted(degrees.items()):
        if degree < need:
            raise ConfigError(f"[gossip] robust = '{robust}' with byzantine = {byzantine}: peer {rank} hears only {degree} neighbours on "
                              f"{source}, and {robust} needs at least {need} to tolerate {byzantine} attacker(s)")
