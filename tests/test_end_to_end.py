"""The whole path through `p2pfed run` -> torchrun -> real gloo peers, on the tiny model."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import ROOT, TINY, read_jsonl, run_cli
from p2pfed.model import tiny_model, tiny_tokenizer

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


def tiny_run(tmp_path: Path, name: str, *overrides: str) -> Path:
    out = tmp_path / name
    result = run_cli("run", str(TINY), f"run.out={out}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def adapter_tensors(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(out / "adapters" / f"peer{rank}" / "adapter_model.safetensors")


def test_four_peers_train_gossip_and_save_stock_peft_adapters(tmp_path):
    out = tiny_run(tmp_path, "gossip", "run.rounds=4")
    records = {r: read_jsonl(out / "metrics" / f"peer{r}.jsonl") for r in range(4)}
    for rank, rows in records.items():
        assert [row["round"] for row in rows] == [0, 1, 2, 3, 4]
        assert all(row["bytes_sent"] > 0 and row["comm_s"] >= 0 and len(row["neighbours"]) == 2 for row in rows[1:])
        assert rows[-1]["global_ppl"] < rows[0]["global_ppl"]
    first = sum(rows[1]["train_loss"] for rows in records.values())
    last = sum(rows[-1]["train_loss"] for rows in records.values())
    assert last < first
    assert 0 < records[0][-1]["consensus"]  # peers hold different data, so they differ a little

    tokenizer = tiny_tokenizer()
    ids = tokenizer("Speak the speech, I pray you", return_tensors="pt").input_ids
    reloaded = PeftModel.from_pretrained(tiny_model(len(tokenizer)), out / "adapters" / "peer2").eval()
    with torch.no_grad():
        with reloaded.disable_adapter():
            base_logits = reloaded(ids).logits
        assert not torch.allclose(reloaded(ids).logits, base_logits, atol=1e-5)  # training moved the adapter
    summary = (out / "summary.md").read_text()
    assert "| peer | global ppl before" in summary and "Fine-tuned adapter" in summary


def test_same_config_and_seed_give_the_same_adapters(tmp_path):
    a = tiny_run(tmp_path, "a", "run.peers=2", "run.rounds=2")
    b = tiny_run(tmp_path, "b", "run.peers=2", "run.rounds=2")
    for rank in range(2):
        left, right = adapter_tensors(a, rank), adapter_tensors(b, rank)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_allreduce_keeps_peers_identical_and_local_sends_nothing(tmp_path):
    out = tiny_run(tmp_path, "allreduce", "run.peers=3", "run.rounds=2", "gossip.mode=allreduce")
    for row in read_jsonl(out / "metrics" / "peer0.jsonl")[1:]:
        assert row["consensus"] < 1e-12 and row["bytes_estimated"]
    zero, two = adapter_tensors(out, 0), adapter_tensors(out, 2)
    assert all(torch.allclose(zero[k], two[k], atol=1e-7) for k in zero)

    local = tiny_run(tmp_path, "local", "run.peers=2", "run.rounds=2", "gossip.mode=local")
    rows = read_jsonl(local / "metrics" / "peer1.jsonl")[1:]
    assert all(row["bytes_sent"] == 0 for row in rows) and rows[-1]["consensus"] > 0


def test_bad_input_stops_before_launch_with_one_sentence(tmp_path):
    result = run_cli("run", str(TINY), f"run.out={tmp_path / 'x'}", "gossip.topology=topologies/ring8.toml")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["p2pfed: topologies/ring8.toml: the topology has 8 nodes but 4 peers were launched"]

    out = tiny_run(tmp_path, "once", "run.peers=2", "run.rounds=1")
    again = run_cli("run", str(TINY), f"run.out={out}", "run.peers=2", "run.rounds=1")
    assert again.returncode == 1 and "already holds a run" in again.stderr and "--overwrite" in again.stderr
