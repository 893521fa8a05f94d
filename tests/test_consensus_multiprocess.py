"""Consensus tracking through the round function peers use, on real gloo peers: the logged
distance falls at the spectral rate on a ring, and consensus control reaches its target
with the extra steps logged."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import join_gloo_group, read_jsonl, spawn_peers
from p2pfed.codec import get_codec
from p2pfed.config import ConsensusSection
from p2pfed.consensus import gossip_round
from p2pfed.gossip import Averager
from p2pfed.metrics import MetricsWriter
from p2pfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
WORLD, DIM = 6, 300
TARGET = 1e-2
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]


def worker(rank: int, world: int, store: str, out: str) -> None:
    transport, key, roster = join_gloo_group(rank, world, store)
    ring = load_topology(ROOT / "topologies/ring.toml", world)
    noise = torch.Generator().manual_seed(rank)

    # 1) pure gossip, the exact figure logged every round
    averager = Averager(transport, "gossip", get_codec("fp32"), ring, key, roster)
    x = torch.randn(DIM, generator=noise)
    with_metrics = MetricsWriter(Path(out) / f"pure{rank}.jsonl")
    for t in range(10):
        result = gossip_round(averager, x, t, transport, ConsensusSection(every=1), measure=True)
        x = result.vector
        with_metrics.write({"round": t + 1, "consensus": result.consensus, "gossip_steps": result.steps})
    with_metrics.close()

    # 2) consensus control: peers drift apart each round (as local training makes them), and
    #    extra gossip steps pull them back under the target, up to 8 steps a round
    averager = Averager(transport, "gossip", get_codec("fp32"), ring, key, roster)
    control = ConsensusSection(every=1, target=TARGET, max_steps=8)
    x = torch.zeros(DIM)
    with_metrics = MetricsWriter(Path(out) / f"control{rank}.jsonl")
    for t in range(6):
        x = x + 0.05 * torch.randn(DIM, generator=noise)
        everyone = [torch.empty(DIM) for _ in range(world)]
        dist.all_gather(everyone, x)  # the test's own copy of the round's start, for an independent step count
        result = gossip_round(averager, x, t, transport, control, measure=True)
        x = result.vector
        with_metrics.write({"round": t + 1, "consensus": result.consensus, "gossip_steps": result.steps,
                            "target": result.target, "bytes_sent": result.stats.bytes_sent, "exchanges": averager.exchanges,
                            "fewest_steps": fewest_steps(torch.stack(everyone), TARGET, 8)})
    with_metrics.close()
    dist.destroy_process_group()


def fewest_steps(start: torch.Tensor, target: float, cap: int) -> int:
    """Independently of the code under test: the fewest steps of the 6-ring's Metropolis
    matrix (1/3 to self and to each neighbour, written out here) that bring Xi^2 to the target."""
    n = start.shape[0]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            w[i, j % n] = 1 / 3
    x = start.to(torch.float64)
    for steps in range(1, cap + 1):
        x = w @ x
        if (x - x.mean(dim=0)).pow(2).sum(dim=1).mean() <= target:
            return steps
    return cap


def test_logged_consensus_falls_at_the_spectral_rate_and_control_reaches_its_target(tmp_path):
    spawn_peers(worker, WORLD, tmp_path, str(tmp_path))
    rate = 2 / 3  # closed form: the 6-ring's Metropolis matrix has eigenvalues 1/3 + 2/3 cos(2 pi k / 6), the second largest 2/3
    pure = read_jsonl(tmp_path / "pure0.jsonl")
    distances = [row["consensus"] for row in pure]
    assert all(row["gossip_steps"] == 1 for row in pure)
    # from random starts the slowest mode takes over within a few rounds; then Xi^2 shrinks by rate^2
    for before, after in zip(distances[4:-1], distances[5:]):
        assert after / before == pytest.approx(rate**2, rel=0.05)
    assert distances[-1] < distances[0] * rate ** (2 * 6)

    logs = {r: read_jsonl(tmp_path / f"control{r}.jsonl") for r in range(WORLD)}
    rows = logs[0]
    for row in rows:
        assert row["target"] == TARGET
        assert row["consensus"] <= TARGET or row["gossip_steps"] == 8
        assert row["gossip_steps"] == row["fewest_steps"]  # stops as soon as the target is met, never a step more
    assert max(row["gossip_steps"] for row in rows) > 1  # control had to work
    assert rows[-1]["exchanges"] == sum(row["gossip_steps"] for row in rows)  # one exchange per logged step
    assert rows[0]["bytes_sent"] > rows[0]["gossip_steps"] * 2 * DIM * 4 - 1  # every step's messages counted
    for r in range(1, WORLD):  # every peer took the same number of steps, without a coordinator
        assert [row["gossip_steps"] for row in logs[r]] == [row["gossip_steps"] for row in rows]
