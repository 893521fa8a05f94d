"""Topologies: shipped files build, weights are doubly stochastic, gaps match closed forms."""

import math
from pathlib import Path

import numpy as np
import pytest

from p2pfed.topology import TopologyError, build_topology, describe, draw, load_spec, load_topology

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "topologies").glob("*.toml"))
REQUIRED = ["ring8", "torus16", "hypercube8", "exponential8", "onepeer-exponential8", "erdos-renyi16", "complete8", "edges-example"]


def built(path: Path, default_n: int = 6):
    spec = load_spec(path)
    if spec.n is not None:
        n = spec.n
    elif spec.generator is not None:
        n = default_n
    else:  # explicit edges / files fix their own size
        from p2pfed.topology import graphs_from_spec

        n = graphs_from_spec(spec, 0)[0].number_of_nodes()
    return build_topology(spec, n)


def test_required_files_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("n", [4, 8, 16])  # files that leave n open: the sizes the benchmark suites run
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_topologies_are_doubly_stochastic_with_self_weight(path, n):
    topology = built(path, default_n=n)
    for t in range(topology.period):
        w = topology.weights(t)
        assert np.allclose(w.sum(axis=0), 1) and np.allclose(w.sum(axis=1), 1)
        assert (np.diag(w) > 0).all() and (w >= 0).all()
    assert 0 < topology.spectral_gap() <= 1 + 1e-9


@pytest.mark.parametrize("n", [4, 5, 8, 12])
def test_ring_gap_matches_closed_form(tmp_path, n):
    topology = load_topology(ROOT / "topologies/ring.toml", n)
    # Metropolis on a ring: W = (I + P + P^T)/3, eigenvalues 1/3 + 2/3 cos(2 pi k / n).
    slem = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n))
    assert topology.spectral_gap() == pytest.approx(1 - slem, abs=1e-9)


def test_complete_and_hypercube_gaps():
    assert load_topology(ROOT / "topologies/complete8.toml", 8).spectral_gap() == pytest.approx(1.0, abs=1e-9)
    # Hypercube of dimension d: W = (I + A)/(d+1), adjacency eigenvalues d - 2k, so SLEM = (d-1)/(d+1).
    assert load_topology(ROOT / "topologies/hypercube8.toml", 8).spectral_gap() == pytest.approx(1 - 2 / 4, abs=1e-9)


def test_onepeer_exponential_averages_exactly_for_powers_of_two():
    topology = load_topology(ROOT / "topologies/onepeer-exponential8.toml", 8)
    assert topology.period == 3 and topology.time_varying
    product = topology.weights(2) @ topology.weights(1) @ topology.weights(0)
    assert np.allclose(product, np.full((8, 8), 1 / 8))
    assert all(len(topology.in_neighbours(i, t)) == 1 for i in range(8) for t in range(3))
    six = load_topology(ROOT / "topologies/onepeer-exponential.toml", 6)
    assert six.spectral_gap() < 1 and "not a power of two" in describe(six)


def test_in_and_out_neighbours_are_consistent():
    topology = load_topology(ROOT / "topologies/onepeer-exponential8.toml", 8)
    for t in range(3):
        for i in range(8):
            assert all(i in topology.in_neighbours(k, t) for k in topology.out_neighbours(i, t))


def test_explicit_edge_weights_are_used():
    topology = built(ROOT / "topologies/edges-example.toml")
    w = topology.weights(0)
    assert w[2, 3] == pytest.approx(0.2) and w[2, 2] == pytest.approx(1 - 0.3 - 0.3 - 0.2)


def test_graph_file_topology(tmp_path):
    (tmp_path / "g.graphml").write_text(
        '<graphml xmlns="http://graphml.graphdrawing.org/xmlns"><graph edgedefault="undirected">'
        '<node id="0"/><node id="1"/><node id="2"/><edge source="0" target="1"/><edge source="1" target="2"/>'
        "</graph></graphml>"
    )
    (tmp_path / "t.toml").write_text('file = "g.graphml"\nweights = "max-degree"\n')
    topology = load_topology(tmp_path / "t.toml", 3)
    assert topology.weights(0)[0, 1] == pytest.approx(1 / 3)


def write(tmp_path, text):
    path = tmp_path / "topo.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("edges = [[0, 1], [2, 3]]\n", 4, "not connected"),
        ('generator = "ring"\nn = 8\n', 4, "has 8 nodes but 4 peers were launched"),
        ('generator = "ring\n', 4, "not valid TOML"),
        ('generator = "moebius"\n', 4, "generator: expected one of"),
        ('generator = "hypercube"\n', 6, "power-of-two"),
        ("edges = [[0, 1], [1, 1], [1, 2]]\n", 3, "self-loop at node 1"),
        ("edges = [[0, 1], [1, 5]]\n", 3, "nodes must be 0..n-1"),
        ('edges = [[0, 1, 0.7], [1, 2, 0.7]]\nweights = "edge"\n', 3, "self-weight"),
        ('generator = "ring"\nweights = "uniform"\n', 4, "weights: expected one of"),
        ('file = "missing.edgelist"\n', 4, "not found"),
        ('generator = "ring"\ncolour = "red"\n', 4, "unknown key(s) colour"),
    ],
)
def test_bad_topology_gives_one_clear_sentence(tmp_path, text, n, expected):
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as err:
        load_topology(path, n)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_malformed_edge_list_file(tmp_path):
    (tmp_path / "bad.edgelist").write_text("0 1\n1 two\n")
    path = write(tmp_path, 'file = "bad.edgelist"\n')
    with pytest.raises(TopologyError, match="cannot read graph file"):
        load_topology(path, 3)


def test_draw_writes_png(tmp_path):
    topology = load_topology(ROOT / "topologies/torus16.toml", 16)
    draw(topology, tmp_path / "t.png", node_values={i: float(i) for i in range(16)}, label="ppl")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_topology_show_cli(tmp_path):
    from conftest import run_cli

    result = run_cli("topology", "show", str(ROOT / "topologies/hypercube8.toml"), "--png", str(tmp_path / "h.png"))
    assert result.returncode == 0, result.stderr
    assert "peers      8" in result.stdout and "spectral gap 0.5000" in result.stdout
    assert (tmp_path / "h.png").stat().st_size > 1000
    open_n = run_cli("topology", "show", str(ROOT / "topologies/ring.toml"))
    assert open_n.returncode == 1 and "pass --peers N" in open_n.stderr
    unasked = run_cli("topology", "show", str(ROOT / "topologies/ring.toml"), "--peers", "6", cwd=tmp_path)
    assert unasked.returncode == 0 and list(tmp_path.glob("*.png")) == [tmp_path / "h.png"]  # no drawing unless asked


def test_a_torus_is_laid_out_as_its_grid_and_a_hypercube_with_every_node_apart():
    from p2pfed.topology import layout

    torus = load_topology(ROOT / "topologies/torus16.toml", 16).graph(0)
    pos = layout(torus)
    assert {i: pos[i] for i in (0, 1, 5, 15)} == {0: (0.0, -0.0), 1: (1.0, -0.0), 5: (1.0, -1.0), 15: (3.0, -3.0)}  # node r*4+c at (c, -r)
    cube = load_topology(ROOT / "topologies/hypercube8.toml", 8).graph(0)
    spots = layout(cube)
    assert len(set(spots.values())) == 8  # no two nodes drawn on one spot
    assert spots[0] == (0.0, 0.0) and spots[1] == (1.0, 0.0) and spots[2] == (0.0, 1.0) and spots[4] == (0.45, 0.3)  # bits 0, 1, 2
    ring = load_topology(ROOT / "topologies/ring.toml", 6).graph(0)
    assert all(abs(x * x + y * y - 1) < 1e-6 for x, y in layout(ring).values())  # no geometry: the circle
