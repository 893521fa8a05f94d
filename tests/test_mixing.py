"""Robust mixing rules against closed forms: ClippedGossip's radius and pulls, trimmed mean
and median per coordinate; settings that cannot tolerate the declared attackers are refused;
and on a ring under a scaled-adapter attack, clipping keeps honest peers near the honest mean."""

from pathlib import Path

import pytest
import torch

from conftest import identities, on_threads
from p2pfed.codec import get_codec
from p2pfed.config import ConfigError, FaultSection, load_config
from p2pfed.faults import FaultInjector
from p2pfed.gossip import Averager
from p2pfed.mixing import ClippedGossip, CoordinateMedian, TrimmedMean, WeightedAverage, check_tolerance
from p2pfed.topology import load_topology
from p2pfed.transport import LocalHub

ROOT = Path(__file__).resolve().parents[1]


def test_clipped_gossip_cuts_the_farthest_neighbour_to_the_next_distance():
    own = torch.zeros(2)
    heard = {1: torch.tensor([3.0, 4.0]), 2: torch.tensor([0.0, 1.0]), 3: torch.tensor([60.0, 80.0])}  # distances 5, 1, 100
    weights = torch.tensor([0.4, 0.2, 0.2, 0.2])
    mixed = ClippedGossip(byzantine=1).mix(own, heard, weights)
    # tau = 5 (second largest): neighbour 3's pull (60, 80) is cut to (3, 4); the others pass whole
    expected = 0.2 * torch.tensor([3.0, 4.0]) + 0.2 * torch.tensor([0.0, 1.0]) + 0.2 * torch.tensor([3.0, 4.0])
    assert torch.allclose(mixed, expected)
    assert ClippedGossip(byzantine=3).radius([5.0, 1.0, 100.0]) == 0.0  # every neighbour may be Byzantine: stay put


def test_trimmed_mean_and_median_per_coordinate():
    own = torch.tensor([0.0, 10.0])
    heard = {1: torch.tensor([1.0, 11.0]), 2: torch.tensor([2.0, 12.0]), 3: torch.tensor([1000.0, -1000.0]), 4: torch.tensor([3.0, 13.0])}
    weights = torch.full((5,), 0.2)
    assert torch.equal(TrimmedMean(1).mix(own, heard, weights), torch.tensor([2.0, 11.0]))  # (1+2+3)/3, (10+11+12)/3
    assert torch.equal(CoordinateMedian(1).mix(own, heard, weights), torch.tensor([2.0, 11.0]))
    assert torch.allclose(WeightedAverage().mix(own, heard, weights), torch.tensor([201.2, -190.8]))


@pytest.mark.parametrize("robust, degree, ok", [("clip", 2, False), ("clip", 3, True), ("trimmed", 3, False), ("trimmed", 4, True),
                                                ("median", 3, False), ("median", 4, True)])
def test_a_neighbourhood_that_cannot_outvote_the_attackers_is_refused(robust, degree, ok):
    if ok:
        check_tolerance(robust, 1, {0: degree}, "g.toml")
    else:
        with pytest.raises(ConfigError, match=f"peer 0 hears only {degree} neighbours on g.toml"):
            check_tolerance(robust, 1, {0: degree}, "g.toml")


@pytest.mark.parametrize("override, message", [("gossip.secure=true", "only ever reveals their sum"), ("gossip.algorithm=choco", "CHOCO mixes")])
def test_robust_rules_refuse_secure_mode_and_choco(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "launch/configs/tiny.toml", ["gossip.robust=clip", override])


def run_graph(robust: str, kind: str | None, rounds: int = 5):
    """8 peers on the exponential graph (five neighbours each), peer 2 attacking."""
    world, attacker = 8, 2
    hub = LocalHub(world, timeout_s=10)
    topology = load_topology(ROOT / "topologies/exponential.toml", world)
    keys, roster = identities(world)
    finals = {}

    def peer(rank):
        faults = FaultInjector(FaultSection(peers=[rank], kind=kind), keys[rank], world, 0) if kind and rank == attacker else None
        averager = Averager(hub.transport(rank), "gossip", get_codec("fp32"), topology, keys[rank], roster, faults, robust=robust, byzantine=1)
        x = torch.full((16,), float(rank))
        for t in range(rounds):
            x, _ = averager.average(x, t)
        finals[rank] = x

    on_threads(peer, world)
    return finals


@pytest.mark.parametrize("robust", ["clip", "trimmed", "median"])
def test_robust_rules_hold_a_scaled_adapter_attack_that_plain_mixing_lets_through(robust):
    honest = [r for r in range(8) if r != 2]
    plain, defended = run_graph("none", "scale"), run_graph(robust, "scale")
    low, high = min(honest), max(honest)  # honest values start at their ranks: 0..7 without 2
    plain_error = max(float((plain[r] - 4.0).abs().max()) for r in honest)
    assert plain_error > 20  # x100 of the attacker's adapter pulls its neighbours far off
    assert all(low <= float(defended[r].min()) and float(defended[r].max()) <= high for r in honest)  # inside the honest range
