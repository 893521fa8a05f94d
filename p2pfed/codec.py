"""Turning an adapter vector into payload bytes and back.

One interface (encode, decode, id); the compressors of the compression issue plug in here.
Bytes are what crosses the wire, so the byte count is measured, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class CodecError(ValueError):
    """Unknown codec name, or a payload that does not decode to the expected size."""


@dataclass(frozen=True)
class DenseCodec:
    """Dense float encoding: fp32 (exact), fp16 or bf16 (half the bytes, rounded)."""

    name: str
    id: int
    dtype: torch.dtype

    def max_payload(self, length: int) -> int:
        return length * torch.empty(0, dtype=self.dtype).element_size()

    def encode(self, vector: torch.Tensor) -> bytes:
        data = vector.detach().to("cpu", self.dtype).contiguous()
        return data.view(torch.uint8).numpy().tobytes()

    def decode(self, payload: bytes, length: int) -> torch.Tensor:
        if len(payload) != self.max_payload(length):
            raise CodecError(f"{self.name} payload of {len(payload)} bytes, expected {self.max_payload(length)} for {length} values")
        raw = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())
        return raw.view(self.dtype).to(torch.float32)


CODECS = {c.name: c for c in (DenseCodec("fp32", 0, torch.float32), DenseCodec("fp16", 1, torch.float16), DenseCodec("bf16", 2, torch.bfloat16))}


def get_codec(name: str) -> DenseCodec:
    if name not in CODECS:
        raise CodecError(f"[gossip] codec: expected one of {', '.join(CODECS)}, got {name!r}")
    return CODECS[name]
