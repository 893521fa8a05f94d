"""`p2pfed simulate`: all peers of a run as threads of one process, one frozen base model.

Each thread runs the same `p2pfed.peer.run` a torchrun process does, with the shared model
in place of its own copy and an in-process transport in place of torch.distributed: run
directory, metrics, checkpoints and summary come out as a torchrun run's."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from p2pfed.config import Config
from p2pfed.memory import keep_freed_memory
from p2pfed.model import load_base, wrap_lora
from p2pfed.simulate.baton import Baton
from p2pfed.topology import load_topology
from p2pfed.simulate.network import Network
from p2pfed.simulate.transport import SimTransport
from p2pfed.transport import LocalHub

WAIT_S = 7 * 24 * 3600.0
"""A simulated peer waits for its neighbours' turns on the model, however many there are:
no timeout but a peer's death (which the hub announces to the others)."""


@dataclass
class SharedModel:
    """The one base model with its LoRA wrapper that every simulated peer computes on, and
    what every peer would read alike from disk (topology, roster): read once, not N times."""

    model: Any
    tokenizer: Any
    baton: Baton
    topology: Any = None
    roster: Any = None


@dataclass
class Simulation:
    rows: list[dict[str, Any] | None]
    wall_s: float
    swaps: int
    per_peer_bytes: int
    rss_base_bytes: int
    """Resident memory once the shared model is loaded, before any peer starts."""
    rss_peak_bytes: int
    """The process's peak resident memory (getrusage): base model plus every peer's state."""

    def record(self, peers: int) -> dict[str, Any]:
        """What simulation.json holds beside the run's own summary (bench scale reads it)."""
        return {"peers": peers, "wall_s": self.wall_s, "swaps": self.swaps, "adapter_bytes_per_peer": self.per_peer_bytes,
                "rss_base_bytes": self.rss_base_bytes, "rss_peak_bytes": self.rss_peak_bytes}


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_resident_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def shared_model(config: Config, device: torch.device) -> SharedModel:
    from p2pfed.identity import Roster
    from p2pfed.peer import key_paths

    base, tokenizer = load_base(config.model)
    model = wrap_lora(base, config.lora, config.run.seed).to(device)
    topology = roster = None
    if config.gossip.mode == "gossip":
        topology = load_topology(config.gossip.topology, config.run.peers)
        roster = Roster.load(key_paths(config)[0])
    return SharedModel(model, tokenizer, Baton([p for p in model.parameters() if p.requires_grad]), topology, roster)


def simulate(config: Config, device: torch.device | None = None) -> Simulation:
    """Run every peer of `config` to the end; the first peer error (not a neighbour's
    consequent stop) is re-raised."""
    from p2pfed.peer import run

    device = device or torch.device("cpu")
    keep_freed_memory(one_arena=True)
    shared = shared_model(config, device)
    rss_base = resident_bytes()
    hub = LocalHub(config.run.peers, timeout_s=WAIT_S)
    network = Network(config.network, config.run.seed)
    rows: list[dict[str, Any] | None] = [None] * config.run.peers
    errors: dict[int, BaseException] = {}
    started = time.perf_counter()

    def peer(rank: int) -> None:
        shared.baton.acquire(rank)
        try:
            rows[rank] = run(config, SimTransport(hub.transport(rank), shared.baton, network), device, shared)
        except BaseException as err:  # noqa: BLE001 (a dead thread must not leave the others waiting)
            errors[rank] = err
            hub.fail(f"peer {rank} failed ({type(err).__name__}: {err})")
        finally:
            shared.baton.release()

    threads = [threading.Thread(target=peer, args=(rank,), name=f"p2pfed-peer{rank}", daemon=True) for rank in range(config.run.peers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the first recorded is the cause: the others stopped after it announced itself (hub.fail)
        raise next(iter(errors.values()))
    return Simulation(rows, time.perf_counter() - started, shared.baton.swaps, shared.baton.per_peer_bytes(), rss_base, peak_resident_bytes())
