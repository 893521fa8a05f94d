"""The outer optimizer (DiLoCo's Nesterov step over gossip), against updates computed by hand,
and the inner optimizer's keep/reset choice."""

from pathlib import Path

import pytest
import torch

from p2pfed.config import LoraSection, OuterSection, TrainSection
from p2pfed.outer import OuterOptimizer


def test_outer_nesterov_steps_match_a_hand_computed_update():
    """theta = 1, mixes 0.5 then 0.2; lr 0.7, momentum 0.9, Nesterov.
    Round 1: g = 0.5, m = 0.5, theta' = 1 - 0.7 * (0.5 + 0.9 * 0.5) = 0.335.
    Round 2 from 0.335 with mix 0.2: g = 0.135, m = 0.9 * 0.5 + 0.135 = 0.585,
    theta'' = 0.335 - 0.7 * (0.135 + 0.9 * 0.585) = -0.12805."""
    outer = OuterOptimizer(OuterSection(enabled=True, lr=0.7, momentum=0.9, nesterov=True))
    first = outer.step(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    assert first.item() == pytest.approx(0.335)
    second = outer.step(first, torch.tensor([0.2], dtype=torch.float64))
    assert second.item() == pytest.approx(-0.12805)


def test_outer_classical_momentum_matches_torch_sgd():
    """The same rule as torch.optim.SGD with the outer gradient as the gradient."""
    section = OuterSection(enabled=True, lr=0.3, momentum=0.8, nesterov=False)
    outer, theta = OuterOptimizer(section), torch.randn(10, dtype=torch.float64)
    reference = theta.clone().requires_grad_(True)
    sgd = torch.optim.SGD([reference], lr=0.3, momentum=0.8)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        mixed = theta + 0.1 * torch.randn(10, generator=generator, dtype=torch.float64)
        reference.grad = (reference.detach() - (mixed - theta + reference.detach()))  # g = start - mix at the reference's own start
        theta_next = outer.step(theta, mixed)
        sgd.step()
        assert torch.allclose(theta_next, reference.detach(), atol=1e-12)
        theta = theta_next


def test_outer_with_unit_lr_and_no_momentum_is_plain_gossip():
    outer = OuterOptimizer(OuterSection(enabled=True, lr=1.0, momentum=0.0))
    start, mixed = torch.randn(100), torch.randn(100)
    assert torch.allclose(outer.step(start, mixed), mixed, atol=1e-6)


def test_reset_starts_each_round_from_fresh_adam_moments():
    from p2pfed.model import tiny_model, tiny_tokenizer, wrap_lora
    from p2pfed.train import BlockSampler, LocalTrainer

    blocks = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    trainers = {}
    for mode in ("keep", "reset"):
        model = wrap_lora(tiny_model(len(tiny_tokenizer())), LoraSection(), seed=0)
        trainers[mode] = LocalTrainer(model, TrainSection(lr=1e-2, optimizer_state=mode), BlockSampler(blocks, 2, 0), torch.device("cpu"))
        trainers[mode].train(2)
    step_counts = {mode: {float(s["step"]) for s in t.optimizer.state.values()} for mode, t in trainers.items()}
    assert step_counts == {"keep": {2.0}, "reset": {2.0}}  # the first round is the same
    for trainer in trainers.values():
        trainer.train(2)
    step_counts = {mode: {float(s["step"]) for s in t.optimizer.state.values()} for mode, t in trainers.items()}
    assert step_counts == {"keep": {4.0}, "reset": {2.0}}  # reset: the second round's moments count only its own steps


def test_every_communication_row_takes_the_same_local_steps_and_the_goal_reads_the_ratio():
    from p2pfed.bench import SUITES, ROOT
    from p2pfed.benchcomm import TOTAL_STEPS, communication_goal
    from p2pfed.config import load_config

    suite = SUITES["communication"]
    for row in suite.rows:
        config = load_config(ROOT / suite.base, [*suite.common, *row.overrides])
        assert config.run.rounds * config.run.local_steps == TOTAL_STEPS, row.name
    rows = [{"name": "allreduce", "global_ppl": 40.0, "bytes_total": 4e9, "peers": 4},
            {"name": "gossip every step", "global_ppl": 40.1, "bytes_total": 4e9, "peers": 4},
            {"name": "a", "global_ppl": 40.39, "bytes_total": 3.9e7, "peers": 4},  # 102.6x, +0.98%
            {"name": "b", "global_ppl": 40.5, "bytes_total": 1e6, "peers": 4}]  # 4000x but +1.25%
    assert "**met**; best 102.6x by a" in communication_goal(rows)
    rows[2]["bytes_total"] = 8e7
    assert "**missed**; best 50.0x by a" in communication_goal(rows)


def test_outer_settings_that_make_disagreement_grow_are_refused_and_diloco_s_are_not():
    """On the ring of 8 (W's eigenvalues 1/3 + 2/3 cos(2 pi k / 8)), Nesterov at lr 1.2 and
    momentum 0.9 amplifies the most disagreeing mode (eigenvalue -1/3, h = 4/3): the 2x2
    step [[1 - lr h (1 + mu), -lr mu^2], [h, mu]] has spectral radius 1.5 > 1 (closed form:
    trace 1 - 3.04 + 0.9 = -1.14, det 0.9 * (1 - 3.04) + 1.2 * 0.81 * 4/3 = -0.54, so the roots
    of z^2 + 1.14 z - 0.54: 0.36 and -1.5)."""
    import numpy as np

    from p2pfed.config import ConfigError, load_config
    from p2pfed.outer import check_outer, growth
    from p2pfed.topology import load_topology

    section = OuterSection(enabled=True, lr=1.2, momentum=0.9)
    expected = max(abs(np.roots([1, 1.14, -0.54])))
    assert expected == pytest.approx(1.5)
    assert growth(section, -1 / 3) == pytest.approx(expected, rel=1e-6) and expected > 1
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "launch/configs/tiny.toml", ["run.peers=8", "outer.enabled=true", "outer.lr=1.2"])
    with pytest.raises(ConfigError, match=r"\[outer\] lr = 1.2, momentum = 0.9: on topologies/ring.toml"):
        check_outer(config, load_topology(root / "topologies/ring.toml", 8))
    for name, n in (("ring", 4), ("ring8", 8), ("torus16", 16), ("hypercube8", 8), ("exponential8", 8), ("complete8", 8),
                    ("star8", 8), ("onepeer-exponential8", 8), ("random-regular16", 16), ("erdos-renyi16", 16)):
        ok = load_config(root / "launch/configs/tiny.toml", [f"run.peers={n}", "outer.enabled=true"])
        check_outer(ok, load_topology(root / f"topologies/{name}.toml", n))  # DiLoCo's 0.7 / 0.9 hold on all of them


def test_a_checkpointed_momentum_of_the_wrong_shape_or_type_is_refused_at_restore():
    outer = OuterOptimizer(OuterSection(enabled=True))
    like = torch.zeros(5)
    for bad in (torch.zeros(4), torch.zeros(5, dtype=torch.float64), torch.tensor([0.0, float("nan"), 0, 0, 0]), "x"):
        with pytest.raises(ValueError):
            outer.restore({"momentum": bad}, like=like)
    outer.restore({"momentum": torch.ones(5)}, like=like)
    assert torch.equal(outer.momentum, torch.ones(5))
