"""Checkpoints: atomic, the newest two kept, a damaged one detected and the previous used,
and peers agree on the newest round they all hold."""

import torch

from p2pfed.checkpoint import CheckpointError, Checkpoints, agree_on_round
from p2pfed.transport import LocalHub


def state(round: int) -> dict:
    return {"round": round, "adapter": torch.full((100,), float(round)), "rng": torch.get_rng_state()}


def test_saving_keeps_the_newest_two_and_leaves_no_temporary_files(tmp_path):
    checkpoints = Checkpoints(tmp_path / "peer0")
    for round in (1, 2, 3):
        checkpoints.save(round, state(round))
    assert checkpoints.rounds() == [2, 3]
    assert not list((tmp_path / "peer0").glob("*.tmp"))
    assert torch.equal(checkpoints.load(3)["adapter"], torch.full((100,), 3.0))


def test_a_truncated_or_corrupted_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    checkpoints = Checkpoints(tmp_path / "peer0")
    checkpoints.save(4, state(4))
    checkpoints.save(5, state(5))
    data = checkpoints.path(5).read_bytes()
    checkpoints.path(5).write_bytes(data[: len(data) // 2])  # a crash mid-copy, a full disk
    assert checkpoints.valid_rounds() == [4]
    flipped = bytearray(data)
    flipped[-10] ^= 0x40  # a bit rotted on disk: still the right length
    checkpoints.path(5).write_bytes(bytes(flipped))
    assert checkpoints.valid_rounds() == [4]
    try:
        checkpoints.load(5)
    except CheckpointError as err:
        assert "round-000005.pt" in str(err) and "corrupted" in str(err)
    else:
        raise AssertionError("a corrupted checkpoint loaded")
    assert checkpoints.load(4)["round"] == 4


def test_peers_resume_from_the_newest_round_they_all_have():
    import threading

    hub = LocalHub(3)
    held = {0: [4, 5], 1: [4, 5], 2: [3, 4]}  # peer 2's round-5 checkpoint was lost
    agreed: dict = {}

    def peer(rank):
        agreed[rank] = agree_on_round(held[rank], hub.transport(rank))

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert agreed == {0: 4, 1: 4, 2: 4}
