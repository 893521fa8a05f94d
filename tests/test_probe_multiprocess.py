"""The bench's overhead probe on real gloo peers: gossip exchanges against bare send/recv of the same bytes."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import join_gloo_group, peer_results, save_peer_result, spawn_peers
from p2pfed.codec import get_codec
from p2pfed.gossip import Averager
from p2pfed.probe import probe_exchange
from p2pfed.topology import load_topology
from p2pfed.wire import OVERHEAD

ROOT = Path(__file__).resolve().parents[1]
DIM = 2000
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def probe_worker(rank: int, world: int, store: str, out: str) -> None:
    transport, key, roster = join_gloo_group(rank, world, store)
    topology = load_topology(ROOT / "topologies/ring.toml", world)
    results = {}
    for spec in ("fp32", "int8"):
        averager = Averager(transport, "gossip", get_codec(spec), topology, key, roster)
        vector = torch.randn(DIM, generator=torch.Generator().manual_seed(rank))
        probe = probe_exchange(averager, transport, vector, first_round=7, probes=3)
        results[spec] = {"gossip_s": probe.gossip_s, "bare_s": probe.bare_s, "bytes": probe.message_bytes,
                         "exchanges": averager.exchanges, "accepted": sorted(averager.verifier.accepted.values())}
    save_peer_result(out, rank, results)
    dist.destroy_process_group()


def test_probe_times_real_exchanges_of_the_bytes_gossip_sends(tmp_path):
    world = 3
    spawn_peers(probe_worker, world, tmp_path, str(tmp_path))
    results = peer_results(tmp_path, world)
    for r in results:
        # the bare exchange moved exactly one signed fp32 envelope per neighbour ...
        assert r["fp32"]["bytes"] == OVERHEAD + 4 * DIM
        # ... int8 far fewer (one byte per value plus a scale per chunk)
        assert OVERHEAD + DIM <= r["int8"]["bytes"] < OVERHEAD + 2 * DIM
        for spec in ("fp32", "int8"):
            assert r[spec]["gossip_s"] > 0 and r[spec]["bare_s"] > 0
            # three real gossip exchanges, each verified: rounds 7, 8, 9 from both ring neighbours
            assert r[spec]["exchanges"] == 3 and r[spec]["accepted"] == [[9, 0], [9, 0]]
