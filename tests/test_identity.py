"""Keys and roster: keygen output reloads; exposed, missing or mismatched keys stop a peer."""

import json
import os

import pytest

from conftest import run_cli
from p2pfed.identity import IdentityError, Roster, keygen, load_identity


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
