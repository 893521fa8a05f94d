"""Secure gossip on real gloo peers with tiny-model adapters: on a ring of 6 and on a 2x3
torus it reaches the same consensus as plain gossip within the fixed-point bound, and when
one peer's masked message arrives but is refused (one flipped bit) its neighbours complete
the sum over the others, with the refused sender still helping to unmask it."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import join_gloo_group, peer_results, save_peer_result, spawn_peers
from p2pfed.codec import get_codec
from p2pfed.config import FaultSection, LoraSection
from p2pfed.consensus import exact_consensus_distance
from p2pfed.faults import FaultInjector
from p2pfed.gossip import Averager
from p2pfed.model import adapter_to_vector, tiny_model, tiny_tokenizer, wrap_lora
from p2pfed.secure import FixedPoint
from p2pfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
WORLD, ROUNDS, SILENT = 6, 4, 4
FIXED = FixedPoint(4.0, 20)
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


def tiny_adapter(rank: int) -> torch.Tensor:
    """The common tiny-model LoRA adapter, moved by a rank-specific step (as local training would)."""
    base = adapter_to_vector(wrap_lora(tiny_model(len(tiny_tokenizer())), LoraSection(), seed=0))
    return base + 0.01 * torch.randn(base.numel(), generator=torch.Generator().manual_seed(rank))


def worker(rank: int, world: int, store: str, out: str) -> None:
    transport, key, roster = join_gloo_group(rank, world, store)
    result = {}
    for name in ("ring", "torus"):
        topology = load_topology(ROOT / "topologies" / f"{name}.toml", world)
        for secure in (False, True):
            averager = Averager(transport, "gossip", get_codec("fp32"), topology, key, roster, secure=FIXED if secure else None, seed=rank)
            x = tiny_adapter(rank)
            for t in range(ROUNDS):
                x, stats = averager.average(x, t)
            result[f"{name}-{'secure' if secure else 'plain'}"] = {"x": x.tolist(), "xi": exact_consensus_distance(x, transport)}
    # one peer's messages are refused in round 2 (index 1) on the torus; everyone records round 1's input and round 2's output
    torus = load_topology(ROOT / "topologies/torus.toml", world)
    faults = FaultInjector(FaultSection(peers=[SILENT], kind="flip", from_round=2, until_round=2), key, world, 0) if rank == SILENT else None
    averager = Averager(transport, "gossip", get_codec("fp32"), torus, key, roster, faults, secure=FIXED, seed=rank)
    x, _ = averager.average(tiny_adapter(rank), 0)
    before = x.clone()
    mixed, stats = averager.average(x, 1)
    _, later = averager.average(mixed, 2)  # and the round after goes on as usual
    result["dropout"] = {"before": before.tolist(), "mixed": mixed.tolist(), "dropouts": stats.dropouts, "abandoned": stats.abandoned,
                         "rejected": stats.rejected, "later_dropouts": later.dropouts, "later_abandoned": later.abandoned}
    save_peer_result(out, rank, result)
    dist.destroy_process_group()


def test_secure_gossip_matches_plain_and_recovers_a_dropout(tmp_path):
    spawn_peers(worker, WORLD, tmp_path, str(tmp_path))
    results = peer_results(tmp_path, WORLD)
    for name, senders in (("ring", 2), ("torus", 3)):
        bound = ROUNDS * senders * FIXED.resolution  # each round, each sender's value is off by < one step
        for r in results:
            secure, plain = torch.tensor(r[f"{name}-secure"]["x"]), torch.tensor(r[f"{name}-plain"]["x"])
            assert (secure - plain).abs().max() <= bound, name
        xi_secure, xi_plain = results[0][f"{name}-secure"]["xi"], results[0][f"{name}-plain"]["xi"]
        assert xi_secure == pytest.approx(xi_plain, rel=1e-3), name
        assert xi_secure < 0.5 * consensus_start(), name  # it did mix

    torus = load_topology(ROOT / "topologies/torus.toml", WORLD)
    weights = torus.weights(1)
    before = [torch.tensor(r["dropout"]["before"]) for r in results]
    for rank, r in enumerate(results):
        senders = torus.in_neighbours(rank, 1)
        heard = [j for j in senders if j != SILENT]
        expected = (1 - sum(weights[rank, j] for j in heard)) * before[rank] + sum(weights[rank, j] * before[j] for j in heard)
        assert (torch.tensor(r["dropout"]["mixed"]) - expected).abs().max() <= len(heard) * FIXED.resolution + 1e-6
        assert r["dropout"]["dropouts"] == (1 if SILENT in senders else 0) and not r["dropout"]["abandoned"]
        assert r["dropout"]["rejected"] == ({"digest": 1} if SILENT in senders else {})
        assert r["dropout"]["later_dropouts"] == 0 and not r["dropout"]["later_abandoned"]


def consensus_start() -> float:
    from p2pfed.consensus import consensus_distance_of

    return consensus_distance_of([tiny_adapter(r) for r in range(WORLD)])
