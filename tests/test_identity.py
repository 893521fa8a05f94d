"""Keys and roster: keygen output reloads; exposed, missing or mismatched keys stop a peer."""

import json
import os

import pytest

from conftest import run_cli
from p2pfed.identity import IdentityError, Roster, generate, keygen, load_identity, write_identity

SMALL_ORDER_ED25519 = bytes([1]) + bytes(31)  # the identity point: (R = identity, S = 0) verifies any message


def roster_with(tmp_path, rank: int, ed25519: bytes | None = None, x25519: bytes | None = None):
    path = keygen(3, tmp_path)
    raw = json.loads(path.read_text())
    if ed25519 is not None:
        raw["peers"][rank]["ed25519"] = ed25519.hex()
    if x25519 is not None:
        raw["peers"][rank]["x25519"] = x25519.hex()
    path.write_text(json.dumps(raw))
    return path


def test_keygen_output_reloads_and_is_private(tmp_path):
    roster_path = keygen(3, tmp_path)
    roster = Roster.load(roster_path)
    assert len(roster) == 3
    for rank in range(3):
        path = tmp_path / f"peer{rank}.pem"
        assert os.stat(path).st_mode & 0o777 == 0o600
        identity = load_identity(path, rank, roster)
        assert identity.signing.sign(b"x") and identity.rank == rank


def test_world_readable_key_is_refused(tmp_path):
    roster = Roster.load(keygen(2, tmp_path))
    os.chmod(tmp_path / "peer0.pem", 0o644)
    with pytest.raises(IdentityError, match="readable by others.*chmod 600"):
        load_identity(tmp_path / "peer0.pem", 0, roster)


def test_key_not_matching_roster_is_refused(tmp_path):
    roster = Roster.load(keygen(2, tmp_path / "a"))
    keygen(2, tmp_path / "b")
    with pytest.raises(IdentityError, match="does not match the roster"):
        load_identity(tmp_path / "b" / "peer1.pem", 1, roster)
    with pytest.raises(IdentityError, match="not found"):
        load_identity(tmp_path / "a" / "peer7.pem", 7, roster)


@pytest.mark.parametrize("content, expected", [
    ("not json", "not readable JSON"),
    (json.dumps({"version": 1, "peers": [{"rank": 0, "ed25519": "zz", "x25519": "00"}]}), r"peers\[0\]: expected rank"),
    (json.dumps({"version": 1, "peers": []}) [:-1], "not readable JSON"),
    (json.dumps({"peers": []}), "expected"),
])
def test_malformed_roster(tmp_path, content, expected):
    path = tmp_path / "roster.json"
    path.write_text(content)
    with pytest.raises(IdentityError, match=expected):
        Roster.load(path)


def test_garbage_key_file(tmp_path):
    roster = Roster.load(keygen(1, tmp_path))
    (tmp_path / "peer0.pem").write_text("garbage")
    with pytest.raises(IdentityError, match="PEM private keys|must hold"):
        load_identity(tmp_path / "peer0.pem", 0, roster)


def test_keygen_cli_refuses_to_overwrite(tmp_path):
    first = run_cli("keygen", "--peers", "2", "--out", str(tmp_path))
    assert first.returncode == 0 and "identity.roster=" in first.stdout
    again = run_cli("keygen", "--peers", "2", "--out", str(tmp_path))
    assert again.returncode == 1 and "--overwrite" in again.stderr


def test_a_small_order_ed25519_key_is_refused_because_it_admits_keyless_forgeries(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(SMALL_ORDER_ED25519).verify(SMALL_ORDER_ED25519 + bytes(32), b"any header")  # the forgery
    with pytest.raises(IdentityError, match=r"peers\[1\] \(rank 1\): the Ed25519 key is a point of small order"):
        Roster.load(roster_with(tmp_path, 1, ed25519=SMALL_ORDER_ED25519))
    order8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    with pytest.raises(IdentityError, match="small order"):
        Roster.load(roster_with(tmp_path / "b", 0, ed25519=bytes(order8[:31]) + bytes([order8[31] | 0x80])))  # sign bit set
    non_canonical = (2**255 - 19 + 1).to_bytes(32, "little")  # y = p + 1, an encoding of 1
    with pytest.raises(IdentityError, match="not canonically encoded"):
        Roster.load(roster_with(tmp_path / "c", 2, ed25519=non_canonical))


@pytest.mark.parametrize("x25519", [bytes(32), bytes([1]) + bytes(31), (2**255 - 20).to_bytes(32, "little")])
def test_a_small_order_x25519_key_is_refused_at_load_not_in_the_first_secure_round(tmp_path, x25519):
    with pytest.raises(IdentityError, match="X25519 key"):
        Roster.load(roster_with(tmp_path, 2, x25519=x25519))


def test_one_key_pair_for_two_ranks_is_refused(tmp_path):
    path = keygen(3, tmp_path)
    raw = json.loads(path.read_text())
    raw["peers"][2]["ed25519"] = raw["peers"][0]["ed25519"]
    path.write_text(json.dumps(raw))
    with pytest.raises(IdentityError, match="rank 2 reuses a public key of rank 0"):
        Roster.load(path)


def test_a_key_is_never_written_into_an_existing_file_or_through_a_symlink(tmp_path):
    exposed = tmp_path / "peer0.pem"
    exposed.write_text("")
    os.chmod(exposed, 0o644)
    with pytest.raises(IdentityError, match="already exists"):
        write_identity(generate(0), exposed)
    assert exposed.read_text() == ""  # nothing was written into the readable file
    target = tmp_path / "somewhere-else.pem"
    (tmp_path / "peer1.pem").symlink_to(target)
    with pytest.raises(IdentityError, match="already exists"):
        write_identity(generate(1), tmp_path / "peer1.pem")
    assert not target.exists()
    keygen(2, tmp_path / "keys")
    first = (tmp_path / "keys" / "peer0.pem").read_bytes()
    keygen(2, tmp_path / "keys", overwrite=True)  # replaced by a new file, not rewritten in place
    assert (tmp_path / "keys" / "peer0.pem").read_bytes() != first


def test_a_roster_that_lists_other_than_the_peers_launched_is_refused_with_one_sentence(tmp_path):
    from conftest import TINY
    from p2pfed.config import load_config
    from p2pfed.peer import load_keys

    roster = keygen(3, tmp_path)
    config = load_config(TINY, [f"identity.roster={roster}", f"identity.key={tmp_path}/peer{{rank}}.pem"])
    with pytest.raises(IdentityError, match=r"roster.json: the roster lists 3 peers but 4 were launched$"):
        load_keys(config, 0, 4)
    identity, loaded = load_keys(config, 2, 3)  # the same files with as many peers as listed
    assert identity.rank == 2 and len(loaded) == 3


def test_a_roster_nested_too_deep_for_the_json_parser_is_one_sentence(tmp_path):
    path = tmp_path / "roster.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IdentityError, match="roster is not readable JSON"):
        Roster.load(path)
