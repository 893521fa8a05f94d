"""Benchmarks: the same task run under several settings, side by side, written as a table.

Each row is a real `p2pfed run` (torchrun, gloo peers) of one base config with a few
overrides, so every figure comes from the run's own metrics. Nothing here asserts a
speed: the tables are for people, `make bench SUITE=...` writes them (see benchtables.py
for the tables and goals, microbench.py for the micro-benchmarks).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfed.benchchurn import CHURN_COMMON, CHURN_ROWS
from p2pfed.benchcomm import COMMUNICATION_ROWS
from p2pfed.benchexchange import EXCHANGE_ROWS
from p2pfed.benchprivacy import PRIVACY_ROWS
from p2pfed.benchrow import Row
from p2pfed.benchscale import SCALE_ROWS
from p2pfed.config import ConfigError, config_from_dict, load_config
from p2pfed.metrics import mean_of, read_metrics
from p2pfed.provenance import code_version, read_code_version, same_clean_code

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scaling:
    """Runs of one base config at several sizes and topologies: seconds and bytes per round."""

    label: str
    base: str
    peers: tuple[int, ...]
    topologies: tuple[str, ...] = ("ring", "exponential")
    common: tuple[str, ...] = ()

    def rows(self) -> list[Row]:
        return [Row(f"{self.label}, {topology}, {n} peers", (f"run.peers={n}", f"gossip.topology=topologies/{topology}.toml"))
                for topology in self.topologies for n in self.peers]


@dataclass(frozen=True)
class Suite:
    """A base config, overrides every row shares, the rows; optionally scaling runs and micro-benchmarks."""

    base: str
    description: str
    rows: tuple[Row, ...]
    common: tuple[str, ...] = ()
    judge: str = "compression"
    """The goals the table is judged by: 'compression' (>= 10x fewer bytes within 2% of row 1),
    'secure' (masking against the plain row of its graph), 'sweep' (the best row), 'privacy'
    (the smallest epsilon within 5% of the no-DP row), 'communication' (>= 100x fewer bytes
    within 1% of allreduce), 'robust' or
    'convergence' (the full suite's four goals), 'scale' (the simulator: memory, speed, consensus),
    'exchange' (the whole gossip exchange against a bare send/recv: p2pfed.benchexchange), 'churn'
    (stragglers and lost peers: p2pfed.benchchurn)."""
    scaling: tuple[Scaling, ...] = ()
    micro: str = ""
    """Micro-benchmark size: '' (none), 'quick' or 'full'."""


TOPK = ("gossip.codec=topk+int8", "codec.fraction=0.1")
BEST_CODEC = ("gossip.codec=lowrank+int8", "codec.rank=2", "gossip.error_feedback=on")
"""The best compressed setting of the compression suite (15.5x fewer bytes, +0.63%)."""
COMPRESSION_ROWS = (
    Row("fp32 (uncompressed)"),
    Row("fp16", ("gossip.codec=fp16",)),
    Row("int8 stochastic", ("gossip.codec=int8",)),
    Row("int4 stochastic", ("gossip.codec=int4",)),
    Row("top-k 10% + int8, error feedback", (*TOPK, "gossip.error_feedback=on")),
    Row("top-k 10% + int8, no error feedback", (*TOPK, "gossip.error_feedback=off")),
    Row("CHOCO top-k 10% + int8, gamma 0.2", (*TOPK, "gossip.algorithm=choco", "gossip.gamma=0.2")),
    Row("low rank 2 + int8, error feedback", BEST_CODEC),
    Row("share B (A frozen), fp32", ("lora.share=B",)),
)
CHOCO_GAMMAS = (0.05, 0.1, 0.2, 0.4, 0.8)
CHOCO_ROWS = tuple(Row(f"CHOCO top-k 10% + int8, gamma {g:g}", (*TOPK, "gossip.algorithm=choco", f"gossip.gamma={g:g}"))
                   for g in CHOCO_GAMMAS)
"""The sweep behind the compression suite's gamma = 0.2 (row 1 is the smallest step, not a reference)."""
SECURE_ROWS = (
    Row("plain gossip, fp32"),
    Row("secure, fp32 (ring: every sender needed, pair masks, one exchange)", ("gossip.secure=true",)),
    Row("plain gossip, fp32, complete graph", ("gossip.topology=topologies/complete.toml",)),
    Row("secure, fp32, complete graph (dropout recovery: double-masked, consent-checked)",
        ("gossip.topology=topologies/complete.toml", "gossip.secure=true")),
)
"""Each secure row is judged against the plain row above it (the same graph)."""


def convergence_rows(peers: int, local_steps: int) -> tuple[Row, ...]:
    """Baselines, five topologies, and ring gossip compressed, masked and B-only."""
    def on(topology: str, *more: str) -> tuple[str, ...]:
        return (f"gossip.topology=topologies/{topology}.toml", *more)

    return (
        Row("centralised (1 process, pooled data)",
            ("run.peers=1", f"data.pool={peers}", f"run.local_steps={peers * local_steps}", "gossip.mode=local")),
        Row("allreduce (exact mean every round)", ("gossip.mode=allreduce",)),
        Row("local (no communication)", ("gossip.mode=local",)),
        Row("gossip ring", on("ring")),
        Row("gossip torus", on("torus")),
        Row("gossip exponential", on("exponential")),
        Row("gossip one-peer exponential", on("onepeer-exponential")),
        Row("gossip Erdos-Renyi p=0.4", on("erdos-renyi")),
        Row("gossip ring, low rank 2 + int8, error feedback", on("ring", *BEST_CODEC)),
        Row("gossip ring, secure (pairwise-masked)", on("ring", "gossip.secure=true")),
        Row("gossip ring, share B (A frozen)", on("ring", "lora.share=B")),
    )


def robust_rows(topologies: tuple[str, ...], attackers: tuple[int, ...], rules: tuple[str, ...]) -> tuple[Row, ...]:
    """No attack under each rule, then every attack under each rule, per graph and attacker count."""
    from p2pfed.benchrobust import ATTACKS, robust_row_overrides, row_name

    rows = [Row(row_name(t, 1, None, rule), robust_row_overrides(t, 1, None, rule), (t, 1, None, rule)) for t in topologies for rule in rules]
    rows += [Row(row_name(t, b, attack, rule), robust_row_overrides(t, b, attack, rule), (t, b, attack, rule))
             for t in topologies for b in attackers for attack in ATTACKS for rule in rules]
    return tuple(rows)


TINY_AND_SMOLLM2 = "launch/configs/demo.toml"
"""The scale suite's rows name their own base (tiny.toml or demo.toml)."""
SCALING_COMMON = ("run.rounds=3", "run.max_restarts=0", "run.local_steps=1", "run.eval_every=3", "data.batch_size=1", "data.eval_blocks=1", "bench.probes=5")
SUITES = {
    "quick": Suite("launch/configs/tiny.toml", "the full suite's rows on the tiny random Llama, 4 peers (a smoke test of the harness)",
                   convergence_rows(4, 2), ("run.peers=4", "run.rounds=12", "run.eval_every=12"), judge="convergence",
                   scaling=(Scaling("tiny", "launch/configs/tiny.toml", (2, 4), common=SCALING_COMMON),), micro="quick"),
    "full": Suite("launch/configs/bench.toml", "SmolLM2-135M + LoRA r=8 on Shakespeare split by play, 8 peers",
                  convergence_rows(8, 1), judge="convergence",
                  scaling=(Scaling("tiny", "launch/configs/tiny.toml", (2, 4, 8, 16), common=SCALING_COMMON),
                           Scaling("SmolLM2", "launch/configs/bench.toml", (2, 4, 8, 16), common=SCALING_COMMON)),
                  micro="full"),
    "compression": Suite("launch/configs/demo.toml", "compression settings on the demo task (SmolLM2-135M, 4 peers, ring)",
                         COMPRESSION_ROWS, ("run.eval_every=12",)),
    "robust": Suite("launch/configs/bench.toml", "Byzantine peers against ClippedGossip on SmolLM2-135M, 8 peers, exponential graph "
                    "(6 rounds; trimmed mean and median then run on the attack clipping handles worst)",
                    robust_rows(("exponential",), (1,), ("none", "clip")), ("run.rounds=6", "run.eval_every=6", "bench.probes=5"),
                    judge="robust"),
    "robust-tiny": Suite("launch/configs/tiny.toml", "the whole Byzantine grid on the tiny model, 8 peers: ring and exponential, "
                         "1 and 2 attackers, every attack, every rule",
                         robust_rows(("ring", "exponential"), (1, 2), ("none", "clip", "trimmed", "median")),
                         ("run.peers=8", "run.rounds=12", "run.eval_every=12", "bench.probes=5"), judge="robust"),
    "choco-gamma": Suite("launch/configs/demo.toml", "CHOCO-gossip's step gamma with top-k 10% + int8 on the demo task "
                         "(SmolLM2-135M, 4 peers, ring)", CHOCO_ROWS, ("run.eval_every=12",), judge="sweep"),
    "secure": Suite("launch/configs/demo.toml", "secure averaging against plain gossip on the demo task (SmolLM2-135M, 4 peers, ring)",
                    SECURE_ROWS, ("run.eval_every=12", "bench.probes=5"), judge="secure"),
    "privacy": Suite("launch/configs/demo.toml", "differential privacy of each party's data on the demo task (SmolLM2-135M, 4 peers, "
                     "ring): perplexity against epsilon", PRIVACY_ROWS, ("run.eval_every=12",), judge="privacy"),
    "communication": Suite("launch/configs/demo.toml", "communication to quality on the demo task (SmolLM2-135M, 4 peers, ring): "
                           "48 local steps per peer in every row, H a round", COMMUNICATION_ROWS, judge="communication"),
    "exchange": Suite("", "the whole gossip exchange against a bare send/recv of the same bytes (torchrun peers on a ring, "
                      "no model: a SmolLM2-sized and a 7B-class LoRA-sized vector)", EXCHANGE_ROWS, judge="exchange"),  # type: ignore[arg-type]
    "churn": Suite("launch/configs/bench.toml", "a slow or dead peer on the 8-peer SmolLM2 task (ring, 12 rounds x 1 local step): "
                   "the others' pace and perplexity with a 3x straggler (lockstep, deadline gossip) and with a peer killed at "
                   "round 5 (continue, restart)", CHURN_ROWS, CHURN_COMMON, judge="churn"),
    "scale": Suite(TINY_AND_SMOLLM2, "the simulator (`p2pfed simulate`): memory and peer-steps/s against torchrun, 1,024 tiny and 256 "
                   "SmolLM2 peers, consensus per round at 16-1,024 peers against the mixing matrices, an emulated 100 ms / 10 Mbit/s ring",
                   SCALE_ROWS, judge="scale"),
}


@dataclass
class BenchRun:
    """Runs a suite's rows, scaling runs and micro-benchmarks one after another, then writes the results."""

    suite_name: str
    out: Path
    only: list[str] = field(default_factory=list)
    """Parts of row names to run (empty: everything); 'micro' selects the micro-benchmarks."""
    fresh: bool = False
    """Run every row even when a finished run of the identical config is already on disk."""
    tag: str = ""
    """Appended to the results file's name (see write_results)."""

    @property
    def suite(self) -> Suite:
        return SUITES[self.suite_name]

    def selected(self, rows: list[Row] | tuple[Row, ...]) -> list[Row]:
        """Rows whose name contains a part of `only`, or whose number (1-based) a '#N' or '#N-M' part names."""
        numbers = set()
        for part in (o for o in self.only if o.startswith("#")):
            low, _, high = part[1:].partition("-")
            high = high.lstrip("#")
            if not (low.isascii() and low.isdigit()) or (high and not (high.isascii() and high.isdigit())):
                raise ValueError(f"--rows {part}: expected a row number '#N' or a range '#N-M'")
            numbers.update(range(int(low), int(high or low) + 1))
        names = [o.lower() for o in self.only if not o.startswith("#")]
        return [r for i, r in enumerate(rows, start=1) if not self.only or i in numbers or any(o in r.name.lower() for o in names)]

    def plan(self) -> tuple[list[Row], list[tuple[Scaling, Row]], bool]:
        """What this invocation runs: convergence rows, scaling rows, and whether the micro-benchmarks."""
        rows = self.selected(self.suite.rows)
        scaling = [(s, r) for s in self.suite.scaling for r in self.selected(s.rows())]
        micro = bool(self.suite.micro) and (not self.only or "micro" in [o.lower() for o in self.only])
        if not rows and not scaling and not micro:
            raise ValueError(f"--rows {','.join(self.only)}: matches no row of suite {self.suite_name}")
        return rows, scaling, micro

    def run_row(self, group: str, index: int, total: int, row: Row, base: str, common: tuple[str, ...]) -> Path:
        """One `p2pfed run` (or a finished run of the identical config); returns its run directory."""
        run_dir = self.out / "runs" / group / f"{index:02d}-{slug(row.name)}"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        overrides = [f"run.out={run_dir}", *common, *row.overrides]
        print(f"[bench] {group} {index}/{total} {row.name}: {' '.join(row.overrides) or '(base config)'}", flush=True)
        wanted = load_config(ROOT / base, overrides).to_dict()
        finished = None if self.fresh else find_finished_run(self.out / "runs", wanted, code_version())
        if finished is not None:
            print(f"    reusing the finished run of the identical config in {finished} (--fresh to run it again)", flush=True)
            return finished
        command = [sys.executable, "-m", "p2pfed.cli", "run", str(ROOT / base), "--overwrite", *overrides]
        log_path = run_dir.parent / f"{run_dir.name}.log"  # not with_suffix: a row name like "0.001" has a dot
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if line.startswith("round"):
                    print(f"    {line.rstrip()}", flush=True)
            code = process.wait()
        if code != 0:
            tail = log_path.read_text(encoding="utf-8").splitlines()[-15:]
            raise RuntimeError(f"row {row.name!r} failed (status {code}); log {log_path}:\n" + "\n".join(tail))
        return run_dir

    def run_robust(self, rows: list[Row]) -> list[dict[str, Any]]:
        """Every cell; a cell whose rule cannot tolerate its attackers is a table line saying so.
        The SmolLM2 suite then runs trimmed mean and median on the attack clipping handles worst."""
        from p2pfed.benchrobust import robust_row_overrides, row_name

        results: list[dict[str, Any]] = []
        pending = list(rows)
        while pending:
            row = pending.pop(0)
            try:
                check_cell(self.suite.base, [*self.suite.common, *row.overrides])
                run_dir = self.run_row(self.suite_name, len(results) + 1, len(results) + 1 + len(pending), row, self.suite.base, self.suite.common)
                results.append(robust_figures(row, run_dir))
            except ConfigError as err:
                results.append({"name": row.name, "cell": list(row.cell or ()), "error": str(err).split(": ", 1)[-1]})
            if not pending and self.suite_name == "robust" and not any(r["cell"][3] in ("trimmed", "median") for r in results):
                attack = worst_for_clipping(results)
                if attack:
                    topology = results[0]["cell"][0]
                    pending = [Row(row_name(topology, 1, attack, rule), robust_row_overrides(topology, 1, attack, rule), (topology, 1, attack, rule))
                               for rule in ("trimmed", "median")]
        return results

    def scale_row(self, index: int, total: int, row: Row) -> dict[str, Any]:
        """A scale row's figures; a size that fails (e.g. out of memory) is a table line saying so."""
        from p2pfed.benchscale import scale_figures

        try:
            return scale_figures(row, self.run_row(self.suite_name, index, total, row, row.base or self.suite.base, self.suite.common))
        except RuntimeError as err:
            print(f"[bench] {err}", file=sys.stderr, flush=True)
            return {"name": row.name, "error": str(err).splitlines()[-1][:200], "wall_s": 0.0}

    def exchange_row(self, index: int, total: int, row: Any) -> dict[str, Any]:
        """An exchange row's figures (never reused: a row takes seconds); a failure is a table line."""
        from p2pfed.benchexchange import run_exchange_row

        print(f"[bench] {self.suite_name} {index}/{total} {row.name}", flush=True)
        try:
            result = run_exchange_row(row)
        except RuntimeError as err:
            print(f"[bench] {err}", file=sys.stderr, flush=True)
            return {"name": row.name, "error": str(err).splitlines()[-1][:200], "wall_s": 0.0}
        print(f"    whole exchange {result['gossip_s'] * 1e3:.1f} ms, bare send/recv {result['bare_s'] * 1e3:.1f} ms: "
              f"{result['ratio']:.2f}x", flush=True)
        return result

    def run(self) -> Path:
        from p2pfed.benchtables import write_results
        from p2pfed.microbench import run_micro

        rows, scaling, micro = self.plan()
        suite = self.suite
        started = time.perf_counter()
        if suite.judge == "robust":
            results = self.run_robust(rows)
        elif suite.judge == "scale":
            results = [self.scale_row(i, len(rows), row) for i, row in enumerate(rows, start=1)]
        elif suite.judge == "exchange":
            results = [self.exchange_row(i, len(rows), row) for i, row in enumerate(rows, start=1)]
        elif suite.judge == "churn":
            from p2pfed.benchchurn import churn_figures

            results = [churn_figures(row, self.run_row(self.suite_name, i, len(rows), row, suite.base, suite.common))
                       for i, row in enumerate(rows, start=1)]
        else:
            results = [convergence_figures(row, self.run_row(self.suite_name, i, len(rows), row, suite.base, suite.common))
                       for i, row in enumerate(rows, start=1)]
        scaled = []
        for i, (spec, row) in enumerate(scaling, start=1):
            try:
                check_cell(self.suite.base, [*self.suite.common, *row.overrides])
                run_dir = self.run_row(f"{self.suite_name}-scaling", i, len(scaling), row, spec.base, spec.common)
                scaled.append(scaling_figures(spec, row, run_dir))
            except RuntimeError as err:  # e.g. out of memory at 16 SmolLM2 peers: the table says so
                print(f"[bench] {err}", file=sys.stderr, flush=True)
                scaled.append({"name": row.name, "model": spec.label, "error": str(err).splitlines()[-1][:200]})
        micro_rows = run_micro(suite.micro) if micro else []
        return write_results(self.suite_name, suite, results, scaled, micro_rows, self.out / "results",
                             time.perf_counter() - started, self.tag)


def robust_figures(row: Row, run_dir: Path) -> dict[str, Any]:
    """A robust table line: the honest peers' perplexity, refusals, and the probed exchange time."""
    from p2pfed.benchrobust import honest_ppl

    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    peers = summary["peers_table"]
    return {"name": row.name, "cell": list(row.cell or ()), "overrides": list(row.overrides), "run_dir": str(run_dir),
            "wall_s": summary["wall_s"], "honest_ppl": honest_ppl(summary, config), "rejected": sum(p["rejected"] for p in peers),
            "probe_gossip_s": mean_of(peers, "probe_gossip_s"), "config": config, "code": read_code_version(run_dir)}


def check_cell(base: str, overrides: list[str]) -> None:
    """ConfigError, before any process starts, for a rule whose graph cannot tolerate its attackers."""
    from p2pfed.mixing import check_topology
    from p2pfed.topology import load_topology

    config = load_config(ROOT / base, overrides)
    check_topology(config.gossip.robust, config.gossip.byzantine, load_topology(ROOT / config.gossip.topology, config.run.peers))


def worst_for_clipping(results: list[dict[str, Any]]) -> str | None:
    """The attack whose ClippedGossip row left the honest peers worst off (trimmed mean and median follow on it)."""
    clipped = [r for r in results if r["cell"][2] and r["cell"][3] == "clip" and not r.get("error")]
    worst = max(clipped, key=lambda r: r["honest_ppl"] if r.get("honest_ppl") is not None else float("inf"), default=None)
    return worst["cell"][2] if worst else None


def find_finished_run(runs: Path, wanted: dict[str, Any], code: dict[str, Any]) -> Path | None:
    """A finished run directory whose resolved config equals `wanted` (run.out aside), produced by
    the same committed, clean code as `code` (so no figure comes from older code)."""
    def key(config: dict[str, Any]) -> str:
        return json.dumps({**config, "run": {k: v for k, v in config["run"].items() if k != "out"}}, sort_keys=True)

    target = key(json.loads(json.dumps(wanted)))
    for config_path in sorted(runs.glob("*/*/config.json")):
        if (config_path.parent / "summary.json").exists() and same_clean_code(config_path.parent, code):
            try:  # reloading fills in settings added since that run, at their defaults
                stored = config_from_dict(json.loads(config_path.read_text(encoding="utf-8")), str(config_path)).to_dict()
            except (json.JSONDecodeError, ConfigError):
                continue
            if key(stored) == target:
                return config_path.parent
    return None


def slug(name: str) -> str:
    """A row name as a directory name: 'top-k 10% + int8' -> 'top-k-10pct-int8'."""
    text = name.lower().replace("%", "pct")
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9.]+", "-", text)).strip("-")


def convergence_figures(row: Row, run_dir: Path) -> dict[str, Any]:
    """A convergence table line, from one run's summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    return {"name": row.name, "overrides": list(row.overrides), "run_dir": str(run_dir), "wall_s": summary["wall_s"],
            **row_figures(summary), "config": config, "code": read_code_version(run_dir)}


def row_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The columns of a bench table, from one run's summary.json."""
    from p2pfed.benchprivacy import privacy_figures

    peers = summary["peers_table"]
    return {
        "global_ppl": summary["global_ppl_after"],
        "global_ppl_before": summary["global_ppl_before"],
        "own_ppl": mean_of(peers, "own_ppl_after"),
        "consensus": mean_of(peers, "consensus_final"),
        "bytes_per_peer_per_round": summary["bytes_per_peer_per_round"],
        "bytes_total": summary["bytes_total"],
        "peers": summary["peers"],
        "rounds": summary["rounds"],
        "bytes_estimated": any(p.get("bytes_estimated") for p in peers),
        "probe_gossip_s": mean_of(peers, "probe_gossip_s"),
        "probe_plain_s": mean_of(peers, "probe_plain_s"),
        "compression": mean_of(peers, "compression"),
        "compute_s": mean_of(peers, "compute_s_per_round"),
        "codec_s": mean_of(peers, "codec_s_per_round"),
        "crypto_s": mean_of(peers, "crypto_s_per_round"),
        "mask_s": mean_of(peers, "mask_s_per_round") or 0.0,
        "comm_s": mean_of(peers, "comm_s_per_round"),
        "round_s": mean_of(peers, "round_s"),
        **privacy_figures(summary),
    }


def scaling_figures(spec: Scaling, row: Row, run_dir: Path) -> dict[str, Any]:
    """Seconds per gossip round (evaluation left out), bytes, and the overhead probe, from one run."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    records = [r for path in sorted((run_dir / "metrics").glob("peer*.jsonl")) for r in read_metrics(path) if r["round"] >= 1]
    per_round = [r["round_s"] - (r.get("eval_s") or 0.0) for r in records]
    peers = summary["peers_table"]
    return {
        "name": row.name, "model": spec.label, "topology": summary["topology"], "peers": summary["peers"], "run_dir": str(run_dir),
        "wall_s": summary["wall_s"], "code": read_code_version(run_dir),
        "round_s": sum(per_round) / len(per_round),
        "compute_s": sum(r["compute_s"] for r in records) / len(records),
        "comm_s": sum(r["comm_s"] for r in records) / len(records),
        "bytes_per_peer_per_round": summary["bytes_per_peer_per_round"],
        "probe_gossip_s": mean_of(peers, "probe_gossip_s"),
        "probe_bare_s": mean_of(peers, "probe_bare_s"),
        "probe_bytes": mean_of(peers, "probe_bytes"),
        "overrides": [*spec.common, *row.overrides],
        "config": json.loads((run_dir / "config.json").read_text(encoding="utf-8")),
    }
