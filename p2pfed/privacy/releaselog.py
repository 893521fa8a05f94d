"""A peer's durable record of its DP releases, kept beside its checkpoints.

A round redone after a crash or restart releases a second noisy copy of an update, so the
accountant must count every release ever made, not the rounds a checkpoint holds, each at
the noise multiplier it was made with (a resume may change the setting). Each release is
appended and fsynced *before* its message leaves; a line torn by a crash still counts (at
the smallest noise multiplier in the log or now: counting one release too many, or too
noisily, is safe; too few is not).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

FILENAME = "releases.log"
_LINE = re.compile(rb"round (\d{1,9}) attempt (\d{1,9}) sigma ([0-9.eE+-]{1,32})")


@dataclass
class ReleaseLog:
    path: Path
    rounds: list[int | None] = field(default_factory=list)
    """The round of each release (None: a torn or unreadable line)."""
    sigmas: list[float | None] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.rounds)

    lock: int | None = None
    """An exclusive flock on the directory's lock file, held while the log is open: a second
    process for the same peer would count only its own releases."""

    @classmethod
    def open(cls, directory: Path) -> "ReleaseLog":
        """Read the releases so far; a planted non-regular file at the path, or another process
        holding this log, is one sentence."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        log = cls(path)
        log.lock = _exclusive(directory / (FILENAME + ".lock"))
        if path.exists() or path.is_symlink():
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise ValueError(f"{path}: expected a regular file of DP releases, found something else (a link, directory "
                                 "or pipe); move it away")
            for line in path.read_bytes().split(b"\n"):
                if not line:
                    continue
                match = _LINE.fullmatch(line)
                sigma = float(match.group(3)) if match else None
                ok = match is not None and sigma is not None and sigma == sigma and sigma >= 0
                log.rounds.append(int(match.group(1)) if ok and match else None)
                log.sigmas.append(sigma if ok else None)
        return log

    def close(self) -> None:
        """Let another process (or a later open) have the log."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def __del__(self) -> None:
        self.close()

    def noise_multipliers(self, current: float) -> list[float]:
        """Every release's noise multiplier; an unreadable line at the smallest one known."""
        known = [s for s in self.sigmas if s is not None]
        floor = min([current, *known])
        return [floor if s is None else s for s in self.sigmas]

    def record(self, round: int, attempt: int, sigma: float) -> None:
        """One more release, on disk before the caller sends it."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            line = f"round {round} attempt {attempt} sigma {sigma!r}\n".encode()
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new file's name must survive a crash too
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self.rounds.append(round)
        self.sigmas.append(sigma)


def _exclusive(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"{path.parent / FILENAME}: another process holds this peer's release log (two processes for one "
                         "peer would each count only their own releases); stop it first") from None
    return fd
