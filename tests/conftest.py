"""Shared test helpers: real gloo peers spawned as processes, and the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.toml"


def spawn_peers(worker, world_size: int, tmp_path: Path, *args) -> None:
    """Run `worker(rank, world_size, store_path, *args)` in `world_size` real processes."""
    store = tmp_path / "store"
    mp.spawn(worker, args=(world_size, str(store), *args), nprocs=world_size, join=True)


def save_peer_result(out: str, rank: int, result: dict) -> None:
    """Inside a spawned peer: leave what it measured for the test to read."""
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def peer_results(directory: Path, world_size: int) -> list[dict]:
    """What every spawned peer saved with `save_peer_result`, in rank order."""
    return [json.loads((directory / f"{rank}.json").read_text()) for rank in range(world_size)]


def deterministic_identity(rank: int):
    """Keys derived from the rank, so every spawned process agrees on the roster without a file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from p2pfed.identity import Identity

    seed = bytes([rank + 1]) * 32
    return Identity(rank, Ed25519PrivateKey.from_private_bytes(seed), X25519PrivateKey.from_private_bytes(seed))


def join_gloo_group(rank: int, world: int, store: str, timeout_s: float | None = None):
    """Inside a spawned peer: join the gloo group; returns (transport, this peer's keys, roster)."""
    import datetime

    import torch.distributed as dist

    from p2pfed.identity import Roster
    from p2pfed.transport import TorchTransport

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    keys = [deterministic_identity(r) for r in range(world)]
    transport = TorchTransport() if timeout_s is None else TorchTransport(timeout_s=timeout_s)
    return transport, keys[rank], Roster({k.rank: k.public() for k in keys})


def on_threads(target, world_size: int) -> None:
    """Run `target(rank)` for every rank on its own thread (in-process peers) and wait for all."""
    import threading

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def identities(world_size: int):
    """Fresh keys for `world_size` peers and their roster (in memory)."""
    from p2pfed.identity import Roster, generate

    peers = [generate(rank) for rank in range(world_size)]
    return peers, Roster({p.rank: p.public() for p in peers})


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Call the installed `p2pfed` command the way a user does."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "p2pfed.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def tiny_config() -> Path:
    return TINY
