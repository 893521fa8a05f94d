"""Differential privacy through the real path: 4 gloo peers (torchrun, tiny model) on a ring
with secure mode on. What each peer holds after the run is the masked sum of its
neighbours' noised releases plus its own, so its change from the common start carries the
noise variance the mixing weights give (closed form from W), and the epsilon budget stops
the run before the round that would exceed it."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel

from conftest import TINY, read_jsonl, run_cli
from p2pfed.config import LoraSection
from p2pfed.model import adapter_to_vector, tiny_model, tiny_tokenizer, wrap_lora
from p2pfed.privacy import Accountant
from p2pfed.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
PEERS, SIGMA, CLIP = 4, 20.0, 1e-3
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


@pytest.mark.parametrize("secure", ["true", "false"], ids=["secure", "plain"])
def test_dp_mixes_carry_the_full_noise_variance_and_the_budget_stops_the_run(tmp_path, secure):
    accountant = Accountant(SIGMA, 1e-5)
    budget = (accountant.epsilon(2) + accountant.epsilon(3)) / 2  # two of the four rounds fit
    out = tmp_path / "run"
    result = run_cli("run", str(TINY), f"run.out={out}", "run.rounds=4", "run.eval_every=4", f"gossip.secure={secure}",
                     "privacy.enabled=true", f"privacy.noise_multiplier={SIGMA}", f"privacy.clip={CLIP}", f"privacy.epsilon={budget}")
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["stopped_after_round"] == 2 and summary["privacy"]["releases"] == 2
    assert summary["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(2)) and summary["privacy"]["epsilon"] <= budget
    assert "stopped the run after round 2 of 4" in (out / "summary.md").read_text()
    for rank in range(PEERS):
        rows = read_jsonl(out / "metrics" / f"peer{rank}.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["update_norm"] is not None for r in rows[1:]) and rows[-1]["global_ppl"] is not None  # the last round evaluates
        assert (out / "checkpoints" / f"peer{rank}" / "releases.log").read_text().count("\n") == 2

    # x_i(2) - x0 = sum_t (W^(3-t) (clipped update + noise))_i over t = 1, 2: noise variance
    # sigma^2 C^2 sum_t sum_j (W^(3-t))_ij^2 per value; updates add at most C^2 / values.
    w = load_topology(ROOT / "topologies" / "ring.toml", PEERS).weights(0)
    start = adapter_to_vector(wrap_lora(tiny_model(len(tiny_tokenizer())), LoraSection(), seed=0)).double().numpy()
    for rank in range(PEERS):
        model = PeftModel.from_pretrained(tiny_model(len(tiny_tokenizer())), out / "adapters" / f"peer{rank}", is_trainable=True)
        change = adapter_to_vector(model).double().numpy() - start
        expected = (SIGMA * CLIP) ** 2 * sum(float(np.sum(np.linalg.matrix_power(w, power)[rank] ** 2)) for power in (1, 2))
        measured, n = float(np.mean(change**2)), change.size
        assert abs(measured - expected) <= 5 * expected * math.sqrt(2 / n) + 2 * CLIP**2 / n, (rank, measured, expected)


def test_distributed_noise_gives_each_sum_the_full_variance_through_torch(tmp_path):
    """Distributed noise, one round on the ring of 4 (weights 1/3, two senders per sum, each adding
    half the variance): peer i ends at (1/3) own + S_i, its own term with the full noise and S_i
    the masked sum, whose noise must be the full sigma^2 C^2 / 9 a single sender's weight asks
    for (local noise would put 2/9 there). The accountant logs the round at sigma / sqrt(3/2)
    (closed form in test_distributed_noise.py); every other party colluding, sigma / sqrt(2)."""
    from p2pfed.privacy.accountant import epsilon_rdp

    out = tmp_path / "run"
    result = run_cli("run", str(TINY), f"run.out={out}", "run.rounds=1", "run.eval_every=1", "gossip.secure=true",
                     "privacy.enabled=true", "privacy.noise=distributed", f"privacy.noise_multiplier={SIGMA}", f"privacy.clip={CLIP}")
    assert result.returncode == 0, result.stderr[-3000:]
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["noise"] == "distributed" and privacy["releases"] == 1
    assert privacy["epsilon"] == pytest.approx(epsilon_rdp([SIGMA / math.sqrt(1.5)], 1e-5), rel=1e-9)
    assert privacy["epsilon_collusion"] == pytest.approx(epsilon_rdp([SIGMA / math.sqrt(2)], 1e-5), rel=1e-9)
    assert "if all other parties pool what they know" in (out / "summary.md").read_text()

    full = (SIGMA * CLIP) ** 2
    start = adapter_to_vector(wrap_lora(tiny_model(len(tiny_tokenizer())), LoraSection(), seed=0)).double().numpy()
    for rank in range(PEERS):
        model = PeftModel.from_pretrained(tiny_model(len(tiny_tokenizer())), out / "adapters" / f"peer{rank}", is_trainable=True)
        change = adapter_to_vector(model).double().numpy() - start
        n = change.size
        in_sum = float(np.mean(change**2)) - full / 9  # less the own term's (1/3)^2 sigma^2 C^2
        assert abs(in_sum - full / 9) <= 5 * (3 * full / 9) * math.sqrt(2 / n) + 2 * CLIP**2 / n, (rank, in_sum * 9 / full)
