"""Which code produced a run: the git commit and whether the tree was dirty, written next to
the run's config so a figure can be traced to the code behind it and a bench reuses a finished
run only when the code is the same."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CODE_FILE = "code.json"


PACKAGES = ("torch", "numpy", "transformers", "peft", "cryptography", "pycryptodome", "networkx", "dp-accounting")
"""The dependencies whose versions can change a figure; recorded and compared with the commit."""


def code_version(root: Path = ROOT) -> dict[str, Any]:
    """{'commit': 40 hex or None outside a git checkout, 'dirty': the tree differs from it
    (tracked changes, or files git does not ignore but nobody added), 'packages': versions}.
    Files under bench/results/ do not count: they are what benchmarks write (a suite run after
    another would otherwise always be "dirty"), never what produces a figure."""
    packages = package_versions()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": True, "packages": packages}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": any(not _is_output(path) for path in changed), "packages": packages}


def _is_output(path: str) -> bool:
    """A benchmark's own results (porcelain paths are relative to the root, quoted when odd)."""
    return path.strip('"').startswith(RESULTS_DIR)


RESULTS_DIR = "bench/results/"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def write_code_version(run_dir: Path, version: dict[str, Any] | None = None) -> dict[str, Any]:
    version = version or code_version()
    (run_dir / CODE_FILE).write_text(json.dumps(version) + "\n", encoding="utf-8")
    return version


def read_code_version(run_dir: Path) -> dict[str, Any]:
    """The run's recorded code, or an unknown one (a run from before provenance was recorded)."""
    try:
        stored = json.loads((run_dir / CODE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"commit": None, "dirty": True, "packages": {}}
    if not isinstance(stored, dict) or not isinstance(stored.get("commit"), (str, type(None))) or not isinstance(stored.get("packages"), dict):
        return {"commit": None, "dirty": True, "packages": {}}
    return {"commit": stored.get("commit"), "dirty": bool(stored.get("dirty", True)), "packages": stored["packages"]}


def same_clean_code(run_dir: Path, current: dict[str, Any]) -> bool:
    """A finished run may stand in for a new one only if both come from the same committed,
    clean code and the same package versions."""
    recorded = read_code_version(run_dir)
    return bool(current["commit"]) and not current["dirty"] and recorded == current


def describe(version: dict[str, Any]) -> str:
    if not version.get("commit"):
        return "unknown code"
    return version["commit"][:12] + (" (dirty tree)" if version.get("dirty") else "")
