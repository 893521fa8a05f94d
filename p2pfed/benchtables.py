"""The bench results as people read them: markdown tables, the goals' verdicts, a plot, JSON.

Pure formatting of figures `p2pfed.bench` collected from the runs' own metrics; nothing
here measures anything.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from p2pfed.provenance import code_version, describe

if TYPE_CHECKING:
    from p2pfed.bench import Suite

GOSSIP_PREFIX = "gossip"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def code_line(rows: list[dict[str, Any]], micro: list[dict[str, Any]]) -> str:
    """Which code produced the rows: one commit for all, or each row's, so a figure can be traced."""
    versions = {describe(r.get("code") or {}) for r in rows if not r.get("error")}
    if micro:
        versions.add(describe(code_version()))
    if len(versions) == 1:
        return f"Code: every row comes from commit {versions.pop()}."
    per_row = "; ".join(f"{r['name']}: {describe(r.get('code') or {})}" for r in rows if not r.get("error"))
    return f"Code: rows come from different commits: {per_row}" + (f"; micro-benchmarks: {describe(code_version())}" if micro else "") + "."


def scaled_code(scaling: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "name": f"{r.get('model', '')} {r['name']}".strip()} for r in scaling]


def _gap(value: float, reference: float) -> float:
    return (value / reference - 1) * 100


def _seconds(r: dict[str, Any]) -> str:
    return (f"{r['round_s']:.2f} | {r['compute_s']:.2f} | {r['codec_s']:.4f} | {r['crypto_s']:.4f} | {r.get('mask_s', 0.0):.4f} "
            f"| {r['comm_s']:.3f}")


def table(results: list[dict[str, Any]]) -> str:
    """Compression/secure suites: one line per row; ratios and gaps against the first row."""
    reference = results[0]
    lines = [
        "| setting | bytes/peer/round | fewer bytes than row 1 | global ppl | gap to row 1 | own ppl | consensus Xi^2 "
        "| s/round | compute | codec | crypto | masks | comm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = reference["bytes_per_peer_per_round"] / r["bytes_per_peer_per_round"] if r["bytes_per_peer_per_round"] else None
        lines.append(
            f"| {r['name']} | {r['bytes_per_peer_per_round']:,.0f} | {'-' if ratio is None else f'{ratio:.1f}x'} "
            f"| {r['global_ppl']:.2f} | {_gap(r['global_ppl'], reference['global_ppl']):+.2f}% | {r['own_ppl']:.2f} | {r['consensus']:.2e} "
            f"| {_seconds(r)} |"
        )
    return "\n".join(lines)


def goal_line(results: list[dict[str, Any]], bytes_factor: float = 10.0, max_gap_pct: float = 2.0) -> str:
    """Whether some row sends >= bytes_factor x fewer bytes than row 1 within max_gap_pct perplexity."""
    reference = results[0]
    hits = [r["name"] for r in results[1:]
            if r["bytes_per_peer_per_round"] * bytes_factor <= reference["bytes_per_peer_per_round"]
            and r["global_ppl"] <= reference["global_ppl"] * (1 + max_gap_pct / 100)]
    verdict = f"met by: {', '.join(hits)}" if hits else "not met by any row"
    return f"Goal (>= {bytes_factor:.0f}x fewer bytes than row 1 with a perplexity gap under {max_gap_pct:.0f}%): {verdict}."


def best_line(results: list[dict[str, Any]]) -> str:
    """A sweep: which row ends at the lowest global perplexity (gaps are against row 1)."""
    best = min(results, key=lambda r: r["global_ppl"])
    return f"Lowest global perplexity: {best['name']} ({best['global_ppl']:.2f}); the gaps in the table are against row 1."


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def secure_line(results: list[dict[str, Any]], max_gap_pct: float = 0.1, max_bytes_pct: float = 2.0, max_time_ratio: float = 1.25) -> str:
    """For rows that mask, against the plain row before them (the same graph) and the goals:
    perplexity gap, extra bytes, and the whole secure exchange timed against a plain one of
    the same adapter in the same run."""
    reference, parts = results[0], []
    for r in results[1:]:
        if not r.get("mask_s"):
            reference = r
            continue
        gap = _gap(r["global_ppl"], reference["global_ppl"])
        extra = (r["bytes_per_peer_per_round"] / reference["bytes_per_peer_per_round"] - 1) * 100
        part = (f"{r['name']}: perplexity gap {gap:+.3f}% (goal <= {max_gap_pct}%: {verdict(abs(gap) <= max_gap_pct)}), "
                f"{extra:+.3f}% bytes (goal <= {max_bytes_pct:g}%: {verdict(extra <= max_bytes_pct)}), "
                f"masks {r['mask_s'] / r['round_s'] * 100:.3f}% of a round")
        if r.get("probe_plain_s"):
            ratio = r["probe_gossip_s"] / r["probe_plain_s"]
            part += (f"; whole exchange {r['probe_gossip_s'] * 1e3:.1f} ms secure vs {r['probe_plain_s'] * 1e3:.1f} ms plain in the same "
                     f"run, {ratio:.2f}x (goal <= {max_time_ratio}x: {verdict(ratio <= max_time_ratio)})")
        parts.append(part)
    return "Secure averaging against the plain row above it: " + ("; ".join(parts) if parts else "no masked row") + "."


# --- the full suite ------------------------------------------------------------------


def _find(results: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in results if r["name"] == name), None)


def convergence_table(results: list[dict[str, Any]]) -> str:
    """Every row against `allreduce` (perplexity) and against its own uncompressed messages (bytes)."""
    reference = next((r for r in results if r["name"].startswith("allreduce")), results[0])
    lines = [
        f"| setting | global ppl | gap to {reference['name'].split()[0]} | own ppl | consensus Xi^2 | bytes/peer/round | total bytes "
        "| compression | s/round | compute | codec | crypto | masks | comm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        estimated = " (est.)" if r.get("bytes_estimated") else ""
        compression = f"{r['compression']:.1f}x" if r.get("compression") and r["name"].startswith(GOSSIP_PREFIX) else "-"
        consensus = f"{r['consensus']:.2e}" if r.get("consensus") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['global_ppl']:.2f} | {_gap(r['global_ppl'], reference['global_ppl']):+.2f}% | {r['own_ppl']:.2f} "
            f"| {consensus} | {r['bytes_per_peer_per_round']:,.0f}{estimated} | {r['bytes_total']:,.0f}{estimated} | {compression} "
            f"| {_seconds(r)} |"
        )
    return "\n".join(lines)


def overhead_share(r: dict[str, Any]) -> float:
    """Codec + envelope signing/verifying + masks as a share of the round, in percent."""
    return (r["codec_s"] + r["crypto_s"] + r.get("mask_s", 0.0)) / r["round_s"] * 100


def convergence_goals(results: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> list[str]:
    """The four goals the full table is judged by, each with its measured figure and verdict."""
    lines = []
    allreduce = next((r for r in results if r["name"].startswith("allreduce")), None)
    exponential, ring = _find(results, "gossip exponential"), _find(results, "gossip ring")
    if allreduce and exponential:
        gap = _gap(exponential["global_ppl"], allreduce["global_ppl"])
        lines.append(f"- Exponential gossip within 2% of allreduce perplexity: {gap:+.2f}% {verdict(gap <= 2.0)}.")
    compressed = [r for r in results if r["name"].startswith("gossip ring,") and r.get("compression") and r["compression"] > 1.5]
    if ring and compressed:
        best = max(compressed, key=lambda r: ring["bytes_per_peer_per_round"] / r["bytes_per_peer_per_round"])
        factor, gap = ring["bytes_per_peer_per_round"] / best["bytes_per_peer_per_round"], _gap(best["global_ppl"], ring["global_ppl"])
        lines.append(f"- A compressed setting at >= 10x fewer bytes within 2% of uncompressed ring gossip: {best['name']} sends "
                     f"{factor:.1f}x fewer bytes at {gap:+.2f}% {verdict(factor >= 10 and gap <= 2.0)}.")
    gossip = [r for r in results if r["name"].startswith(GOSSIP_PREFIX)]
    if gossip:
        worst = max(gossip, key=overhead_share)
        model = worst.get("config", {}).get("model", {}).get("name")  # the task's own model: a tiny model's 20 ms rounds say nothing
        probes = [s for s in scaling if s.get("probe_bare_s") and s.get("config", {}).get("model", {}).get("name") == model]
        probe = ""
        if probes:
            ratios = [s["probe_gossip_s"] / s["probe_bare_s"] for s in probes]
            shares = [(s["probe_gossip_s"] - s["probe_bare_s"]) / s["round_s"] * 100 for s in probes]
            probe = (f" Timed whole ({probes[0]['model']} rows of the scaling table), a gossip exchange takes {min(ratios):.1f}-{max(ratios):.1f}x a bare send/recv of "
                     f"its bytes; the difference is at most {max(shares):.2f}% of a round.")
        lines.append(f"- Envelope + crypto (codec, signing, verifying, masks) under 5% of a round: at most {overhead_share(worst):.2f}% "
                     f"({worst['name']}) {verdict(overhead_share(worst) < 5.0)}.{probe}")
    secure = next((r for r in results if "secure" in r["name"]), None)
    if ring and secure:
        gap = _gap(secure["global_ppl"], ring["global_ppl"])
        lines.append(f"- Secure gossip within 3% of plain gossip perplexity: {gap:+.2f}% {verdict(abs(gap) <= 3.0)}.")
    return lines


def scaling_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | topology | peers | s/round | compute | comm | bytes/peer/round | gossip exchange ms | bare send/recv ms | ratio "
        "| overhead % of round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['name']} | | failed: {r['error']} | | | | | | | |")
            continue
        topology = Path(r["topology"]).stem if r.get("topology") else "-"
        ratio = f"{r['probe_gossip_s'] / r['probe_bare_s']:.1f}x" if r.get("probe_bare_s") else "-"
        probe = "- | -"
        if r.get("probe_bare_s"):
            share = (r["probe_gossip_s"] - r["probe_bare_s"]) / r["round_s"] * 100
            probe = f"{r['probe_gossip_s'] * 1e3:.1f} | {r['probe_bare_s'] * 1e3:.2f}"
            ratio += f" | {share:.2f}%"
        else:
            ratio += " | -"
        lines.append(f"| {r['model']} | {topology} | {r['peers']} | {r['round_s']:.2f} | {r['compute_s']:.2f} | {r['comm_s']:.3f} "
                     f"| {r['bytes_per_peer_per_round']:,.0f} | {probe} | {ratio} |")
    return "\n".join(lines)


def micro_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| operation | input | per call | throughput |", "|---|---|---:|---:|"]
    for r in rows:
        per_call = f"{r['seconds'] * 1e6:,.0f} us" if r["seconds"] < 1e-2 else f"{r['seconds'] * 1e3:,.1f} ms"
        rate = f"{r['mb_per_s']:,.0f}" if r["mb_per_s"] >= 10 else f"{r['mb_per_s']:.1f}"
        lines.append(f"| {r['operation']} | {r['input']} | {per_call} | {rate} MB/s |")
    return "\n".join(lines)


def save_loglog(path: Path, draw: Any, xlabel: str, ylabel: str, title: str) -> Path:
    """A log-log figure the suites' plots share: `draw(ax)` puts the points, this the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    draw(ax)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ppl_vs_bytes(results: list[dict[str, Any]], path: Path) -> Path:
    """One point per row: final global perplexity against total bytes sent (rows that send nothing at the left edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sending = [r["bytes_total"] for r in results if r["bytes_total"]]
    floor = min(sending) / 4 if sending else 1.0
    fig, ax = plt.subplots(figsize=(11, 5))
    markers = "oD^v<>PX*hpd"
    for i, r in enumerate(results):
        x = r["bytes_total"] or floor
        ax.scatter(x, r["global_ppl"], marker="s" if not r["bytes_total"] else markers[i % len(markers)], s=45,
                   label=f"{r['name']}: {r['global_ppl']:.2f}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="row: final ppl", title_fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("total bytes sent by all peers (log; squares send nothing)")
    ax.set_ylabel("final global eval perplexity")
    ax.set_title("Perplexity against communication, one point per row")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(suite_name: str, suite: "Suite", results: list[dict[str, Any]], scaling: list[dict[str, Any]],
                  micro: list[dict[str, Any]], directory: Path, wall_s: float = 0.0, tag: str = "") -> Path:
    """bench/results/<suite>-<date>[-<tag>].md, .json and (rows permitting) a plot; returns the markdown path.
    A tag keeps an invocation of some rows from overwriting the same day's file of the others."""
    directory.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    stamp = f"{date}-{tag}" if tag else date
    info = machine()
    text = [f"# p2pfed bench `{suite_name}`: {suite.description}", "",
            f"{date}; {info['platform']}, {info['cpus']} CPUs, torch {info['torch']}, Python {info['python']}; "
            f"the runs took {sum(r.get('wall_s', 0.0) for r in [*results, *scaling]) / 60:.0f} min in all "
            f"(this invocation {wall_s / 60:.0f} min: finished runs of the identical config and the same clean commit are reused).", "",
            code_line([*results, *scaled_code(scaling)], micro), ""]
    if suite.judge == "churn":
        from p2pfed.benchchurn import CHURN_NOTE, churn_goals, churn_table

        base = results[0]["config"]
        text += [f"Base config `{suite.base}` with `{' '.join(suite.common)}`: {base['run']['peers']} peers, model "
                 f"`{base['model']['name']}`, {base['run']['rounds']} rounds x {base['run']['local_steps']} local step of "
                 f"{base['data']['batch_size']}x{base['data']['block_size']} tokens, seed {base['run']['seed']}.", "",
                 churn_table(results), "", "Goals:", *churn_goals(results), "", CHURN_NOTE, ""]
    elif suite.judge == "exchange":
        from p2pfed.benchexchange import EXCHANGE_NOTE, exchange_table

        text += [exchange_table(results), "", EXCHANGE_NOTE, ""]
    elif suite.judge == "scale":
        from p2pfed.benchscale import scale_sections

        text += scale_sections(results, directory, stamp, suite_name)
    elif results and any(r.get("config") for r in results):
        configured = [r for r in results if r.get("config")]
        base = configured[0]["config"] if suite.judge != "convergence" else next(
            (r["config"] for r in results if r["name"].startswith("gossip ring")), results[-1]["config"])
        text += [
            f"Base config `{suite.base}`{' with `' + ' '.join(suite.common) + '`' if suite.common else ''}: {base['run']['peers']} peers, "
            f"model `{base['model']['name']}`, LoRA r={base['lora']['r']}, {base['run']['rounds']} rounds x {base['run']['local_steps']} "
            f"local steps of {base['data']['batch_size']}x{base['data']['block_size']} tokens, data {base['data']['source']} by "
            f"{base['data']['split']}, seed {base['run']['seed']}. Every row runs the same rounds, steps, seeds and data; only its "
            "overrides differ (each row's full config is in the JSON).", ""]
        if suite.judge == "robust":
            from p2pfed.benchrobust import robust_goals, robust_table

            text += [robust_table(results), "", "Goals:", *robust_goals(results), "",
                     "Honest global ppl: mean final perplexity on the shared held-out set over the peers that do not attack. The gap "
                     "is against the same graph's run with no attack and no defence. Exchange: the median whole gossip exchange "
                     "of the final adapter (5 probes after the last round).", ""]
        elif suite.judge == "convergence":
            plot = plot_ppl_vs_bytes(results, directory / f"{suite_name}-{stamp}-ppl-vs-bytes.png")
            text += ["## Convergence", "", convergence_table(results), "", "Goals:", *convergence_goals(results, scaling), "",
                     f"![perplexity vs total bytes]({plot.name})", ""]
        elif suite.judge == "communication":
            from p2pfed.benchcomm import add_bytes_to_target, communication_goal, communication_table, plot_frontier

            results[:] = add_bytes_to_target(results)
            plot = plot_frontier(results, directory / f"{suite_name}-{stamp}-ppl-vs-bytes.png")
            text += [communication_table(results), "", communication_goal(results), "", f"![perplexity vs bytes]({plot.name})", "",
                     "Bytes to target: what a peer sent until the run's global perplexity first came within 1% of row 1's final "
                     "value (evaluated about every 4 local steps; '-': never).", ""]
        elif suite.judge == "privacy":
            from p2pfed.benchprivacy import plot_ppl_vs_epsilon, privacy_goal, privacy_table

            plot = plot_ppl_vs_epsilon(results, directory / f"{suite_name}-{stamp}-ppl-vs-epsilon.png")
            text += [privacy_table(results), "", privacy_goal(results), "", f"![perplexity vs epsilon]({plot.name})", "",
                     "Epsilon: each party's whole data against all other parties and the wire together, at delta = 1e-5, after "
                     "the run's releases (one per round: the clipped, noised local update; see README, Differential privacy). "
                     "RDP is the bound the run enforces; PLD is tighter and is computed where its grid fits in memory.", ""]
        else:
            line = {"compression": goal_line, "secure": secure_line, "sweep": best_line}[suite.judge](results)
            text += [table(results), "", line, ""]
        text += [
            "Bytes are the serialized signed envelopes handed to the transport (sent, per peer per round; allreduce: estimated for "
            "a ring all-reduce). Compression: against the same messages as uncompressed fp32. Global ppl: mean over peers of the "
            "final perplexity on the shared held-out set (the same blocks for every row). Own ppl: on each peer's own held-out "
            "text (the centralised process's own set is the pooled one). Consensus: the final squared distance to the network "
            "mean, Xi^2. Seconds per round are means over peers and rounds, evaluation rounds included: compute is local "
            "training, codec encode+decode (fixed point in secure mode), crypto sign+verify, masks the secure-mode mask "
            "generation, comm the exchange including waiting for the slowest neighbour.", ""]
    if scaling:
        text += ["## Scaling", "", scaling_table(scaling), "",
                 "Each run: " + " ".join(f"`{o}`" for o in scaling[0].get("overrides", [])[:6]) + ". Seconds per round leave "
                 "evaluation out. After the last round every peer times 5 gossip exchanges of its final adapter (encode, seal, "
                 "send, receive, verify, decode, mix) and 5 bare torch.distributed isend/irecv of the same bytes to the same "
                 "neighbours, each after a barrier; the table gives the medians (means over peers), their ratio, and the "
                 "difference as a share of a round: the overhead our envelope, codec and crypto add to moving the bytes. "
                 "With more peers than cores, every peer's share of that CPU work queues behind the others', so the ratio "
                 "grows with the peers on one machine while the bare send/recv barely uses the CPU.", ""]
    if micro:
        text += ["## Micro-benchmarks", "", micro_table(micro), "",
                 "One thread of this machine; best of several repeats. MB/s counts the fp32 input (codecs, fixed point, masks) "
                 "or the message (signing, verifying).", ""]
    text += [f"Reproduce: `make bench SUITE={suite_name}`."]
    md = directory / f"{suite_name}-{stamp}.md"
    md.write_text("\n".join(text) + "\n", encoding="utf-8")
    payload = {"suite": suite_name, "machine": info, "code": code_version(), "rows": results, "scaling": scaling, "micro": micro}
    (directory / f"{suite_name}-{stamp}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md
