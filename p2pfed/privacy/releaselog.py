"""A peer's durable count of its DP releases, kept beside its checkpoints.

A round redone after a crash or restart releases a second noisy copy of an update, so the
accountant must count every release ever made, not the rounds a checkpoint holds. Each
release is appended and fsynced *before* its message leaves; a torn last line still counts
(counting one release too many is safe, one too few is not).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

FILENAME = "releases.log"


class ReleaseLog:
    def __init__(self, path: Path, count: int) -> None:
        self.path, self.count = path, count

    @classmethod
    def open(cls, directory: Path) -> "ReleaseLog":
        """Read the count so far; a planted non-regular file at the path is one sentence."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        count = 0
        if path.exists() or path.is_symlink():
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{path}: expected a regular file of DP releases, found something else (a link, directory "
                                 "or pipe); move it away")
            data = path.read_bytes()
            count = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
        return cls(path, count)

    def record(self, round: int, attempt: int) -> None:
        """One more release, on disk before the caller sends it."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            line = f"round {round} attempt {attempt}\n".encode()
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        self.count += 1
