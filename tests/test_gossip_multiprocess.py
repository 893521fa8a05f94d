"""Real gloo peers (4 processes) gossiping vectors through the production code path."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import join_gloo_group, peer_results, save_peer_result, spawn_peers
from p2pfed.codec import get_codec
from p2pfed.consensus import consensus_distance_of, exact_consensus_distance
from p2pfed.gossip import Averager
from p2pfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
DIM = 1000
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]


def start_vector(rank: int) -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(100 + rank))


def gossip_worker(rank: int, world: int, store: str, out: str) -> None:
    transport, key, roster = join_gloo_group(rank, world, store)
    signed = (key, roster)
    result: dict = {}
    # 1) plain gossip on a ring: record the exact consensus distance every round
    ring = Averager(transport, "gossip", get_codec("fp32"), load_topology(ROOT / "topologies/ring.toml", world), *signed)
    x = start_vector(rank)
    distances = [exact_consensus_distance(x, transport)]
    for t in range(12):
        x, stats = ring.average(x, t)
        distances.append(exact_consensus_distance(x, transport))
    result["ring_distances"] = distances
    result["ring_final"] = x.tolist()
    result["bytes_sent"] = stats.bytes_sent
    # 2) allreduce: the exact mean in one round
    mean, _ = Averager(transport, "allreduce", get_codec("fp32"), None).average(start_vector(rank), 0)
    result["allreduce"] = mean.tolist()
    # 3) one-peer exponential on 4 peers: exact after log2(4) = 2 rounds, one message each
    onepeer = Averager(transport, "gossip", get_codec("fp32"), load_topology(ROOT / "topologies/onepeer-exponential.toml", world), *signed)
    y = start_vector(rank)
    for t in range(2):
        y, stats = onepeer.average(y, t)
    result["onepeer"] = y.tolist()
    result["onepeer_neighbours"] = stats.neighbours
    # 4) the distributed consensus distance equals a direct computation on gathered vectors
    z = start_vector(rank) * (rank + 1)
    result["distributed_xi"] = exact_consensus_distance(z, transport)
    save_peer_result(out, rank, result)
    dist.destroy_process_group()


def test_gossip_converges_to_the_mean_at_the_spectral_rate(tmp_path):
    world = 4
    spawn_peers(gossip_worker, world, tmp_path, str(tmp_path))
    results = peer_results(tmp_path, world)
    mean = torch.stack([start_vector(r) for r in range(world)]).mean(dim=0)

    # Ring of 4 with Metropolis weights: every non-unit eigenvalue has modulus 1/3, so the
    # squared consensus distance shrinks by exactly (1/3)^2 each round.
    rate = 1 / 3  # closed form: eigenvalues 1/3 + 2/3 cos(2 pi k / 4) = 1, 1/3, -1/3, 1/3
    distances = results[0]["ring_distances"]
    assert distances[0] > 1.0
    for before, after in zip(distances[:8], distances[1:9]):
        assert after / before == pytest.approx(rate**2, rel=1e-3)
    for r in results:
        assert torch.allclose(torch.tensor(r["ring_final"]), mean, atol=1e-4)
        assert r["ring_distances"] == distances  # every peer sees the same monitoring figure
    assert results[0]["bytes_sent"] > 2 * DIM * 4  # two neighbours, fp32, plus headers

    for r in results:
        assert torch.allclose(torch.tensor(r["allreduce"]), mean, atol=1e-6)
        assert torch.allclose(torch.tensor(r["onepeer"]), mean, atol=1e-6)
        assert len(r["onepeer_neighbours"]) == 1

    direct = consensus_distance_of([start_vector(r) * (r + 1) for r in range(world)])
    assert results[0]["distributed_xi"] == pytest.approx(direct, rel=1e-9)
