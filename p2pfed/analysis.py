"""Reading run directories and drawing what they say: the logic behind `p2pfed report`
and the notebooks in analysis/ (which stay thin so that this is what gets tested).

Every plot takes one or several runs; several runs are overlaid, one colour each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from p2pfed.metrics import read_metrics  # noqa: E402
from p2pfed.topology import Topology, TopologyError, load_topology  # noqa: E402

TIME_PARTS = ("compute_s", "codec_s", "crypto_s", "mask_s", "comm_s", "monitor_s", "eval_s")
TIME_LABELS = ("local training", "codec", "signing + verifying", "secure masks", "communication (incl. waiting)", "mixing + monitoring", "evaluation")


class AnalysisError(ValueError):
    """A directory is not a readable p2pfed run; the message names it."""


@dataclass
class Run:
    """One run directory: its resolved config, its summary (if it finished) and every peer's metrics."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    metrics: dict[int, list[dict[str, Any]]]

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def peers(self) -> list[int]:
        return sorted(self.metrics)

    def series(self, rank: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, values) of one metric for one peer, skipping rounds that lack it."""
        rows = [r for r in self.metrics[rank] if r.get(key) is not None]
        return np.array([r["round"] for r in rows]), np.array([float(r[key]) for r in rows])

    def mean_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, mean over the peers that logged it) of one metric."""
        by_round: dict[int, list[float]] = {}
        for rank in self.peers:
            for r in self.metrics[rank]:
                if r.get(key) is not None:
                    by_round.setdefault(r["round"], []).append(float(r[key]))
        rounds = sorted(by_round)
        return np.array(rounds), np.array([np.mean(by_round[t]) for t in rounds])

    def final(self, rank: int, key: str) -> float | None:
        values = self.series(rank, key)[1]
        return float(values[-1]) if len(values) else None

    def topology(self) -> Topology | None:
        """The run's topology, if it gossiped and the file is still where the config says."""
        gossip = self.config.get("gossip", {})
        if gossip.get("mode") != "gossip":
            return None
        try:
            return load_topology(gossip["topology"], len(self.peers))
        except TopologyError:
            return None


def load_run(path: str | Path) -> Run:
    """Read a run directory written by `p2pfed run` (finished or not)."""
    path = Path(path)
    files = sorted((path / "metrics").glob("peer*.jsonl"))
    if not files:
        raise AnalysisError(f"{path}: no metrics/peer*.jsonl; expected a run directory written by `p2pfed run`")
    try:
        metrics = {int(f.stem.removeprefix("peer")): read_metrics(f) for f in files}
    except (ValueError, json.JSONDecodeError) as err:
        raise AnalysisError(f"{path}/metrics: a metrics file is not JSON lines ({err})") from None
    config_path, summary_path = path / "config.json", path / "summary.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    return Run(path, config, summary, metrics)


def _colours(runs: list[Run]) -> list[Any]:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(len(runs))]


def _finish(fig: Figure, *axes: Any, which: str = "major") -> Figure:
    """Grid, a legend where something is labelled, tight layout."""
    for ax in axes:
        ax.grid(alpha=0.3, which=which)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_losses(runs: list[Run]) -> Figure:
    """Train loss and eval perplexity (global and own) per peer against the round."""
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, colour in zip(runs, _colours(runs)):
        for i, rank in enumerate(run.peers):
            label = f"{run.label}" if len(runs) > 1 else f"peer {rank}"
            peer_colour = colour if len(runs) > 1 else plt.get_cmap("tab10")(i % 10)
            train_ax.plot(*run.series(rank, "train_loss"), color=peer_colour, alpha=0.8, label=label if (i == 0 or len(runs) == 1) else None)
            eval_ax.plot(*run.series(rank, "global_ppl"), color=peer_colour, marker="o", alpha=0.8, label=label if (i == 0 or len(runs) == 1) else None)
            eval_ax.plot(*run.series(rank, "own_ppl"), color=peer_colour, linestyle=":", alpha=0.8)
    train_ax.set(title="Local training loss", xlabel="round", ylabel="cross-entropy (nats/token)")
    eval_ax.set(title="Eval perplexity (solid: shared held-out set, dotted: peer's own)", xlabel="round", ylabel="perplexity")
    return _finish(fig, train_ax, eval_ax)


def plot_consensus(runs: list[Run]) -> Figure:
    """Exact consensus distance Xi^2 (solid) and the mean local estimate (dashed), log scale."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, colour in zip(runs, _colours(runs)):
        rounds, exact = run.series(run.peers[0], "consensus")
        positive = exact > 0
        if positive.any():
            ax.semilogy(rounds[positive], exact[positive], color=colour, marker="o", label=f"{run.label}: exact Xi^2")
        rounds, local = run.mean_series("local_consensus")
        if (local > 0).any():
            ax.semilogy(rounds[local > 0], local[local > 0], color=colour, linestyle="--", label=f"{run.label}: local estimate (before mixing)")
    ax.set(title="Consensus distance Xi^2 = (1/n) sum_i ||x_i - mean||^2", xlabel="round", ylabel="squared L2 distance (log)")
    return _finish(fig, ax, which="both")


def plot_bytes(runs: list[Run]) -> Figure:
    """Cumulative bytes sent by all peers together, in MB."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, colour in zip(runs, _colours(runs)):
        rounds, mean_sent = run.mean_series("bytes_sent")
        if len(rounds):
            ax.plot(rounds, np.cumsum(mean_sent) * len(run.peers) / 1e6, color=colour, marker="o", label=run.label)
    ax.set(title="Bytes sent, all peers together (signed envelopes)", xlabel="round", ylabel="cumulative MB")
    return _finish(fig, ax)


def time_split(run: Run) -> dict[str, float]:
    """Mean seconds per round and peer spent in each part of a round."""
    parts: dict[str, float] = {}
    rows = [r for rank in run.peers for r in run.metrics[rank] if r["round"] > 0]
    for key in TIME_PARTS:
        parts[key] = float(np.mean([r.get(key) or 0.0 for r in rows])) if rows else 0.0
    return parts


def plot_time_split(runs: list[Run]) -> Figure:
    """One stacked bar per run: where a round's seconds go."""
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs) + 3), 4.5))
    bottoms = np.zeros(len(runs))
    splits = [time_split(run) for run in runs]
    cmap = plt.get_cmap("Set2")
    for i, (key, label) in enumerate(zip(TIME_PARTS, TIME_LABELS)):
        heights = np.array([s[key] for s in splits])
        ax.bar([r.label for r in runs], heights, bottom=bottoms, color=cmap(i), label=label)
        bottoms += heights
    ax.set(title="Time per round (mean over peers)", ylabel="seconds per round")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_topology(run: Run) -> Figure:
    """The run's graph (first of a schedule), each peer coloured by its final eval perplexity."""
    fig, ax = plt.subplots(figsize=(6, 5))
    topology = run.topology()
    key = "global_ppl" if run.final(run.peers[0], "global_ppl") is not None else "own_ppl"
    values = [run.final(rank, key) or float("nan") for rank in run.peers]
    if topology is None:
        graph = nx.empty_graph(len(run.peers))
        ax.set_title(f"{run.label}: no gossip topology (mode {run.config.get('gossip', {}).get('mode', '?')})")
    else:
        graph = nx.Graph(topology.graphs[0])
        ax.set_title(f"{run.label}: {Path(topology.source).name}, coloured by final {key.replace('_', ' ')}")
    positions = nx.circular_layout(graph)
    nx.draw_networkx_edges(graph, positions, ax=ax, alpha=0.5)
    nodes = nx.draw_networkx_nodes(graph, positions, nodelist=run.peers, node_color=values, cmap="viridis", ax=ax)
    nx.draw_networkx_labels(graph, positions, ax=ax, font_color="white")
    fig.colorbar(nodes, ax=ax, label=f"final {key.replace('_', ' ')}")
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def bytes_to_target(run: Run, target_ppl: float, tolerance: float = 0.01) -> float | None:
    """Mean bytes a peer sent up to and including the first round whose mean global perplexity
    came within `tolerance` of `target_ppl` (a reference run's final value); None if never."""
    rounds, ppl = run.mean_series("global_ppl")
    reached = [int(t) for t, p in zip(rounds, ppl) if p <= target_ppl * (1 + tolerance)]
    if not reached:
        return None
    first = min(reached)
    sent = [sum(float(r.get("bytes_sent") or 0) for r in run.metrics[rank] if r["round"] <= first) for rank in run.peers]
    return float(np.mean(sent))


def final_global_ppl(run: Run) -> float | None:
    ppl = run.mean_series("global_ppl")[1]
    return float(ppl[-1]) if len(ppl) else None


def run_table(runs: list[Run], reference: Run | None = None) -> str:
    """Markdown: one line per run with its final figures, and with a reference run the bytes
    each peer sent until the global perplexity came within 1% of the reference's final one."""
    target = final_global_ppl(reference) if reference is not None else None
    lines = ["| run | mode | codec | global ppl | own ppl (mean) | consensus Xi^2 | MB sent (all peers) | s/round | MB/peer to target |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        to_target = bytes_to_target(run, target) if target is not None else None
        gossip = run.config.get("gossip", {})
        glob = run.mean_series("global_ppl")[1]
        own = [run.final(r, "own_ppl") for r in run.peers]
        consensus = run.series(run.peers[0], "consensus")[1]
        sent = sum(float(r.get("bytes_sent") or 0) for rank in run.peers for r in run.metrics[rank])
        round_s = run.mean_series("round_s")[1]
        lines.append(
            f"| {run.label} | {gossip.get('mode', '?')} | {gossip.get('codec', '?')} | {_num(glob[-1] if len(glob) else None)} "
            f"| {_num(np.mean([o for o in own if o is not None]) if any(o is not None for o in own) else None)} "
            f"| {_num(consensus[-1] if len(consensus) else None, '.2e')} | {sent / 1e6:,.2f} | {_num(np.mean(round_s) if len(round_s) else None)} "
            f"| {_num(None if to_target is None else to_target / 1e6, ',.2f')} |"
        )
    if target is not None:
        lines += ["", f"Target: within 1% of {reference.label}'s final global perplexity {target:.2f}; '-': never reached."]  # type: ignore[union-attr]
    return "\n".join(lines)


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


def write_report(run_dirs: list[str | Path], out: str | Path, reference: str | Path | None = None) -> Path:
    """report.md and one PNG per plot in `out`; returns the markdown path. `reference`: the run
    whose final perplexity sets the bytes-to-target column (default: the first of several)."""
    runs = [load_run(d) for d in run_dirs]
    base = load_run(reference) if reference is not None else (runs[0] if len(runs) > 1 else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"losses.png": plot_losses(runs), "consensus.png": plot_consensus(runs), "bytes.png": plot_bytes(runs),
               "time.png": plot_time_split(runs)}
    for run in runs:
        figures[f"topology-{run.label}.png"] = plot_topology(run)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    text = [f"# p2pfed report: {', '.join(r.label for r in runs)}", "", run_table(runs, base), ""]
    text += [f"![{name}]({name})" for name in figures]
    text += ["", "Run directories: " + ", ".join(str(r.path) for r in runs)]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def shipped_topologies(directory: str | Path, n: int) -> list[Path]:
    """The topology files in `directory` that describe a graph on n peers."""
    usable = []
    for file in sorted(Path(directory).glob("*.toml")):
        try:
            load_topology(file, n)
        except TopologyError:
            continue
        usable.append(file)
    return usable


def consensus_rates(topology_files: list[str | Path], n: int, rounds: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    """Per topology: spectral gap, the rate it predicts, and the rate pure gossip shows.

    Pure gossip (x <- W x) from random vectors; the measured rate is the per-round factor
    by which Xi (not squared) shrinks over the last half of `rounds`.
    """
    rows = []
    rng = np.random.default_rng(seed)
    for file in topology_files:
        topology = load_topology(file, n)
        x = rng.standard_normal((n, 64))
        distances = []
        for t in range(rounds):
            distances.append(float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean())))
            x = topology.weights(t) @ x
        half = rounds // 2
        tail = [d for d in distances[half:] if d > 1e-12]
        measured = (tail[-1] / tail[0]) ** (1 / (len(tail) - 1)) if len(tail) > 1 else 0.0
        rows.append({"topology": Path(file).stem, "n": n, "period": topology.period, "spectral_gap": topology.spectral_gap(),
                     "predicted_rate": 1 - topology.spectral_gap(), "measured_rate": measured, "distances": distances})
    return rows


def plot_consensus_rates(rows: list[dict[str, Any]]) -> Figure:
    """Left: Xi against the round per topology. Right: measured vs predicted rate."""
    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        curves.semilogy(np.maximum(row["distances"], 1e-16), label=f"{row['topology']} (gap {row['spectral_gap']:.2f})")
        scatter.scatter(row["predicted_rate"], row["measured_rate"])
        scatter.annotate(row["topology"], (row["predicted_rate"], row["measured_rate"]), fontsize=7)
    curves.set(title=f"Pure gossip on {rows[0]['n']} peers", xlabel="round", ylabel="consensus distance Xi (log)")
    scatter.plot([0, 1], [0, 1], color="grey", linestyle="--", label="measured = 1 - spectral gap")
    scatter.set(title="Consensus speed vs spectral gap", xlabel="predicted rate per round (1 - gap)", ylabel="measured rate per round")
    return _finish(fig, curves, scatter)
