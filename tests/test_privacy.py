"""Differential privacy: the clipped update, the noise, the accountant against dp-accounting
and the closed form of composed Gaussian mechanisms, the budget, the release log."""

import math
import os
from pathlib import Path

import dp_accounting
import numpy as np
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
    log.record(1, 0, 2.0)
    log.record(2, 0, 2.0)
    log.record(2, 1, 0.5)  # round 2 redone after a restart, with less noise: a second release, at its own sigma
    with pytest.raises(ValueError, match="another process holds this peer's release log"):
        ReleaseLog.open(tmp_path)  # a second writer would count only its own releases
    log.close()
    assert ReleaseLog.open(tmp_path).count == 3
    with open(tmp_path / "releases.log", "ab") as f:
        f.write(b"round 3 att")  # a crash mid-write: counted (one too many is safe), at the smallest sigma known
    reread = ReleaseLog.open(tmp_path)
    assert reread.count == 4 and reread.noise_multipliers(3.0) == [2.0, 2.0, 0.5, 0.5]
    reread.close()
    assert oct(os.stat(tmp_path / "releases.log").st_mode & 0o777) == "0o600"


def test_a_resume_with_less_noise_is_charged_what_each_release_cost(tmp_path):
    """50 releases at sigma 0.5, then a resume at sigma 20: epsilon composes both, so it is at
    least the first 50's (the review's attack: it read 1.5 instead of 166 before the fix)."""
    from p2pfed.config import PrivacySection
    from p2pfed.privacy import PrivacyLedger

    log = ReleaseLog.open(tmp_path)
    for round in range(1, 51):
        log.record(round, 0, 0.5)
    log.close()
    ledger = PrivacyLedger.open(PrivacySection(enabled=True, noise_multiplier=20.0), tmp_path, resume=50,
                                private_rounds=range(1, 51))
    assert ledger.unprotected == [] and ledger.epsilon() >= Accountant(0.5, 1e-5).epsilon(50)


def test_rounds_run_before_privacy_was_switched_on_make_epsilon_infinite_and_refuse_a_budget(tmp_path):
    from p2pfed.config import PrivacySection
    from p2pfed.privacy import PrivacyLedger

    ledger = PrivacyLedger.open(PrivacySection(enabled=True, noise_multiplier=2.0), tmp_path, resume=5)
    assert ledger.unprotected == [1, 2, 3, 4, 5] and ledger.epsilon() == math.inf
    ledger.log.close()
    with pytest.raises(ConfigError, match="released adapters without"):
        PrivacyLedger.open(PrivacySection(enabled=True, noise_multiplier=2.0, epsilon=3.0), tmp_path, resume=5)


def test_an_earlier_attempts_log_lines_do_not_hide_rounds_a_later_attempt_ran_without_privacy(tmp_path):
    """Review finding: attempt 1 logged rounds 1-10 and died with only round 5's checkpoint;
    attempt 2 resumed without [privacy] and ran 6-10 raw; attempt 3 resumes from 10. The log
    has lines for 1-10, but the checkpoint's history says only 1-5 were private."""
    from p2pfed.config import PrivacySection
    from p2pfed.privacy import PrivacyLedger

    log = ReleaseLog.open(tmp_path)
    for round in range(1, 11):
        log.record(round, 0, 1.0)
    log.close()
    ledger = PrivacyLedger.open(PrivacySection(enabled=True, noise_multiplier=1.0), tmp_path, resume=10, private_rounds=range(1, 6))
    assert ledger.unprotected == [6, 7, 8, 9, 10] and ledger.epsilon() == math.inf


def test_a_release_next_to_a_huge_start_still_moves_no_more_than_the_clip():
    """A hostile mix can make a peer's start huge, where float32's grid is coarse: the sum
    start + clipped update would round back to the unclipped update (review finding)."""
    start = torch.full((1000,), 393216.0)  # float32 step 0.03125 there
    trained = start + torch.full((1000,), 0.0625)  # norm 1.98 > clip 1
    release = privatize(trained, start, clip=1.0, noise_multiplier=0.0)
    assert float(torch.linalg.vector_norm(release.vector.double() - start.double())) <= 1.0


def test_the_noise_reaches_past_the_tail_a_32_bit_sampler_stops_at():
    """Box-Muller on 32-bit uniforms cannot go beyond 6.66 std, and a release coordinate past
    the sampler's reach would prove the update was there. The smallest radius word (0) must
    give sqrt(-2 ln 2^-53) = 8.57 std; the largest and a mid one give ~0 and sqrt(2 ln 2)."""
    from p2pfed.privacy.mechanism import normal_from_words

    radii = np.array([0, 2**64 - 1, 2**63], dtype=np.uint64)
    angles = np.zeros(3, dtype=np.uint64)  # cos(0) = 1: the radius itself
    z = normal_from_words(np.concatenate([radii, angles]))
    assert z[0] == pytest.approx(math.sqrt(-2 * math.log(2.0**-53))) and z[0] > 8.5
    assert abs(z[1]) < 1e-7 and z[2] == pytest.approx(math.sqrt(2 * math.log(2)), rel=1e-9)


def test_a_planted_release_log_is_one_sentence(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    os.symlink(tmp_path / "elsewhere", tmp_path / "releases.log")
    with pytest.raises(ValueError, match="expected a regular file of DP releases"):
        ReleaseLog.open(tmp_path)


@pytest.mark.parametrize("override, message", [
    (["privacy.clip=0"], r"\[privacy\] clip: expected a positive"),
    (["privacy.clip=inf"], r"\[privacy\] clip: expected a positive, finite"),
    (["privacy.noise_multiplier=inf"], r"\[privacy\] noise_multiplier"),
    (["privacy.delta=1"], r"\[privacy\] delta: expected a number in \(0, 1\)"),
    (["privacy.noise_multiplier=-1"], r"\[privacy\] noise_multiplier"),
    (["privacy.noise_multiplier=1e-200"], r"\[privacy\] noise_multiplier: expected 0 \(no noise\) or a number in \[1e-6, 1e6\]"),
    (["privacy.noise_multiplier=1e308"], r"\[privacy\] noise_multiplier: expected 0 \(no noise\) or a number in \[1e-6, 1e6\]"),
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


def test_the_summary_reports_its_own_privacy_account_not_a_hostile_peers_claim():
    """Another peer's row claiming the budget stopped the run at round 1 (with no budget set)
    crashed the summary before; now the writer's own row is the account."""
    from p2pfed.peer import _privacy_info, _privacy_line

    config = load_config(ROOT / "launch/configs/tiny.toml", ["privacy.enabled=true", "privacy.noise_multiplier=2"])
    own = {"rank": 0, "epsilon": 3.0, "epsilon_pld": 2.9, "epsilon_replace": 9.0, "dp_releases": 4, "budget_stop": None,
           "dp_unprotected_rounds": 0}
    hostile = {**own, "rank": 1, "epsilon": 0.001, "budget_stop": 1}
    info = _privacy_info(config, [own, hostile])
    line = _privacy_line(config, info)
    assert info["epsilon"] == 3.0 and info["stopped_after_round"] is None
    # peer 0 lost (a survivors' summary): no peer's claim stands in for its account
    assert _privacy_info(config, [hostile]) is None
    assert "epsilon 3 (RDP), 2.9 (PLD)" in line and "replaced, 9 (RDP)" in line and "stopped" not in line
