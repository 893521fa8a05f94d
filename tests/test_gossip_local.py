"""The gossip round with the in-process transport: refused messages give their weight back."""

import threading
from pathlib import Path

import torch

from conftest import identities
from p2pfed.codec import get_codec
from p2pfed.gossip import Averager
from p2pfed.topology import load_topology
from p2pfed.transport import LocalHub

ROOT = Path(__file__).resolve().parents[1]


class Tampering:
    """Wraps a transport and flips one payload bit in everything it sends."""

    def __init__(self, inner):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size

    def exchange(self, outgoing, incoming_from, tag):
        bad = {j: m[:-1] + bytes([m[-1] ^ 0x01]) for j, m in outgoing.items()}
        return self.inner.exchange(bad, incoming_from, tag)


def run_round(world: int, tamper_rank: int | None):
    hub = LocalHub(world, timeout_s=10)
    topology = load_topology(ROOT / "topologies/ring.toml", world)
    vectors = [torch.full((8,), float(r)) for r in range(world)]
    keys, roster = identities(world)
    results: dict = {}

    def peer(rank):
        transport = hub.transport(rank)
        if rank == tamper_rank:
            transport = Tampering(transport)
        results[rank] = Averager(transport, "gossip", get_codec("fp32"), topology, keys[rank], roster).average(vectors[rank], 0)

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return topology.weights(0), vectors, results


def test_honest_round_mixes_with_the_mixing_row():
    weights, vectors, results = run_round(4, None)
    for rank, (mixed, stats) in results.items():
        expected = sum(weights[rank, j] * vectors[j] for j in range(4))
        assert torch.allclose(mixed, expected) and stats.rejected == {}


def test_tampered_message_is_rejected_and_its_weight_returned_to_self():
    weights, vectors, results = run_round(4, tamper_rank=1)
    for rank in (0, 2):  # the tamperer's neighbours on the ring
        mixed, stats = results[rank]
        assert stats.rejected == {"digest": 1}
        kept = [j for j in range(4) if weights[rank, j] > 0 and j not in (1, rank)]
        self_weight = weights[rank, rank] + weights[rank, 1]
        expected = self_weight * vectors[rank] + sum(weights[rank, j] * vectors[j] for j in kept)
        assert torch.allclose(mixed, expected)
    assert results[3][1].rejected == {}  # peer 3 does not hear from peer 1
