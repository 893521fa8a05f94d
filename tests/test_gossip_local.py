"""The gossip round with the in-process transport: refused messages give their weight back;
stateful compressed gossip tracks its neighbours exactly when the codec is exact."""

import threading
from pathlib import Path

import pytest
import torch

from conftest import identities
from p2pfed.codec import CodecSettings, build_codec, get_codec
from p2pfed.config import ConfigError
from p2pfed.gossip import Averager
from p2pfed.topology import load_topology
from p2pfed.transport import LocalHub

ROOT = Path(__file__).resolve().parents[1]


class Tampering:
    """Wraps a transport and flips one payload bit in everything it sends."""

    def __init__(self, inner):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size

    def exchange(self, outgoing, incoming_from, tag, partial=False, patience=1, max_length=None, head=0):
        whole = {j: bytes(m) for j, m in outgoing.items()}  # a sealed message may come in two parts (wire.Sealed)
        bad = {j: m[:-1] + bytes([m[-1] ^ 0x01]) for j, m in whole.items()}
        got = self.inner.exchange(bad, incoming_from, tag, partial, patience, max_length, head)
        self.refused = self.inner.refused
        return got

    def all_gather_bytes(self, data, max_length=None):
        return self.inner.all_gather_bytes(data, max_length)


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


def run_rounds(world: int, rounds: int, topology_file: str = "ring.toml", tamper: tuple[int, int] | None = None, **options):
    """`rounds` gossip rounds on `world` threads; `tamper` = (rank, round) flips a bit once."""
    hub = LocalHub(world, timeout_s=10)
    topology = load_topology(ROOT / "topologies" / topology_file, world)
    keys, roster = identities(world)
    spec = options.pop("spec", "fp32")
    history: dict = {}

    def peer(rank):
        transport = hub.transport(rank)
        averager = Averager(transport, "gossip", build_codec(spec, CodecSettings(fraction=0.25), rank), topology, keys[rank], roster, **options)
        x = torch.randn(40, generator=torch.Generator().manual_seed(rank))
        history[rank] = [x]
        for t in range(rounds):
            if tamper == (rank, t):
                averager.transport = Tampering(transport)
            x, stats = averager.average(x, t)
            averager.transport = transport
            history[rank].append(x)

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return topology.weights(0), history


def test_error_feedback_copies_with_an_exact_codec_equal_plain_gossip():
    _, plain = run_rounds(5, 6)
    _, copies = run_rounds(5, 6, error_feedback=True)
    for rank in range(5):
        assert torch.allclose(torch.stack(plain[rank]), torch.stack(copies[rank]), atol=1e-6)


def test_choco_with_gamma_one_and_an_exact_codec_is_plain_gossip_and_keeps_the_mean():
    _, plain = run_rounds(5, 6)
    _, choco = run_rounds(5, 6, algorithm="choco", gamma=1.0)
    for rank in range(5):
        assert torch.allclose(torch.stack(plain[rank]), torch.stack(choco[rank]), atol=1e-5)
    _, slow = run_rounds(5, 6, spec="topk+int8", algorithm="choco", gamma=0.3)
    means = [torch.stack([slow[r][t] for r in range(5)]).mean(dim=0) for t in range(7)]
    assert all(torch.allclose(m, means[0], atol=1e-5) for m in means)


def test_sparse_stateless_messages_fill_unsent_coordinates_with_the_receivers_own():
    weights, history = run_rounds(4, 1, spec="randk")  # randk: the same coordinates for every sender
    chosen = build_codec("randk", CodecSettings(fraction=0.25)).shared_indices(40, 0, 0)
    rest = torch.ones(40, dtype=torch.bool)
    rest[chosen] = False
    for rank in range(4):
        mixed, own = history[rank][1], history[rank][0]
        assert torch.allclose(mixed[rest], own[rest], atol=1e-6)
        expected = sum(weights[rank, j] * history[j][0] for j in range(4))
        assert torch.allclose(mixed[chosen], expected[chosen], atol=1e-6)


def test_a_refused_message_in_stateful_gossip_drops_that_neighbour_for_good():
    weights, history = run_rounds(4, 3, tamper=(1, 1), error_feedback=True)
    # peer 1 tampers in round 1 only; peer 0's copy of it is then out of step, so from
    # round 1 on peer 0 mixes with peer 3 alone (fp32: the copy of 3 is exactly x_3)
    for t in (1, 2):
        expected = (1 - weights[0, 3]) * history[0][t] + weights[0, 3] * history[3][t]
        assert torch.allclose(history[0][t + 1], expected, atol=1e-5)
    assert not torch.allclose(history[0][1], (1 - weights[0, 3]) * history[0][0] + weights[0, 3] * history[3][0])


def test_stateful_gossip_refuses_a_time_varying_topology():
    keys, roster = identities(4)
    topology = load_topology(ROOT / "topologies/onepeer-exponential.toml", 4)
    with pytest.raises(ConfigError, match="static topology"):
        Averager(LocalHub(4).transport(0), "gossip", get_codec("topk"), topology, keys[0], roster, algorithm="choco")


def test_local_estimate_is_exact_for_a_complete_graph_with_uniform_weights(tmp_path):
    from p2pfed.consensus import consensus_distance_of

    spec = tmp_path / "complete.toml"
    spec.write_text('generator = "complete"\nweights = "max-degree"\n')  # W_ij = 1/n everywhere
    world = 5
    topology = load_topology(spec, world)
    assert torch.allclose(torch.as_tensor(topology.weights(0)), torch.full((world, world), 1 / world, dtype=torch.float64))
    hub = LocalHub(world, timeout_s=10)
    keys, roster = identities(world)
    vectors = [torch.randn(30, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    estimates: dict = {}

    def peer(rank):
        averager = Averager(hub.transport(rank), "gossip", get_codec("fp32"), topology, keys[rank], roster)
        estimates[rank] = averager.average(vectors[rank], 0)[1].local_consensus

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(estimates.values()) / world == pytest.approx(consensus_distance_of(vectors), rel=1e-5)


def test_exact_consensus_is_measured_every_e_rounds_and_after_the_last():
    from p2pfed.config import ConsensusSection
    from p2pfed.consensus import is_measured

    assert [t for t in range(1, 8) if is_measured(t, ConsensusSection(every=3), 7)] == [3, 6, 7]
    assert not any(is_measured(t, ConsensusSection(every=0), 7) for t in range(1, 8))


def test_a_neighbour_value_is_finite_only_without_nan_infinity_or_overflowing_squares():
    from p2pfed.gossip import finite

    honest = torch.randn(10_000) * 0.05
    assert finite(honest)
    for poison in (float("nan"), float("inf"), -float("inf"), 1e20, -3e19):  # 3e19 squared passes float32's 3.4e38
        hostile = honest.clone()
        hostile[1234] = poison
        assert not finite(hostile), poison


def test_local_consensus_is_half_the_weighted_squared_distance_to_each_neighbour_heard():
    import numpy as np

    from p2pfed.gossip import local_consensus

    generator = torch.Generator().manual_seed(5)
    own, heard = torch.randn(3000, generator=generator), {j: torch.randn(3000, generator=generator) for j in (2, 5)}
    weights = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.0, 0.2])
    expected = 0.5 * sum(float(weights[j]) * float(((own.double().numpy() - v.double().numpy()) ** 2).sum()) for j, v in heard.items())
    assert np.isclose(local_consensus(own, heard, weights), expected, rtol=1e-5)
    assert local_consensus(own, {}, weights) == 0.0
