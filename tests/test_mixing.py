"""Robust mixing rules against closed forms: ClippedGossip's radius and pulls, trimmed mean
and median per coordinate; settings that cannot tolerate the declared attackers are refused;
and on a ring under a scaled-adapter attack, clipping keeps honest peers near the honest mean."""

import threading
from pathlib import Path

import pytest
import torch

from conftest import identities
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


@pytest.mark.parametrize("robust, degree, ok", [("clip", 1, False), ("clip", 2, True), ("trimmed", 1, False), ("trimmed", 2, True),
                                                ("median", 3, True)])
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


def run_ring(robust: str, kind: str | None, rounds: int = 5):
    world, attacker = 6, 2
    hub = LocalHub(world, timeout_s=10)
    topology = load_topology(ROOT / "topologies/ring.toml", world)
    keys, roster = identities(world)
    finals = {}

    def peer(rank):
        faults = FaultInjector(FaultSection(peers=[rank], kind=kind), keys[rank], world, 0) if kind and rank == attacker else None
        averager = Averager(hub.transport(rank), "gossip", get_codec("fp32"), topology, keys[rank], roster, faults, robust=robust, byzantine=1)
        x = torch.full((16,), float(rank))
        for t in range(rounds):
            x, _ = averager.average(x, t)
        finals[rank] = x

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return finals


def test_clipping_holds_a_scaled_adapter_attack_that_plain_mixing_lets_through():
    honest_mean = sum(r for r in range(6) if r != 2) / 5  # 2.6
    plain, clipped = run_ring("none", "scale"), run_ring("clip", "scale")
    plain_error = max(float((plain[r] - honest_mean).abs().max()) for r in (1, 3))
    clipped_error = max(float((clipped[r] - honest_mean).abs().max()) for r in (1, 3))
    assert plain_error > 20  # x100 of the attacker's adapter pulls its neighbours far off
    assert clipped_error < 3  # clipped to an honest neighbour's distance: stays in the honest range
