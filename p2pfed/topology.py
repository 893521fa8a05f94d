"""Topology files -> networkx graphs (static or one per round) -> mixing matrices.

A topology file is TOML. It names a generator with parameters, lists edges, or points at
a file networkx reads. Mixing weights are Metropolis-Hastings by default. Every check
that fails raises `TopologyError` with the file name and the problem in one sentence.

Convention: ``W[i, j]`` is the weight peer i gives to peer j's vector, so peer i
receives from every j != i with ``W[i, j] > 0`` and mixes ``x_i <- sum_j W[i, j] x_j``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import networkx as nx
import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Rank = int
Round = int

WEIGHT_SCHEMES = ("metropolis", "max-degree", "edge")
_KNOWN_KEYS = {"generator", "n", "edges", "file", "weights", "p", "seed", "d", "rows", "cols", "name"}


class TopologyError(ValueError):
    """A topology file is invalid or does not fit the run; the message names the file."""


@dataclass(frozen=True)
class TopologySpec:
    """What a topology file says, before it is built for a number of peers."""

    source: str
    generator: str | None = None
    n: int | None = None
    edges: list[list[float]] | None = None
    file: Path | None = None
    weights: str = "metropolis"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Topology:
    """Built topology: one mixing matrix per round of a period (period 1 = static)."""

    source: str
    graphs: list[nx.Graph]
    matrices: list[np.ndarray]
    _mixing_rate: float | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.matrices[0].shape[0]

    @property
    def period(self) -> int:
        return len(self.matrices)

    @property
    def time_varying(self) -> bool:
        return self.period > 1

    def graph(self, round: Round) -> nx.Graph:
        return self.graphs[round % self.period]

    def weights(self, round: Round) -> np.ndarray:
        return self.matrices[round % self.period]

    def in_neighbours(self, rank: Rank, round: Round) -> list[Rank]:
        """Peers whose vectors `rank` mixes this round (it receives from them)."""
        row = self.weights(round)[rank]
        return [int(j) for j in np.flatnonzero(row > 0) if j != rank]

    def out_neighbours(self, rank: Rank, round: Round) -> list[Rank]:
        """Peers that mix `rank`'s vector this round (it sends to them)."""
        col = self.weights(round)[:, rank]
        return [int(i) for i in np.flatnonzero(col > 0) if i != rank]

    def mixing_rate(self) -> float:
        """Per-round contraction of the disagreement: ||prod_t W_t - J||_2 ** (1/period).
        Computed once (an SVD of n x n: every simulated peer shares this object and asks)."""
        if self._mixing_rate is not None:
            return self._mixing_rate
        product = np.eye(self.n)
        for matrix in self.matrices:
            product = matrix @ product
        rate = np.linalg.norm(product - np.full((self.n, self.n), 1.0 / self.n), 2)
        self._mixing_rate = float(max(rate, 0.0) ** (1.0 / self.period))
        return self._mixing_rate

    def spectral_gap(self) -> float:
        """1 - mixing rate; for a static symmetric W this is 1 - |second eigenvalue|."""
        return 1.0 - self.mixing_rate()


def load_spec(path: str | Path) -> TopologySpec:
    """Read and check the keys of a topology TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TopologyError(f"{path}: topology file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TopologyError(f"{path}: cannot read topology file ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise TopologyError(f"{path}: not valid TOML ({err})") from None
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise TopologyError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(_KNOWN_KEYS))}")
    sources = [key for key in ("generator", "edges", "file") if key in raw]
    if len(sources) != 1:
        raise TopologyError(f"{path}: expected exactly one of 'generator', 'edges' or 'file', got {sources or 'none'}")
    weights = raw.get("weights", "metropolis")
    if weights not in WEIGHT_SCHEMES:
        raise TopologyError(f"{path}: weights: expected one of {', '.join(WEIGHT_SCHEMES)}, got {weights!r}")
    n = raw.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise TopologyError(f"{path}: n: expected a positive integer, got {n!r}")
    params = {k: raw[k] for k in ("p", "seed", "d", "rows", "cols") if k in raw}
    generator = raw.get("generator")
    if generator is not None:
        if not isinstance(generator, str) or generator.replace("-", "_") not in GENERATORS:
            raise TopologyError(f"{path}: generator: expected one of {', '.join(GENERATORS)}, got {generator!r}")
        generator = generator.replace("-", "_")
    edges = raw.get("edges")
    if edges is not None and not _valid_edge_list(edges):
        raise TopologyError(f"{path}: edges: expected a list of [i, j] or [i, j, weight] with integer node ids")
    file = raw.get("file")
    if file is not None:
        if not isinstance(file, str):
            raise TopologyError(f"{path}: file: expected a path string, got {file!r}")
        file = (path.parent / file) if not Path(file).is_absolute() else Path(file)
    return TopologySpec(source=str(path), generator=generator, n=n, edges=edges, file=file, weights=weights, params=params)


def _valid_edge_list(edges: Any) -> bool:
    if not isinstance(edges, list):
        return False
    for edge in edges:
        if not isinstance(edge, list) or len(edge) not in (2, 3):
            return False
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in edge[:2]):
            return False
        if len(edge) == 3 and (isinstance(edge[2], bool) or not isinstance(edge[2], (int, float))):
            return False
    return True


# --- generators: each returns one graph (static) or a list of graphs (one per round) ---


def _ring(n: int, params: dict) -> nx.Graph:
    return nx.cycle_graph(n) if n > 2 else nx.path_graph(n)


def _torus(n: int, params: dict) -> nx.Graph:
    rows = params.get("rows") or _squarest_factor(n)
    cols = params.get("cols") or n // rows
    if rows * cols != n:
        raise ValueError(f"a torus of {rows}x{cols} has {rows * cols} nodes, not {n}")
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    nx.set_node_attributes(grid, {(r, c): (float(c), -float(r)) for r, c in grid.nodes}, "pos")  # drawn as the grid it is
    return nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})


def _squarest_factor(n: int) -> int:
    return max(f for f in range(1, int(math.isqrt(n)) + 1) if n % f == 0)


def _hypercube(n: int, params: dict) -> nx.Graph:
    dim = n.bit_length() - 1
    if n < 2 or 2**dim != n:
        raise ValueError(f"a hypercube needs a power-of-two number of nodes, not {n}")
    cube = nx.hypercube_graph(dim)
    nx.set_node_attributes(cube, {bits: _cube_position(bits) for bits in cube.nodes}, "pos")
    return nx.relabel_nodes(cube, {bits: int("".join(map(str, bits)), 2) for bits in cube.nodes})


def _cube_position(bits: tuple[int, ...]) -> tuple[float, float]:
    """A hypercube drawn as cubes in perspective: bits 0, 1, 2 step right, up and into the
    page; each further three bits repeat that at 2.2 times the size, so no two nodes meet."""
    steps = ((1.0, 0.0), (0.0, 1.0), (0.45, 0.3))
    x = y = 0.0
    for i, bit in enumerate(reversed(bits)):
        scale = 2.2 ** (i // 3)
        x += bit * scale * steps[i % 3][0]
        y += bit * scale * steps[i % 3][1]
    return x, y


def _complete(n: int, params: dict) -> nx.Graph:
    return nx.complete_graph(n)


def _star(n: int, params: dict) -> nx.Graph:
    return nx.star_graph(n - 1)


def _erdos_renyi(n: int, params: dict) -> nx.Graph:
    if "p" not in params:
        raise ValueError("erdos_renyi needs p (edge probability)")
    return nx.erdos_renyi_graph(n, float(params["p"]), seed=params.get("seed", 0))


def _random_regular(n: int, params: dict) -> nx.Graph:
    if "d" not in params:
        raise ValueError("random_regular needs d (degree)")
    return nx.random_regular_graph(int(params["d"]), n, seed=params.get("seed", 0))


def _exponential(n: int, params: dict) -> nx.Graph:
    """Static exponential graph: i links to i + 2^k (mod n) for every 2^k < n."""
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        hop = 1
        while hop < n:
            if (i + hop) % n != i:
                graph.add_edge(i, (i + hop) % n)
            hop *= 2
    return graph


def _onepeer_exponential(n: int, params: dict) -> list[nx.DiGraph]:
    """One-peer exponential (Ying et al. 2021): in round t, i sends to i + 2^(t mod log2 n).

    Averages exactly after log2(n) rounds only when n is a power of two.
    """
    if n < 2:
        raise ValueError("one-peer exponential needs at least 2 nodes")
    period = max(1, math.ceil(math.log2(n)))
    graphs = []
    for k in range(period):
        graph = nx.DiGraph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from((i, (i + 2**k) % n) for i in range(n))
        graphs.append(graph)
    return graphs


GENERATORS: dict[str, Callable[[int, dict], nx.Graph | list[nx.DiGraph]]] = {
    "ring": _ring,
    "torus": _torus,
    "hypercube": _hypercube,
    "complete": _complete,
    "star": _star,
    "erdos_renyi": _erdos_renyi,
    "random_regular": _random_regular,
    "exponential": _exponential,
    "onepeer_exponential": _onepeer_exponential,
}


def graphs_from_spec(spec: TopologySpec, n_peers: int) -> list[nx.Graph]:
    if spec.generator is not None:
        n = spec.n if spec.n is not None else n_peers
        try:
            built = GENERATORS[spec.generator](n, spec.params)
        except (ValueError, TypeError, KeyError, nx.NetworkXError) as err:  # a parameter of the wrong kind or missing
            raise TopologyError(f"{spec.source}: generator {spec.generator}: bad or missing parameter ({type(err).__name__}: {err}); "
                                f"got {spec.params}") from None
        return built if isinstance(built, list) else [built]
    if spec.edges is not None:
        graph = nx.Graph()
        for edge in spec.edges:
            graph.add_edge(edge[0], edge[1], **({"weight": float(edge[2])} if len(edge) == 3 else {}))
        if spec.n is not None:
            graph.add_nodes_from(range(spec.n))
        return [graph]
    return [_read_graph_file(spec)]


def _read_graph_file(spec: TopologySpec) -> nx.Graph:
    path = spec.file
    assert path is not None
    try:
        if path.suffix.lower() == ".graphml":
            graph = nx.read_graphml(path)
            graph = nx.relabel_nodes(graph, {v: int(v) for v in graph.nodes})
        else:
            graph = nx.read_edgelist(path, nodetype=int, data=(("weight", float),))
    except FileNotFoundError:
        raise TopologyError(f"{spec.source}: graph file {path} not found") from None
    except (ValueError, TypeError, IndexError, nx.NetworkXError, SyntaxError) as err:
        raise TopologyError(f"{spec.source}: cannot read graph file {path} as {'GraphML' if path.suffix.lower() == '.graphml' else 'an edge list (i j [weight] per line)'} ({err})") from None
    return nx.Graph(graph) if not graph.is_directed() else graph


def _check_graphs(spec: TopologySpec, graphs: list[nx.Graph], n_peers: int) -> None:
    n = graphs[0].number_of_nodes()
    for graph in graphs:
        if sorted(graph.nodes) != list(range(graph.number_of_nodes())):
            raise TopologyError(f"{spec.source}: nodes must be 0..n-1, got {sorted(graph.nodes)[:10]}")
        loops = list(nx.selfloop_edges(graph))
        if loops:
            raise TopologyError(f"{spec.source}: self-loop at node {loops[0][0]}; self-weights come from the mixing rule, not edges")
    if n != n_peers:
        raise TopologyError(f"{spec.source}: the topology has {n} nodes but {n_peers} peers were launched")
    union = nx.compose_all([nx.DiGraph(g) for g in graphs])
    if not nx.is_strongly_connected(union):
        parts = len(list(nx.strongly_connected_components(union)))
        over = " over one period" if len(graphs) > 1 else ""
        raise TopologyError(f"{spec.source}: the graph is not connected{over} ({parts} components); gossip would never reach consensus")


def _mixing_matrix(spec: TopologySpec, graph: nx.Graph) -> np.ndarray:
    n = graph.number_of_nodes()
    matrix = np.zeros((n, n))
    if graph.is_directed():  # one-peer style: each peer averages itself with its in-neighbours
        for i in range(n):
            senders = list(graph.predecessors(i))
            for j in senders:
                matrix[i, j] = 1.0 / (len(senders) + 1)
    else:
        degree = dict(graph.degree)
        max_degree = max(degree.values())
        for i, j, data in graph.edges(data=True):
            if spec.weights == "metropolis":
                w = 1.0 / (1 + max(degree[i], degree[j]))
            elif spec.weights == "max-degree":
                w = 1.0 / (1 + max_degree)
            else:
                if "weight" not in data:
                    raise TopologyError(f"{spec.source}: weights = 'edge' but edge ({i}, {j}) has no weight")
                w = float(data["weight"])
                if w <= 0:
                    raise TopologyError(f"{spec.source}: edge ({i}, {j}) has weight {w}; expected a positive number")
            matrix[i, j] = matrix[j, i] = w
    for i in range(n):
        matrix[i, i] = 1.0 - matrix[i].sum()
        if matrix[i, i] <= 1e-12:
            raise TopologyError(f"{spec.source}: node {i} has self-weight {matrix[i, i]:.3g}; edge weights of a node must sum to less than 1")
    return matrix


def _check_doubly_stochastic(spec: TopologySpec, matrix: np.ndarray) -> None:
    if not (np.allclose(matrix.sum(axis=0), 1.0, atol=1e-9) and np.allclose(matrix.sum(axis=1), 1.0, atol=1e-9)):
        raise TopologyError(f"{spec.source}: mixing weights are not doubly stochastic (row sums {matrix.sum(axis=1).round(4)}, column sums {matrix.sum(axis=0).round(4)})")


def build_topology(spec: TopologySpec, n_peers: int) -> Topology:
    """Build the graphs and mixing matrices of `spec` for `n_peers` peers, with all checks."""
    graphs = graphs_from_spec(spec, n_peers)
    _check_graphs(spec, graphs, n_peers)
    matrices = [_mixing_matrix(spec, g) for g in graphs]
    for matrix in matrices:
        _check_doubly_stochastic(spec, matrix)
    return Topology(source=spec.source, graphs=graphs, matrices=matrices)


def load_topology(path: str | Path, n_peers: int) -> Topology:
    """Read a topology file and build it for `n_peers` peers."""
    return build_topology(load_spec(path), n_peers)


def describe(topology: Topology) -> str:
    """A few lines a person reads: size, degrees, period, spectral gap."""
    degrees = [len(topology.in_neighbours(i, 0)) for i in range(topology.n)]
    lines = [
        f"topology   {topology.source}",
        f"peers      {topology.n}",
        f"period     {topology.period} round(s){' (time-varying)' if topology.time_varying else ''}",
        f"degree     min {min(degrees)}, mean {np.mean(degrees):.2f}, max {max(degrees)} (round 0, in-neighbours)",
        f"spectral gap {topology.spectral_gap():.4f}  (per-round mixing rate {topology.mixing_rate():.4f})",
    ]
    if topology.time_varying and topology.n & (topology.n - 1):
        lines.append(f"note       n = {topology.n} is not a power of two: one-peer exponential does not average exactly after {topology.period} rounds")
    return "\n".join(lines)


def layout(graph: nx.Graph) -> dict[int, tuple[float, float]]:
    """Where to draw each node: the generator's own geometry (a torus as a grid, a hypercube as
    nested cubes) when it left one on every node, else a circle (rings, random graphs)."""
    pos = nx.get_node_attributes(graph, "pos")
    return pos if len(pos) == graph.number_of_nodes() and graph.number_of_nodes() else nx.circular_layout(graph)


def draw(topology: Topology, png: str | Path, node_values: dict[int, float] | None = None, label: str = "") -> None:
    """Draw the round-0 graph to a PNG; optional per-node values colour the nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = topology.graph(0)
    fig, ax = plt.subplots(figsize=(5, 5))
    pos = layout(graph)
    colours = [node_values[i] for i in graph.nodes] if node_values else "#8fb8de"
    nodes = nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colours, node_size=500, **({"cmap": "viridis"} if node_values else {}))
    wraps = [(a, b) for a, b in graph.edges if "pos" in graph.nodes[a] and math.dist(pos[a], pos[b]) > 1.5]  # a torus's wrap-around
    nx.draw_networkx_edges(graph, pos, ax=ax, edgelist=[e for e in graph.edges if e not in wraps], arrows=graph.is_directed(), alpha=0.6)
    if wraps:  # curved, so they do not lie on top of the grid's own edges
        nx.draw_networkx_edges(graph, pos, ax=ax, edgelist=wraps, arrows=True, arrowstyle="-", connectionstyle="arc3,rad=0.25",
                               alpha=0.35, style="dashed")
    nx.draw_networkx_labels(graph, pos, ax=ax, font_size=9)
    if node_values:
        fig.colorbar(nodes, ax=ax, label=label)
    ax.set_title(f"{Path(topology.source).name}: n={topology.n}, spectral gap {topology.spectral_gap():.3f}")
    ax.axis("off")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
