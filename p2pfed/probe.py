"""How much a gossip exchange costs beyond moving its bytes: the benchmark's overhead probe.

After the last round each peer times a few extra gossip exchanges of its final adapter
(encode, seal, send, receive, verify, decode, mix) and, right after, a bare
torch.distributed send/recv of the same number of bytes to the same neighbours. Both start
from a barrier, so neither includes waiting for a slower peer's training. The probes'
results are discarded: the adapter a run saves is the one its last round produced. In
secure mode each probe also times a plain exchange of the same adapter (a twin averager
without masking), so the whole secure exchange is compared with the plain one in one run.
Probes exchange under their own purpose, so they never reuse a training round's masks.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from p2pfed.gossip import Averager
from p2pfed.secure import Purpose
from p2pfed.transport import TorchTransport


@dataclass(frozen=True)
class ExchangeProbe:
    """Median seconds of a gossip exchange and of a bare send/recv of the same bytes."""

    gossip_s: float
    bare_s: float
    message_bytes: int
    """Bytes per message in the bare exchange: the largest any peer sent in its gossip exchange."""
    probes: int
    plain_s: float | None = None
    """Secure mode: median seconds of a plain (unmasked) exchange of the same adapter."""
    stages: dict[str, float] = field(default_factory=dict)
    """Median seconds of each part of the gossip exchange (RoundStats' codec_s, crypto_s, mask_s, comm_s, mix_s)."""

    @property
    def ratio(self) -> float:
        return self.gossip_s / self.bare_s if self.bare_s > 0 else float("inf")


def probe_exchange(averager: Averager, transport: TorchTransport, vector: torch.Tensor, first_round: int, probes: int) -> ExchangeProbe:
    """Time `probes` gossip exchanges (rounds first_round, first_round+1, ...) against bare ones."""
    assert averager.topology is not None, "probes time neighbour gossip"
    rank, gossip_times, bare_times, plain_times, size = transport.rank, [], [], [], 0
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    twin = plain_twin(averager)
    for k in range(probes):
        round = first_round + k
        if twin is not None:  # a stand-in of the same size: the real adapter never leaves unmasked
            transport.barrier()
            start = time.perf_counter()
            twin.average(torch.randn(vector.shape, dtype=vector.dtype), round, purpose=Purpose.PROBE)
            plain_times.append(time.perf_counter() - start)
        # secure mode: a fresh stand-in too, never the final adapter, whose network mean monitoring
        # just revealed (mean less a neighbourhood's sum is the rest of the network)
        sent = vector if twin is None else torch.randn(vector.shape, dtype=vector.dtype)
        transport.barrier()
        start = time.perf_counter()
        _, stats = averager.average(sent, round, purpose=Purpose.PROBE)
        gossip_times.append(time.perf_counter() - start)
        for stage, seconds in stages.items():
            seconds.append(getattr(stats, stage))
        receivers = averager.topology.out_neighbours(rank, round)
        senders = averager.topology.in_neighbours(rank, round)
        mine = stats.bytes_sent // max(1, len(receivers))
        # every receiver must expect the size its senders send: all use the largest that any
        # envelope of this exchange could weigh (a peer cannot make the others allocate more)
        size = agreed_size(transport.all_gather_bytes(mine.to_bytes(8, "little"), max_length=8), mine, largest_envelope(averager, vector))
        transport.barrier()
        bare_times.append(transport.bare_exchange(size, receivers, senders))
    plain = statistics.median(plain_times) if plain_times else None
    return ExchangeProbe(statistics.median(gossip_times), statistics.median(bare_times), size, probes, plain,
                         {stage: statistics.median(seconds) for stage, seconds in stages.items()})


STAGES = ("codec_s", "crypto_s", "mask_s", "comm_s", "mix_s")


def largest_envelope(averager: Averager, vector: torch.Tensor) -> int:
    """The most bytes one message of this exchange can weigh (secure data carries shares too)."""
    from p2pfed.wire import OVERHEAD

    return OVERHEAD + averager.codec.max_payload(vector.numel()) + 64 * (averager.topology.n if averager.topology else 1) + 64


def agreed_size(gathered: list[bytes], mine: int, bound: int) -> int:
    """The largest size announced, each read as 8 little-endian bytes and capped at `bound`."""
    sizes = [int.from_bytes(b, "little") if len(b) == 8 else mine for b in gathered]
    return max(min(size, bound) for size in sizes)


def plain_twin(averager: Averager) -> Averager | None:
    """A secure averager's unmasked twin (same codec, topology and keys); None when not secure."""
    if averager.secure is None or averager.verifier is None:
        return None
    return Averager(averager.transport, "gossip", averager.codec, averager.topology, averager.identity, averager.verifier.roster)
