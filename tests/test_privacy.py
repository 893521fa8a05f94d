"""Differential privacy: the clipped update, the noise, the accountant against dp-accounting
and the closed form of composed Gaussian mechanisms, the budget, the release log."""

import math
import os
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed.config import ConfigError, load_config
from p2pfed.privacy import Accountant, ReleaseLog, affordable_rounds, clip_update, gaussian_noise, privatize

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=200, deadline=None)
@given(scale=st.floats(1e-8, 1e8), clip=st.floats(1e-6, 1e6), size=st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_the_clipped_update_never_exceeds_the_bound(scale, clip, size, seed):
    update = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * scale
    clipped, norm, was_clipped = clip_update(update, clip)
    assert float(torch.linalg.vector_norm(clipped.double())) <= clip
    assert was_clipped == (norm > clip)
    if not was_clipped:
        assert torch.equal(clipped, update)  # an update inside the ball leaves untouched
    else:  # scaled, not reshaped: the same direction
        cosine = torch.nn.functional.cosine_similarity(clipped.double(), update.double(), dim=0)
        assert cosine > 1 - 1e-6


def test_a_non_finite_update_is_dropped_not_sent():
    update = torch.tensor([1.0, float("nan"), 2.0])
    clipped, norm, was_clipped = clip_update(update, 1.0)
    assert torch.equal(clipped, torch.zeros(3)) and math.isnan(norm) and was_clipped


def test_noise_has_the_set_standard_deviation_and_is_gaussian():
    """Fixed key, n = 400,000: the sample std lies within 5 standard errors (std / sqrt(2n)) of
    the setting, the mean within 5 std / sqrt(n) of 0, and the share within one std within 5
    binomial standard errors of the normal law's 0.6827."""
    n, std = 400_000, 0.7
    noise = gaussian_noise(n, std, key=bytes(range(32))).double()
    assert abs(noise.std().item() - std) <= 5 * std / math.sqrt(2 * n)
    assert abs(noise.mean().item()) <= 5 * std / math.sqrt(n)
    inside, p = (noise.abs() <= std).double().mean().item(), math.erf(1 / math.sqrt(2))
    assert abs(inside - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_every_release_draws_fresh_noise_unless_a_key_is_given():
    assert not torch.equal(gaussian_noise(1000, 1.0), gaussian_noise(1000, 1.0))
    assert torch.equal(gaussian_noise(1000, 1.0, key=bytes(32)), gaussian_noise(1000, 1.0, key=bytes(32)))


def test_privatize_shares_start_plus_clipped_update_plus_noise():
    start, trained = torch.zeros(50_000), torch.full((50_000,), 0.01)  # update norm 2.24
    release = privatize(trained, start, clip=1.0, noise_multiplier=0.0)
    assert release.clipped and abs(float(torch.linalg.vector_norm(release.vector.double())) - 1.0) < 1e-5
    noisy = privatize(trained, start, clip=1.0, noise_multiplier=2.0, key=bytes(32))
    residual = (noisy.vector - release.vector).double()
    assert abs(residual.std().item() - 2.0) <= 5 * 2.0 / math.sqrt(2 * 50_000)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a mu-GDP mechanism at delta (Dong, Roth, Su 2019, Cor. 2.13):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved by bisection. n
    Gaussian mechanisms of noise multiplier sigma compose to mu = sqrt(n) / sigma exactly."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    curve = lambda eps: phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)  # noqa: E731
    low, high = 0.0, 500.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if curve(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("sigma, releases", [(1.0, 12), (3.0, 12), (0.8, 5), (2.0, 1)])
def test_epsilon_equals_dp_accounting_for_the_composed_event_and_the_closed_form(sigma, releases):
    accountant = Accountant(sigma, 1e-5)
    pld = pld_privacy_accountant.PLDAccountant()
    for _ in range(releases):  # composed one mechanism at a time, not as the accountant's self-composition
        pld.compose(dp_accounting.GaussianDpEvent(sigma))
    expected = pld.get_epsilon(1e-5)
    assert accountant.epsilon_pld(releases) == pytest.approx(expected, rel=1e-3)
    exact = gaussian_dp_epsilon(math.sqrt(releases) / sigma, 1e-5)
    assert exact <= accountant.epsilon_pld(releases) <= exact * 1.01 + 1e-3  # PLD is a tight upper bound
    assert accountant.epsilon(releases) >= accountant.epsilon_pld(releases)  # RDP is never below PLD


def test_epsilon_grows_with_releases_and_is_infinite_without_noise():
    accountant = Accountant(1.5, 1e-5)
    figures = [accountant.epsilon(k) for k in range(6)]
    assert figures[0] == 0 and all(a < b for a, b in zip(figures, figures[1:]))
    assert Accountant(0.0, 1e-5).epsilon(3) == math.inf and Accountant(0.0, 1e-5).epsilon_pld(3) is None
    assert Accountant(0.01, 1e-5).epsilon_pld(12) is None  # mu = 346: the PLD grid would need tens of GB


def test_the_budget_affords_the_rounds_whose_epsilon_stays_within_it():
    accountant, sigma = Accountant(2.0, 1e-5), 2.0
    budget = 4.0
    rounds = affordable_rounds(accountant, budget, releases_so_far=0, rounds_left=50)
    assert accountant.epsilon(rounds) <= budget < accountant.epsilon(rounds + 1)
    assert gaussian_dp_epsilon(math.sqrt(rounds) / sigma, 1e-5) <= budget  # and the true epsilon too
    assert affordable_rounds(accountant, budget, releases_so_far=rounds - 1, rounds_left=50) == 1  # a restart's releases count
    assert affordable_rounds(accountant, budget, releases_so_far=0, rounds_left=3) == min(3, rounds)
    assert affordable_rounds(accountant, 0.0, releases_so_far=99, rounds_left=7) == 7  # no budget


def test_the_release_log_counts_every_release_a_torn_line_included(tmp_path):
    log = ReleaseLog.open(tmp_path)
    assert log.count == 0
    log.record(1, 0)
    log.record(2, 0)
    log.record(2, 1)  # round 2 redone after a restart: a second release
    assert ReleaseLog.open(tmp_path).count == 3
    with open(tmp_path / "releases.log", "ab") as f:
        f.write(b"round 3 att")  # a crash mid-write: counted (one too many is safe)
    assert ReleaseLog.open(tmp_path).count == 4
    assert oct(os.stat(tmp_path / "releases.log").st_mode & 0o777) == "0o600"


def test_a_planted_release_log_is_one_sentence(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    os.symlink(tmp_path / "elsewhere", tmp_path / "releases.log")
    with pytest.raises(ValueError, match="expected a regular file of DP releases"):
        ReleaseLog.open(tmp_path)


@pytest.mark.parametrize("override, message", [
    (["privacy.clip=0"], r"\[privacy\] clip: expected a positive"),
    (["privacy.delta=1"], r"\[privacy\] delta: expected a number in \(0, 1\)"),
    (["privacy.noise_multiplier=-1"], r"\[privacy\] noise_multiplier"),
    (["privacy.enabled=true", "privacy.noise_multiplier=0", "privacy.epsilon=3"], "a budget needs noise"),
    (["privacy.enabled=true", "gossip.mode=local"], "shares nothing"),
])
def test_privacy_settings_that_mean_nothing_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "launch/configs/tiny.toml", override)


def test_the_privacy_goal_is_the_smallest_epsilon_within_five_percent():
    from p2pfed.benchprivacy import privacy_goal

    rows = [{"name": "no DP", "global_ppl": 40.0, "epsilon": None},
            {"name": "a", "global_ppl": 41.9, "epsilon": 900.0},  # +4.75%: within
            {"name": "b", "global_ppl": 42.1, "epsilon": 90.0},  # +5.25%: not within
            {"name": "c", "global_ppl": 40.5, "epsilon": 9000.0}]
    assert "epsilon 900 at delta" in privacy_goal(rows) and "(a," in privacy_goal(rows)
    assert "no DP row came within" in privacy_goal(rows[:1] + rows[2:3])
