"""One averaging round at one peer: encode -> seal -> exchange -> open -> decode -> mix.

Orchestration only: the codec, the envelope and the transport hold the logic. Three modes
share this path so baselines are honest: `gossip` (neighbours on the topology), `allreduce`
(exact mean every round, FedAvg without a server), `local` (no communication).

Compressed gossip comes in two shapes. Stateless: each message is the compressed adapter
(right for unbiased codecs). Stateful (error feedback, CHOCO): each message is the
compressed change since the last one plus what the codec dropped before, and every peer
keeps a public copy x_hat_j of each neighbour (and of itself) that the messages update
identically on both ends. Plain mixing uses the copies as the neighbours' adapters; CHOCO
moves x_i by gamma * sum_j W_ij (x_hat_j - x_hat_i), which keeps the network mean.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from p2pfed.codec import Codec, CodecError, Decoded, ErrorFeedback, StochasticInt
from p2pfed.config import ConfigError
from p2pfed.faults import FaultInjector
from p2pfed.identity import Identity, Roster
from p2pfed.topology import Topology
from p2pfed.transport import Transport, TransportTimeout
from p2pfed.secure import ABSTAIN, CORRECTION, REQUEST, FixedPoint, SecureCost, SecureError, SecureNeighbourhood, check_secure_topology, decode_missing, encode_missing
from p2pfed.wire import OVERHEAD, Verifier, WireError, seal

log = logging.getLogger("p2pfed.gossip")


@dataclass
class RoundStats:
    """What one averaging round cost and what it refused."""

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_estimated: bool = False
    bytes_fp32: int = 0
    """What the same messages would have weighed as uncompressed fp32 envelopes."""
    codec_s: float = 0.0
    crypto_s: float = 0.0
    """Signing and verifying."""
    comm_s: float = 0.0
    neighbours: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    mask_s: float = 0.0
    """Secure mode: generating pairwise masks (ChaCha20)."""
    clipped: int = 0
    """Secure mode: values clipped to the fixed-point bound."""
    dropouts: int = 0
    """Secure mode: senders missing from the sum whose masks were removed by recovery."""
    abandoned: bool = False
    """Secure mode: the sum could not be completed, so this peer kept its own adapter."""
    local_consensus: float | None = None
    """(1/2) sum_j W_ij ||x_i - x_j||^2 over the neighbours heard (free; before mixing). Its
    mean over peers is Xi^2 exactly for a complete graph with uniform weights."""


    @staticmethod
    def combine(steps: list["RoundStats"]) -> "RoundStats":
        """One round's totals over its gossip steps (the local estimate is the first step's)."""
        total = RoundStats(neighbours=steps[0].neighbours, local_consensus=steps[0].local_consensus,
                           bytes_estimated=steps[0].bytes_estimated)
        for s in steps:
            total.bytes_sent += s.bytes_sent
            total.bytes_received += s.bytes_received
            total.bytes_fp32 += s.bytes_fp32
            total.codec_s += s.codec_s
            total.crypto_s += s.crypto_s
            total.comm_s += s.comm_s
            total.mask_s += s.mask_s
            total.clipped += s.clipped
            total.dropouts += s.dropouts
            total.abandoned = total.abandoned or s.abandoned
            for reason, count in s.rejected.items():
                total.rejected[reason] = total.rejected.get(reason, 0) + count
        return total


class Averager:
    """Mixes this peer's adapter vector with its neighbours' once per round."""

    def __init__(self, transport: Transport, mode: str, codec: Codec, topology: Topology | None,
                 identity: Identity | None = None, roster: Roster | None = None, faults: FaultInjector | None = None,
                 *, algorithm: str = "plain", gamma: float = 0.5, error_feedback: bool = False,
                 initial: torch.Tensor | None = None, secure: FixedPoint | None = None, seed: int = 0) -> None:
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
        self.algorithm = algorithm
        self.gamma = gamma
        self.stateful = mode == "gossip" and (algorithm == "choco" or error_feedback)
        if self.stateful and topology is not None and topology.period > 1:
            raise ConfigError("[gossip] algorithm/error_feedback: CHOCO and error feedback keep a copy of each neighbour, "
                              f"so they need a static topology; {topology.source} changes neighbours every round")
        self.feedback = ErrorFeedback(codec) if self.stateful else None
        self.initial = initial
        """The common starting adapter: every public copy starts there (zeros if not given)."""
        self.last_sent: torch.Tensor | None = None
        self.own_copy: torch.Tensor | None = None
        self.copies: dict[int, torch.Tensor] = {}
        self.lost: set[int] = set()
        """Neighbours whose copy fell out of step (a refused message); no longer mixed."""
        self.exchanges = 0
        """Exchanges so far: every peer counts the same, so it tags messages in lockstep."""
        self.secure: SecureNeighbourhood | None = None
        if secure is not None:
            assert topology is not None and identity is not None and roster is not None
            check_secure_topology(topology, secure)
            self.secure = SecureNeighbourhood(identity, roster, topology, secure, Codec.STRUCTURES.index(codec.structure), seed)

    def average(self, vector: torch.Tensor, round: int, step: int = 0) -> tuple[torch.Tensor, RoundStats]:
        """Return the mixed vector for gossip step `step` of `round`, and what it cost."""
        if self.mode == "local":
            return vector, RoundStats()
        if self.mode == "allreduce":
            return self._allreduce(vector)
        try:
            if self.secure is not None:
                return self._secure_gossip(vector, round, step)
            return self._gossip(vector, round, step)
        except TransportTimeout as err:
            raise TransportTimeout(f"round {round + 1}{f' step {step}' if step else ''}: {err}") from None

    def state(self) -> dict:
        """Codec randomness, error-feedback and CHOCO copies: what a restart must not lose."""
        values = self.codec.values
        return {
            "exchanges": self.exchanges, "last_sent": self.last_sent, "own_copy": self.own_copy, "copies": self.copies,
            "lost": sorted(self.lost), "residual": self.feedback.residual if self.feedback else None,
            "warm_start": self.codec.warm_start,
            "rounding": values.generator.get_state() if isinstance(values, StochasticInt) else None,
            "secure": self.secure.generator.get_state() if self.secure else None,
        }

    def restore(self, state: dict) -> None:
        self.exchanges, self.last_sent, self.own_copy = state["exchanges"], state["last_sent"], state["own_copy"]
        self.copies, self.lost = state["copies"], set(state["lost"])
        if self.feedback is not None:
            self.feedback.residual = state["residual"]
        self.codec.warm_start = state["warm_start"]
        if state["rounding"] is not None and isinstance(self.codec.values, StochasticInt):
            self.codec.values.generator.set_state(state["rounding"])
        if state["secure"] is not None and self.secure is not None:
            self.secure.generator.set_state(state["secure"])

    def _exchange(self, outgoing: dict[int, bytes], incoming_from: list[int], stats: RoundStats, partial: bool = False,
                  patience: int = 1) -> dict[int, bytes]:
        """One lockstep exchange, timed and counted."""
        self.exchanges += 1
        stats.bytes_sent += sum(len(m) for m in outgoing.values())
        start = time.perf_counter()
        incoming = self.transport.exchange(outgoing, incoming_from, self.exchanges, partial, patience)
        stats.comm_s += time.perf_counter() - start
        stats.bytes_received += sum(len(m) for m in incoming.values())
        return incoming

    def _seal_all(self, payloads: dict[int, bytes], round: int, step: int, codec: int, stats: RoundStats) -> dict[int, bytes]:
        assert self.identity is not None and self.topology is not None
        start = time.perf_counter()
        epoch = round % self.topology.period
        sealed = {j: seal(self.identity.signing, self.rank, j, round, step, epoch, codec, p) for j, p in payloads.items()}
        stats.crypto_s += time.perf_counter() - start
        return sealed

    def _open(self, message: bytes, source: int, round: int, step: int, senders: list[int], max_payload: int,
              codecs: tuple[int, ...], stats: RoundStats) -> tuple[int, bytes] | None:
        """(codec id, payload) of a verified message, or None after counting and logging the refusal."""
        assert self.verifier is not None
        start = time.perf_counter()
        try:
            header, payload = self.verifier.open_header(message, source, round, step, senders, max_payload, codecs)
            return header.codec, payload
        except WireError as err:
            stats.rejected[err.reason] = stats.rejected.get(err.reason, 0) + 1
            log.warning("peer %d, round %d: message from peer %d rejected: %s", self.rank, round + 1, source, err)
            return None
        finally:
            stats.crypto_s += time.perf_counter() - start

    def _secure_gossip(self, vector: torch.Tensor, round: int, step: int) -> tuple[torch.Tensor, RoundStats]:
        """Masked data, then missing-sender reports, then (only if needed) corrections; see p2pfed.secure."""
        assert self.topology is not None and self.secure is not None
        secure, weights = self.secure, self.topology.weights(round)[self.rank]
        senders = self.topology.in_neighbours(self.rank, round)
        receivers = self.topology.out_neighbours(self.rank, round)
        stats, cost = RoundStats(neighbours=senders), SecureCost()
        chosen = self.codec.shared_indices(vector.numel(), round, step) if self.codec.structure == "randk" else None
        values = vector if chosen is None else vector[chosen]
        count = values.numel()

        start = time.perf_counter()
        payloads = secure.contributions(values, round, step, cost)
        stats.codec_s += time.perf_counter() - start - cost.mask_s
        outgoing = self._seal_all(payloads, round, step, secure.codec_id, stats)
        if self.faults is not None:
            outgoing = self.faults.corrupt(outgoing, round + 1)
        stats.bytes_fp32 = len(outgoing) * (OVERHEAD + 4 * vector.numel())
        present: dict[int, bytes] = {}
        for j, message in sorted(self._exchange(outgoing, senders, stats, partial=True).items()):
            opened = self._open(message, j, round, step, senders, 4 * count, (secure.codec_id, ABSTAIN), stats)
            if opened is not None and opened[0] == ABSTAIN:
                stats.rejected["abstain"] = stats.rejected.get("abstain", 0) + 1
                log.warning("peer %d, round %d: peer %d abstained", self.rank, round + 1, j)
            elif opened is not None:
                present[j] = opened[1]
        missing = [j for j in senders if j not in present]
        for j in missing:
            self.verifier.close(j, round, step, (secure.codec_id, ABSTAIN))  # type: ignore[union-attr]

        reports = self._seal_all({j: encode_missing(missing) for j in senders}, round, step, REQUEST, stats)
        requests: dict[int, list[int]] = {}
        for i, message in sorted(self._exchange(reports, receivers, stats, partial=True, patience=2).items()):
            opened = self._open(message, i, round, step, receivers, 4 * self.transport.world_size, (REQUEST,), stats)
            try:
                requests[i] = decode_missing(opened[1], self.topology.in_neighbours(i, round)) if opened else []
            except SecureError as err:
                log.warning("peer %d, round %d: ignoring peer %d's dropout report: %s", self.rank, round + 1, i, err)
        fixes = self._seal_all(secure.corrections(requests, round, step, count, cost), round, step, CORRECTION, stats)
        expected = sorted(present) if secure.expects_corrections(senders, missing) else []
        corrections = {j: opened[1] for j, m in self._exchange(fixes, expected, stats, partial=True, patience=3).items()
                       if (opened := self._open(m, j, round, step, expected, 4 * count, (CORRECTION,), stats)) is not None}

        stats.mask_s, stats.clipped, stats.dropouts = cost.mask_s, cost.clipped, len(missing)
        if len(present) < 2 or (missing and len(corrections) != len(present)):
            stats.abandoned = True
            log.warning("peer %d, round %d: secure sum abandoned (%d of %d senders, %d corrections): keeping its own adapter",
                        self.rank, round + 1, len(present), len(senders), len(corrections))
            return vector, stats
        start = time.perf_counter()
        total = SecureNeighbourhood.unmask([present[j] for j in sorted(present)], list(corrections.values()), secure.fixed, count)
        self_weight = 1.0 - sum(float(weights[j]) for j in present)
        mixed = vector.clone()
        if chosen is None:
            mixed = vector * self_weight + total
        else:
            mixed[chosen] = values * self_weight + total
        stats.codec_s += time.perf_counter() - start
        return mixed, stats

    def _allreduce(self, vector: torch.Tensor) -> tuple[torch.Tensor, RoundStats]:
        n = self.transport.world_size
        start = time.perf_counter()
        mean = self.transport.all_reduce_sum(vector) / n
        # A ring all-reduce moves 2(n-1)/n of the vector each way; gloo does not report bytes.
        estimate = int(2 * (n - 1) / n * vector.numel() * 4)
        return mean, RoundStats(bytes_sent=estimate, bytes_received=estimate, bytes_estimated=True, bytes_fp32=estimate, comm_s=time.perf_counter() - start, neighbours=[])

    def _gossip(self, vector: torch.Tensor, round: int, step: int) -> tuple[torch.Tensor, RoundStats]:
        assert self.topology is not None and self.identity is not None
        weights = self.topology.weights(round)[self.rank]
        senders = self.topology.in_neighbours(self.rank, round)
        receivers = self.topology.out_neighbours(self.rank, round)
        stats = RoundStats(neighbours=senders)

        start = time.perf_counter()
        payload = self._encode(vector, round, step)
        stats.codec_s += time.perf_counter() - start
        outgoing = self._seal_all({j: payload for j in receivers}, round, step, self.codec.id, stats)
        if self.faults is not None:
            outgoing = self.faults.corrupt(outgoing, round + 1)
        stats.bytes_fp32 = len(outgoing) * (OVERHEAD + 4 * vector.numel())
        incoming = self._exchange(outgoing, senders, stats)

        heard: dict[int, torch.Tensor] = {}
        for j in sorted(incoming):  # fixed order: the same inputs give the same bits
            message = self._accept(incoming[j], j, round, step, senders, vector.numel(), stats)
            if message is not None and j not in self.lost:
                heard[j] = self._neighbour_value(j, message, vector)
            elif message is None and self.stateful and j not in self.lost:
                self.lost.add(j)
                log.warning("peer %d: no longer mixing peer %d: its public copy fell out of step with a refused message", self.rank, j)
        mixed = self._mix(vector, heard, weights)
        stats.local_consensus = 0.5 * sum(float(weights[j]) * float((vector - value).pow(2).sum()) for j, value in heard.items())
        return mixed, stats

    def _encode(self, vector: torch.Tensor, round: int, step: int) -> bytes:
        """Stateless: the compressed adapter. Stateful: the change since the last message plus the residual."""
        if self.feedback is None:
            return self.codec.encode(vector, round, step)
        if self.last_sent is None:
            self.last_sent = self._start_point(vector)
            self.own_copy = self.last_sent.clone()
        payload, decoded = self.feedback.encode(vector - self.last_sent, round, step)
        self.own_copy += decoded
        self.last_sent = vector.detach().clone()
        return payload

    def _start_point(self, vector: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(vector) if self.initial is None else self.initial.detach().to(vector.dtype).clone()

    def _neighbour_value(self, j: int, message: Decoded, vector: torch.Tensor) -> torch.Tensor:
        """What this peer takes as neighbour j's adapter: the updated copy, or the message (own values where it is silent)."""
        if not self.stateful:
            return message.fill(vector)
        if j not in self.copies:
            self.copies[j] = self._start_point(vector)
        self.copies[j] += message.values
        return self.copies[j]

    def _mix(self, vector: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Plain: W_ii x_i + sum_j W_ij x_j (a missing neighbour's weight goes to self). CHOCO: the gamma step."""
        if self.algorithm == "choco":
            assert self.own_copy is not None
            pull = torch.zeros_like(vector)
            for j in sorted(heard):
                pull.add_(heard[j] - self.own_copy, alpha=float(weights[j]))
            return vector + self.gamma * pull
        self_weight = 1.0 - sum(float(weights[j]) for j in heard)
        mixed = vector * self_weight
        for j in sorted(heard):
            mixed.add_(heard[j], alpha=float(weights[j]))
        return mixed

    def _accept(self, message: bytes, source: int, round: int, step: int, senders: list[int], length: int, stats: RoundStats) -> Decoded | None:
        """Verify and decode one neighbour's message; None (and one log line) if refused."""
        opened = self._open(message, source, round, step, senders, self.codec.max_payload(length), (self.codec.id,), stats)
        if opened is None:
            return None
        start = time.perf_counter()
        try:
            return self.codec.decode(opened[1], length, round, step)
        except CodecError as err:
            stats.rejected["codec"] = stats.rejected.get("codec", 0) + 1
            log.warning("peer %d, round %d: message from peer %d rejected: %s", self.rank, round + 1, source, err)
            return None
        finally:
            stats.codec_s += time.perf_counter() - start
