"""[run] on_peer_loss = 'continue' over real torchrun agents and gloo peers: a peer that dies
mid-run leaves the others finishing every round, mixing over the neighbours still alive,
with monitoring skipped from the loss on and a summary of the peers that finished."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, read_jsonl, run_cli
from p2pfed.config import ConfigError, load_config
from p2pfed.model import draw_peer_adapter, load_base, shared_parameters, wrap_lora
from p2pfed.topology import load_topology

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]
ROUNDS, LOST, AT = 6, 2, 3
RING_NEIGHBOURS = {0: (1, 3), 1: (0, 2), 2: (1, 3), 3: (2, 0)}


def initial_adapters(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Each peer's starting adapter under lora.init = 'per_peer', by saved (stock PEFT) name."""
    config = load_config(TINY, ["lora.init=per_peer"])
    model = wrap_lora(load_base(config.model)[0], config.lora, seed)
    adapters = {}
    for rank in range(4):
        draw_peer_adapter(model, seed, rank)
        adapters[rank] = {name.replace(".default", ""): p.detach().double().clone() for name, p in shared_parameters(model)}
    return adapters


def ring_matrix(alive: set[int]) -> np.ndarray:
    """Metropolis weights of the ring of 4 (1/3 per edge), each dead neighbour's weight on the diagonal."""
    w = np.zeros((4, 4))
    for i in alive:
        for j in RING_NEIGHBOURS[i]:
            if j in alive:
                w[i, j] = 1 / 3
        w[i, i] = 1 - w[i].sum()
    return w


@pytest.mark.parametrize("kind", ["vanish", "crash"])
def test_a_peer_lost_at_round_3_of_6_leaves_the_others_finishing_every_round(tmp_path, kind):
    out = tmp_path / kind
    result = run_cli("run", str(TINY), f"run.out={out}", f"run.rounds={ROUNDS}", "run.local_steps=0", "lora.init=per_peer",
                     "run.on_peer_loss=continue", "consensus.every=1", "gossip.timeout_s=60", f"faults.peers=[{LOST}]",
                     f"faults.kind={kind}", f"faults.from_round={AT}", timeout=280)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    survivors = [r for r in range(4) if r != LOST]
    rows = {rank: read_jsonl(out / "metrics" / f"peer{rank}.jsonl") for rank in range(4)}
    assert [r["round"] for r in rows[LOST]] == list(range(AT))  # it ran rounds 0..2, then left
    for rank in survivors:
        assert [r["round"] for r in rows[rank]] == list(range(ROUNDS + 1)), rank  # no round lost
        # named gone once, in the round it left, by its neighbours only
        gone = {r["round"]: r["gone"] for r in rows[rank][1:] if r["gone"]}
        assert gone == ({AT: [LOST]} if LOST in RING_NEIGHBOURS[rank] else {}), rank
        assert all(LOST not in r["neighbours"] for r in rows[rank][AT + 1:])
        # monitoring: measured while everyone was there, skipped at every peer from the loss on
        assert all(r["consensus"] is not None for r in rows[rank][: AT])
        assert all(r.get("monitoring_skipped") and r["consensus"] is None for r in rows[rank][AT:]), rank
    # gossip only (no local steps): the final adapters are a closed form of the starting ones.
    # Rounds 1-2 mix on the whole ring; rounds 3-6 over the path that is left, each lost edge's
    # weight going to its end's own term (symmetric and stochastic: the survivors' mean is kept).
    start = initial_adapters()
    mixing = np.linalg.matrix_power(ring_matrix(set(survivors)), ROUNDS - AT + 1) @ np.linalg.matrix_power(ring_matrix(set(range(4))), AT - 1)
    for rank in survivors:
        final = load_file(out / "adapters" / f"peer{rank}" / "adapter_model.safetensors")
        for name, tensor in final.items():
            expected = sum(float(mixing[rank, j]) * start[j][name] for j in range(4))
            assert torch.allclose(tensor.double(), expected, rtol=1e-5, atol=1e-6), (rank, name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lost"] == [LOST] and [p["rank"] for p in summary["peers_table"]] == survivors
    assert f"Peers lost during the run (on_peer_loss = 'continue'): [{LOST}]" in (out / "summary.md").read_text()


SECURE_LOST = 4


def test_secure_mode_sums_the_senders_left_when_one_vanishes_through_torch(tmp_path):
    """A complete graph of 8 (seven senders per receiver): peer 4 leaves at round 2 of 3.
    Every other receiver's secure sum completes over the six senders left (dropout recovery
    over gloo, in every round after), and equals what plain gossip computes in the clear with
    the same loss. (On a 6-peer torus a sender that sends nothing leaves too few share holders:
    abandoned, as README's Secure averaging says.)"""
    common = ("run.peers=8", "run.rounds=3", "run.local_steps=1", "gossip.topology=topologies/complete.toml", "consensus.every=1",
              "run.on_peer_loss=continue", "gossip.timeout_s=60", f"faults.peers=[{SECURE_LOST}]", "faults.kind=vanish",
              "faults.from_round=2")
    outs = {}
    for mode in ("plain", "secure"):
        outs[mode] = tmp_path / mode
        result = run_cli("run", str(TINY), f"run.out={outs[mode]}", *common, f"gossip.secure={'true' if mode == 'secure' else 'false'}",
                         timeout=280)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for rank in (r for r in range(8) if r != SECURE_LOST):
        rows = read_jsonl(outs["secure"] / "metrics" / f"peer{rank}.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        assert [r["dropouts"] for r in rows[1:]] == [0, 1, 1], rank  # recovered, in every round after the loss
        assert not any(r["abandoned"] for r in rows[1:])
        assert [r["gone"] for r in rows[1:]] == [[], [SECURE_LOST], []]
        assert all(r.get("monitoring_skipped") for r in rows[2:])  # the masked monitoring sums need every peer too
        plain = load_file(outs["plain"] / "adapters" / f"peer{rank}" / "adapter_model.safetensors")
        for name, tensor in load_file(outs["secure"] / "adapters" / f"peer{rank}" / "adapter_model.safetensors").items():
            # the same weighted sums, in fixed point instead of in the clear: 2^-20 rounding per value,
            # which AdamW's normalised steps carry into the next round's update (4.4e-5 seen at most);
            # a sum missing a mask correction would be off by whole 2^32 wraps, a wrong weight by ~1e-2
            assert torch.allclose(tensor, plain[name], rtol=0, atol=2e-4), (rank, name)


@pytest.mark.parametrize("overrides, expected", [
    (["gossip.mode=allreduce"], "needs gossip.mode = 'gossip'"),
    (["consensus.target=0.01"], "set consensus.target = 0"),
    (["gossip.algorithm=choco"], "use algorithm = 'plain' and error_feedback = 'off'"),
    (["bench.probes=2"], "set probes = 0"),
])
def test_continue_is_refused_where_a_missing_peer_would_break_the_round(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "launch/configs/tiny.toml", ["run.on_peer_loss=continue", *overrides]).check()


def test_the_launcher_reads_the_survivors_rows_as_hostile_bytes(tmp_path):
    """Each survivor writes its own row file; the launcher's summary keeps numbers under the
    first row's columns only, skips a file larger than the limit, and shows placeholders for
    samples that are not three strings."""
    from p2pfed.peer import SURVIVOR_FILE_LIMIT, survivors_summary

    config = load_config(TINY, [f"run.out={tmp_path}"])
    folder = tmp_path / "survivors"
    folder.mkdir()
    row = {"rank": 1, "global_ppl_before": 10.0, "global_ppl_after": 9.0, "bytes_per_round": 10, "bytes_total": 100, "wall_s": 3.0}
    (folder / "peer1.json").write_text(json.dumps(row))
    (folder / "peer2.json").write_text(json.dumps({**row, "global_ppl_after": "<b>lie</b>", "extra": "text", "rank": 99}))
    (folder / "peer3.json").write_bytes(b"[" * 100_000)  # nested past the parser's recursion limit
    (folder / "peer0.json").write_bytes(b" " * (SURVIVOR_FILE_LIMIT + 1))
    (folder / "samples.json").write_text(json.dumps({"prompt": 1, "base": "x", "fine_tuned": "y"}))
    text = survivors_summary(config, 1.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lost"] == [0] and [p["rank"] for p in summary["peers_table"]] == [1, 2, 3]
    assert summary["peers_table"][1]["global_ppl_after"] is None and "extra" not in summary["peers_table"][1]
    assert "<b>" not in text and "(not generated: peer 0 was lost)" in text
    assert summary["wall_s"] == 3.0  # the peers' time, not the launcher's


SILENT_T = 3.0
PATH = {0: [1, 2], 1: [0], 2: [0]}  # 0 in the middle; 1 goes silent; 2 never neighbours it


def silent_neighbour_worker(rank: int, world: int, store: str, out: str, streams: bool) -> None:
    """Peers 0 and 2 exchange six times; peer 1 stays alive but silent for 3x the timeout from
    the second exchange on. The process group's timeout is the gossip timeout, as under p2pfed run."""
    import datetime
    import os
    import time

    import torch.distributed as dist

    from p2pfed.transport import TorchTransport

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=SILENT_T))
    transport, log = TorchTransport(timeout_s=SILENT_T, keep_going=True), []
    for k in range(1, 7):
        if rank == 1 and k == 2:
            time.sleep(5 * SILENT_T)  # alive and silent past the point its neighbour gives up on it
            os._exit(0)
        talk = [j for j in PATH[rank] if j not in transport.gone]
        outgoing = {j: f"{rank}:{k}".encode().ljust(20) for j in talk}
        if streams:
            got, _, _ = transport.deadline_exchange(outgoing, talk, k, 64, 8, SILENT_T)
        else:
            got = transport.exchange(outgoing, talk, k, max_length=64, head=8)
        log.append({"got": sorted(got), "gone": sorted(transport.gone)})
    (Path(out) / f"{rank}.json").write_text(json.dumps(log))
    os._exit(0)


@pytest.mark.parametrize("streams", [True, False], ids=["streams", "lockstep"])
def test_a_neighbour_silent_past_the_timeout_costs_its_receiver_that_neighbour_only(tmp_path, streams):
    """gloo's own timeout, once it expires, fails every connection of the process: peer 0 then
    lost peer 2 too, and peer 2 lost peer 0 (the attack review's script; seen failing). Waits
    under keep_going never let it expire, and a neighbour is gone only after two timeouts of
    silence (one timeout failed here too: peer 0, itself waiting out peer 1, was one timeout
    late for peer 2). Peer 1 is gone for peer 0, and nothing else is."""
    from conftest import spawn_peers

    spawn_peers(silent_neighbour_worker, 3, tmp_path, str(tmp_path), streams)
    middle, far = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 2))
    assert middle[0]["got"] == [1, 2] and middle[-1] == {"got": [2], "gone": [1]}
    assert all(2 not in entry["gone"] for entry in middle)
    # peer 2 may miss one message of the peer in the middle while it waits out peer 1, never loses it
    assert all(entry["gone"] == [] for entry in far) and far[-1]["got"] == [0]
    assert sum(entry["got"] == [0] for entry in far) >= len(far) - 2

