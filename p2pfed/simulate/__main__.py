"""``python -m p2pfed.simulate RESOLVED_CONFIG``: the simulator's own process, started by
`p2pfed simulate` / `p2pfed run` (run.engine = 'simulate') with SIMULATOR_ENV set before torch
loads; the run directory is ready."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): a signal this process gets when its parent dies."""


def die_with_parent() -> None:
    """The `p2pfed` command that started this process forwards Ctrl+C and SIGTERM; if it is
    killed outright (SIGKILL, a timeout), this process must not live on holding every peer.
    The parent names itself (P2PFED_PARENT_PID): it may have died while this one loaded torch."""
    import ctypes
    import ctypes.util
    import signal

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    parent = os.environ.get("P2PFED_PARENT_PID")
    if parent is not None and str(os.getppid()) != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    import torch

    from p2pfed.checkpoint import CheckpointError
    from p2pfed.config import load_config
    from p2pfed.peer import StopRequested
    from p2pfed.secure import SecureError
    from p2pfed.simulate import simulate
    from p2pfed.transport import TransportRefused, TransportTimeout

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m p2pfed.simulate RESOLVED_CONFIG (started by `p2pfed simulate`)", file=sys.stderr)
        return 2
    config = load_config(argv[0], [])
    torch.set_num_threads(config.run.threads or os.cpu_count() or 1)
    try:
        result = simulate(config)
    except StopRequested as err:
        print(f"p2pfed simulate: {err}", file=sys.stderr)
        return 130
    except (TransportTimeout, TransportRefused, CheckpointError, SecureError) as err:
        print(f"p2pfed simulate: {err}", file=sys.stderr)
        return 1
    out = Path(config.run.out)
    (out / "simulation.json").write_text(json.dumps(result.record(config.run.peers), indent=2) + "\n", encoding="utf-8")
    print("\n" + (out / "summary.md").read_text(encoding="utf-8"))
    print(f"[p2pfed] simulated {config.run.peers} peers in {result.wall_s:.1f} s ({result.swaps} adapter swaps, "
          f"{result.per_peer_bytes / 1e6:.2f} MB of adapter per peer; peak resident memory {result.rss_peak_bytes / 2**30:.2f} GiB, "
          f"{result.rss_base_bytes / 2**30:.2f} GiB with the base model alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
