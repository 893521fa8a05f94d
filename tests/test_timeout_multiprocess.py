"""A neighbour that sends nothing stops its peers with an error naming it, the round and the
timeout, within the configured time plus a margin (no silent hang)."""

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import join_gloo_group, spawn_peers
from p2pfed.codec import get_codec
from p2pfed.gossip import Averager
from p2pfed.topology import load_topology
from p2pfed.transport import TransportTimeout

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S, SILENT = 3.0, 2
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def worker(rank: int, world: int, store: str, out: str) -> None:
    transport, key, roster = join_gloo_group(rank, world, store, timeout_s=TIMEOUT_S)
    averager = Averager(transport, "gossip", get_codec("fp32"), load_topology(ROOT / "topologies/ring.toml", world), key, roster)
    x = torch.ones(10)
    x, _ = averager.average(x, 0)  # a healthy round first
    result = {"error": None, "seconds": None}
    if rank == SILENT:
        time.sleep(TIMEOUT_S + 6)  # stuck: says nothing in round 2
    else:
        start = time.monotonic()
        try:
            averager.average(x, 1)
        except TransportTimeout as err:
            result = {"error": str(err), "seconds": time.monotonic() - start}
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    # the silent peer's unmatched messages would keep the group busy: leave without a goodbye barrier


def test_a_silent_neighbour_is_named_in_a_timeout_error(tmp_path):
    spawn_peers(worker, 3, tmp_path, str(tmp_path))
    for rank in (0, 1):  # on a 3-ring both other peers are the silent one's neighbours
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["error"] is not None, f"peer {rank} did not notice"
        assert result["error"].startswith("round 2: ") and f"peer {SILENT}" in result["error"] and "3 s timeout" in result["error"]
        assert TIMEOUT_S - 0.5 <= result["seconds"] <= TIMEOUT_S + 3.0
