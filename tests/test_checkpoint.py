"""Checkpoints: atomic, the newest two kept, a damaged one detected and the previous used,
a planted one refused without running its pickle, and peers agree on the newest round they
all hold."""

import hashlib
import io
import os
import stat

import pytest
import torch

from p2pfed.checkpoint import MAGIC, CheckpointError, Checkpoints, agree_on_round, identity_key, local_key
from p2pfed.transport import LocalHub

KEY = bytes(range(32))


def state(round: int) -> dict:
    return {"round": round, "adapter": torch.full((100,), float(round)), "rng": torch.get_rng_state()}


def test_saving_keeps_the_newest_two_and_leaves_no_temporary_files(tmp_path):
    checkpoints = Checkpoints(tmp_path / "peer0", KEY)
    for round in (1, 2, 3):
        checkpoints.save(round, state(round))
    assert checkpoints.rounds() == [2, 3]
    assert not list((tmp_path / "peer0").glob("*.tmp"))
    assert torch.equal(checkpoints.load(3)["adapter"], torch.full((100,), 3.0))


def test_a_truncated_or_corrupted_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    checkpoints = Checkpoints(tmp_path / "peer0", KEY)
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
        assert "round-000005.pt" in str(err) and "MAC mismatch" in str(err)
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


class Planted:
    """A pickle that runs code when loaded: what a planted checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def planted_body(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"round": 7, "adapter": Planted(str(marker))}, buffer)
    return buffer.getvalue()


def test_a_planted_checkpoint_with_a_valid_sha256_is_refused_and_its_pickle_never_runs(tmp_path):
    """The earlier format carried an unkeyed SHA-256: anyone could write a file that passed."""
    marker = tmp_path / "pwned"
    checkpoints = Checkpoints(tmp_path / "peer0", KEY)
    checkpoints.directory.mkdir(parents=True)
    body = planted_body(marker)
    for magic in (MAGIC, b"P2PFED-CHECKPOINT-1\n"):
        checkpoints.path(7).write_bytes(magic + hashlib.sha256(body).digest() + body)
        assert checkpoints.valid_rounds() == []
        with pytest.raises(CheckpointError, match="MAC mismatch|not a complete p2pfed checkpoint"):
            checkpoints.load(7)
    assert not marker.exists()


def test_even_an_authentic_checkpoint_is_read_as_tensors_only(tmp_path):
    marker = tmp_path / "pwned"
    checkpoints = Checkpoints(tmp_path / "peer0", KEY)
    checkpoints.directory.mkdir(parents=True)
    body = planted_body(marker)
    checkpoints.path(7).write_bytes(MAGIC + checkpoints._mac(7, body) + body)  # say the key leaked
    with pytest.raises(CheckpointError, match="tensors and plain types"):
        checkpoints.load(7)
    assert not marker.exists()


def test_a_checkpoint_copied_over_another_rounds_name_or_a_fifo_is_refused(tmp_path):
    checkpoints = Checkpoints(tmp_path / "peer0", KEY)
    checkpoints.save(3, state(3))
    checkpoints.save(4, state(4))
    checkpoints.path(4).write_bytes(checkpoints.path(3).read_bytes())  # round 3's file under round 4's name
    assert checkpoints.valid_rounds() == [3]
    os.mkfifo(checkpoints.directory / "round-000009.pt")  # would block a plain read forever
    assert checkpoints.valid_rounds() == [3]


def test_a_planted_local_key_is_refused(tmp_path):
    (tmp_path / "peer0").mkdir()
    (tmp_path / "peer0" / "mac.key").write_bytes(bytes(32))
    os.chmod(tmp_path / "peer0" / "mac.key", 0o644)
    with pytest.raises(CheckpointError, match="mode 0600"):
        local_key(tmp_path / "peer0")


def test_another_peers_key_does_not_open_a_checkpoint(tmp_path):
    mine, theirs = identity_key(b"\x01" * 32), identity_key(b"\x02" * 32)
    assert mine != theirs and len(mine) == 32
    Checkpoints(tmp_path / "peer0", theirs).save(3, state(3))
    assert Checkpoints(tmp_path / "peer0", mine).valid_rounds() == []


def test_a_local_key_is_created_once_owner_only_and_never_through_a_symlink(tmp_path):
    first = local_key(tmp_path / "peer0")
    assert local_key(tmp_path / "peer0") == first
    assert stat.S_IMODE((tmp_path / "peer0" / "mac.key").stat().st_mode) == 0o600
    (tmp_path / "peer1").mkdir()
    (tmp_path / "elsewhere").write_bytes(b"x" * 32)
    (tmp_path / "peer1" / "mac.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="not a readable regular file"):  # one sentence, not an OSError traceback
        local_key(tmp_path / "peer1")
    for planted, make in (("dir", lambda p: p.mkdir()), ("fifo", lambda p: os.mkfifo(p))):  # neither read nor waited on
        (tmp_path / planted).mkdir()
        make(tmp_path / planted / "mac.key")
        with pytest.raises(CheckpointError, match="mac.key"):
            local_key(tmp_path / planted)


def test_a_planted_symlink_or_later_round_beside_the_checkpoints_is_never_written_through_or_kept_over_ours(tmp_path):
    checkpoints = Checkpoints(tmp_path, b"k" * 32, keep=2)
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_bytes(b"precious")
    (tmp_path / "round-000001.tmp").symlink_to(victim)  # the old fixed temporary name
    for junk in (999998, 999999):  # files named after later rounds, not ours
        checkpoints.path(junk).write_bytes(b"junk")
    for round in (1, 2, 3):
        checkpoints.save(round, {"round": round})
    assert victim.read_bytes() == b"precious"
    assert [r for r in checkpoints.rounds() if r < 999998] == [2, 3]  # ours kept, the newest two
    assert checkpoints.load(3)["round"] == 3
    (tmp_path / "round-\u0661\u0662\u0663\u0664\u0665\u0666.pt").write_bytes(b"x")  # Arabic-Indic digits are not a round
    assert 123456 not in checkpoints.rounds()
