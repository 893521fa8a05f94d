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
from p2pfed.faults import FaultInjector
from p2pfed.identity import Identity, Roster
from p2pfed.topology import Topology
from p2pfed.transport import Transport
from p2pfed.wire import Verifier, WireError, seal

log = logging.getLogger("p2pfed.gossip")


@dataclass
class RoundStats:
    """What one averaging round cost and what it refused."""

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_estimated: bool = False
    codec_s: float = 0.0
    crypto_s: float = 0.0
    """Signing and verifying."""
    comm_s: float = 0.0
    neighbours: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    local_consensus: float | None = None
    """sum_j W_ij ||x_i - x_j||^2 over the neighbours heard this round (free estimate)."""


class Averager:
    """Mixes this peer's adapter vector with its neighbours' once per round."""

    def __init__(self, transport: Transport, mode: str, codec: DenseCodec, topology: Topology | None,
                 identity: Identity | None = None, roster: Roster | None = None, faults: FaultInjector | None = None) -> None:
        if mode == "gossip" and (topology is None or identity is None or roster is None):
            raise ValueError("gossip mode needs a topology, this peer's identity and the roster")
        self.transport = transport
        self.rank = transport.rank
        self.mode = mode
        self.codec = codec
        self.topology = topology
        self.identity = identity
        self.verifier = Verifier(self.rank, roster) if roster is not None else None
        self.faults = faults

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
        stats.codec_s += time.perf_counter() - start
        start = time.perf_counter()
        epoch = round % self.topology.period
        key = self.identity.signing
        outgoing = {j: seal(key, self.rank, j, round, 0, epoch, self.codec.id, payload) for j in receivers}
        stats.crypto_s += time.perf_counter() - start
        if self.faults is not None:
            outgoing = self.faults.corrupt(outgoing, round + 1)
        stats.bytes_sent = sum(len(m) for m in outgoing.values())

        start = time.perf_counter()
        incoming = self.transport.exchange(outgoing, senders, tag=round)
        stats.comm_s = time.perf_counter() - start
        stats.bytes_received = sum(len(m) for m in incoming.values())

        self_weight = float(weights[self.rank])
        mixed = torch.zeros_like(vector, dtype=torch.float32)
        local_consensus = 0.0
        for j in sorted(incoming):  # fixed order: the same inputs give the same bits
            neighbour = self._accept(incoming[j], j, round, senders, vector.numel(), stats)
            if neighbour is None:
                self_weight += float(weights[j])  # give the weight back: the row stays stochastic
                continue
            mixed.add_(neighbour, alpha=float(weights[j]))
            local_consensus += float(weights[j]) * float((vector - neighbour).pow(2).sum())
        mixed.add_(vector, alpha=self_weight)
        stats.local_consensus = local_consensus
        return mixed, stats

    def _accept(self, message: bytes, source: int, round: int, senders: list[int], length: int, stats: RoundStats) -> torch.Tensor | None:
        """Verify and decode one neighbour's message; None (and one log line) if refused."""
        assert self.verifier is not None
        try:
            start = time.perf_counter()
            try:
                payload = self.verifier.open(message, source, round, 0, senders, self.codec.max_payload(length), self.codec.id)
            finally:
                stats.crypto_s += time.perf_counter() - start
            start = time.perf_counter()
            try:
                return self.codec.decode(payload, length)
            finally:
                stats.codec_s += time.perf_counter() - start
        except (WireError, CodecError) as err:
            reason = getattr(err, "reason", "codec")
            stats.rejected[reason] = stats.rejected.get(reason, 0) + 1
            log.warning("peer %d, round %d: message from peer %d rejected: %s", self.rank, round + 1, source, err)
            return None
