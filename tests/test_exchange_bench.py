"""The exchange made cheap (issue 16) and the `exchange` bench suite that measures it."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from p2pfed.benchexchange import ExchangeRow, exchange_table, run_exchange_row
from p2pfed.codec import get_codec
from p2pfed.mixing import SLICE, WeightedAverage
from p2pfed.wire import OVERHEAD


def test_the_fused_mix_and_local_consensus_match_an_independent_float64_computation_across_slices():
    n = 2 * SLICE + 1234  # three slices, the last one short
    generator = torch.Generator().manual_seed(0)
    own = torch.randn(n, generator=generator)
    heard = {3: torch.randn(n, generator=generator), 1: torch.randn(n, generator=generator) + 0.5}
    weights = torch.tensor([0.0, 0.25, 0.0, 0.35, 0.0])
    mixed, distance = WeightedAverage().mix_with_distance(own, heard, weights)

    x, a, b = (t.double().numpy() for t in (own, heard[1], heard[3]))
    expected = 0.4 * x + 0.25 * a + 0.35 * b
    np.testing.assert_allclose(mixed.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert distance == pytest.approx(0.5 * (0.25 * np.sum((x - a) ** 2) + 0.35 * np.sum((x - b) ** 2)), rel=1e-6)
    # nobody heard: the own vector, and no distance
    alone, none = WeightedAverage().mix_with_distance(own, {}, weights)
    assert torch.equal(alone, own) and none == 0.0


def test_an_fp32_payload_is_a_read_only_view_of_the_vector_and_decoding_it_copies():
    codec = get_codec("fp32")
    vector = torch.arange(1000, dtype=torch.float32)
    payload = codec.encode(vector)
    assert isinstance(payload, memoryview) and payload.readonly and len(payload) == 4000
    assert np.shares_memory(np.frombuffer(payload, dtype=np.uint8), vector.numpy())  # no copy was made
    decoded = codec.decode(payload, 1000).values
    decoded += 1  # a receiver (here: error feedback, which decodes its own payload) writes to what it decoded ...
    assert torch.equal(vector, torch.arange(1000, dtype=torch.float32))  # ... and the sender's vector is untouched
    # anything else is encoded from a copy of its own, which the sender's vector does not share
    for other in (vector.double(), vector[::2]):
        payload = codec.encode(other)
        assert not np.shares_memory(np.frombuffer(payload, dtype=np.uint8), vector.numpy())
        assert torch.equal(codec.decode(payload, other.numel()).values, other.float())
    assert isinstance(get_codec("fp16").encode(vector), bytes)


MAPPED_BLOCKS = """
import ctypes, sys, torch
from p2pfed.memory import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                     "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
assert keep_freed_memory(large_blocks=sys.argv[1] == "large")
before = libc.mallinfo2().hblks  # blocks mapped while Python and torch loaded
block = torch.ones(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_peer_takes_blocks_above_the_mmap_threshold_from_the_heap():
    def mapped(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    assert mapped("default") == 1  # mapped afresh (and faulted in) every time it is allocated
    assert mapped("large") == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_an_exchange_row_times_real_exchanges_of_the_exact_envelope():
    result = run_exchange_row(ExchangeRow("tiny", 3, 1000, 1.5, probes=3))
    assert result["message_bytes"] == OVERHEAD + 4 * 1000  # one signed fp32 envelope per message
    assert result["peers"] == 3 and result["code"]["packages"]["torch"]
    assert result["gossip_s"] > 0 and result["bare_s"] > 0 and result["ratio"] == pytest.approx(result["gossip_s"] / result["bare_s"])
    stages = result["stages"]
    assert stages["crypto_s"] > 0 and stages["comm_s"] > 0 and stages["mask_s"] == 0.0  # signed, sent, never masked
    assert sum(stages.values()) <= result["gossip_s"] * 1.5  # parts of the whole (medians of each, so roughly)


def test_the_exchange_table_judges_each_row_against_its_own_goal():
    stages = {"codec_s": 0.001, "crypto_s": 0.002, "mask_s": 0.0, "comm_s": 0.01, "mix_s": 0.001}
    rows = [{"name": "small", "message_bytes": 100, "gossip_s": 0.014, "bare_s": 0.01, "ratio": 1.4, "goal": 1.5, "stages": stages},
            {"name": "large", "message_bytes": 100, "gossip_s": 0.013, "bare_s": 0.01, "ratio": 1.3, "goal": 1.2, "stages": stages},
            {"name": "broken", "error": "out of memory"}]
    lines = exchange_table(rows).splitlines()
    assert "| 1.40x | <= 1.5x: **met** |" in lines[2] and "| 1.30x | <= 1.2x: **missed** |" in lines[3]
    assert lines[4].startswith("| broken | failed: out of memory |")
