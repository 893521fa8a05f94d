"""The survivor lists a helper consented to, kept on disk for the life of a run.

A restart redoes the rounds after the last checkpoint with bit-identical adapters (that is
what resuming promises). A new session gives the redo fresh masks, but a receiver could ask
for a different present list the second time and subtract the two sums: one sender's
adapter. So before it signs, a helper records (purpose, round, step, receiver) -> list,
fsynced, and in any later attempt of the same run consents only to that same list. The
file lives beside the peer's checkpoints, so `--overwrite` (a new run) removes it with them.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from p2pfed.secure.fixedpoint import SecureError
from p2pfed.secure.messages import Survivors

log = logging.getLogger("p2pfed.secure")
CONSENT_FILE = "consents.jsonl"
MAX_LINE = 1 << 16
"""The longest line read back: a record names at most a few hundred ranks."""
Key = tuple[int, int, int, int]
"""(purpose, round, step, receiver): one exchange of a run, whatever the attempt."""


def _ranks(value: object) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 31 for r in value):
        return None
    return tuple(value)


@dataclass
class ConsentLog:
    """What this peer, as a helper, has consented to in this run (memory, and a file if given)."""

    path: Path | None = None
    lists: dict[Key, Survivors] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | Path) -> "ConsentLog":
        """The run's log in `directory` (created if missing, a regular file of its own or a
        SecureError sentence); lines that do not parse are skipped and counted."""
        path = Path(directory) / CONSENT_FILE
        consents, skipped = cls(path), 0
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a planted symlink, never waiting on a FIFO
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as err:
            raise SecureError(f"{path}: consent log is not a writable regular file ({err.strerror or err}); "
                              "remove it only if this run is to start afresh", "consents") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SecureError(f"{path}: consent log is not a regular file", "consents")
        with os.fdopen(fd, "rb+") as handle:
            while raw := handle.readline(MAX_LINE):
                key, survivors = _parse(raw.decode("utf-8", errors="replace"))
                if key is None or survivors is None:
                    skipped += 1
                    continue
                consents.lists.setdefault(key, survivors)
            if handle.tell() and not raw_ends_with_newline(handle):
                handle.write(b"\n")  # a line torn by a crash stays one broken line; the next record starts clean
                handle.flush()
                os.fsync(handle.fileno())
        if skipped:
            log.warning("%s: %d lines are not consent records; ignored", path, skipped)
        return consents

    def admits(self, key: Key, survivors: Survivors) -> bool:
        """Whether consenting to `survivors` for `key` keeps this run to one list per exchange."""
        earlier = self.lists.get(key)
        return earlier is None or earlier == survivors

    def record(self, key: Key, survivors: Survivors) -> None:
        """Remember the list before the consent leaves this peer (on disk first, if there is a file)."""
        if key in self.lists:
            return
        if self.path is not None:
            self._append(key, survivors)
        self.lists[key] = survivors  # only once it is on disk: a failed write leaves no consent to rely on

    def _append(self, key: Key, survivors: Survivors) -> None:
        """One record, whole and fsynced, at the end of the file."""
        assert self.path is not None
        line = json.dumps({"key": list(key), "present": list(survivors.present), "helpers": list(survivors.helpers)})
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as err:
            raise SecureError(f"{self.path}: cannot record a consent ({err.strerror or err})", "consents") from None
        try:
            data = (line + "\n").encode()
            while data:  # a short write (a full disk) must not leave half a record
                written = os.write(fd, data)
                if written <= 0:
                    raise SecureError(f"{self.path}: could not write a consent record", "consents")
                data = data[written:]
            os.fsync(fd)
        except OSError as err:
            raise SecureError(f"{self.path}: cannot record a consent ({err.strerror or err})", "consents") from None
        finally:
            os.close(fd)


def raw_ends_with_newline(handle) -> bool:
    """Whether the file's last byte is a newline (the handle is left at its end)."""
    handle.seek(-1, os.SEEK_END)
    last = handle.read(1)
    return last == b"\n"


def _parse(line: str) -> tuple[Key | None, Survivors | None]:
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(raw, dict):
        return None, None
    key, present, helpers = _ranks(raw.get("key")), _ranks(raw.get("present")), _ranks(raw.get("helpers"))
    if key is None or len(key) != 4 or present is None or helpers is None:
        return None, None
    return (key[0], key[1], key[2], key[3]), Survivors(present, helpers)
