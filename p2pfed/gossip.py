"""One averaging round at one peer: encode -> seal -> exchange -> open -> decode -> mix.

Orchestration only: the codec, the envelope and the transport hold the logic. Three modes
share this path so baselines are honest: `gossip` (neighbours on the topology), `allreduce`
(exact mean every round, FedAvg without a server), `local` (no communication).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from p2pfed.codec import CodecError, DenseCodec
from p2pfed.topology import Topology
from p2pfed.transport import Transport
from p2pfed.wire import WireError, open_envelope, seal

log = logging.getLogger("p2pfed.gossip")


@dataclass
class RoundStats:
    """What one averaging round cost and what it refused."""

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_estimated: bool = False
    codec_s: float = 0.0
    comm_s: float = 0.0
    neighbours: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    local_consensus: float | None = None
    """sum_j W_ij ||x_i - x_j||^2 over the neighbours heard this round (free estimate)."""


class Averager:
    """Mixes this peer's adapter vector with its neighbours' once per round."""

    def __init__(self, transport: Transport, mode: str, codec: DenseCodec, topology: Topology | None) -> None:
        if mode == "gossip" and topology is None:
            raise ValueError("gossip mode needs a topology")
        self.transport = transport
        self.rank = transport.rank
        self.mode = mode
        self.codec = codec
        self.topology = topology

    def average(self, vector: torch.Tensor, round: int) -> tuple[torch.Tensor, RoundStats]:
        """Return the mixed vector for `round` and the round's costs."""
        if self.mode == "local":
            return vector, RoundStats()
        if self.mode == "allreduce":
            return self._allreduce(vector)
        return self._gossip(vector, round)

    def _allreduce(self, vector: torch.Tensor) -> tuple[torch.Tensor, RoundStats]:
        n = self.transport.world_size
        start = time.perf_counter()
        mean = self.transport.all_reduce_sum(vector) / n
        # A ring all-reduce moves 2(n-1)/n of the vector each way; gloo does not report bytes.
        estimate = int(2 * (n - 1) / n * vector.numel() * 4)
        return mean, RoundStats(bytes_sent=estimate, bytes_received=estimate, bytes_estimated=True, comm_s=time.perf_counter() - start, neighbours=[])

    def _gossip(self, vector: torch.Tensor, round: int) -> tuple[torch.Tensor, RoundStats]:
        assert self.topology is not None
        weights = self.topology.weights(round)[self.rank]
        senders = self.topology.in_neighbours(self.rank, round)
        receivers = self.topology.out_neighbours(self.rank, round)
        stats = RoundStats(neighbours=senders)

        start = time.perf_counter()
        payload = self.codec.encode(vector)
        epoch = round % self.topology.period
        outgoing = {j: seal(self.rank, j, round, 0, epoch, self.codec.id, payload) for j in receivers}
        stats.codec_s += time.perf_counter() - start
        stats.bytes_sent = sum(len(m) for m in outgoing.values())

        start = time.perf_counter()
        incoming = self.transport.exchange(outgoing, senders, tag=round)
        stats.comm_s = time.perf_counter() - start
        stats.bytes_received = sum(len(m) for m in incoming.values())

        start = time.perf_counter()
        self_weight = float(weights[self.rank])
        mixed = torch.zeros_like(vector, dtype=torch.float32)
        local_consensus = 0.0
        for j in sorted(incoming):  # fixed order: the same inputs give the same bits
            neighbour = self._accept(incoming[j], j, round, vector.numel(), stats)
            if neighbour is None:
                self_weight += float(weights[j])  # give the weight back: the row stays stochastic
                continue
            mixed.add_(neighbour, alpha=float(weights[j]))
            local_consensus += float(weights[j]) * float((vector - neighbour).pow(2).sum())
        mixed.add_(vector, alpha=self_weight)
        stats.local_consensus = local_consensus
        stats.codec_s += time.perf_counter() - start
        return mixed, stats

    def _accept(self, message: bytes, sender: int, round: int, length: int, stats: RoundStats) -> torch.Tensor | None:
        """Open, check and decode one neighbour's message; None (and a log line) if refused."""
        try:
            header, payload = open_envelope(message, self.codec.max_payload(length))
            if header.receiver != self.rank:
                raise WireError("receiver", f"addressed to peer {header.receiver}")
            if header.sender != sender:
                raise WireError("sender", f"claims to be from peer {header.sender}")
            if header.round != round:
                raise WireError("replay", f"is for round {header.round}")
            if header.codec != self.codec.id:
                raise WireError("codec", f"codec id {header.codec}, expected {self.codec.id}")
            return self.codec.decode(payload, length)
        except (WireError, CodecError) as err:
            reason = getattr(err, "reason", "codec")
            stats.rejected[reason] = stats.rejected.get(reason, 0) + 1
            log.warning("peer %d, round %d: message from peer %d rejected: %s", self.rank, round, sender, err)
            return None
