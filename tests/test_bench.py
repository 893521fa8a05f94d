"""The bench harness's arithmetic and bookkeeping (the runs themselves are `make bench`)."""

import json

import pytest

from p2pfed.bench import ROOT, SUITES, BenchRun, find_finished_run, slug
from p2pfed.benchtables import (best_line, code_line, convergence_goals, convergence_table, goal_line, micro_table, plot_ppl_vs_bytes,
                                 scaling_table, secure_line, table, write_results)
from p2pfed.config import load_config, save_config
from p2pfed.provenance import write_code_version


def row(name, bytes_, ppl):
    return {"name": name, "bytes_per_peer_per_round": bytes_, "global_ppl": ppl, "own_ppl": ppl, "consensus": 1e-3,
            "round_s": 1.0, "compute_s": 0.9, "codec_s": 0.01, "crypto_s": 0.001, "mask_s": 0.0, "comm_s": 0.05}


def test_table_and_goal_compare_every_row_with_the_first():
    results = [row("fp32", 1000.0, 40.0), row("int8", 260.0, 40.1), row("top-k", 90.0, 40.6), row("top-1%", 20.0, 45.0)]
    text = table(results)
    assert "| int8 | 260 | 3.8x | 40.10 | +0.25% |" in text
    assert "| top-k | 90 | 11.1x | 40.60 | +1.50% |" in text
    assert goal_line(results).endswith("met by: top-k.")  # 11x and +1.5%; top-1% is 50x but +12.5%
    assert "not met" in goal_line(results[:2])


def test_row_names_become_directory_names():
    assert slug("CHOCO top-k 10% + int8, gamma 0.2") == "choco-top-k-10pct-int8-gamma-0.2"


def test_a_finished_run_is_reused_only_for_the_identical_config_and_the_same_clean_commit(tmp_path):
    base = ROOT / "launch/configs/tiny.toml"
    done = tmp_path / "runs" / "suite" / "01-x"
    done.mkdir(parents=True)
    save_config(load_config(base, [f"run.out={done}", "gossip.codec=int8"]), done / "config.json")
    (done / "summary.json").write_text(json.dumps({}))
    code = {"commit": "a" * 40, "dirty": False, "packages": {"torch": "2.13.0"}}
    write_code_version(done, code)
    same = load_config(base, ["run.out=elsewhere", "gossip.codec=int8"]).to_dict()
    other = load_config(base, ["run.out=elsewhere", "gossip.codec=int4"]).to_dict()
    assert find_finished_run(tmp_path / "runs", same, code) == done
    assert find_finished_run(tmp_path / "runs", other, code) is None
    assert find_finished_run(tmp_path / "runs", same, {**code, "commit": "b" * 40}) is None  # other code
    assert find_finished_run(tmp_path / "runs", same, {**code, "packages": {"torch": "2.14.0"}}) is None  # other torch
    assert find_finished_run(tmp_path / "runs", same, {**code, "dirty": True}) is None  # uncommitted changes now
    write_code_version(done, {**code, "dirty": True})
    assert find_finished_run(tmp_path / "runs", same, code) is None  # the run came from uncommitted changes
    (done / "code.json").unlink()
    assert find_finished_run(tmp_path / "runs", same, code) is None  # a run from before code was recorded
    write_code_version(done, code)
    (done / "summary.json").unlink()  # an unfinished run is never reused
    assert find_finished_run(tmp_path / "runs", same, code) is None


def test_results_name_the_commit_of_every_row():
    rows = [{"name": "a", "code": {"commit": "c" * 40, "dirty": False}}, {"name": "b", "code": {"commit": "c" * 40, "dirty": False}}]
    assert code_line(rows, []) == f"Code: every row comes from commit {'c' * 12}."
    rows[1]["code"] = {"commit": "d" * 40, "dirty": True}
    assert code_line(rows, []) == f"Code: rows come from different commits: a: {'c' * 12}; b: {'d' * 12} (dirty tree)."


def test_secure_line_reports_gap_bytes_mask_share_and_exchange_time_against_the_goals():
    plain, secure = row("plain", 1000.0, 40.0), {**row("secure", 1010.0, 40.4), "mask_s": 0.02}
    assert secure_line([plain, secure]) == ("Secure averaging against the plain row above it: secure: perplexity gap +1.000% (goal <= 0.1%: **missed**), "
                                            "+1.000% bytes (goal <= 2%: **met**), masks 2.000% of a round.")
    timed = {**secure, "global_ppl": 40.02, "probe_gossip_s": 0.012, "probe_plain_s": 0.010}  # 1.2x the plain exchange
    assert secure_line([plain, timed]).endswith("perplexity gap +0.050% (goal <= 0.1%: **met**), +1.000% bytes (goal <= 2%: **met**), "
                                                "masks 2.000% of a round; whole exchange 12.0 ms secure vs 10.0 ms plain in the "
                                                "same run, 1.20x (goal <= 1.25x: **met**).")
    # a second graph: its secure row is judged against its own plain row, not row 1
    other_plain, other_secure = row("plain, other graph", 3000.0, 50.0), {**row("secure, other graph", 3030.0, 50.0), "mask_s": 0.02}
    line = secure_line([plain, secure, other_plain, other_secure])
    assert "secure, other graph: perplexity gap +0.000% (goal <= 0.1%: **met**), +1.000% bytes" in line


def full_rows(exponential_ppl=40.5, compressed_bytes=90.0, secure_ppl=41.0, codec_s=0.01):
    """A convergence table: allreduce at 40, ring at 40.4 sending 1000 B per round."""
    rows = [{**row("centralised (1 process, pooled data)", 0.0, 39.0), "bytes_total": 0.0},
            {**row("allreduce (exact mean every round)", 1500.0, 40.0), "bytes_estimated": True},
            {**row("local (no communication)", 0.0, 44.0), "bytes_total": 0.0},
            {**row("gossip ring", 1000.0, 40.4), "compression": 1.0},
            {**row("gossip exponential", 2500.0, exponential_ppl), "compression": 1.0},
            {**row("gossip ring, low rank 2 + int8, error feedback", compressed_bytes, 40.9), "compression": 1000 / compressed_bytes},
            {**row("gossip ring, secure (pairwise-masked)", 1001.0, secure_ppl), "mask_s": 0.004, "compression": 1.0}]
    for r in rows:
        r.setdefault("bytes_total", r["bytes_per_peer_per_round"] * 12)
        r["codec_s"] = codec_s
        r["config"] = {"model": {"name": "smollm2-135m"}}
    return rows


def test_convergence_goals_are_computed_from_the_rows():
    met = convergence_goals(full_rows(), [])
    assert met[0] == "- Exponential gossip within 2% of allreduce perplexity: +1.25% **met**."
    assert met[1].startswith("- A compressed setting at >= 10x fewer bytes within 2% of uncompressed ring gossip: "
                             "gossip ring, low rank 2 + int8, error feedback sends 11.1x fewer bytes at +1.24% **met**")
    assert "at most 1.50% (gossip ring, secure (pairwise-masked)) **met**" in met[2]  # (0.01 + 0.001 + 0.004) / 1.0
    assert met[3] == "- Secure gossip within 3% of plain gossip perplexity: +1.49% **met**."
    # the whole-exchange probe is read from the scaling runs of the task's own model only
    probe = {"probe_gossip_s": 0.05, "probe_bare_s": 0.01, "round_s": 4.0}
    scaling = [{**probe, "model": "SmolLM2", "config": {"model": {"name": "smollm2-135m"}}},
               {**probe, "model": "tiny", "round_s": 0.02, "config": {"model": {"name": "tiny"}}}]
    assert convergence_goals(full_rows(), scaling)[2].endswith(
        "Timed whole (SmolLM2 rows of the scaling table), a gossip exchange takes 5.0-5.0x a bare send/recv of its bytes; "
        "the difference is at most 1.00% of a round.")
    missed = convergence_goals(full_rows(exponential_ppl=41.0, compressed_bytes=200.0, secure_ppl=42.0, codec_s=0.06), [])
    assert len(missed) == 4 and all("**missed**" in line for line in missed)
    assert "5.0x fewer bytes" in missed[1]


def test_convergence_table_gaps_are_against_allreduce(tmp_path):
    text = convergence_table(full_rows())
    assert "| gossip ring | 40.40 | +1.00% | 40.40 |" in text
    assert "| allreduce (exact mean every round) | 40.00 | +0.00% |" in text and "1,500 (est.)" in text
    assert "| local (no communication) | 44.00 | +10.00% |" in text
    plot = plot_ppl_vs_bytes(full_rows(), tmp_path / "p.png")
    assert plot.stat().st_size > 10_000


def test_scaling_and_micro_tables():
    ok = {"name": "tiny, ring, 4 peers", "model": "tiny", "topology": "topologies/ring.toml", "peers": 4, "round_s": 0.5,
          "compute_s": 0.3, "comm_s": 0.01, "bytes_per_peer_per_round": 29000, "probe_gossip_s": 0.004, "probe_bare_s": 0.001}
    failed = {"name": "SmolLM2, ring, 16 peers", "model": "SmolLM2", "error": "out of memory"}
    text = scaling_table([ok, failed])
    assert "| tiny | ring | 4 | 0.50 | 0.30 | 0.010 | 29,000 | 4.0 | 1.00 | 4.0x | 0.60% |" in text
    assert "| SmolLM2 | SmolLM2, ring, 16 peers | | failed: out of memory |" in text
    micro = micro_table([{"operation": "verify (open)", "input": "64 B payload", "seconds": 1.5e-4, "mb_per_s": 0.43}])
    assert "| verify (open) | 64 B payload | 150 us | 0.4 MB/s |" in micro


def test_rows_select_parts_of_a_suite():
    rows, scaling, micro = BenchRun("full", ROOT / "bench", ["exponential"]).plan()
    assert [r.name for r in rows] == ["gossip exponential", "gossip one-peer exponential"]
    assert [r.name for _, r in scaling] == [f"{m}, exponential, {n} peers" for m in ("tiny", "SmolLM2") for n in (2, 4, 8, 16)]
    assert not micro
    assert BenchRun("full", ROOT / "bench", ["micro"]).plan()[2]
    with pytest.raises(ValueError, match="matches no row of suite full"):
        BenchRun("full", ROOT / "bench", ["no such row"]).plan()
    numbered = BenchRun("full", ROOT / "bench", ["#2", "#4-#5"]).plan()[0]
    assert [r.name for r in numbered] == ["allreduce (exact mean every round)", "gossip ring", "gossip torus"]
    with pytest.raises(ValueError, match="--rows #x: expected a row number"):
        BenchRun("full", ROOT / "bench", ["#x"]).plan()


@pytest.mark.parametrize("name", sorted(n for n, s in SUITES.items() if s.judge != "exchange"))  # exchange rows run no config
def test_every_row_of_every_suite_is_a_valid_config(name):
    suite = SUITES[name]
    for row in suite.rows:
        load_config(ROOT / (row.base or suite.base), [*suite.common, *row.overrides]).check()
    for scaling in suite.scaling:
        for row in scaling.rows():
            load_config(ROOT / scaling.base, [*scaling.common, *row.overrides]).check()


def test_a_sweep_names_the_row_with_the_lowest_perplexity():
    rows = [row("gamma 0.05", 100.0, 43.0), row("gamma 0.2", 100.0, 42.5), row("gamma 0.8", 100.0, 44.0)]
    assert best_line(rows).startswith("Lowest global perplexity: gamma 0.2 (42.50)")


def test_a_tree_is_dirty_for_code_changes_but_not_for_benchmark_results(tmp_path):
    """A suite run right after another finds the first one's results file rewritten: that is
    output, not code, so the rows stay attributable to the clean commit."""
    import subprocess

    from p2pfed.provenance import code_version

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "a.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "start")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "bench" / "results" / "a.md").write_text("new\n")
    (tmp_path / "bench" / "results" / "b.json").write_text("{}\n")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path)["dirty"] is True


def test_a_tagged_invocation_leaves_the_days_untagged_results_alone(tmp_path):
    """`bench --tag`: a run of some rows writes <suite>-<date>-<tag>.*, so the same day's full
    table (written by an untagged run) survives it."""
    suite = SUITES["scale"]
    untagged = write_results("scale", suite, [], [], [], tmp_path)
    before = untagged.read_text(encoding="utf-8")
    tagged = write_results("scale", suite, [], [], [], tmp_path, tag="large")
    assert tagged.name == untagged.name.replace(".md", "-large.md")
    assert tagged.with_suffix(".json").exists() and untagged.read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [untagged.name, untagged.with_suffix(".json").name, tagged.name, tagged.with_suffix(".json").name])


@pytest.mark.parametrize("tag,ok", [("large", True), ("part-2", True), ("../x", False), ("a b", False), ("", False), ("x" * 33, False)])
def test_bench_tag_is_a_plain_file_name_part(tag, ok):
    from p2pfed.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", "scale"]).tag is None  # no tag: the plain <suite>-<date> name
    if ok:
        assert parser.parse_args(["bench", "scale", "--tag", tag]).tag == tag
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "scale", "--tag", tag])
