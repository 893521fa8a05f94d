"""Peer identities: an Ed25519 key (signing) and an X25519 key (mask agreement) per peer.

`p2pfed keygen --peers N --out DIR` writes one private key file per peer (PEM, mode 0600,
both keys in one file) and `roster.json`, the public keys of every peer. A peer refuses
to start when its key is missing, unreadable, readable by others, or not the roster's.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

ROSTER_VERSION = 1
_PEM_END = b"-----END PRIVATE KEY-----"
_FIELD_PRIME = 2**255 - 19
_ED25519_SMALL_ORDER = {bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0100000000000000000000000000000000000000000000000000000000000000",  # the identity, order 1
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
)}
"""Encodings (sign bit cleared) of the Ed25519 points of small order (libsodium's list): such a
public key verifies signatures that nobody made."""


class IdentityError(ValueError):
    """A key or roster file is missing, malformed, exposed, or inconsistent."""


@dataclass(frozen=True)
class Identity:
    """One peer's private keys."""

    rank: int
    signing: Ed25519PrivateKey
    agreement: X25519PrivateKey

    def public(self) -> "PeerKeys":
        return PeerKeys(self.signing.public_key(), self.agreement.public_key())


@dataclass(frozen=True)
class PeerKeys:
    """One peer's public keys, as listed in the roster."""

    signing: Ed25519PublicKey
    agreement: X25519PublicKey


def _raw(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_public_keys(signing: bytes, agreement: bytes) -> str | None:
    """Why a roster entry's raw public keys are unsafe, or None: a non-canonical or
    small-order Ed25519 point (keyless forgeries), or an X25519 key with no shared secret."""
    if len(signing) != 32 or len(agreement) != 32:
        return "keys must be 32 bytes each"
    y = int.from_bytes(signing, "little") & ((1 << 255) - 1)
    if y >= _FIELD_PRIME:
        return "the Ed25519 key is not canonically encoded"
    if bytes(signing[:31]) + bytes([signing[31] & 0x7F]) in _ED25519_SMALL_ORDER:
        return "the Ed25519 key is a point of small order (it would accept forged signatures)"
    if int.from_bytes(agreement, "little") & ((1 << 255) - 1) >= _FIELD_PRIME:
        return "the X25519 key is not canonically encoded"
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(agreement))
    except ValueError:
        return "the X25519 key is of small order (every shared secret with it is zero)"
    return None


class Roster:
    """Every peer's public keys by rank: who may speak in this run."""

    def __init__(self, peers: dict[int, PeerKeys]) -> None:
        self.peers = peers

    def __len__(self) -> int:
        return len(self.peers)

    def get(self, rank: int) -> PeerKeys | None:
        return self.peers.get(rank)

    def to_json(self) -> str:
        rows = [{"rank": r, "ed25519": _raw(k.signing).hex(), "x25519": _raw(k.agreement).hex()} for r, k in sorted(self.peers.items())]
        return json.dumps({"version": ROSTER_VERSION, "peers": rows}, indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> "Roster":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IdentityError(f"{path}: roster file not found; create one with `p2pfed keygen`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise IdentityError(f"{path}: roster is not readable JSON ({type(err).__name__}: {str(err)[:80]})") from None
        if not isinstance(raw, dict) or raw.get("version") != ROSTER_VERSION or not isinstance(raw.get("peers"), list):
            raise IdentityError(f"{path}: expected {{\"version\": {ROSTER_VERSION}, \"peers\": [...]}}")
        peers: dict[int, PeerKeys] = {}
        seen: dict[bytes, int] = {}
        for index, row in enumerate(raw["peers"]):
            try:
                rank = int(row["rank"])
                signing, agreement = bytes.fromhex(row["ed25519"]), bytes.fromhex(row["x25519"])
                keys = PeerKeys(Ed25519PublicKey.from_public_bytes(signing), X25519PublicKey.from_public_bytes(agreement))
            except (KeyError, TypeError, ValueError) as err:
                raise IdentityError(f"{path}: peers[{index}]: expected rank, ed25519 and x25519 (32-byte hex) ({err})") from None
            if rank in peers:
                raise IdentityError(f"{path}: rank {rank} is listed twice")
            unsafe = check_public_keys(signing, agreement)
            if unsafe:
                raise IdentityError(f"{path}: peers[{index}] (rank {rank}): {unsafe}")
            for key in (signing, agreement[:31] + bytes([agreement[31] & 0x7F])):  # X25519 ignores bit 255
                if key in seen:
                    raise IdentityError(f"{path}: rank {rank} reuses a public key of rank {seen[key]}; every peer needs its own keys")
                seen[key] = rank
            peers[rank] = keys
        if sorted(peers) != list(range(len(peers))):
            raise IdentityError(f"{path}: ranks must be 0..n-1, got {sorted(peers)}")
        return cls(peers)


def generate(rank: int) -> Identity:
    return Identity(rank, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_identity(identity: Identity, path: Path) -> None:
    """Write both private keys into a new file, owner-only from its creation: never into an
    existing file (whatever its mode) and never through a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path}: already exists; remove it first (keys are only ever written to a new file)") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(_pem(identity.signing) + _pem(identity.agreement))


def keygen(peers: int, out: str | Path, overwrite: bool = False) -> Path:
    """Keys for `peers` peers in `out` (peer{rank}.pem) and their roster; returns the roster path.
    With `overwrite`, old key files are removed first (a symlink is removed, not followed)."""
    out = Path(out)
    identities = [generate(rank) for rank in range(peers)]
    if overwrite:
        for old in out.glob("peer*.pem"):
            old.unlink()
    for identity in identities:
        write_identity(identity, out / f"peer{identity.rank}.pem")
    roster = out / "roster.json"
    temporary = out / "roster.json.tmp"
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(Roster({i.rank: i.public() for i in identities}).to_json())
    os.replace(temporary, roster)  # replaces a planted symlink itself, never writes through it
    return roster


def load_identity(path: str | Path, rank: int, roster: Roster) -> Identity:
    """Load peer `rank`'s keys, refusing exposed files and keys the roster does not list."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"peer {rank}: key file {path} not found") from None
    except OSError as err:
        raise IdentityError(f"peer {rank}: key file {path} is not readable ({err.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"peer {rank}: key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); run chmod 600 {path}")
    blocks = [b + _PEM_END for b in data.split(_PEM_END) if b.strip()]
    try:
        keys = [serialization.load_pem_private_key(b.strip() + b"\n", password=None) for b in blocks]
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise IdentityError(f"peer {rank}: key file {path} is not PEM private keys ({err})") from None
    signing = next((k for k in keys if isinstance(k, Ed25519PrivateKey)), None)
    agreement = next((k for k in keys if isinstance(k, X25519PrivateKey)), None)
    if signing is None or agreement is None:
        raise IdentityError(f"peer {rank}: key file {path} must hold an Ed25519 and an X25519 private key")
    identity = Identity(rank, signing, agreement)
    listed = roster.get(rank)
    if listed is None:
        raise IdentityError(f"peer {rank}: the roster has no entry for rank {rank} ({len(roster)} peers listed)")
    if _raw(listed.signing) != _raw(identity.public().signing) or _raw(listed.agreement) != _raw(identity.public().agreement):
        raise IdentityError(f"peer {rank}: key file {path} does not match the roster's public keys for rank {rank}")
    return identity
