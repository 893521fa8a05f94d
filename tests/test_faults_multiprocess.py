"""Through torchrun: a peer injecting bad messages is refused by every honest neighbour, training goes on."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, read_jsonl, run_cli

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


@pytest.mark.parametrize("kind, reason", [("flip", "digest"), ("foreign_key", "bad_signature"), ("replay", "replay"), ("misaddress", "wrong_receiver")])
def test_injected_messages_are_all_rejected_and_honest_peers_agree(tmp_path, kind, reason):
    out = tmp_path / kind
    result = run_cli("run", str(TINY), f"run.out={out}", "run.peers=4", "run.rounds=3", "run.eval_every=3",
                     "faults.peers=[1]", f"faults.kind='{kind}'")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r: read_jsonl(out / "metrics" / f"peer{r}.jsonl")[1:] for r in range(4)}
    injected = rows[1][-1]["injected"]
    assert injected == (4 if kind == "replay" else 6)  # 2 neighbours x 3 rounds; replay has nothing to resend in round 1
    rejected = sum(row["rejected"].get(reason, 0) for r in (0, 2, 3) for row in rows[r])
    assert rejected == injected and all(set(row["rejected"]) <= {reason} for r in (0, 2, 3) for row in rows[r])
    assert f"message from peer 1 rejected: {reason}" in result.stderr
    for r in (0, 2, 3):
        assert rows[r][-1]["train_loss"] < rows[r][0]["train_loss"] + 0.05 and rows[r][-1]["crypto_s"] > 0
    assert rows[1][-1]["rejected"] == {}  # the faulty peer itself hears honest messages

    # The honest peers stay in consensus among themselves: their trained B factors (which all
    # start at zero) differ from the honest mean by far less than the mean itself.
    honest = [load_file(out / "adapters" / f"peer{r}" / "adapter_model.safetensors") for r in (0, 2, 3)]
    b_keys = [k for k in honest[0] if "lora_B" in k]
    vectors = torch.stack([torch.cat([h[k].flatten() for k in b_keys]) for h in honest])
    spread = (vectors - vectors.mean(dim=0)).norm(dim=1).max()
    assert 0 < spread < 0.5 * vectors.mean(dim=0).norm()
