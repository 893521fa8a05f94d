"""The simulator runs the torchrun path's own code: a 4-peer simulated run's metrics and
adapters equal a torchrun run's with the same config and seeds."""

import json

import pytest
import torch
from peft import PeftModel

from conftest import TINY, read_jsonl, run_cli
from p2pfed.model import adapter_to_vector, tiny_model, tiny_tokenizer

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
