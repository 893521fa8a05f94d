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
from dataclasses import dataclass, field
from pathlib import Path

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
        """The run's log in `directory` (created if missing); lines that do not parse are skipped and counted."""
        path = Path(directory) / CONSENT_FILE
        consents, skipped = cls(path), 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and not path.is_symlink():
            with open(path, encoding="utf-8", errors="replace") as handle:
                while line := handle.readline(MAX_LINE):
                    key, survivors = _parse(line)
                    if key is None or survivors is None:
                        skipped += 1
                        continue
                    consents.lists.setdefault(key, survivors)
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
        self.lists[key] = survivors
        if self.path is None:
            return
        line = json.dumps({"key": list(key), "present": list(survivors.present), "helpers": list(survivors.helpers)})
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


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
