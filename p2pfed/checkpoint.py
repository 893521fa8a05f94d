"""Per-peer checkpoints that survive a crash at any instant, and agreeing where to resume.

A checkpoint is one file: a magic line, the SHA-256 of the body, then the body (a
`torch.save` of the peer's state). It is written to a temporary file, fsynced, and renamed
into place, so a reader sees a whole checkpoint or none; the digest catches a file that
was truncated or damaged later. The last `keep` checkpoints are kept, so a bad newest one
still leaves the one before.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from p2pfed.transport import Transport

log = logging.getLogger("p2pfed.checkpoint")
MAGIC = b"P2PFED-CHECKPOINT-1\n"
NAME = re.compile(r"round-(\d{6})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is incomplete or damaged; the message names it."""


class Checkpoints:
    """One peer's checkpoint directory."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
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
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(MAGIC + hashlib.sha256(body).digest() + body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself reaches the disk
        finally:
            os.close(directory)
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return final

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint file present (not yet verified), oldest first."""
        if not self.directory.exists():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := NAME.match(p.name)))

    def load(self, round: int) -> dict[str, Any]:
        """The state saved for `round`; CheckpointError if the file is incomplete or damaged."""
        return torch.load(io.BytesIO(self._verified_body(round)), weights_only=False)

    def _verified_body(self, round: int) -> bytes:
        """The file's body once its digest matches; checking needs no unpickling."""
        path = self.path(round)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from None
        head = len(MAGIC) + 32
        if len(data) < head or not data.startswith(MAGIC):
            raise CheckpointError(f"{path}: not a complete p2pfed checkpoint (truncated header)")
        body = data[head:]
        if hashlib.sha256(body).digest() != data[len(MAGIC) : head]:
            raise CheckpointError(f"{path}: checkpoint is truncated or corrupted (SHA-256 mismatch)")
        return body

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
    everyone = [set(json.loads(b)) for b in transport.all_gather_bytes(json.dumps(own).encode())]
    common = set.intersection(*everyone) if everyone else set()
    return max(common, default=0)
