"""Reports and notebooks on a run directory that a tiny run here produces: every figure is
saved, several runs overlay, and a directory that is not a run gets one clear sentence."""

from pathlib import Path

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, TINY, run_cli
from p2pfed.analysis import AnalysisError, consensus_rates, load_run, shipped_topologies

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]
NOTEBOOKS = ["convergence", "consensus", "communication", "topologies"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """A gossip run and a compressed one, 3 rounds each on the tiny model."""
    base = tmp_path_factory.mktemp("runs")
    made = []
    for name, extra in (("ring-fp32", []), ("ring-topk", ["gossip.codec=topk+int8"])):
        out = base / name
        result = run_cli("run", str(TINY), f"run.out={out}", "run.rounds=3", "run.eval_every=1", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        made.append(out)
    return made


def test_report_writes_the_summary_and_every_plot_for_several_runs(runs, tmp_path):
    out = tmp_path / "report"
    result = run_cli("report", *map(str, runs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = (out / "report.md").read_text()
    for name in ("losses.png", "consensus.png", "bytes.png", "time.png", "topology-ring-fp32.png", "topology-ring-topk.png"):
        assert (out / name).stat().st_size > 5000, name  # a drawn figure, not an empty canvas
        assert f"]({name})" in text
    assert "| ring-fp32 | gossip | fp32 |" in text and "| ring-topk | gossip | topk+int8 |" in text


def test_report_names_a_directory_that_is_not_a_run(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 1
    assert "no metrics/peer*.jsonl" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(AnalysisError, match=str(tmp_path)):
        load_run(tmp_path)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_run_top_to_bottom_and_save_their_figures(name, runs, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("P2PFED_RUN_DIR", str(runs[0]))
    monkeypatch.setenv("P2PFED_FIGURES", str(figures))
    monkeypatch.setenv("P2PFED_TOPOLOGIES", str(ROOT / "topologies"))
    notebook = nbformat.read(ROOT / "analysis" / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "outputs must be stripped in git"
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "analysis")}}).execute()
    saved = sorted(p.name for p in figures.glob("*.png"))
    drawn = sum(cell.source.count("savefig") for cell in notebook.cells if cell.cell_type == "code")
    assert len(saved) == drawn and drawn > 0


def test_measured_consensus_speed_follows_the_spectral_gap():
    rows = consensus_rates(shipped_topologies(ROOT / "topologies", 16), 16, rounds=40)
    names = {r["topology"] for r in rows}
    assert {"ring", "torus16", "exponential", "onepeer-exponential"} <= names
    for row in rows:
        if row["predicted_rate"] > 0.05:  # graphs that do not average exactly in a few rounds
            assert row["measured_rate"] == pytest.approx(row["predicted_rate"], abs=0.03), row["topology"]
        else:
            assert row["measured_rate"] < 0.05, row["topology"]


def test_bytes_to_target_counts_a_peers_bytes_until_the_perplexity_first_comes_within_one_percent(tmp_path):
    """Two peers; global ppl (mean over peers) 50 -> 44 -> 40.3 -> 40.1 at rounds 0, 2, 4, 6 and
    bytes 100 per round each: against a target of 40.0 the first round within 1% (<= 40.4)
    is round 4, so each peer sent 4 x 100 bytes by then; a target of 30 is never reached."""
    from p2pfed.analysis import bytes_to_target, load_run

    ppl = {0: 50.0, 2: 44.0, 4: 40.3, 6: 40.1}
    (tmp_path / "metrics").mkdir()
    for rank in (0, 1):
        lines = []
        for round in range(7):
            row = {"rank": rank, "round": round, "bytes_sent": 0 if round == 0 else 100}
            if round in ppl:
                row["global_ppl"] = ppl[round] + (0.1 if rank else -0.1)  # the mean is ppl[round]
            lines.append(json.dumps(row))
        (tmp_path / "metrics" / f"peer{rank}.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(tmp_path)
    assert bytes_to_target(run, 40.0) == 400.0
    assert bytes_to_target(run, 30.0) is None
