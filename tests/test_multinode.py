"""Two torchrun commands (two 'nodes') rendezvous on localhost through launch/multinode.sh."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, read_jsonl, run_cli

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_on_localhost(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable}
    keys = tmp_path / "keys"
    assert run_cli("keygen", "--peers", "4", "--out", str(keys)).returncode == 0  # made once, shared out of band
    command = [str(ROOT / "launch" / "multinode.sh"), str(TINY), "2", "2", endpoint, "two-nodes", f"run.out={out}", "run.rounds=2",
               f"identity.roster={keys / 'roster.json'}", f"identity.key={keys / 'peer{rank}.pem'}"]
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    for rank in range(4):  # ranks 0-1 on one node, 2-3 on the other
        rows = read_jsonl(out / "metrics" / f"peer{rank}.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2] and all(r["bytes_sent"] > 0 for r in rows[1:])
    assert (out / "summary.md").is_file() and (out / "config.json").is_file()
