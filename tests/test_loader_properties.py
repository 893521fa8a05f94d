"""Property-based tests: random mutations of valid config and topology files give either a
valid result or one clear line naming the file, never an uncaught exception."""

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfed.config import ConfigError, load_config
from p2pfed.topology import TopologyError, load_topology

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["launch/configs/demo.toml", "launch/configs/tiny.toml", "launch/configs/demo-secure.toml"]
TOPOLOGIES = ["topologies/ring.toml", "topologies/torus16.toml", "topologies/edges-example.toml", "topologies/erdos-renyi16.toml",
              "topologies/onepeer-exponential.toml"]
VALUES = st.one_of(st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text(max_size=12), st.lists(st.integers(-2, 20), max_size=4), st.just("[[0, 1], [1, 2]]"))


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, "nan" if value != value else repr(value))
    if isinstance(value, str) and value.startswith("[["):
        return value
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return str(value).replace("'", '"')


@st.composite
def mutated(draw, files: list[str]) -> str:
    """A valid file's text with a few random edits: values replaced, lines dropped or doubled, junk inserted."""
    lines = (ROOT / draw(st.sampled_from(files))).read_text().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["value", "drop", "double", "junk", "rename"]))
        line = lines[index]
        if kind == "value" and "=" in line and not line.lstrip().startswith("#"):
            lines[index] = line.split("=", 1)[0] + "= " + toml_value(draw(VALUES))
        elif kind == "drop":
            lines.pop(index)
        elif kind == "double":
            lines.insert(index, line)
        elif kind == "junk":
            lines[index] = line[: draw(st.integers(0, len(line)))] + draw(st.text(max_size=6))
        elif kind == "rename" and "=" in line:
            lines[index] = draw(st.sampled_from(["n", "peers", "weights", "generator", "edges", "file", "zz", "rank"])) + " =" + line.split("=", 1)[1]
        if not lines:
            break
    return "\n".join(lines) + "\n"


def one_clear_line(message: str, path: Path) -> None:
    assert "\n" not in message.strip(), message
    assert str(path) in message or path.name in message, message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated(CONFIGS))
def test_mutated_configs_load_or_fail_in_one_line(tmp_path, text):
    path = tmp_path / "mutated.toml"
    path.write_text(text)
    (tmp_path / "demo.toml").write_text((ROOT / "launch/configs/demo.toml").read_text())  # for `extends`
    try:
        load_config(path)
    except ConfigError as err:
        one_clear_line(str(err), path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated(TOPOLOGIES), peers=st.integers(1, 20))
def test_mutated_topologies_load_or_fail_in_one_line(tmp_path, text, peers):
    path = tmp_path / "mutated.toml"
    path.write_text(text)
    try:
        load_topology(path, peers)
    except TopologyError as err:
        one_clear_line(str(err), path)
