"""The `churn` bench suite: a slow or dead peer against the others' pace and perplexity.

The 8-peer SmolLM2 task of the full suite (12 rounds x 1 local step, ring). One peer (rank 3)
is a 3x straggler under lockstep and under deadline gossip, or is killed at the start of round
5 (a third of the run done) under on_peer_loss = 'continue' and 'restart'. Every figure is the
*others'*: the peers that were neither slow nor lost, the same seven in every row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from p2pfed.benchrow import Row
from p2pfed.metrics import read_metrics

FAULTY, LOST_AT, DEADLINE_S = 3, 5, 5.0
STRAGGLER = (f"faults.peers=[{FAULTY}]", "faults.kind=slow", "faults.strength=3")
KILLED = (f"faults.peers=[{FAULTY}]", "faults.kind=crash", f"faults.from_round={LOST_AT}")
CHURN_ROWS = (
    Row("no straggler, lockstep (reference)"),
    Row("one 3x straggler, lockstep", STRAGGLER),
    Row(f"one 3x straggler, deadline {DEADLINE_S:g} s", (*STRAGGLER, f"gossip.deadline_s={DEADLINE_S:g}")),
    Row(f"one peer killed at round {LOST_AT}, continue", (*KILLED, "run.on_peer_loss=continue")),
    Row(f"one peer killed at round {LOST_AT}, restart", KILLED),
)
CHURN_COMMON = ("gossip.topology=topologies/ring.toml", "bench.probes=0", "consensus.every=0")
"""No monitoring all-reduces: they wait for every peer, the straggler too, whatever the deadline."""
STRAGGLER_PACE, STRAGGLER_GAP_PCT, LOSS_GAP_PCT = 1.2, 1.0, 2.0


def churn_figures(row: Row, run_dir: Path) -> dict[str, Any]:
    """The others' figures of one run: pace (rounds without evaluation), rounds, final perplexity."""
    from p2pfed.provenance import read_code_version

    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    others = [r for r in range(config["run"]["peers"]) if r != FAULTY]
    paces, rounds, missing, late = [], [], 0, 0
    for rank in others:
        lines = [m for m in read_metrics(run_dir / "metrics" / f"peer{rank}.jsonl", skip_broken=True) if m["round"] >= 1]
        rounds.append(len(lines))
        paces += [m["round_s"] - m.get("eval_s", 0.0) for m in lines]
        missing += sum(len(m.get("missing", [])) for m in lines)
        late += sum(m.get("late", 0) for m in lines)
    ppl = [p["global_ppl_after"] for p in summary["peers_table"] if p["rank"] in others and p.get("global_ppl_after") is not None]
    restarts = max((m.get("restart", 0) for m in read_metrics(run_dir / "metrics" / "peer0.jsonl", skip_broken=True)), default=0)
    return {"name": row.name, "overrides": list(row.overrides), "run_dir": str(run_dir), "wall_s": summary["wall_s"],
            "others_round_s": sum(paces) / len(paces), "others_rounds": min(rounds), "rounds": config["run"]["rounds"],
            "others_ppl": sum(ppl) / len(ppl) if len(ppl) == len(others) else None, "missing": missing, "late": late,
            "restarts": restarts, "lost": summary.get("lost", []), "config": config, "code": read_code_version(run_dir)}


def churn_table(results: list[dict[str, Any]]) -> str:
    reference = results[0]
    lines = ["| row | others' s/round | vs no straggler | rounds the others finished | others' global ppl | gap | messages missed "
             "| restarts | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        pace = r["others_round_s"] / reference["others_round_s"]
        gap = _gap(r, reference)
        ppl = f"{r['others_ppl']:.2f}" if r["others_ppl"] is not None else "-"
        lines.append(f"| {r['name']} | {r['others_round_s']:.2f} | {pace:.2f}x | {r['others_rounds']} of {r['rounds']} | {ppl} | "
                     f"{'reference' if r is reference else f'{gap:+.2f}%' if gap is not None else '-'} | {r['missing']} | "
                     f"{r['restarts']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def _gap(row: dict[str, Any], reference: dict[str, Any]) -> float | None:
    if row["others_ppl"] is None or reference["others_ppl"] is None:
        return None
    return (row["others_ppl"] / reference["others_ppl"] - 1) * 100


def churn_goals(results: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, each judged from the table's rows (a row not run is said so)."""
    reference = results[0]
    by_name = {r["name"]: r for r in results}
    lines = []
    deadline = by_name.get(CHURN_ROWS[2].name)
    if deadline is not None:
        pace, gap = deadline["others_round_s"] / reference["others_round_s"], _gap(deadline, reference)
        met = pace <= STRAGGLER_PACE and gap is not None and gap <= STRAGGLER_GAP_PCT
        lines.append(f"- One 3x straggler under deadline gossip: the others' rounds {pace:.2f}x the no-straggler run's (goal <= "
                     f"{STRAGGLER_PACE:g}x) at {gap if gap is not None else float('nan'):+.2f}% perplexity (goal <= "
                     f"{STRAGGLER_GAP_PCT:g}%): {'**met**' if met else '**missed**'}")
    survivors = by_name.get(CHURN_ROWS[3].name)
    if survivors is not None:
        gap = _gap(survivors, reference)
        met = survivors["others_rounds"] == survivors["rounds"] and gap is not None and gap <= LOSS_GAP_PCT
        lines.append(f"- One peer lost, continue: the survivors finished {survivors['others_rounds']} of {survivors['rounds']} rounds "
                     f"at {gap if gap is not None else float('nan'):+.2f}% perplexity (goal: every round, <= {LOSS_GAP_PCT:g}%): "
                     f"{'**met**' if met else '**missed**'}")
    restarted = by_name.get(CHURN_ROWS[4].name)
    if restarted is not None:
        same = restarted["others_ppl"] == reference["others_ppl"]
        lines.append(f"- One peer lost, restart: {restarted['restarts']} group restart(s), final perplexity "
                     f"{'identical to' if same else 'different from'} the uninterrupted run's")
    return lines


CHURN_NOTE = (f"Others: the seven peers other than rank {FAULTY}, the straggler or the peer killed, in every row. s/round: their "
              "mean seconds per round without evaluation (local step, gossip, waiting), from the metrics. A 3x straggler sleeps "
              "twice its step's time after it (faults.kind = 'slow'); with 8 peers on this machine's cores, its sleep frees CPU "
              "for the others. Killed: kill -9 at the start of the round; 'continue' goes on without it (one torchrun agent per "
              "peer), 'restart' restarts the group from the newest checkpoint every peer has. Messages missed: neighbours' "
              "messages of a round that were not there by its deadline (their weight went to the receiver's own term). No row "
              "measures the exact consensus distance (consensus.every = 0): its all-reduces wait for every peer, the straggler too.")
