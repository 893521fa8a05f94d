"""The whole path through `p2pfed run` -> torchrun -> real gloo peers, on the tiny model."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import ROOT, TINY, read_jsonl, run_cli
from p2pfed.config import load_config
from p2pfed.topology import load_topology
from p2pfed.model import save_adapter, tiny_model, tiny_tokenizer, wrap_lora
from p2pfed.provenance import code_version, read_code_version

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
    assert read_code_version(out) == code_version()  # the run names the code that produced it


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
    # one global evaluation (peer 0's) serves all: every peer reports the same figure, every round
    figures = [[row["global_ppl"] for row in read_jsonl(out / "metrics" / f"peer{r}.jsonl") if row.get("global_ppl")] for r in range(3)]
    assert figures[0] and figures[0] == figures[1] == figures[2]

    local = tiny_run(tmp_path, "local", "run.peers=3", "run.rounds=2", "gossip.mode=local")
    rows = read_jsonl(local / "metrics" / "peer1.jsonl")[1:]
    assert all(row["bytes_sent"] == 0 for row in rows) and rows[-1]["consensus"] > 0
    # before any training the model is the common start: a peer that evaluated it itself agrees with the shared figure
    assert abs(read_jsonl(local / "metrics" / "peer2.jsonl")[0]["global_ppl"] - figures[2][0]) < 1e-6 * figures[2][0]


def test_bad_input_stops_before_launch_with_one_sentence(tmp_path):
    result = run_cli("run", str(TINY), f"run.out={tmp_path / 'x'}", "gossip.topology=topologies/ring8.toml")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["p2pfed: topologies/ring8.toml: the topology has 8 nodes but 4 peers were launched"]

    # a malformed data file of one peer (and a missing one) stop the launch: no peer starts, no restarts
    for rank in range(4):
        (tmp_path / f"peer{rank}.jsonl").write_text('{"text": "a line of text to learn"}\n' * 8)
    (tmp_path / "peer2.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    data = ["data.source=jsonl", f"data.path={tmp_path}/peer{{rank}}.jsonl"]
    bad = run_cli("run", str(TINY), f"run.out={tmp_path / 'y'}", *data)
    assert bad.returncode == 1 and not (tmp_path / "y" / "metrics").exists()
    assert bad.stderr.strip().splitlines() == [f"p2pfed: {tmp_path}/peer2.jsonl, line 2: expected a 'text' string, "
                                               "'instruction'+'output' strings, or a 'messages' list; got keys ['text']"]
    (tmp_path / "peer2.jsonl").unlink()
    missing = run_cli("run", str(TINY), f"run.out={tmp_path / 'y'}", *data)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [f"p2pfed: {tmp_path}/peer2.jsonl: data file not found"]

    out = tiny_run(tmp_path, "once", "run.peers=2", "run.rounds=1")
    again = run_cli("run", str(TINY), f"run.out={out}", "run.peers=2", "run.rounds=1")
    assert again.returncode == 1 and "already holds a run" in again.stderr and "--overwrite" in again.stderr


def test_compressed_choco_run_sends_a_tenth_of_the_bytes_and_still_learns(tmp_path):
    out = tiny_run(tmp_path, "choco", "run.rounds=3", "gossip.codec=topk+int8", "gossip.algorithm=choco", "gossip.gamma=0.2")
    for rank in range(4):
        rows = read_jsonl(out / "metrics" / f"peer{rank}.jsonl")[1:]
        assert all(10 * row["bytes_sent"] < row["bytes_fp32"] for row in rows)
        assert rows[-1]["global_ppl"] < read_jsonl(out / "metrics" / f"peer{rank}.jsonl")[0]["global_ppl"]
    summary = (out / "summary.md").read_text()
    assert "codec `topk+int8`, algorithm `choco`" in summary and "fewer than fp32 envelopes" in summary


def initial_adapter(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The common starting adapter every peer builds from the seed (saved the PEFT way)."""
    config = load_config(TINY)
    model = wrap_lora(tiny_model(len(tiny_tokenizer())), config.lora, config.run.seed)
    save_adapter(model, tmp_path / "initial")
    return load_file(tmp_path / "initial" / "adapter_model.safetensors")


def test_share_b_keeps_a_frozen_and_identical_and_halves_the_bytes(tmp_path):
    out = tiny_run(tmp_path, "share-b", "run.rounds=2", "lora.share=B")
    full = tiny_run(tmp_path, "share-ab", "run.rounds=2")
    adapters = [adapter_tensors(out, r) for r in range(4)]
    initial = initial_adapter(tmp_path)
    a_names = [n for n in adapters[0] if "lora_A" in n]
    b_names = [n for n in adapters[0] if "lora_B" in n]
    assert a_names and b_names
    for name in a_names:
        assert all(torch.equal(adapters[0][name], other[name]) for other in adapters[1:])
        assert torch.equal(adapters[0][name], initial[name])  # never trained, never averaged
        assert not torch.equal(adapter_tensors(full, 0)[name], initial[name])  # share AB trains A
    assert any(adapters[0][name].abs().max() > 0 for name in b_names)
    sent_b = read_jsonl(out / "metrics" / "peer0.jsonl")[1]["bytes_sent"]
    sent_ab = read_jsonl(full / "metrics" / "peer0.jsonl")[1]["bytes_sent"]
    assert sent_b < 0.6 * sent_ab


def test_consensus_control_takes_extra_steps_and_logs_them(tmp_path):
    out = tiny_run(tmp_path, "control", "run.rounds=2", "consensus.target=1e-4", "consensus.relative=true", "consensus.max_steps=3")
    for rank in range(4):
        rows = read_jsonl(out / "metrics" / f"peer{rank}.jsonl")[1:]
        for row in rows:
            assert row["consensus"] <= row["consensus_target"] or row["gossip_steps"] == 3
        assert rows[0]["gossip_steps"] > 1
    quiet = tiny_run(tmp_path, "quiet", "run.rounds=3", "consensus.every=2")
    logged = [row["consensus"] is not None for row in read_jsonl(quiet / "metrics" / "peer0.jsonl")]
    assert logged == [True, False, True, True]  # round 0, then every 2nd round and the last


def test_secure_run_survives_an_abstaining_peer_and_keeps_training(tmp_path):
    out = tiny_run(tmp_path, "secure", "run.peers=6", "run.rounds=3", "gossip.secure=true", "gossip.topology=topologies/torus.toml",
                   "faults.peers=[4]", "faults.kind=abstain", "faults.from_round=2", "faults.until_round=2")
    torus = load_topology(ROOT / "topologies/torus.toml", 6)
    for rank in range(6):
        rows = read_jsonl(out / "metrics" / f"peer{rank}.jsonl")
        assert [row["round"] for row in rows] == [0, 1, 2, 3]
        assert rows[-1]["global_ppl"] < rows[0]["global_ppl"]
        assert all(row["mask_s"] > 0 and not row["abandoned"] for row in rows[1:])
        assert [row["dropouts"] for row in rows[1:]] == [0, int(4 in torus.in_neighbours(rank, 1)), 0]
    assert "Secure (pairwise-masked) averaging" in (out / "summary.md").read_text()


def test_secure_mode_refuses_a_one_sender_topology_before_launch(tmp_path):
    result = run_cli("run", str(TINY), f"run.out={tmp_path / 'x'}", "gossip.secure=true", "gossip.topology=topologies/onepeer-exponential.toml")
    assert result.returncode == 1
    assert "secure mode needs two or more senders" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["crash", "vanish"])  # killed, or gone with status 0 (run.on_peer_loss = 'restart', the default)
def test_a_peer_killed_mid_run_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path, kind):
    common = ("run.rounds=5", "run.eval_every=5")
    steady = tiny_run(tmp_path, "steady", *common)
    crashed = tiny_run(tmp_path, "crashed", *common, "faults.peers=[1]", f"faults.kind={kind}", "faults.from_round=3")
    for rank in range(4):
        rows = read_jsonl(crashed / "metrics" / f"peer{rank}.jsonl")
        assert [row["round"] for row in rows] == [0, 1, 2, 3, 4, 5]  # no completed round lost, none twice
        assert [row.get("restart", 0) for row in rows] == [0, 0, 0, 1, 1, 1]  # rounds 3-5 ran after the restart
        assert rows[3]["resumed_from"] == 2
        for name, tensor in adapter_tensors(steady, rank).items():
            assert torch.equal(adapter_tensors(crashed, rank)[name], tensor), name  # bit for bit
    assert sorted(p.name for p in (crashed / "checkpoints" / "peer0").iterdir()) == ["round-000004.pt", "round-000005.pt"]


def test_resume_and_overwrite_guard_the_run_directory(tmp_path):
    out = tiny_run(tmp_path, "guarded", "run.rounds=1")
    again = run_cli("run", str(TINY), f"run.out={out}", "run.rounds=1")
    assert again.returncode == 1 and "--resume to continue it, --overwrite to replace it" in again.stderr
    more = run_cli("run", str(TINY), f"run.out={out}", "run.rounds=2", "--resume")
    assert more.returncode == 0, more.stderr[-2000:]
    assert [row["round"] for row in read_jsonl(out / "metrics" / "peer0.jsonl")] == [0, 1, 2]


def test_sigterm_checkpoints_the_round_exits_130_and_resume_finishes_the_run(tmp_path):
    """`kill` of a running job (SIGTERM to the launcher, torchrun and every peer): a computing
    peer finishes its round, checkpoints it and exits 130 naming `--resume`; one waiting on
    the network stops at once (its last checkpoint stands). Resuming runs the remaining rounds
    once each, from the newest round every peer checkpointed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, rounds = tmp_path / "stopped", 40
    command = [sys.executable, "-m", "p2pfed.cli", "run", str(TINY), f"run.out={out}", f"run.rounds={rounds}", "run.eval_every=40"]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = out / "metrics" / "peer0.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.2)
    assert metrics.exists(), "the run never started a round"
    os.killpg(job.pid, signal.SIGTERM)
    output = job.communicate(timeout=120)[0]
    while subprocess.run(["pgrep", "-f", str(out / "config.json")], capture_output=True).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # torchrun and the peers wind down after the launcher
    stopped = {rank: read_jsonl(out / "metrics" / f"peer{rank}.jsonl") for rank in range(4)}
    last = min(rows[-1]["round"] for rows in stopped.values())
    assert 3 <= last < rounds, output[-2000:]
    assert job.returncode != 0, output[-2000:]
    checkpointed = [sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints" / f"peer{rank}").iterdir()) for rank in range(4)]
    assert all(c and c[-1] >= last - 1 for c in checkpointed)  # every peer kept its last round (or the one before, if stopped mid-save)

    resumed = run_cli("run", str(TINY), f"run.out={out}", f"run.rounds={rounds}", "run.eval_every=40", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for rank in range(4):
        rounds_logged = [row["round"] for row in read_jsonl(out / "metrics" / f"peer{rank}.jsonl")]
        assert rounds_logged == list(range(rounds + 1))  # no round lost, none logged twice


def test_the_outer_optimizer_at_unit_lr_without_momentum_is_plain_gossip_and_diloco_with_int2_runs(tmp_path):
    """outer lr 1, momentum 0 gives back the mix: the same perplexities as plain gossip (up to
    float rounding of start - (start - mix)); DiLoCo's setting with top-k 2% + int2, error
    feedback and fresh AdamW moments per round runs, sends ~2 bits a kept value, and learns."""
    plain = tiny_run(tmp_path, "plain", "run.rounds=3", "run.eval_every=3")
    unit = tiny_run(tmp_path, "unit", "run.rounds=3", "run.eval_every=3", "outer.enabled=true", "outer.lr=1", "outer.momentum=0")
    for rank in range(4):
        a, b = read_jsonl(plain / "metrics" / f"peer{rank}.jsonl")[-1], read_jsonl(unit / "metrics" / f"peer{rank}.jsonl")[-1]
        assert b["global_ppl"] == pytest.approx(a["global_ppl"], rel=1e-4) and b["own_ppl"] == pytest.approx(a["own_ppl"], rel=1e-4)
    diloco = tiny_run(tmp_path, "diloco", "run.rounds=3", "run.eval_every=3", "outer.enabled=true", "gossip.codec=topk+int2",
                      "codec.fraction=0.02", "gossip.error_feedback=on", "train.optimizer_state=reset")
    rows = read_jsonl(diloco / "metrics" / "peer0.jsonl")
    assert rows[-1]["global_ppl"] < rows[0]["global_ppl"]
    dense = read_jsonl(plain / "metrics" / "peer0.jsonl")[1]["bytes_sent"]
    assert rows[1]["bytes_sent"] < dense / 30  # 2% of the values at 2 bits, plus indices and scales, against 32 bits each
