"""The `exchange` bench suite: the whole gossip exchange against a bare send/recv of the same bytes.

Issue 16's goal, measured from a results file: a gossip exchange (encode, seal, send,
receive, verify, decode, mix, and the local consensus estimate every round computes) should
cost little more than moving its bytes. Each row launches real torchrun peers on a ring over
gloo, each with an `Averager` (fp32, Ed25519 keys from `p2pfed keygen`) and a random vector
the size of an adapter, and runs `p2pfed.probe.probe_exchange`: every probe starts from a
barrier, times one whole exchange, then a bare isend/irecv of the same bytes to the same
neighbours. No model is loaded: the exchange does not depend on where the vector came from.

    python -m torch.distributed.run --standalone --nproc-per-node=4 -m p2pfed.benchexchange \
        --values 460800 --probes 7 --keys KEYS --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ExchangeRow:
    """One size of exchange: how many peers on the ring, how many fp32 values each sends, the goal."""

    name: str
    peers: int
    values: int
    goal: float
    """The most the whole exchange may cost, as a multiple of the bare send/recv."""
    probes: int = 25
    """Exchanges timed (medians): a 2 ms exchange on a shared machine needs many."""


SMOLLM2_ADAPTER = 460_800
"""SmolLM2-135M's LoRA r=8 on q_proj and v_proj, the demo task's adapter."""
LARGE_ADAPTER = 40_000_000
"""A 7B-class LoRA (r=16 on every attention projection of a 32-layer, 4096-wide model is ~17M; r=16
on every linear layer ~40M)."""
EXCHANGE_ROWS = (
    ExchangeRow("SmolLM2 adapter (460,800 values), ring of 4", 4, SMOLLM2_ADAPTER, 1.5),
    ExchangeRow("SmolLM2 adapter (460,800 values), ring of 8", 8, SMOLLM2_ADAPTER, 1.5),
    ExchangeRow("7B-class LoRA (40M values), ring of 4", 4, LARGE_ADAPTER, 1.2, probes=9),
    ExchangeRow("7B-class LoRA (40M values), ring of 8", 8, LARGE_ADAPTER, 1.2, probes=9),
)


def run_exchange_row(row: ExchangeRow) -> dict[str, Any]:
    """Launch the row's peers under torchrun and gather what each measured."""
    from p2pfed.identity import keygen
    from p2pfed.provenance import code_version

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="p2pfed-exchange-") as scratch:
        keys, out = Path(scratch, "keys"), Path(scratch, "out")
        out.mkdir()
        keygen(row.peers, keys)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={row.peers}", "--max-restarts=0",
                   "-m", "p2pfed.benchexchange", "--values", str(row.values), "--probes", str(row.probes), "--keys", str(keys), "--out", str(out)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise RuntimeError(f"exchange row {row.name!r} failed (status {done.returncode}):\n{tail}")
        peers = [json.loads((out / f"{rank}.json").read_text(encoding="utf-8")) for rank in range(row.peers)]
    return {"name": row.name, "peers": row.peers, "values": row.values, "goal": row.goal, "probes": row.probes,
            "wall_s": time.perf_counter() - started, "code": code_version(), **summarise(peers)}


def summarise(peers: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over peers of each peer's medians; the ratio is the mean whole exchange over the mean bare one."""
    def mean(key: str) -> float:
        return sum(p[key] for p in peers) / len(peers)

    gossip_s, bare_s = mean("gossip_s"), mean("bare_s")
    return {"gossip_s": gossip_s, "bare_s": bare_s, "ratio": gossip_s / bare_s if bare_s > 0 else float("inf"),
            "message_bytes": max(p["message_bytes"] for p in peers),
            "stages": {stage: sum(p["stages"][stage] for p in peers) / len(peers) for stage in peers[0]["stages"]}}


def exchange_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| exchange | bytes/message | whole exchange (ms) | bare send/recv (ms) | ratio | goal | encode+decode | seal+verify "
             "| transport | mix + local consensus |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | | |")
            continue
        s = r["stages"]
        verdict = "met" if r["ratio"] <= r["goal"] else "missed"
        lines.append(f"| {r['name']} | {r['message_bytes']:,} | {r['gossip_s'] * 1e3:.1f} | {r['bare_s'] * 1e3:.1f} | {r['ratio']:.2f}x "
                     f"| <= {r['goal']:g}x: **{verdict}** | {s['codec_s'] * 1e3:.1f} | {s['crypto_s'] * 1e3:.1f} "
                     f"| {s['comm_s'] * 1e3:.1f} | {s['mix_s'] * 1e3:.1f} |")
    return "\n".join(lines)


EXCHANGE_NOTE = (
    "Each row: torchrun peers on one machine, a ring over gloo, fp32 codec, signed envelopes (Ed25519 over a BLAKE3 "
    "digest of the payload), a random vector of the given size per peer. Every probe starts from a barrier and times "
    "one whole gossip exchange (encode, seal, send, receive, verify, decode, mix, local consensus), then a bare "
    "torch.distributed isend/irecv of the same bytes to the same neighbours; figures are medians over the probes, "
    "averaged over peers. The stage columns split the whole exchange (medians, ms); transport is the exchange call "
    "itself, which includes waiting for the slowest neighbour to reach it.")


def measure(values: int, probes: int, keys: Path) -> dict[str, Any]:
    """Inside one torchrun peer: the probes of this row, with the stages of each exchange."""
    import torch

    from p2pfed.codec import get_codec
    from p2pfed.gossip import Averager
    from p2pfed.identity import Roster, load_identity
    from p2pfed.memory import keep_freed_memory
    from p2pfed.probe import probe_exchange
    from p2pfed.topology import load_topology
    from p2pfed.transport import TorchTransport, init_process_group, shutdown

    keep_freed_memory(large_blocks=True)  # as a torchrun peer does
    torch.set_num_threads(1)
    init_process_group(torch.device("cpu"), timeout_s=600.0)
    try:
        transport = TorchTransport(timeout_s=600.0)
        rank, world = transport.rank, transport.world_size
        roster = Roster.load(keys / "roster.json")
        identity = load_identity(keys / f"peer{rank}.pem", rank, roster)
        topology = load_topology(ROOT / "topologies/ring.toml", world)
        averager = Averager(transport, "gossip", get_codec("fp32"), topology, identity, roster)
        vector = torch.randn(values, generator=torch.Generator().manual_seed(rank))
        probe = probe_exchange(averager, transport, vector, first_round=0, probes=probes)
        return {"rank": rank, "gossip_s": probe.gossip_s, "bare_s": probe.bare_s,
                "message_bytes": probe.message_bytes, "stages": probe.stages}
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one peer of an `exchange` bench row (run under torchrun)")
    parser.add_argument("--values", type=int, required=True)
    parser.add_argument("--probes", type=int, required=True)
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = measure(args.values, args.probes, args.keys)
    (args.out / f"{result['rank']}.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
