"""The bench harness's arithmetic and bookkeeping (the runs themselves are `make bench`)."""

import json

from p2pfed.bench import ROOT, find_finished_run, goal_line, secure_line, slug, table
from p2pfed.config import load_config, save_config


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


def test_a_finished_run_of_the_identical_config_is_found_and_others_are_not(tmp_path):
    base = ROOT / "launch/configs/tiny.toml"
    done = tmp_path / "runs" / "suite" / "01-x"
    done.mkdir(parents=True)
    save_config(load_config(base, [f"run.out={done}", "gossip.codec=int8"]), done / "config.json")
    (done / "summary.json").write_text(json.dumps({}))
    same = load_config(base, ["run.out=elsewhere", "gossip.codec=int8"]).to_dict()
    other = load_config(base, ["run.out=elsewhere", "gossip.codec=int4"]).to_dict()
    assert find_finished_run(tmp_path / "runs", same) == done
    assert find_finished_run(tmp_path / "runs", other) is None
    (done / "summary.json").unlink()  # an unfinished run is never reused
    assert find_finished_run(tmp_path / "runs", same) is None


def test_secure_line_reports_gap_bytes_and_mask_share():
    plain, secure = row("plain", 1000.0, 40.0), {**row("secure", 1010.0, 40.4), "mask_s": 0.02}
    assert secure_line([plain, secure]) == ("Secure averaging against row 1: secure: perplexity gap +1.00%, +1.000% bytes, "
                                            "masks 2.000% of a round.")
