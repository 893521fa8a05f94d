"""Per-peer JSONL metrics (one line per round) and the run summary a person reads.

Every figure is measured in the run: seconds with perf_counter, bytes as the lengths of
the serialised envelopes handed to the transport.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one JSON object per line, flushed, so a crash loses at most one line."""

    def __init__(self, path: str | Path, keep_until_round: int | None = None) -> None:
        """A new file, or (resuming) the existing one cut back to the rounds up to `keep_until_round`."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_round is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path, skip_broken=True) if r.get("round", 0) <= keep_until_round]
        self.handle = open(self.path, "w", encoding="utf-8")
        for record in kept:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read_metrics(path: str | Path, skip_broken: bool = False) -> list[dict[str, Any]]:
    """All records of one peer's metrics file (`skip_broken`: drop a line a crash cut short)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                if not skip_broken:
                    raise
                continue
            # a line that is not a record of a round (edited or planted) is dropped when resuming
            if skip_broken and not (isinstance(record, dict) and isinstance(record.get("round"), int) and not isinstance(record["round"], bool)):
                continue
            records.append(record)
    return records


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per peer: perplexities before/after, bytes, seconds."""
    header = (
        "| peer | global ppl before | global ppl after | own ppl before | own ppl after "
        "| bytes/round sent | vs fp32 | compute s/round | codec s/round | crypto s/round | comm s/round | rejected |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['rank']} | {_fmt(r['global_ppl_before'])} | {_fmt(r['global_ppl_after'])} "
            f"| {_fmt(r['own_ppl_before'])} | {_fmt(r['own_ppl_after'])} | {r['bytes_per_round']:,.0f}"
            f"{' (est.)' if r.get('bytes_estimated') else ''} | {_fmt(r.get('compression'), '.1f')}{'x' if r.get('compression') else ''} | {r['compute_s_per_round']:.2f} "
            f"| {r['codec_s_per_round']:.4f} | {r['crypto_s_per_round']:.4f} "
            f"| {r['comm_s_per_round']:.3f} | {r['rejected']} |"
        )
    return "\n".join(lines)


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None
