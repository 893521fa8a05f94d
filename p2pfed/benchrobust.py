"""The `robust` bench suite: Byzantine peers (valid keys, harmful adapters) against each
mixing rule. Its rows, its table and its goals; bench.py runs the rows like any suite's."""

from __future__ import annotations

from typing import Any

ATTACKS = ("nan", "scale", "signflip", "noise", "alie")
RULES = ("none", "clip", "trimmed", "median")
RULE_NAMES = {"none": "no defence", "clip": "ClippedGossip", "trimmed": "trimmed mean", "median": "median"}
ATTACKERS = {1: (3,), 2: (3, 6)}
"""Which ranks attack (8 peers): spaced so no honest neighbourhood of the ring holds both."""


def robust_row_overrides(topology: str, attackers: int, attack: str | None, rule: str) -> tuple[str, ...]:
    """The overrides of one cell: the graph, who attacks and how, the rule and what it tolerates."""
    common = (f"gossip.topology=topologies/{topology}.toml", f"gossip.robust={rule}", f"gossip.byzantine={attackers}")
    if attack is None:
        return common
    peers = ",".join(map(str, ATTACKERS[attackers]))
    return (*common, f"faults.peers=[{peers}]", f"faults.kind='{attack}'")


def row_name(topology: str, attackers: int, attack: str | None, rule: str) -> str:
    return f"{topology}, {attackers} attacker{'s' if attackers > 1 else ''}, {attack or 'no attack'}, {RULE_NAMES[rule]}"


def honest_ppl(summary: dict[str, Any], config: dict[str, Any]) -> float | None:
    """Mean final global perplexity over the peers that do not attack."""
    bad = set(config.get("faults", {}).get("peers", [])) if config.get("faults", {}).get("kind") in ATTACKS else set()
    values = [p["global_ppl_after"] for p in summary["peers_table"] if p["rank"] not in bad and p.get("global_ppl_after") is not None]
    return sum(values) / len(values) if values else None


def robust_table(results: list[dict[str, Any]]) -> str:
    """One line per cell: honest peers' perplexity against the same graph's no-attack, no-defence run."""
    lines = ["| topology | attackers | attack | rule | honest global ppl | gap to no attack | refused messages | exchange (probe) |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        topology, attackers, attack, rule = r["cell"]
        if r.get("error"):
            lines.append(f"| {topology} | {attackers} | {attack or '-'} | {RULE_NAMES[rule]} | refused: {r['error']} | | | |")
            continue
        reference = _reference(results, topology)
        gap = gap_text(r["honest_ppl"], reference) if reference and r.get("honest_ppl") else "-"
        ppl = "nan" if r.get("honest_ppl") is None else f"{r['honest_ppl']:.2f}" if r["honest_ppl"] < 1e6 else f"{r['honest_ppl']:.2e}"
        probe = f"{r['probe_gossip_s'] * 1e3:.1f} ms" if r.get("probe_gossip_s") else "-"
        lines.append(f"| {topology} | {attackers if attack else 0} | {attack or '-'} | {RULE_NAMES[rule]} | {ppl} | {gap} | {r.get('rejected', 0)} | {probe} |")
    return "\n".join(lines)


DIVERGED = 100.0
"""A perplexity this many times the no-attack run's is shown as divergence, not a percentage."""


def gap_text(ppl: float, reference: float) -> str:
    """The gap to the no-attack run, or 'diverged (ppl ...)' once training has blown up."""
    if ppl > DIVERGED * reference:
        return f"diverged (ppl {ppl:.1e})"
    return f"{(ppl / reference - 1) * 100:+.2f}%"


def _reference(results: list[dict[str, Any]], topology: str) -> float | None:
    for r in results:
        if r["cell"][0] == topology and r["cell"][2] is None and r["cell"][3] == "none" and not r.get("error"):
            return r.get("honest_ppl")
    return None


def robust_goals(results: list[dict[str, Any]], max_gap_pct: float = 3.0, clean_gap_pct: float = 1.0, clean_time: float = 1.10) -> list[str]:
    """ClippedGossip under one attacker within 3% of no attack, for every attack; without
    attackers it costs at most 1% perplexity and 10% of the exchange time."""
    lines = []
    for topology in dict.fromkeys(r["cell"][0] for r in results):
        reference = _reference(results, topology)
        clipped = [r for r in results if r["cell"][0] == topology and r["cell"][1] == 1 and r["cell"][2] and r["cell"][3] == "clip"
                   and not r.get("error")]
        if reference and clipped:
            gaps = {r["cell"][2]: (r["honest_ppl"] / reference - 1) * 100 if r.get("honest_ppl") else float("inf") for r in clipped}
            worst = max(gaps, key=gaps.get)
            lines.append(f"- {topology}: ClippedGossip, 1 attacker: worst gap {gaps[worst]:+.2f}% ({worst}) "
                         f"(goal <= {max_gap_pct:g}% for every attack: {'**met**' if gaps[worst] <= max_gap_pct else '**missed**'})")
        clean = next((r for r in results if r["cell"][0] == topology and r["cell"][2] is None and r["cell"][3] == "clip"
                      and not r.get("error")), None)
        plain = next((r for r in results if r["cell"][0] == topology and r["cell"][2] is None and r["cell"][3] == "none"
                      and not r.get("error")), None)
        if clean and plain and reference:
            gap = (clean["honest_ppl"] / reference - 1) * 100
            line = f"- {topology}: ClippedGossip without attackers: {gap:+.2f}% perplexity (goal <= {clean_gap_pct:g}%: {'**met**' if gap <= clean_gap_pct else '**missed**'})"
            if clean.get("probe_gossip_s") and plain.get("probe_gossip_s"):
                ratio = clean["probe_gossip_s"] / plain["probe_gossip_s"]
                line += f", exchange {ratio:.2f}x of plain mixing (goal <= {clean_time:.2f}x: {'**met**' if ratio <= clean_time else '**missed**'})"
            lines.append(line)
    return lines


def pivot_table(results: list[dict[str, Any]], topology: str, attackers: int = 1) -> str:
    """Attack x rule: the honest peers' gap to the same graph's no-attack, no-defence run
    ('-' where the suite ran no such cell, 'refused' where the graph cannot host the rule)."""
    reference = _reference(results, topology)
    cells = {(r["cell"][2], r["cell"][3]): r for r in results if r["cell"][0] == topology and (r["cell"][1] == attackers or r["cell"][2] is None)}
    rules = [rule for rule in RULES if any(key[1] == rule for key in cells)]
    peers = next((r["config"]["run"]["peers"] for r in cells.values() if r.get("config")), "?")
    lines = [f"| attack ({attackers} of {peers} peers) | " + " | ".join(RULE_NAMES[rule] for rule in rules) + " |",
             "|---|" + "---:|" * len(rules)]
    for attack in (None, *ATTACKS):
        row = []
        for rule in rules:
            r = cells.get((attack, rule))
            if r is None:
                row.append("-")
            elif r.get("error"):
                row.append("refused")
            elif r.get("honest_ppl") is None or not reference:
                row.append("nan")
            else:
                row.append(gap_text(r["honest_ppl"], reference))
        lines.append(f"| {attack or 'none'} | " + " | ".join(row) + " |")
    return "\n".join(lines)
