"""The `scale` bench suite: what the simulator holds and how fast, and what gossip does at
16-1024 peers. Its rows, tables, goals and plot; bench.py runs the rows like any suite's.

Three groups of rows, each a real `p2pfed run` (run.engine = 'simulate' where named):
- throughput and memory: SmolLM2 peers under torchrun and simulated at 8 and 16, simulated
  at 256; the tiny model simulated at 64 and 1024;
- consensus: gossip only (no training), every peer's A drawn from (seed, rank), so the
  measured Xi^2 per round is pure mixing, next to what the mixing matrices predict;
- an emulated network: the demo task on a ring of 100 ms, 10 Mbit/s links, fp32 against
  the compression suite's best codec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from p2pfed.benchrow import Row
from p2pfed.metrics import read_metrics

SMOLLM2, TINY = "launch/configs/demo.toml", "launch/configs/tiny.toml"
SIMULATE = ("run.engine=simulate",)
SMALL = ("run.rounds=3", "run.local_steps=1", "run.eval_every=3", "data.batch_size=1", "data.eval_blocks=1", "data.split=slice",
         "run.max_restarts=0")
"""Throughput rows: 3 rounds of one step on one block; the plays cut into one slice per peer
(42 plays are too few for 1,024 peers, and the 1,024th largest of the 1,313 roles is 181
characters: too short to hold out a block)."""
CONSENSUS_ROUNDS = 10
CONSENSUS_PEERS = (16, 64, 256, 1024)
CONSENSUS_TOPOLOGIES = ("ring", "torus", "exponential", "onepeer-exponential")
GOSSIP_ONLY = (*SIMULATE, f"run.rounds={CONSENSUS_ROUNDS}", "run.local_steps=0", "lora.init=per_peer", f"run.eval_every={CONSENSUS_ROUNDS}",
               "data.batch_size=1", "data.eval_blocks=1", "data.split=slice", "consensus.every=1", "run.checkpoint_every=100")
LINK = ("network.latency_ms=100", "network.bandwidth_mbit=10")
EMULATED = (*SIMULATE, *LINK, "run.rounds=3", "run.eval_every=3")
BEST_CODEC = ("gossip.codec=lowrank+int8", "codec.rank=2", "gossip.error_feedback=on")
"""The compression suite's best setting (15.5x fewer bytes at +0.63%)."""
ADAMW_COPIES = 3
"""What AdamW keeps per trainable value: the value, exp_avg and exp_avg_sq (float32 each)."""
MEMORY_GOAL, SPEED_GOAL = 1.5, 1.0


def _throughput(model: str, base: str, peers: int, engine: str) -> Row:
    return Row(f"{model}, {peers} peers, {engine}", (f"run.peers={peers}", *SMALL, *(SIMULATE if engine == "simulated" else ())),
               base=base)


SCALE_ROWS = (
    _throughput("SmolLM2", SMOLLM2, 8, "torchrun"),
    _throughput("SmolLM2", SMOLLM2, 8, "simulated"),
    _throughput("SmolLM2", SMOLLM2, 16, "torchrun"),
    _throughput("SmolLM2", SMOLLM2, 16, "simulated"),
    _throughput("SmolLM2", SMOLLM2, 256, "simulated"),
    _throughput("tiny", TINY, 64, "simulated"),
    _throughput("tiny", TINY, 1024, "simulated"),
    *(Row(f"consensus, {topology}, {n} peers", (f"run.peers={n}", f"gossip.topology=topologies/{topology}.toml", *GOSSIP_ONLY), base=TINY)
      for topology in CONSENSUS_TOPOLOGIES for n in CONSENSUS_PEERS),
    Row("demo task, 100 ms / 10 Mbit/s ring, fp32", EMULATED, base=SMOLLM2),
    Row("demo task, 100 ms / 10 Mbit/s ring, low rank 2 + int8, error feedback", (*EMULATED, *BEST_CODEC), base=SMOLLM2),
)


def scale_figures(row: Row, run_dir: Path) -> dict[str, Any]:
    """One row's figures: round times and throughput, memory (simulated), consensus per round."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    simulation_path = run_dir / "simulation.json"
    simulation = json.loads(simulation_path.read_text(encoding="utf-8")) if simulation_path.exists() else None
    records = [r for path in sorted((run_dir / "metrics").glob("peer*.jsonl")) for r in read_metrics(path)]
    rounds = [r for r in records if r["round"] >= 1]
    training = [r["round_s"] - (r.get("eval_s") or 0.0) for r in rounds]
    peer0 = sorted((r for r in records if r["rank"] == 0), key=lambda r: r["round"])
    round_s = sum(training) / len(training)
    peers, local_steps = summary["peers"], config["run"]["local_steps"]

    def mean(key: str) -> float | None:
        values = [r[key] for r in rounds if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    from p2pfed.provenance import read_code_version

    return {
        "name": row.name, "run_dir": str(run_dir), "code": read_code_version(run_dir), "engine": config["run"]["engine"], "model": config["model"]["name"],
        "peers": peers, "rounds": summary["rounds"], "local_steps": local_steps, "topology": config["gossip"]["topology"],
        "wall_s": summary["wall_s"], "round_s": round_s, "peer_steps_per_s": peers * local_steps / round_s if local_steps else None,
        "global_ppl": summary["global_ppl_after"], "bytes_per_peer_per_round": summary["bytes_per_peer_per_round"],
        "adapter_values": _adapter_values(run_dir),
        "simulation": simulation, "consensus": [r.get("consensus") for r in peer0],
        "sim_round_s": mean("sim_round_s"), "sim_compute_s": mean("sim_compute_s"), "sim_comm_s": mean("sim_comm_s"),
        "compute_s": mean("compute_s"), "comm_s": mean("comm_s"),
        "config": config, "overrides": list(row.overrides),
    }


def _adapter_values(run_dir: Path) -> int | None:
    """Trainable adapter values, from peer 0's saved adapter (stock PEFT safetensors)."""
    from safetensors import safe_open

    path = run_dir / "adapters" / "peer0" / "adapter_model.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as tensors:
        return sum(int(np.prod(tensors.get_slice(k).get_shape())) for k in tensors.keys())


def _group(results: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in results if r["name"].startswith(prefix) and not r.get("error")]


def throughput_table(results: list[dict[str, Any]]) -> str:
    lines = ["| setting | peers | s/round (eval out) | peer-steps/s | wall s | peak memory | base model alone | per peer above the base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['name']} | - | failed: {r['error']} | | | | | |")
            continue
        sim = r["simulation"]
        memory = (f"{sim['rss_peak_bytes'] / 2**30:.2f} GiB | {sim['rss_base_bytes'] / 2**30:.2f} GiB | "
                  f"{(sim['rss_peak_bytes'] - sim['rss_base_bytes']) / r['peers'] / 2**20:.1f} MiB") if sim else "- | - | -"
        lines.append(f"| {r['name']} | {r['peers']} | {r['round_s']:.2f} | {r['peer_steps_per_s']:.2f} | {r['wall_s']:.0f} | {memory} |")
    return "\n".join(lines)


def memory_per_added_peer(small: dict[str, Any], large: dict[str, Any]) -> float:
    """Bytes of peak memory each peer adds: the slope between two simulated sizes of one model."""
    return (large["simulation"]["rss_peak_bytes"] - small["simulation"]["rss_peak_bytes"]) / (large["peers"] - small["peers"])


def scale_goals(results: list[dict[str, Any]]) -> list[str]:
    """Memory per added peer against adapter + AdamW state; simulated against torchrun peer-steps/s."""
    lines = []
    for model in ("SmolLM2", "tiny"):
        sims = sorted((r for r in _group(results, model) if r["simulation"]), key=lambda r: r["peers"])
        if len(sims) >= 2 and sims[0]["adapter_values"]:
            added = memory_per_added_peer(sims[0], sims[-1])
            state = ADAMW_COPIES * 4 * sims[0]["adapter_values"]
            verdict = ("**met**" if added <= MEMORY_GOAL * state else "**missed**") if model == "SmolLM2" else "(not judged: fixed costs dominate)"
            lines.append(f"- Memory per added peer, {model} ({sims[0]['peers']} -> {sims[-1]['peers']} simulated peers): "
                         f"{added / 2**20:.2f} MiB, {added / state:.2f}x its adapter + AdamW state ({state / 2**20:.2f} MiB = "
                         f"{ADAMW_COPIES} x {sims[0]['adapter_values']:,} float32 values); goal <= {MEMORY_GOAL:g}x: {verdict}.")
    for peers in (8, 16):
        pair = {r["engine"]: r for r in _group(results, f"SmolLM2, {peers} peers,")}
        if "torchrun" in pair and "simulate" in pair:
            ratio = pair["simulate"]["peer_steps_per_s"] / pair["torchrun"]["peer_steps_per_s"]
            lines.append(f"- Peer-steps per second at {peers} SmolLM2 peers: simulated {pair['simulate']['peer_steps_per_s']:.2f}, "
                         f"torchrun {pair['torchrun']['peer_steps_per_s']:.2f} ({ratio:.2f}x); goal not slower: "
                         f"{'**met**' if ratio >= SPEED_GOAL else '**missed**'}.")
    return lines


def predicted_consensus(topology_file: str, peers: int, rounds: int) -> tuple[list[float], list[float] | None]:
    """Xi^2_t / Xi^2_0 that the mixing matrices predict for peers that start apart, each peer
    drawn independently: E = ||P_t - J||_F^2 / (n - 1), P_t the product of the rounds' W, J the
    averaging matrix (every W doubly stochastic). For a static graph that is the mean over the
    non-trivial eigenvalues of lambda_k^(2t); the spectral-gap bound is max |lambda_k|^(2t)."""
    from p2pfed.topology import load_topology

    topology = load_topology(topology_file, peers)
    j = np.full((peers, peers), 1.0 / peers)
    product = np.eye(peers)
    expected = [1.0]
    for t in range(rounds):
        product = np.asarray(topology.weights(t), dtype=np.float64) @ product
        expected.append(float(np.sum((product - j) ** 2)) / (peers - 1))
    if topology.time_varying:
        return expected, None
    eigenvalues = np.sort(np.abs(np.linalg.eigvals(np.asarray(topology.weights(0), dtype=np.float64))))[::-1]
    second = float(eigenvalues[1])
    return expected, [second ** (2 * t) for t in range(rounds + 1)]


CONSENSUS_SHOWN = (1, 2, 5, 10)


def consensus_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each consensus row with its measured ratios and the predictions beside them."""
    rows = []
    for r in _group(results, "consensus,"):
        xi = r["consensus"]
        if not xi or not xi[0]:
            continue
        expected, bound = predicted_consensus(r["topology"], r["peers"], len(xi) - 1)
        rows.append({**r, "measured": [x / xi[0] for x in xi], "expected": expected, "bound": bound})
    return rows


def consensus_table(rows: list[dict[str, Any]]) -> str:
    header = " | ".join(f"round {t}" for t in CONSENSUS_SHOWN)
    lines = [f"| topology | peers | {header} | spectral-gap bound, round {CONSENSUS_SHOWN[-1]} |",
             "|---|---:|" + "---:|" * len(CONSENSUS_SHOWN) + "---:|"]
    for r in rows:
        cells = " | ".join(f"{r['measured'][t]:.3g} ({r['expected'][t]:.3g})" if t < len(r["measured"]) else "-" for t in CONSENSUS_SHOWN)
        last = CONSENSUS_SHOWN[-1]
        bound = f"{r['bound'][last]:.3g}" if r["bound"] and last < len(r["bound"]) else "- (time-varying)"
        lines.append(f"| {Path(r['topology']).stem} | {r['peers']} | {cells} | {bound} |")
    return "\n".join(lines)


def consensus_agreement(rows: list[dict[str, Any]]) -> str:
    """The largest relative gap between measured and predicted, where the prediction is not ~0."""
    gaps = [abs(m / e - 1) for r in rows for m, e in zip(r["measured"][1:], r["expected"][1:]) if e > 1e-6]
    exact = [r for r in rows if r["bound"] is None and min(r["expected"]) < 1e-12]
    text = f"Measured against predicted Xi^2 ratio: largest relative difference {max(gaps):.1%} over {len(gaps)} (row, round) pairs"
    if exact:
        text += ("; the one-peer exponential graph averages exactly after log2(n) rounds (prediction 0), measured "
                 + ", ".join(f"{min(r['measured']):.1e} at {r['peers']} peers" for r in exact))
    return text + "."


def plot_consensus(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topologies = list(dict.fromkeys(Path(r["topology"]).stem for r in rows))
    fig, axes = plt.subplots(1, len(topologies), figsize=(4 * len(topologies), 3.6), sharey=True, squeeze=False)
    for ax, topology in zip(axes[0], topologies):
        for r in (r for r in rows if Path(r["topology"]).stem == topology):
            t = range(len(r["measured"]))
            line, = ax.semilogy(t, np.maximum(r["measured"], 1e-16), marker="o", markersize=3, label=f"{r['peers']} measured")
            ax.semilogy(t, np.maximum(r["expected"], 1e-16), linestyle="--", color=line.get_color(), label=f"{r['peers']} predicted")
        ax.set_title(topology)
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("Xi^2_t / Xi^2_0 (log)")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("Consensus distance per round, gossip only (simulated), against the mixing matrices' prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def emulated_table(results: list[dict[str, Any]]) -> str:
    lines = ["| setting | bytes/peer/round | simulated s/round | of which compute | of which communication | measured CPU s/round | global ppl |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in _group(results, "demo task"):
        lines.append(f"| {r['name']} | {r['bytes_per_peer_per_round']:,.0f} | {r['sim_round_s']:.2f} | {r['sim_compute_s']:.2f} | "
                     f"{r['sim_comm_s']:.2f} | {r['round_s']:.2f} | {r['global_ppl']:.2f} |")
    return "\n".join(lines)


def scale_sections(results: list[dict[str, Any]], directory: Path, stamp: str, suite_name: str) -> list[str]:
    """The markdown the scale suite's results file holds (the plot written beside it)."""
    throughput = [r for r in results if r["name"].startswith(("SmolLM2", "tiny"))]
    text = ["## Throughput and memory", "", throughput_table(throughput), "", "Goals:", *scale_goals(results), "",
            "Rows: 3 rounds of one local step a peer on one block (128 tokens SmolLM2, 64 tiny; the plays cut into one slice of text per peer), ring, fp32 gossip. Seconds per round "
            "leave evaluation out; peer-steps/s = peers x local steps / s per round. Memory (simulated rows): the process's peak "
            "resident set (getrusage) and its resident set once the shared base model is loaded; per added peer: the slope of the "
            "peak between the two simulated sizes of one model. Torchrun rows are separate processes, each with its own base "
            "model.", ""]
    consensus = consensus_rows(results)
    if consensus:
        plot = plot_consensus(consensus, directory / f"{suite_name}-{stamp}-consensus.png")
        text += ["## Consensus distance per round", "", consensus_table(consensus), "", consensus_agreement(consensus), "",
                 f"![consensus per round]({plot.name})", "",
                 f"Cells: measured Xi^2_t / Xi^2_0 (predicted). Gossip only ({CONSENSUS_ROUNDS} rounds, no training, fp32, signed "
                 "envelopes, simulated): every peer's LoRA A drawn from (seed, rank), so peers start apart and the rounds only mix. "
                 "Predicted: ||P_t - J||_F^2 / (n - 1) with P_t the product of the rounds' mixing matrices (p2pfed.topology) and J "
                 "the exact average, the expected ratio for independently drawn starts (for a static graph the mean of "
                 "lambda_k^(2t) over the non-trivial eigenvalues). The spectral-gap bound max|lambda_k|^(2t) is what the slowest "
                 "direction allows.", ""]
    if _group(results, "demo task"):
        text += ["## Emulated network", "", emulated_table(results), "",
                 "The demo task (SmolLM2, 4 peers, ring, 3 rounds x 2 local steps of 4x128) simulated over links of 100 ms latency "
                 "and 10 Mbit/s uplinks: simulated seconds per round are compute as measured plus each message's bytes over its "
                 "sender's uplink (messages leave one after another) and the latency; measured CPU s/round is this machine's.", ""]
    return text
