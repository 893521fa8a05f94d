"""The README's result tables, copied from the results files they come from, so no figure is
typed by hand and a stale one is caught (`p2pfed tables --check`, and a test).

A block in the README names its source and what to take from it:

    <!-- results: bench/results/secure-2026-11-23.md table 1 -->
    ...generated...
    <!-- /results -->

Views: `table N` (the N-th markdown table of a results .md), `line PREFIX` (the first line
of the .md starting with PREFIX, e.g. a goal's verdict), `lines PREFIX` (every such line),
`robust-pivot TOPOLOGY` (attack x rule gaps from a robust suite's .json).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

BLOCK = re.compile(r"(<!-- results: (?P<source>\S+) (?P<view>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


class TablesError(ValueError):
    """A block whose source or view cannot be read; the message names the block."""


@dataclass(frozen=True)
class Difference:
    source: str
    view: str


def render(readme: str, root: Path) -> str:
    """The README with every block's body regenerated from its source."""
    def replace(match: re.Match) -> str:
        body = generate(root / match["source"], match["view"].strip())
        return f"{match[1]}{body.rstrip()}\n{match[5]}"

    return BLOCK.sub(replace, readme)


def stale(readme: str, root: Path) -> list[Difference]:
    """The blocks whose body differs from what their source gives today."""
    return [Difference(m["source"], m["view"].strip()) for m in BLOCK.finditer(readme)
            if m["body"].rstrip() != generate(root / m["source"], m["view"].strip()).rstrip()]


def generate(source: Path, view: str) -> str:
    kind, _, argument = view.partition(" ")
    if not source.is_file():
        raise TablesError(f"README block '{source.name} {view}': no such results file {source}")
    text = source.read_text(encoding="utf-8")
    if kind == "table":
        if not argument.isdigit():
            raise TablesError(f"README block '{source.name} {view}': expected 'table N' with N a table number, got {argument!r}")
        return nth_table(text, int(argument), f"{source.name} {view}")
    if kind in ("line", "lines"):
        found = [line for line in text.splitlines() if line.startswith(argument)]
        if not found:
            raise TablesError(f"README block '{source.name} {view}': no line of {source} starts with {argument!r}")
        return found[0] if kind == "line" else "\n".join(found)
    if kind == "robust-pivot":
        from p2pfed.benchrobust import pivot_table

        return pivot_table(json.loads(text)["rows"], argument)
    raise TablesError(f"README block '{source.name} {view}': unknown view {kind!r}; expected table N, line PREFIX, lines PREFIX "
                      "or robust-pivot TOPOLOGY")


def nth_table(text: str, n: int, where: str) -> str:
    """The n-th (1-based) run of consecutive lines starting with '|'."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    if not 1 <= n <= len(tables):
        raise TablesError(f"README block '{where}': the file has {len(tables)} tables, not {n}")
    return tables[n - 1]
