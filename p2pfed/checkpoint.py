"""Per-peer checkpoints that survive a crash at any instant, and agreeing where to resume.

A checkpoint is one file: a magic line, an HMAC-SHA256 of the body under a key only this
peer holds, then the body (a `torch.save` of the peer's state: tensors and plain types).
It is written to a temporary file, fsynced, and renamed into place, so a reader sees a
whole checkpoint or none. On load the MAC is checked before anything is parsed, and the
body is read with `weights_only=True`, so a damaged, truncated or planted file (a shared
or copied run directory) is refused, never run. The last `keep` checkpoints are kept, so a
bad newest one still leaves the one before.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from p2pfed.transport import Transport

log = logging.getLogger("p2pfed.checkpoint")
MAGIC = b"P2PFED-CHECKPOINT-2\n"
KEY_FILE = "mac.key"
NAME = re.compile(r"round-([0-9]{6})\.pt$")
MAX_CHECKPOINT_BYTES = 1 << 34
"""The largest checkpoint file read (16 GiB): a planted sparse file cannot make a peer allocate more."""


class CheckpointError(ValueError):
    """A checkpoint file is incomplete or damaged; the message names it."""


def identity_key(signing_private_bytes: bytes) -> bytes:
    """The checkpoint MAC key of a peer with a roster identity: derived from its signing key."""
    return hmac.new(signing_private_bytes, b"p2pfed checkpoint mac v1", hashlib.sha256).digest()


def local_key(directory: str | Path) -> bytes:
    """A peer without an identity (allreduce, local modes): a random key kept beside its
    checkpoints, created once, mode 0600, never through a symlink."""
    path = Path(directory) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        try:  # a symlink, directory or FIFO planted at the name is refused, never followed or waited on
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as err:
            raise CheckpointError(f"{path}: checkpoint key is not a readable regular file ({err.strerror or err}); remove it to start afresh") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            os.close(fd)
            raise CheckpointError(f"{path}: checkpoint key must be a regular file of this user's, mode 0600; remove it to start afresh")
        with os.fdopen(fd, "rb") as handle:
            key = handle.read(64)
        if len(key) != 32:
            raise CheckpointError(f"{path}: checkpoint key of {len(key)} bytes, expected 32") from None
        return key
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


class Checkpoints:
    """One peer's checkpoint directory, authenticated under `key`."""

    def __init__(self, directory: str | Path, key: bytes, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.key = key
        self.keep = keep

    def path(self, round: int) -> Path:
        return self.directory / f"round-{round:06d}.pt"

    def save(self, round: int, state: dict[str, Any]) -> Path:
        """Write atomically (temporary file, fsync, rename), then drop all but the newest `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        body = buffer.getvalue()
        final = self.path(round)
        # a fresh, exclusive, unpredictable name: a symlink planted beside the checkpoints is never written through
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".round-{round:06d}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC + self._mac(round, body) + body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself reaches the disk
        finally:
            os.close(directory)
        # prune only older rounds: a planted file named after a later round must not make this one go
        older = [r for r in self.rounds() if r < round]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            self.path(old).unlink(missing_ok=True)
        return final

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint file present (not yet verified), oldest first."""
        if not self.directory.exists():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := NAME.match(p.name)))

    def load(self, round: int) -> dict[str, Any]:
        """The state saved for `round`; CheckpointError if the file is incomplete, damaged or not ours."""
        body = self._verified_body(round)
        try:
            state = torch.load(io.BytesIO(body), weights_only=True)
        except Exception as err:  # noqa: BLE001 - a body that authenticates but does not parse is still refused
            raise CheckpointError(f"{self.path(round)}: checkpoint does not load as tensors and plain types ({err})") from None
        if not isinstance(state, dict) or state.get("round") != round:
            raise CheckpointError(f"{self.path(round)}: holds the state of another round")
        return state

    def _mac(self, round: int, body: bytes) -> bytes:
        """Keyed, and bound to the round: a file copied over another round's name does not verify."""
        mac = self._mac_start(round)
        mac.update(body)
        return mac.digest()

    def _mac_start(self, round: int) -> "hmac.HMAC":
        """The MAC of `round` before its body: a reader streams the body into it."""
        return hmac.new(self.key, MAGIC + struct.pack("<Q", round), hashlib.sha256)

    def _verified_body(self, round: int) -> bytes:
        """The file's body once its MAC matches; checking needs no unpickling."""
        path = self.path(round)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a symlink or a FIFO planted here is refused
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise CheckpointError(f"{path}: not a regular file")
                if info.st_size > MAX_CHECKPOINT_BYTES:
                    raise CheckpointError(f"{path}: {info.st_size} bytes, more than any checkpoint ({MAX_CHECKPOINT_BYTES})")
                head = handle.read(len(MAGIC) + 32)
                if len(head) < len(MAGIC) + 32 or not head.startswith(MAGIC):
                    raise CheckpointError(f"{path}: not a complete p2pfed checkpoint (truncated header)")
                # the MAC first, streamed: a planted file is refused before its body is held in memory
                mac = self._mac_start(round)
                while chunk := handle.read(1 << 20):
                    mac.update(chunk)
                if not hmac.compare_digest(mac.digest(), head[len(MAGIC):]):
                    raise CheckpointError(f"{path}: checkpoint is truncated, corrupted or not written by this peer (MAC mismatch)")
                handle.seek(len(head))
                return handle.read()
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None

    def valid_rounds(self) -> list[int]:
        """Rounds whose checkpoint verifies; a damaged one is reported and skipped."""
        good = []
        for round in self.rounds():
            try:
                self._verified_body(round)
            except CheckpointError as err:
                log.warning("%s; falling back to an older checkpoint", err)
                continue
            good.append(round)
        return good


def agree_on_round(own: list[int], transport: Transport) -> int:
    """The newest round every peer holds a valid checkpoint for (0: start afresh)."""
    everyone = [rounds_of(b, rank) for rank, b in enumerate(transport.all_gather_bytes(json.dumps(own).encode(), max_length=1 << 16))]
    common = set.intersection(*everyone) if everyone else set()
    return max(common, default=0)


def rounds_of(data: bytes, rank: int) -> set[int]:
    """A peer's list of checkpoint rounds; CheckpointError naming it when it is not one."""
    try:
        rounds = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        rounds = None
    if not isinstance(rounds, list) or len(rounds) > 1000 or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rounds):
        raise CheckpointError(f"peer {rank} sent {data[:40]!r} as its checkpoint rounds, not a list of round numbers")
    return set(rounds)
