"""Micro-benchmarks of one message's work: codecs, signing and verifying, masks, fixed point.

The input has the shape of the suite model's real LoRA adapter (SmolLM2-135M for `full`, the
tiny random Llama for `quick`) with random values: speed does not depend on them. Each
operation is timed on one thread, best of several repeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from p2pfed.codec import CodecSettings, build_codec
from p2pfed.config import LoraSection, ModelSection
from p2pfed.identity import Roster, generate
from p2pfed.model import adapter_layout, adapter_to_vector, load_base, wrap_lora
from p2pfed.secure import Context, FixedPoint, PairwiseMasks
from p2pfed.secure.scratch import Scratch
from p2pfed.wire import Verifier, seal

CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "topk+int8", "randk+fp16", "lowrank+int8")
MODELS = {"quick": "tiny", "full": "smollm2-135m"}


def best_time(operation: Callable[[], Any], min_total_s: float) -> float:
    """Seconds per call: the best of repeats, each repeat at least a few calls long."""
    operation()  # warm up (allocations, lazy imports)
    calls, best, spent = 1, float("inf"), 0.0
    while spent < min_total_s:
        start = time.perf_counter()
        for _ in range(calls):
            operation()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed / calls), spent + elapsed
        if elapsed < 0.02:
            calls *= 2
    return best


def adapter_vector(size: str) -> tuple[torch.Tensor, list[tuple[int, ...]], str]:
    """A random vector shaped like the suite model's LoRA adapter (r=8 on q, v), its layout and a label."""
    model = wrap_lora(load_base(ModelSection(name=MODELS[size]))[0], LoraSection(), seed=0)
    vector = torch.randn(adapter_to_vector(model).numel(), generator=torch.Generator().manual_seed(0)) * 0.01
    return vector, adapter_layout(model), f"{MODELS[size]} adapter, {vector.numel():,} values"


def run_micro(size: str) -> list[dict[str, Any]]:
    """Every micro-benchmark; rows of operation, input, seconds per call and MB/s of input."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(size, min_total_s=0.2 if size == "quick" else 1.0)
    finally:
        torch.set_num_threads(threads)


def _measure(size: str, min_total_s: float) -> list[dict[str, Any]]:
    vector, layout, label = adapter_vector(size)
    mb = vector.numel() * 4 / 1e6
    rows: list[dict[str, Any]] = []

    def add(operation: str, what: str, seconds: float, megabytes: float) -> None:
        rows.append({"operation": operation, "input": what, "seconds": seconds, "mb_per_s": megabytes / seconds})
        print(f"[bench] micro {operation} ({what}): {seconds * 1e3:.3f} ms, {megabytes / seconds:,.0f} MB/s", flush=True)

    for spec in CODECS:
        codec = build_codec(spec, CodecSettings(seed=0), rank=0, layout=layout)
        payload = codec.encode(vector, 0, 0)
        add(f"encode {spec}", f"{label} -> {len(payload):,} B", best_time(lambda: codec.encode(vector, 0, 0), min_total_s), mb)
        add(f"decode {spec}", label, best_time(lambda: codec.decode(payload, vector.numel(), 0, 0), min_total_s), mb)

    import hashlib

    from p2pfed.wire import payload_digest

    dense = build_codec("fp32").encode(vector)
    add("digest SHA-256 (before)", f"{len(dense):,} B payload", best_time(lambda: hashlib.sha256(dense).digest(), min_total_s), len(dense) / 1e6)
    add("digest BLAKE3 (envelope)", f"{len(dense):,} B payload", best_time(lambda: payload_digest(dense), min_total_s), len(dense) / 1e6)
    sender, receiver = generate(0), generate(1)
    roster = Roster({0: sender.public(), 1: receiver.public()})
    for payload in (bytes(64), dense):
        what = f"{len(payload):,} B payload"
        add("sign (seal)", what, best_time(lambda: seal(sender.signing, 0, 1, 0, 0, 0, 0, payload), min_total_s), len(payload) / 1e6)
        message = seal(sender.signing, 0, 1, 0, 0, 0, 0, payload)
        # a fresh verifier per call: one that has accepted the message would refuse it as a replay
        add("verify (open)", what, best_time(lambda: Verifier(1, roster).open(message, 0, 0, 0, [0], len(payload), 0), min_total_s),
            len(payload) / 1e6)

    masks = PairwiseMasks(sender, roster)
    masks.secret(1)  # the key agreement happens once per pair and run, not per message
    # as in a secure exchange: keystreams, encodings and sums land in buffers reused from round to round
    scratch = Scratch()
    stream, onto = scratch.array("stream", vector.numel(), np.uint32), scratch.array("words", vector.numel(), np.uint32)
    add("mask (AES-256-CTR, one pair)", label,
        best_time(lambda: masks.mask(Context(bytes(16), 0, 0, 0, 1), [0, 1], vector.numel(), onto=onto, stream=stream), min_total_s), mb)
    fixed, generator = FixedPoint(4.0, 20), torch.Generator().manual_seed(0)
    words, _ = fixed.encode(vector, generator, scratch)
    add("fixed-point encode", label, best_time(lambda: fixed.encode(vector, generator, scratch), min_total_s), mb)
    total = scratch.array("sum", vector.numel(), np.float32)
    add("fixed-point decode", label, best_time(lambda: fixed.decode(words, out=total), min_total_s), mb)
    return rows
