"""Through real gloo peers: a neighbour whose length prefix asks for -1, 2^62 or 256 MiB
bytes is refused before anything is allocated (it crashed the receivers on the earlier
code: `torch.empty` of the announced length), counted as `length`; one whose prefix
announces fewer bytes than it sends is read as the truncated message it announced and
refused (on the earlier code gloo aborted the receiving process: the payload overran the
buffer sized by the prefix); the next round runs in step, in plain and in secure mode."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import join_gloo_group, peer_results, save_peer_result, spawn_peers
from p2pfed.codec import get_codec
from p2pfed.config import FaultSection
from p2pfed.faults import FaultInjector
from p2pfed.gossip import Averager
from p2pfed.secure import FixedPoint
from p2pfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
WORLD, HOSTILE = 4, 1
ANNOUNCED = (-1, 2**62, 256 << 20, 40)
"""Three lies above any bound, one below the message's size (40 bytes: inside the header)."""
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


def worker(rank: int, world: int, store: str, out: str) -> None:
    import p2pfed.faults

    transport, key, roster = join_gloo_group(rank, world, store, timeout_s=30)
    ring = load_topology(ROOT / "topologies/ring.toml", world)
    result = {}
    for mode in ("plain", "secure"):
        faults = None
        if rank == HOSTILE:
            faults = FaultInjector(FaultSection(peers=[rank], kind="hugelength", until_round=len(ANNOUNCED)), key, world, 0)
        averager = Averager(transport, "gossip", get_codec("fp32"), ring, key, roster, faults,
                            secure=FixedPoint(4.0, 20) if mode == "secure" else None, seed=rank)
        x = torch.full((64,), float(rank))
        rows = []
        for t, announced in enumerate((*ANNOUNCED, None)):  # four lies, then an honest round
            p2pfed.faults.HUGE_LENGTH = announced or 0
            x, stats = averager.average(x, t)
            rows.append({"rejected": stats.rejected, "abandoned": stats.abandoned, "x": x.tolist()})
        result[mode] = rows
    save_peer_result(out, rank, result)
    dist.destroy_process_group()


def test_length_prefixes_outside_the_bound_are_refused_and_the_stream_stays_in_step(tmp_path):
    spawn_peers(worker, WORLD, tmp_path, str(tmp_path))
    results = peer_results(tmp_path, WORLD)
    for mode in ("plain", "secure"):
        for rank in (0, 2):  # the hostile peer's receivers
            rows = results[rank][mode]
            assert [r["rejected"].get("length", 0) for r in rows] == [1, 1, 1, 0, 0], mode
            assert rows[3]["rejected"] == {"truncated": 1}, (mode, rows[3]["rejected"])  # the 40 bytes announced, refused
            assert rows[4]["rejected"] == {}, mode
            assert all(torch.isfinite(torch.tensor(r["x"])).all() for r in rows)
        honest = results[3][mode][-1]
        assert honest["rejected"] == {} and not honest["abandoned"]


def short_frame_worker(rank: int, world: int, store: str, out: str) -> None:
    from p2pfed.transport import LyingLength

    transport, _, _ = join_gloo_group(rank, world, store, timeout_s=30)
    bound = 4096
    if rank == 1:  # a prefix announcing the whole bound, and no bytes behind it
        transport.exchange({0: LyingLength.of(b"", bound)}, [], tag=1, max_length=bound)
        save_peer_result(out, rank, {})
    else:
        secret = torch.full((8 + bound,), ord("S"), dtype=torch.uint8)
        del secret  # freed, not zeroed: what an uninitialised receive buffer could show
        got = transport.exchange({}, [1], tag=1, max_length=bound)
        save_peer_result(out, rank, {"message": got[1].hex(), "refused": transport.refused})
    dist.destroy_process_group()


def test_a_frame_shorter_than_its_prefix_reads_as_zeros_never_as_stale_memory(tmp_path):
    spawn_peers(short_frame_worker, 2, tmp_path, str(tmp_path))
    received = peer_results(tmp_path, 2)[0]
    assert received["refused"] == {} and bytes.fromhex(received["message"]) == bytes(4096)
