"""The simulator runs the torchrun path's own code: a 4-peer simulated run's metrics and
adapters equal a torchrun run's with the same config and seeds."""

import json

import pytest
import torch
from peft import PeftModel

from conftest import TINY, read_jsonl, run_cli
from p2pfed.model import adapter_to_vector, tiny_model, tiny_tokenizer

ROOT = TINY.parents[2]
PEERS = 4
SAME = ("train_loss", "global_loss", "global_ppl", "own_loss", "own_ppl", "local_consensus")
"""Computed by each peer alone: bit-identical. Consensus goes through an all-reduce whose
summation order differs between gloo and the in-process sum: equal to float tolerance."""
EXACT = ("bytes_sent", "bytes_fp32", "rejected", "dropouts", "abandoned", "gossip_steps", "update_norm")


def adapter(run_dir, rank):
    model = PeftModel.from_pretrained(tiny_model(len(tiny_tokenizer())), run_dir / "adapters" / f"peer{rank}", is_trainable=True)
    return adapter_to_vector(model)


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("overrides", [
    ("gossip.secure=true",),
    ("gossip.codec=topk+int2", "codec.fraction=0.1", "gossip.error_feedback=on", "outer.enabled=true", "run.local_steps=3",
     "lora.dropout=0.1"),  # dropout draws from torch's global RNG, which the baton swaps
], ids=["secure", "sparse-outer"])
def test_a_simulated_run_equals_a_torchrun_run(tmp_path, overrides):
    common = (str(TINY), "run.rounds=2", "run.eval_every=1", *overrides)
    real = run_cli("run", *common, f"run.out={tmp_path / 'real'}")
    assert real.returncode == 0, real.stderr[-3000:]
    simulated = run_cli("simulate", *common, f"run.out={tmp_path / 'sim'}")
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    assert "simulated 4 peers in" in simulated.stdout

    for rank in range(PEERS):
        a = read_jsonl(tmp_path / "real" / "metrics" / f"peer{rank}.jsonl")
        b = read_jsonl(tmp_path / "sim" / "metrics" / f"peer{rank}.jsonl")
        assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]
        for x, y in zip(a, b):
            for key in (*SAME, *EXACT):
                assert x.get(key) == y.get(key), (rank, x["round"], key)
            if x.get("consensus") is not None:
                assert y["consensus"] == pytest.approx(x["consensus"], rel=1e-9)
        assert torch.equal(adapter(tmp_path / "real", rank), adapter(tmp_path / "sim", rank))
    real_summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    sim_summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    for key in ("global_ppl_before", "global_ppl_after", "bytes_total", "compression"):
        assert sim_summary[key] == real_summary[key], key


def simulated_rows(tmp_path, *overrides):
    out = tmp_path / "sim"
    result = run_cli("simulate", str(TINY), f"run.out={out}", "run.rounds=3", "run.eval_every=3", "consensus.every=0", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, {rank: read_jsonl(out / "metrics" / f"peer{rank}.jsonl")[1:] for rank in range(PEERS)}


def test_the_emulated_clock_charges_latency_and_each_uplinks_bytes(tmp_path):
    """Ring of 4, a 50 kbit/s uplink, 20 s latency: a peer's two messages (tau = size * 8 / 5e4 s
    each) leave one after the other in the order its out-neighbours are listed, so the one
    listed k-th arrives k tau + 20 s after its sender began the exchange. In rounds 1 and 2 (no
    evaluation after the exchange) peer i sends at s_i = (its clock at the round's start) + its
    compute, and its clock ends the round at max(s_i + 2 tau, max_j s_j + k_j(i) tau + 20 s)."""
    from p2pfed.topology import load_topology

    out, rows = simulated_rows(tmp_path, "network.latency_ms=20000", "network.bandwidth_mbit=0.05")
    t = load_topology(ROOT / "topologies" / "ring.toml", PEERS)
    for index in (0, 1):  # rounds 1 and 2
        sends = {r: lines[index]["sim_clock_s"] - lines[index]["sim_round_s"] + lines[index]["sim_compute_s"] for r, lines in rows.items()}
        for rank, lines in rows.items():
            tau = lines[index]["bytes_sent"] / 2 * 8 / 5e4
            arrivals = [sends[j] + (1 + list(t.out_neighbours(j, 0)).index(rank)) * tau + 20.0 for j in t.in_neighbours(rank, 0)]
            expected = max(sends[rank] + 2 * tau, *arrivals)
            assert lines[index]["sim_clock_s"] == pytest.approx(expected, abs=0.05), (rank, index + 1)
            assert lines[index]["sim_comm_s"] > 20.0 + tau - 0.05  # at least the latency and one message's turn
    assert "Emulated network (20000 ms latency, 0.05 Mbit/s uplinks" in (out / "summary.md").read_text()


def test_a_straggler_sets_its_neighbours_pace_in_lockstep_gossip(tmp_path):
    """Peer 3 computes 30x slower, with no latency or bandwidth to add: its neighbours 0 and 2
    end each round's exchange when its message arrives, so their emulated clocks end rounds
    1 and 2 (no evaluation in them) where the straggler's does, up to their own compute;
    peer 1, two hops away, hears of it a round later. Their rounds are mostly waiting."""
    _, rows = simulated_rows(tmp_path, "network.slow_peers=[3]", "network.slowdown=30")
    fast = 2 * max(line["sim_compute_s"] for rank in (0, 1, 2) for line in rows[rank])
    clock = {rank: [line["sim_clock_s"] for line in lines] for rank, lines in rows.items()}
    for rank in (0, 2):
        for t in (0, 1):
            assert clock[rank][t] == pytest.approx(clock[3][t], abs=fast), (rank, t)
    assert clock[1][1] >= clock[3][0] - fast
    for rank in (0, 1, 2):
        lines = rows[rank]
        assert sum(line["sim_comm_s"] for line in lines) > 0.9 * sum(line["sim_round_s"] for line in lines)
        assert sum(line["sim_compute_s"] for line in rows[3]) > 5 * sum(line["sim_compute_s"] for line in lines)


def test_message_loss_costs_a_retransmission_per_loss_at_the_geometric_rate():
    from p2pfed.config import NetworkSection
    from p2pfed.simulate.network import Network

    network = Network(NetworkSection(loss=0.25), seed=7)
    tries = [network.lost_tries(0, 1, tag, sent) for tag in range(200) for sent in range(50)]
    mean, expected = sum(tries) / len(tries), 0.25 / 0.75  # failures before a success: p / (1 - p)
    variance = 0.25 / 0.75**2
    assert abs(mean - expected) <= 5 * (variance / len(tries)) ** 0.5
    assert tries == [network.lost_tries(0, 1, tag, sent) for tag in range(200) for sent in range(50)]  # a fixed draw per message


@pytest.mark.parametrize("overrides,message", [
    (["network.latency_ms=5"], r"\[network\]: an emulated network is for `p2pfed simulate`"),
    (["run.engine=simulate", "network.loss=1"], r"\[network\] loss: expected a probability in \[0, 1\)"),
    (["run.engine=simulate", "network.slowdown=0.5"], r"\[network\] slowdown: expected a factor >= 1"),
    (["run.engine=simulate", "network.bandwidth_mbit=5e-324"], r"\[network\] bandwidth_mbit: expected 0 \(unlimited\) or Mbit/s"),
    (["run.engine=simulate", "network.latency_ms=inf"], r"\[network\] latency_ms: expected milliseconds in \[0, 1e7\]"),
    (["run.engine=simulate", "network.slow_peers=[7]"], r"\[network\] slow_peers: \[7\] names a rank outside the 4 peers"),
    (["run.engine=simulate", "bench.probes=3"], r"\[bench\] probes: bare send/recv probes time a real network"),
    (["run.engine=simulate", "faults.peers=[1]", "faults.kind=crash"], r"\[faults\] kind = 'crash' ends its process"),
    (["run.engine=mpi"], r"\[run\] engine: expected one of torchrun, simulate"),
    (["run.engine=simulate", "network.churn=[[4, 1, 2]]"], r"\[network\] churn: \[\[4, 1, 2\]\] names a rank outside the 4 peers"),
    (["run.engine=simulate", "network.churn=[[1, 3, 3]]"], r"\[network\] churn: expected entries \[rank, leave, rejoin\]"),
    (["run.engine=simulate", "network.churn=[[1, 2]]"], r"\[network\] churn: expected entries \[rank, leave, rejoin\]"),
    (["run.engine=simulate", "network.churn=[[1, 2, 3]]", "gossip.secure=true"], r"\[network\] churn: emulated only for plain gossip"),
    (["run.engine=simulate", "network.churn=[[1, 2, 3]]", "gossip.algorithm=choco"], r"\[network\] churn: emulated only for plain gossip"),
])
def test_simulation_settings_that_cannot_hold_are_one_sentence(overrides, message):
    from p2pfed.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_run_engine_simulate_makes_p2pfed_run_simulate(tmp_path):
    result = run_cli("run", str(TINY), f"run.out={tmp_path / 'r'}", "run.rounds=1", "run.engine=simulate", "network.latency_ms=50")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "simulated 4 peers in" in result.stdout and "Emulated network (50 ms latency" in result.stdout
    assert json.loads((tmp_path / "r" / "config.json").read_text())["run"]["engine"] == "simulate"


@pytest.mark.timeout(300)
def test_a_peer_away_keeps_its_adapter_and_its_neighbours_give_its_weight_to_their_own(tmp_path):
    """Ring of 4 (weights 1/3), gossip only from per-peer starts x, peer 2 away in round 1
    (network.churn): y2 = x2, y1 = (x0 + 2 x1) / 3, y3 = (x0 + 2 x3) / 3, y0 = (x0 + x1 + x3) / 3;
    back in round 2: z_i = (y_(i-1) + y_i + y_(i+1)) / 3. The starts come from a run in which every
    peer is away (each keeps its draw)."""
    common = (str(TINY), "run.local_steps=0", "lora.init=per_peer", "data.eval_blocks=1")
    for name, rounds, churn in (("still", 1, "[[0, 1, 2], [1, 1, 2], [2, 1, 2], [3, 1, 2]]"), ("churn", 2, "[[2, 1, 2]]")):
        result = run_cli("simulate", *common, f"run.rounds={rounds}", f"run.eval_every={rounds}", f"run.out={tmp_path / name}",
                         f"network.churn={churn}", timeout=200)
        assert result.returncode == 0, result.stderr[-3000:]
    x = [adapter(tmp_path / "still", rank) for rank in range(PEERS)]
    assert (x[0] - x[1]).norm() > 1e-3 * x[0].norm()  # per-peer starts: apart
    y = [(x[0] + x[1] + x[3]) / 3, (x[0] + 2 * x[1]) / 3, x[2], (x[0] + 2 * x[3]) / 3]
    for rank in range(PEERS):
        want = (y[rank - 1] + y[rank] + y[(rank + 1) % PEERS]) / 3
        assert torch.allclose(adapter(tmp_path / "churn", rank), want, rtol=1e-5, atol=1e-7), rank
    rows = {rank: read_jsonl(tmp_path / "churn" / "metrics" / f"peer{rank}.jsonl")[1:] for rank in range(PEERS)}
    assert rows[2][0]["away"] is True and rows[2][0]["bytes_sent"] == 0 and rows[2][0]["neighbours"] == []
    assert [rows[r][0].get("away", False) for r in (0, 1, 3)] == [False] * 3 and all("away" not in rows[r][1] for r in range(PEERS))
    assert rows[1][0]["neighbours"] == [0] and rows[3][0]["neighbours"] == [0] and rows[0][0]["neighbours"] == [1, 3]
    assert rows[1][0]["bytes_sent"] == rows[0][0]["bytes_sent"] / 2  # peer 0 sends to 1 and 3, peer 1 only to 0
    assert rows[2][1]["neighbours"] == [1, 3] and rows[2][1]["bytes_sent"] == rows[0][0]["bytes_sent"]


def gossip_only(tmp_path, topology, peers, rounds, *overrides):
    """Xi^2_t / Xi^2_0 of a simulated gossip-only run whose peers start apart."""
    out = tmp_path / topology
    result = run_cli("simulate", str(TINY), f"run.out={out}", f"run.peers={peers}", f"gossip.topology=topologies/{topology}.toml",
                     f"run.rounds={rounds}", "run.local_steps=0", "lora.init=per_peer", f"run.eval_every={rounds}", "consensus.every=1",
                     "data.split=role", "data.eval_blocks=1", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    xi = [r["consensus"] for r in read_jsonl(out / "metrics" / "peer0.jsonl")]
    return [x / xi[0] for x in xi], xi[0]


@pytest.mark.timeout(300)
def test_gossip_only_rounds_from_apart_mix_at_the_rate_the_ring_spectrum_predicts(tmp_path):
    """Ring of 8, weights 1/3: eigenvalues (1 + 2 cos(2 pi k / 8)) / 3; independent starts give
    E[Xi^2_t / Xi^2_0] = (1/7) sum_{k=1..7} lambda_k^(2t) (closed form, not the code's matrices)."""
    import math

    ratios, start = gossip_only(tmp_path, "ring", 8, 4)
    assert start > 1e-3  # per_peer: the peers start apart (a common start would give 0)
    for t in range(1, 5):
        expected = sum(((1 + 2 * math.cos(2 * math.pi * k / 8)) / 3) ** (2 * t) for k in range(1, 8)) / 7
        assert ratios[t] == pytest.approx(expected, rel=0.1), t
    saved = [adapter(tmp_path / "ring", rank) for rank in range(8)]
    assert not torch.equal(saved[0], saved[1])  # still apart after 4 rounds on a ring


@pytest.mark.timeout(300)
def test_the_one_peer_exponential_graph_averages_exactly_in_log2_n_gossip_only_rounds(tmp_path):
    """Ying et al. 2021: on 8 peers, rounds with hops 1, 2, 4 (weights 1/2) give the exact mean.
    Before that, circulant eigenvalues (1 + w^(k 2^j)) / 2, w = exp(2 pi i / 8), give
    E[Xi^2_t / Xi^2_0] = (1/7) sum_k prod_{j<t} |(1 + w^(k 2^j)) / 2|^2 (3/7 after one round)."""
    import cmath
    import math

    ratios, _ = gossip_only(tmp_path, "onepeer-exponential", 8, 3)
    w = cmath.exp(2j * cmath.pi / 8)
    for t in (1, 2):
        expected = sum(abs(math.prod((1 + w ** (k * 2 ** j)) / 2 for j in range(t))) ** 2 for k in range(1, 8)) / 7
        assert ratios[t] == pytest.approx(expected, rel=0.15), t
    assert ratios[1] == pytest.approx(3 / 7, rel=0.1)
    assert ratios[3] < 1e-9


@pytest.mark.parametrize("overrides,message", [
    (["run.local_steps=0", "gossip.mode=allreduce"], r"\[run\] local_steps = 0 \(no training, gossip only\) needs gossip.mode"),
    (["run.local_steps=0", "privacy.enabled=true"], r"\[run\] local_steps = 0"),
    (["run.local_steps=0", "gossip.secure=true"], r"\[run\] local_steps = 0 .* mask the same adapter twice"),
    (["lora.init=per_peer", "lora.share=B"], r"\[lora\] init = 'per_peer' draws each peer's A, but share = 'B'"),
    (["lora.init=random"], r"\[lora\] init: expected one of common, per_peer"),
    (["run.local_steps=-1"], r"\[run\] local_steps: expected a number >= 0"),
])
def test_gossip_only_settings_that_cannot_hold_are_one_sentence(overrides, message):
    from p2pfed.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_the_scale_suites_prediction_is_the_ring_spectrum():
    """The bench's predicted ratio from the project's mixing matrices against the cosine closed form."""
    import math

    from p2pfed.benchscale import predicted_consensus

    expected, bound = predicted_consensus(str(ROOT / "topologies" / "ring.toml"), 16, 5)
    for t in range(6):
        assert expected[t] == pytest.approx(sum(((1 + 2 * math.cos(2 * math.pi * k / 16)) / 3) ** (2 * t) for k in range(1, 16)) / 15)
        assert bound[t] == pytest.approx(((1 + 2 * math.cos(2 * math.pi / 16)) / 3) ** (2 * t))
    varying, none = predicted_consensus(str(ROOT / "topologies" / "onepeer-exponential.toml"), 16, 4)
    assert none is None and varying[4] < 1e-20 and varying[1] == pytest.approx(7 / 15)  # mean of (1 + cos(2 pi k / 16)) / 2, k = 1..15


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", [("gossip.error_feedback=on",), ("gossip.algorithm=choco", "gossip.gamma=0.5")], ids=["ef", "choco"])
def test_peers_that_start_apart_still_mix_with_copies_of_their_neighbours(tmp_path, overrides):
    """Error feedback and CHOCO keep a copy of each neighbour; with per-peer starts every copy
    must start where the sender's own does (attack review: each peer mixed with itself). fp32
    with error feedback is exact gossip: on the ring of 4 (weights 1/3) every non-trivial
    eigenvalue is +-1/3, so Xi^2 falls to exactly 1/9 in a round; CHOCO with gamma 1/2
    contracts more slowly but must contract."""
    ratios, _ = gossip_only(tmp_path, "ring", 4, 2, *overrides)
    if overrides == ("gossip.error_feedback=on",):
        assert ratios[1] == pytest.approx(1 / 9, rel=1e-3)
    assert ratios[2] < 0.5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["loading", "running"])
def test_the_simulation_process_does_not_outlive_the_command_that_started_it(tmp_path, when):
    """`p2pfed simulate` runs the peers in a child process; the command killed outright (SIGKILL:
    no chance to forward anything), whether the child is still loading torch or already running
    rounds, must not leave that child holding every peer."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-m", "p2pfed.cli", "simulate", str(TINY), "run.rounds=500", f"run.out={out}"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = subprocess.run(["pgrep", "-f", f"p2pfed.simulate {out}"], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    deadline = time.monotonic() + 60
    while not children() and time.monotonic() < deadline:
        time.sleep(0.05)
    if when == "running":
        while not (out / "metrics" / "peer0.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    kids = children()
    assert kids, "no simulation process started"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 45
    while children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not children(), f"simulation process {kids} outlived its parent"
