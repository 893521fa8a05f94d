"""Benchmarks: the same task run under several settings, side by side, written as a table.

Each row is a real `p2pfed run` (torchrun, gloo peers) of one base config with a few
overrides, so every figure comes from the run's own metrics. Nothing here asserts a
speed: the tables are for people, `make bench SUITE=...` writes them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pfed.config import ConfigError, config_from_dict, load_config
from p2pfed.metrics import mean_of

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One setting: a name for the table and the overrides that make it."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    """A base config, overrides every row shares, and the rows (the first is the reference)."""

    base: str
    description: str
    rows: tuple[Row, ...]
    common: tuple[str, ...] = ()
    compression_goal: bool = True
    """Whether the table is judged by the compression goal (>= 10x fewer bytes within 2%)."""


TOPK = ("gossip.codec=topk+int8", "codec.fraction=0.1")
COMPRESSION_ROWS = (
    Row("fp32 (uncompressed)"),
    Row("fp16", ("gossip.codec=fp16",)),
    Row("int8 stochastic", ("gossip.codec=int8",)),
    Row("int4 stochastic", ("gossip.codec=int4",)),
    Row("top-k 10% + int8, error feedback", (*TOPK, "gossip.error_feedback=on")),
    Row("top-k 10% + int8, no error feedback", (*TOPK, "gossip.error_feedback=off")),
    Row("CHOCO top-k 10% + int8, gamma 0.2", (*TOPK, "gossip.algorithm=choco", "gossip.gamma=0.2")),
    Row("low rank 2 + int8, error feedback", ("gossip.codec=lowrank+int8", "codec.rank=2", "gossip.error_feedback=on")),
    Row("share B (A frozen), fp32", ("lora.share=B",)),
)
SECURE_ROWS = (
    Row("plain gossip, fp32"),
    Row("secure (pairwise-masked), fp32", ("gossip.secure=true",)),
)
SUITES = {
    "quick": Suite("launch/configs/tiny.toml", "compression settings on the tiny random Llama (a smoke test of the harness)",
                   COMPRESSION_ROWS, ("run.rounds=12", "run.eval_every=12")),
    "compression": Suite("launch/configs/demo.toml", "compression settings on the demo task (SmolLM2-135M, 4 peers, ring)",
                         COMPRESSION_ROWS, ("run.eval_every=12",)),
    "secure": Suite("launch/configs/demo.toml", "secure averaging against plain gossip on the demo task (SmolLM2-135M, 4 peers, ring)",
                    SECURE_ROWS, ("run.eval_every=12",), compression_goal=False),
}


@dataclass
class BenchRun:
    """Runs a suite's rows one after another and collects their summaries."""

    suite_name: str
    out: Path
    only: list[str] = field(default_factory=list)
    fresh: bool = False
    """Run every row even when a finished run of the identical config is already on disk."""

    def rows(self) -> list[Row]:
        suite = SUITES[self.suite_name]
        rows = [r for r in suite.rows if not self.only or any(o.lower() in r.name.lower() for o in self.only)]
        if not rows:
            raise ValueError(f"--rows {','.join(self.only)}: matches no row of suite {self.suite_name}")
        return rows

    def run_row(self, index: int, total: int, row: Row) -> dict[str, Any]:
        suite = SUITES[self.suite_name]
        run_dir = self.out / "runs" / self.suite_name / f"{index:02d}-{slug(row.name)}"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "p2pfed.cli", "run", str(ROOT / suite.base), "--overwrite",
                   f"run.out={run_dir}", *suite.common, *row.overrides]
        log_path = run_dir.with_suffix(".log")
        print(f"[bench] {index}/{total} {row.name}: {' '.join(row.overrides) or '(base config)'}", flush=True)
        wanted = load_config(ROOT / suite.base, [f"run.out={run_dir}", *suite.common, *row.overrides]).to_dict()
        finished = None if self.fresh else find_finished_run(self.out / "runs", wanted)
        if finished is not None:
            print(f"    reusing the finished run of the identical config in {finished} (--fresh to run it again)", flush=True)
            return self.collect(row, finished, 0.0)
        started = time.perf_counter()
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
        return self.collect(row, run_dir, time.perf_counter() - started)

    @staticmethod
    def collect(row: Row, run_dir: Path, wall_s: float) -> dict[str, Any]:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        return {"name": row.name, "overrides": list(row.overrides), "run_dir": str(run_dir), "wall_s": wall_s or summary["wall_s"],
                **row_figures(summary), "config": config}

    def run(self) -> Path:
        rows = self.rows()
        results = [self.run_row(i, len(rows), row) for i, row in enumerate(rows, start=1)]
        return write_results(self.suite_name, results, self.out / "results")


def find_finished_run(runs: Path, wanted: dict[str, Any]) -> Path | None:
    """A finished run directory whose resolved config equals `wanted` (run.out aside)."""
    def key(config: dict[str, Any]) -> str:
        return json.dumps({**config, "run": {k: v for k, v in config["run"].items() if k != "out"}}, sort_keys=True)

    target = key(json.loads(json.dumps(wanted)))
    for config_path in sorted(runs.glob("*/*/config.json")):
        if (config_path.parent / "summary.json").exists():
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


def row_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The columns of a bench table, from one run's summary.json."""
    peers = summary["peers_table"]
    return {
        "global_ppl": summary["global_ppl_after"],
        "global_ppl_before": summary["global_ppl_before"],
        "own_ppl": mean_of(peers, "own_ppl_after"),
        "consensus": mean_of(peers, "consensus_final"),
        "bytes_per_peer_per_round": summary["bytes_per_peer_per_round"],
        "bytes_total": summary["bytes_total"],
        "compute_s": mean_of(peers, "compute_s_per_round"),
        "codec_s": mean_of(peers, "codec_s_per_round"),
        "crypto_s": mean_of(peers, "crypto_s_per_round"),
        "mask_s": mean_of(peers, "mask_s_per_round") or 0.0,
        "comm_s": mean_of(peers, "comm_s_per_round"),
        "round_s": mean_of(peers, "round_s"),
    }


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one line per row; ratios and gaps against the first row."""
    reference = results[0]
    lines = [
        "| setting | bytes/peer/round | fewer bytes than row 1 | global ppl | gap to row 1 | own ppl | consensus Xi^2 "
        "| s/round | compute | codec | crypto | masks | comm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = reference["bytes_per_peer_per_round"] / r["bytes_per_peer_per_round"] if r["bytes_per_peer_per_round"] else None
        gap = (r["global_ppl"] / reference["global_ppl"] - 1) * 100
        lines.append(
            f"| {r['name']} | {r['bytes_per_peer_per_round']:,.0f} | {'-' if ratio is None else f'{ratio:.1f}x'} "
            f"| {r['global_ppl']:.2f} | {gap:+.2f}% | {r['own_ppl']:.2f} | {r['consensus']:.2e} "
            f"| {r['round_s']:.2f} | {r['compute_s']:.2f} | {r['codec_s']:.4f} | {r['crypto_s']:.4f} | {r.get('mask_s', 0.0):.4f} | {r['comm_s']:.3f} |"
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


def secure_line(results: list[dict[str, Any]]) -> str:
    """For rows that mask: the perplexity gap, the extra bytes and the share of a round spent on masks, against row 1."""
    reference, parts = results[0], []
    for r in results[1:]:
        if not r.get("mask_s"):
            continue
        extra = (r["bytes_per_peer_per_round"] / reference["bytes_per_peer_per_round"] - 1) * 100
        parts.append(f"{r['name']}: perplexity gap {(r['global_ppl'] / reference['global_ppl'] - 1) * 100:+.2f}%, "
                     f"{extra:+.3f}% bytes, masks {r['mask_s'] / r['round_s'] * 100:.3f}% of a round")
    return "Secure averaging against row 1: " + ("; ".join(parts) if parts else "no masked row") + "."


def write_results(suite_name: str, results: list[dict[str, Any]], directory: Path) -> Path:
    """bench/results/<suite>-<date>.md and .json; returns the markdown path."""
    suite = SUITES[suite_name]
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    info = machine()
    base = results[0]["config"]
    text = "\n".join([
        f"# p2pfed bench `{suite_name}`: {suite.description}",
        "",
        f"{stamp}; {info['platform']}, {info['cpus']} CPUs, torch {info['torch']}, Python {info['python']}.",
        f"Base config `{suite.base}` with `{' '.join(suite.common)}`: {base['run']['peers']} peers, model `{base['model']['name']}`, "
        f"{base['run']['rounds']} rounds x {base['run']['local_steps']} local steps, topology `{base['gossip']['topology']}`, seed {base['run']['seed']}. "
        "Every row runs the same rounds, steps, seeds and data; only its overrides differ (in the JSON).",
        "",
        table(results),
        "",
        goal_line(results) if suite.compression_goal else secure_line(results),
        "",
        "Bytes are the serialized signed envelopes handed to the transport (sent, per peer per round). "
        "Global ppl: mean over peers of the final perplexity on the shared held-out set. Own ppl: on each peer's own held-out text. "
        "Seconds per round are means over peers: compute is local training, codec encode+decode (fixed point in secure mode), crypto sign+verify, masks the secure-mode mask generation, comm the exchange including waiting for the slowest neighbour; the rest of a round is monitoring and evaluation.",
        "",
        f"Reproduce: `make bench SUITE={suite_name}`.",
    ])
    md = directory / f"{suite_name}-{stamp}.md"
    md.write_text(text + "\n", encoding="utf-8")
    (directory / f"{suite_name}-{stamp}.json").write_text(json.dumps({"suite": suite_name, "machine": info, "rows": results}, indent=2) + "\n", encoding="utf-8")
    return md
