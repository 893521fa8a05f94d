"""A bench row: a name for the table and the overrides that make it (shared by the suites'
modules, which bench.py imports)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One setting: a name for the table and the overrides that make it."""

    name: str
    overrides: tuple[str, ...] = ()
    cell: tuple | None = None
    """Robust suite: (topology, attackers, attack or None, rule)."""
    base: str = ""
    """The row's base config where it is not its suite's (the scale suite mixes models)."""
