"""The `communication` bench suite: the allreduce baseline's perplexity for fewer bytes.
Every row takes the same 48 local steps per peer (H steps a round, 48 / H rounds), so rows
differ only in how often and how much they communicate. Its rows, table, goal and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pfed.benchrow import Row

TOTAL_STEPS = 48
OUTER = ("outer.enabled=true", "outer.lr=0.7", "outer.momentum=0.9")
SPARSE = ("gossip.codec=topk+int2", "gossip.error_feedback=on")
INT4_DELTAS = ("gossip.codec=int4", "gossip.error_feedback=on")
"""With error feedback every message is the change since the last one (from the common start),
so int4's rounding error is relative to a round's update, not to the whole adapter."""


def every(h: int, *more: str) -> tuple[str, ...]:
    """H local steps a round, the same total, evaluated about every 4 steps' worth of rounds."""
    rounds = TOTAL_STEPS // h
    return (f"run.local_steps={h}", f"run.rounds={rounds}", f"run.eval_every={max(1, 4 // h)}", *more)


COMMUNICATION_ROWS = (
    Row("allreduce every step (reference)", every(1, "gossip.mode=allreduce")),
    Row("gossip fp32 every step", every(1)),
    *(Row(f"gossip fp32, H={h}", every(h)) for h in (4, 8, 16)),
    *(Row(f"gossip fp32, H={h}, outer Nesterov", every(h, *OUTER)) for h in (4, 8, 16)),
    Row("gossip fp32, H=8, outer Nesterov, AdamW reset each round", every(8, *OUTER, "train.optimizer_state=reset")),
    Row("H=4, outer Nesterov, top-k 2% + int2, error feedback", every(4, *OUTER, *SPARSE, "codec.fraction=0.02")),
    Row("H=8, outer Nesterov, top-k 2% + int2, error feedback", every(8, *OUTER, *SPARSE, "codec.fraction=0.02")),
    Row("H=16, outer Nesterov, top-k 1% + int2, error feedback", every(16, *OUTER, *SPARSE, "codec.fraction=0.01")),
    *(Row(f"H={h}, int4, error feedback", every(h, *INT4_DELTAS)) for h in (8, 16)),
)
"""Row 1 is the reference (exact averaging every step), row 2 what the ratio is taken against."""
MAX_GAP_PCT, FEWER_BYTES = 1.0, 100.0


def total_bytes_per_peer(r: dict[str, Any]) -> float:
    return r["bytes_total"] / r["peers"]


def communication_table(results: list[dict[str, Any]]) -> str:
    reference, dense = results[0], results[1]
    lines = ["| setting | rounds | global ppl | gap to reference | total bytes/peer | fewer bytes than gossip every step "
             "| bytes/peer to target |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        gap = (r["global_ppl"] / reference["global_ppl"] - 1) * 100
        fewer = total_bytes_per_peer(dense) / total_bytes_per_peer(r) if total_bytes_per_peer(r) else None
        target = "-" if r.get("bytes_to_target") is None else f"{r['bytes_to_target']:,.0f}"
        lines.append(f"| {r['name']} | {r['rounds']} | {r['global_ppl']:.2f} | {gap:+.2f}% | {total_bytes_per_peer(r):,.0f} "
                     f"| {'-' if fewer is None else f'{fewer:,.1f}x'} | {target} |")
    return "\n".join(lines)


def communication_goal(results: list[dict[str, Any]]) -> str:
    """Goal: within 1% of the reference's final perplexity for >= 100x fewer total bytes per
    peer than fp32 gossip every step; the best ratio among rows within 1% either way."""
    reference, dense = results[0], results[1]
    within = [r for r in results[2:] if r["global_ppl"] <= reference["global_ppl"] * (1 + MAX_GAP_PCT / 100) and total_bytes_per_peer(r)]
    if not within:
        return f"Goal (within {MAX_GAP_PCT:g}% of the reference for >= {FEWER_BYTES:g}x fewer bytes): no row came within {MAX_GAP_PCT:g}%."
    best = max(within, key=lambda r: total_bytes_per_peer(dense) / total_bytes_per_peer(r))
    ratio = total_bytes_per_peer(dense) / total_bytes_per_peer(best)
    verdict = "**met**" if ratio >= FEWER_BYTES else "**missed**"
    return (f"Goal (within {MAX_GAP_PCT:g}% of the reference's perplexity {reference['global_ppl']:.2f} for >= {FEWER_BYTES:g}x "
            f"fewer total bytes per peer than fp32 gossip every step): {verdict}; best {ratio:,.1f}x by {best['name']} "
            f"({best['global_ppl']:.2f}).")


def plot_frontier(results: list[dict[str, Any]], path: Path) -> Path:
    from p2pfed.benchtables import save_loglog

    def draw(ax: Any) -> None:
        for r in results:
            ax.scatter(total_bytes_per_peer(r), r["global_ppl"])
            ax.annotate(r["name"], (total_bytes_per_peer(r), r["global_ppl"]), fontsize=6)
        ax.axhline(results[0]["global_ppl"] * (1 + MAX_GAP_PCT / 100), color="grey", linestyle=":", label="reference + 1%")

    return save_loglog(path, draw, "total bytes sent per peer (log)", "final global eval perplexity (log)",
                       "Perplexity against communication, the same local steps in every row")


def add_bytes_to_target(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's bytes per peer until its perplexity first came within 1% of row 1's final value."""
    from p2pfed.analysis import bytes_to_target, load_run

    target = results[0]["global_ppl"]
    return [{**r, "bytes_to_target": bytes_to_target(load_run(r["run_dir"]), target)} if r.get("run_dir") else r for r in results]
