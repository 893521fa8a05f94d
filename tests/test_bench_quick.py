"""`make bench SUITE=quick` end to end: a smoke test of the harness (it asserts nothing about speed)."""

import json

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1500)]


def test_quick_suite_writes_every_table_the_full_suite_writes(tmp_path):
    result = run_cli("bench", "quick", "--out", str(tmp_path), timeout=1400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [md] = list((tmp_path / "results").glob("quick-*.md"))
    text = md.read_text()
    data = json.loads(md.with_suffix(".json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names[:3] == ["centralised (1 process, pooled data)", "allreduce (exact mean every round)", "local (no communication)"]
    assert len(names) == 11 and all(f"| {name} |" in text for name in names)
    rows = {r["name"]: r for r in data["rows"]}
    # the baselines are what they claim: one process with 4x the steps, no bytes without communication
    centralised = rows["centralised (1 process, pooled data)"]["config"]
    assert centralised["run"]["peers"] == 1 and centralised["run"]["local_steps"] == 8 and centralised["data"]["pool"] == 4
    assert rows["local (no communication)"]["bytes_total"] == 0
    assert rows["gossip exponential"]["bytes_per_peer_per_round"] > rows["gossip ring"]["bytes_per_peer_per_round"]
    assert rows["gossip ring, low rank 2 + int8, error feedback"]["compression"] > 5
    assert rows["gossip ring, secure (pairwise-masked)"]["mask_s"] > 0
    # every row judged on the same global eval blocks: the untrained starting point is the same number
    before = [r["global_ppl_before"] for r in data["rows"]]
    assert max(before) / min(before) - 1 < 1e-4
    assert text.count("**met**") + text.count("**missed**") == 4
    # scaling: ring and exponential at 2 and 4 peers, each with the probe's ratio
    assert [s["name"] for s in data["scaling"]] == ["tiny, ring, 2 peers", "tiny, ring, 4 peers", "tiny, exponential, 2 peers",
                                                    "tiny, exponential, 4 peers"]
    assert all(s["probe_gossip_s"] > 0 and s["probe_bare_s"] > 0 and s["probe_bytes"] > 0 for s in data["scaling"])
    # micro-benchmarks: every codec both ways, signing, verifying, masks, fixed point
    operations = {m["operation"] for m in data["micro"]}
    assert {"encode lowrank+int8", "decode int4", "sign (seal)", "verify (open)", "mask (AES-256-CTR, one pair)", "fixed-point decode"} <= operations
    assert (tmp_path / "results" / md.name.replace(".md", "-ppl-vs-bytes.png")).stat().st_size > 10_000
    assert data["machine"]["torch"] and rows["gossip ring"]["config"]["model"]["name"] == "tiny"
