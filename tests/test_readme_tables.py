"""The README's result tables are the results files' own: every marked block equals what its
file gives today, and a figure edited by hand (or a results file replaced) is caught."""

import pytest

from p2pfed.benchrobust import pivot_table
from p2pfed.readmetables import TablesError, render, stale

from conftest import ROOT


def test_every_readme_results_block_matches_its_results_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("<!-- results: ") >= 8  # secure, robust, full, compression blocks are all generated
    assert stale(readme, ROOT) == []


def test_a_figure_typed_by_hand_is_caught_and_regenerated(tmp_path):
    results = tmp_path / "r.md"
    results.write_text("# suite\n\n| a | b |\n|---|---|\n| x | 1.00 |\n\nGoal: met.\n", encoding="utf-8")
    readme = "intro\n<!-- results: r.md table 1 -->\n| a | b |\n|---|---|\n| x | 0.99 |\n<!-- /results -->\n<!-- results: r.md line Goal -->\nGoal: met.\n<!-- /results -->\n"
    assert [d.view for d in stale(readme, tmp_path)] == ["table 1"]
    fixed = render(readme, tmp_path)
    assert "| x | 1.00 |" in fixed and "0.99" not in fixed and stale(fixed, tmp_path) == []
    with pytest.raises(TablesError, match="has 1 tables, not 2"):
        render(readme.replace("table 1", "table 2"), tmp_path)
    with pytest.raises(TablesError, match="no such results file"):
        render(readme.replace("r.md table", "gone.md table"), tmp_path)


def test_robust_pivot_gaps_are_against_the_no_attack_no_defence_run():
    def row(attack, rule, ppl=None, error=None):
        return {"cell": ["exponential", 1, attack, rule], "honest_ppl": ppl, "error": error, "config": {"run": {"peers": 8}}}

    rows = [row(None, "none", 40.0), row(None, "clip", 40.2), row("scale", "none", 50.0), row("scale", "clip", 40.4),
            row("scale", "median", error="needs 4 neighbours")]
    table = pivot_table(rows, "exponential").splitlines()
    assert table[0] == "| attack (1 of 8 peers) | no defence | ClippedGossip | median |"
    assert table[2] == "| none | +0.00% | +0.50% | - |"  # 40.2 / 40 - 1
    assert table[4] == "| scale | +25.00% | +1.00% | refused |"  # 50 / 40 - 1, 40.4 / 40 - 1


def test_a_run_that_blew_up_reads_as_diverged_not_as_a_twenty_digit_percentage():
    rows = [{"cell": ["exponential", 1, None, "none"], "honest_ppl": 40.0, "config": {"run": {"peers": 8}}},
            {"cell": ["exponential", 1, "scale", "none"], "honest_ppl": 1.3e18, "config": {"run": {"peers": 8}}},
            {"cell": ["exponential", 1, "scale", "clip"], "honest_ppl": 3999.0, "config": {"run": {"peers": 8}}}]
    table = pivot_table(rows, "exponential").splitlines()
    assert table[4] == "| scale | diverged (ppl 1.3e+18) | +9897.50% |"  # 100x the reference is the line (3999 / 40 - 1 is not)
