"""Config loading: defaults, overrides, extends, and one clear error per bad input."""

from pathlib import Path

import pytest

from p2pfed.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_demo_config_loads_with_overrides():
    config = load_config(ROOT / "launch/configs/demo.toml", ["gossip.mode=allreduce", "run.rounds=3", "lora.target_modules=['q_proj']"])
    assert config.gossip.mode == "allreduce"
    assert config.run.rounds == 3
    assert config.lora.target_modules == ["q_proj"]
    assert config.model.name == "smollm2-135m"


def test_extends_merges_sections():
    config = load_config(ROOT / "launch/configs/demo-local.toml")
    assert config.gossip.mode == "local"
    assert config.lora.r == 8 and config.run.out == "runs/demo-local"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[lora]\nrank = 8\n", "[lora] rank: unknown setting"),
        ("[lora]\nr = 'eight'\n", "[lora] r: expected an integer"),
        ("[nonsense]\nx = 1\n", "unknown section [nonsense]"),
        ("[gossip]\nmode = 'broadcast'\n", "[gossip] mode: expected one of gossip, allreduce, local"),
        ("[run]\npeers = 0\n", "[run] peers: expected a number >= 1"),
        ("[data]\nsource = 'jsonl'\npath = 'data.jsonl'\n", "needs a path template with {rank}"),
        ("[run\npeers = 2\n", "not valid TOML"),
        ("extends = 'missing.toml'\n", "extends"),
        ("[gossip]\ncodec = 'int8+topk'\n", "[gossip] codec: expected a value encoding"),
        ("[gossip]\nalgorithm = 'choco'\nerror_feedback = 'off'\n", "CHOCO-gossip always carries"),
        ("[gossip]\ngamma = 1.5\n", "[gossip] gamma: expected a number in (0, 1]"),
        ("[codec]\nfraction = 0.0\n", "[codec] fraction: expected a number in (0, 1]"),
        ("[codec]\nrank = 0\n", "[codec] rank: expected a number >= 1"),
    ],
)
def test_bad_config_gives_one_clear_sentence(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and expected in message
    assert "\n" not in message


def test_bad_override_is_named():
    with pytest.raises(ConfigError, match="override 'rounds=3'"):
        load_config(ROOT / "launch/configs/demo.toml", ["rounds=3"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.toml")
