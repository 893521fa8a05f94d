"""Turning an adapter vector into payload bytes and back, in a fraction of its size.

A codec is a *structure* (which numbers travel: all of them, the top k, k at coordinates
drawn from a seed every peer shares, or low-rank factors of each matrix) followed by a
*value encoding* (fp32, fp16, bf16, or stochastic int8/int4/int2 with one scale per chunk).
The spec string names both: "int8", "topk+int8", "randk+fp16", "lowrank+int8".
Bytes are what crosses the wire, so byte counts are measured, never assumed.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from p2pfed.indices import IndexBlockError, decode_indices, encode_indices, max_index_bytes


class CodecError(ValueError):
    """Unknown codec spec, or a payload that does not decode to the expected size."""


@dataclass(frozen=True)
class CodecSettings:
    """The numbers a codec spec leaves open (the [codec] config section)."""

    fraction: float = 0.1
    """topk / randk: share of coordinates sent."""
    rank: int = 2
    """lowrank: rank of each matrix's factors."""
    chunk: int = 256
    """int8 / int4: values per fp32 scale."""
    seed: int = 0
    """Run seed: random-k coordinates and stochastic rounding derive from it."""


# ---------------------------------------------------------------- value encodings


class ValueEncoding(Protocol):
    name: str
    id: int
    unbiased: bool

    def size(self, count: int) -> int: ...
    def encode(self, values: torch.Tensor) -> bytes: ...
    def decode(self, data: bytes, count: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class FloatValues:
    """Dense floats: fp32 (exact), fp16 or bf16 (half the bytes, rounded to nearest)."""

    name: str
    id: int
    dtype: torch.dtype
    unbiased: bool = True  # exact, or rounding to nearest: error far below the gossip noise

    def size(self, count: int) -> int:
        return count * torch.empty(0, dtype=self.dtype).element_size()

    def encode(self, values: torch.Tensor) -> bytes | memoryview:
        """The values' bytes; fp32 values already on the CPU in one piece are not copied: a read-only
        view of them is the payload (it keeps them alive). A lockstep exchange has sent it when it
        returns; deadline gossip, which sends later from a thread, sends a copy."""
        values = values.detach()
        if values.dtype == self.dtype == torch.float32 and values.device.type == "cpu" and values.is_contiguous() and sys.byteorder == "little":
            return memoryview(values.numpy()).cast("B").toreadonly()
        return values.to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().tobytes()

    def decode(self, data: bytes, count: int) -> torch.Tensor:
        _expect_size(self.name, data, self.size(count), count)
        raw = np.frombuffer(data, dtype=np.uint8)
        # a writable buffer (the transport's receive buffer, owned by this message alone) is read in place
        return torch.from_numpy(raw if raw.flags.writeable else raw.copy()).view(self.dtype).to(torch.float32)


@dataclass
class StochasticInt:
    """Unbiased stochastic rounding to `bits`-bit integers, one fp32 scale per chunk.

    Each chunk is scaled so its largest magnitude maps to the top level L (127 for int8,
    7 for int4, 1 for int2); x/s is rounded down or up with probabilities that make E[decode] = x.
    The error per value is below one step, max|chunk| / L.
    """

    name: str
    id: int
    bits: int
    chunk: int
    generator: torch.Generator
    unbiased: bool = True

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def size(self, count: int) -> int:
        return 4 * math.ceil(count / self.chunk) + math.ceil(count * self.bits / 8)

    def encode(self, values: torch.Tensor) -> bytes:
        count = values.numel()
        padded = torch.zeros(math.ceil(count / self.chunk) * self.chunk)
        padded[:count] = values.detach().to("cpu", torch.float32).reshape(-1)
        chunks = padded.view(-1, self.chunk)
        scales = chunks.abs().amax(dim=1) / self.levels
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        scaled = chunks / safe[:, None]
        noise = torch.rand(scaled.shape, generator=self.generator)
        codes = torch.floor(scaled + noise).clamp_(-self.levels, self.levels).to(torch.int8).reshape(-1)[:count]
        return scales.numpy().astype("<f4").tobytes() + self._pack(codes.numpy())

    def decode(self, data: bytes, count: int) -> torch.Tensor:
        _expect_size(self.name, data, self.size(count), count)
        n_chunks = math.ceil(count / self.chunk)
        scales = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n_chunks).copy())
        if not torch.isfinite(scales).all() or (scales < 0).any():
            raise CodecError(f"{self.name} payload carries a negative or non-finite scale")
        codes = torch.from_numpy(self._unpack(np.frombuffer(data, dtype=np.uint8, offset=4 * n_chunks), count))
        if count and int(codes.abs().max()) > self.levels:
            raise CodecError(f"{self.name} payload carries a code beyond +-{self.levels}")
        return codes.to(torch.float32) * scales.repeat_interleave(self.chunk)[:count]

    def _pack(self, codes: np.ndarray) -> bytes:
        if self.bits == 8:
            return codes.astype(np.int8).tobytes()
        if self.bits == 2:  # -1..1 -> 0..2, four codes a byte, low bits first
            twos = (codes.astype(np.int16) + 1).astype(np.uint8)
            twos = np.append(twos, np.ones((-len(twos)) % 4, dtype=np.uint8))  # padding codes read as 0
            quads = twos.reshape(-1, 4)
            return (quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)).astype(np.uint8).tobytes()
        nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)  # -7..7 -> 1..15
        if len(nibbles) % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()

    def _unpack(self, raw: np.ndarray, count: int) -> np.ndarray:
        if self.bits == 8:
            return raw.view(np.int8)[:count].astype(np.int64)
        if self.bits == 2:  # a code of 3 (beyond +-1) is refused by the caller's range check
            quads = np.stack([raw & 3, (raw >> 2) & 3, (raw >> 4) & 3, raw >> 6], axis=1).reshape(-1)[:count]
            return quads.astype(np.int64) - 1
        both = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:count]
        return both.astype(np.int64) - 8


def _expect_size(name: str, data: bytes, expected: int, count: int) -> None:
    if len(data) != expected:
        raise CodecError(f"{name} values of {len(data)} bytes, expected {expected} for {count} values")


VALUE_ENCODINGS = ("fp32", "fp16", "bf16", "int8", "int4", "int2")
_INT_BITS = {"int8": (3, 8), "int4": (4, 4), "int2": (5, 2)}
"""Stochastic integer encodings: (codec id, bits). int2 is ternary (-s, 0, s per chunk) in two
bits a value: SparseLoCo's 2-bit values, unbiased, composable with top-k and error feedback."""


def value_encoding(name: str, settings: CodecSettings, rank: int) -> ValueEncoding:
    floats = {"fp32": (0, torch.float32), "fp16": (1, torch.float16), "bf16": (2, torch.bfloat16)}
    if name in floats:
        return FloatValues(name, floats[name][0], floats[name][1])
    generator = torch.Generator().manual_seed(_derive_seed("stochastic-rounding", settings.seed, rank))
    codec_id, bits = _INT_BITS[name]
    return StochasticInt(name, codec_id, bits, settings.chunk, generator)


# ---------------------------------------------------------------- decoded messages


@dataclass
class Decoded:
    """A decoded message: a dense vector, and the coordinates it carries (None: all)."""

    values: torch.Tensor
    support: torch.Tensor | None = None

    def fill(self, fallback: torch.Tensor) -> torch.Tensor:
        """The message's values where it has them, `fallback`'s elsewhere."""
        if self.support is None:
            return self.values
        filled = fallback.clone()
        filled[self.support] = self.values[self.support]
        return filled


# ---------------------------------------------------------------- structures


@dataclass
class Codec:
    """A structure and a value encoding; `encode`/`decode` are inverse up to the stated error."""

    spec: str
    structure: str
    values: ValueEncoding
    settings: CodecSettings
    layout: list[tuple[int, ...]] | None = None
    """Shapes of the tensors the flat vector is made of (low rank needs the matrices)."""
    warm_start: dict[int, torch.Tensor] = field(default_factory=dict)

    STRUCTURES = ("dense", "topk", "randk", "lowrank")

    @property
    def id(self) -> int:
        """One byte in the envelope header: structure in the high nibble, values in the low."""
        return self.STRUCTURES.index(self.structure) * 16 + self.values.id

    @property
    def biased(self) -> bool:
        """Whether the decoded message misses part of the input on average (error feedback helps)."""
        return self.structure != "dense" or not self.values.unbiased

    def k(self, length: int) -> int:
        return max(1, min(length, round(self.settings.fraction * length)))

    def max_payload(self, length: int) -> int:
        if self.structure == "dense":
            return self.values.size(length)
        if self.structure == "topk":
            k = self.k(length)
            return 8 + max_index_bytes(k, length) + self.values.size(k)
        if self.structure == "randk":
            return self.values.size(self.k(length))
        return self.values.size(sum(self._lowrank_counts(length)))

    def encode(self, vector: torch.Tensor, round: int = 0, step: int = 0) -> bytes:
        vector = vector.detach().to("cpu", torch.float32).reshape(-1)
        if self.structure == "dense":
            return self.values.encode(vector)
        if self.structure == "topk":
            k = self.k(vector.numel())
            chosen = torch.topk(vector.abs(), k, sorted=False).indices.sort().values
            index_block = encode_indices(chosen.numpy(), vector.numel())
            return struct.pack("<II", k, len(index_block)) + index_block + self.values.encode(vector[chosen])
        if self.structure == "randk":
            return self.values.encode(vector[self.shared_indices(vector.numel(), round, step)])
        return self.values.encode(torch.cat(self._factorise(vector)))

    def decode(self, payload: bytes, length: int, round: int = 0, step: int = 0) -> Decoded:
        if len(payload) > self.max_payload(length):
            raise CodecError(f"{self.spec} payload of {len(payload)} bytes exceeds {self.max_payload(length)} for {length} values")
        if self.structure == "dense":
            return Decoded(self.values.decode(payload, length))
        if self.structure == "topk":
            return self._decode_topk(payload, length)
        if self.structure == "randk":
            chosen = self.shared_indices(length, round, step)
            out = torch.zeros(length)
            out[chosen] = self.values.decode(payload, chosen.numel())
            return Decoded(out, chosen)
        factors = self.values.decode(payload, sum(self._lowrank_counts(length)))
        return Decoded(self._rebuild(factors, length))

    def shared_indices(self, length: int, round: int, step: int) -> torch.Tensor:
        """Random-k coordinates for (round, step): the same at every peer, never sent."""
        generator = torch.Generator().manual_seed(_derive_seed("random-k", self.settings.seed, round, step))
        return torch.randperm(length, generator=generator)[: self.k(length)].sort().values

    def _decode_topk(self, payload: bytes, length: int) -> Decoded:
        if len(payload) < 8:
            raise CodecError(f"{self.spec} payload of {len(payload)} bytes is shorter than its 8-byte header")
        k, index_bytes = struct.unpack_from("<II", payload)
        if k != self.k(length) or 8 + index_bytes > len(payload):
            raise CodecError(f"{self.spec} payload announces {k} values in {index_bytes} index bytes, expected {self.k(length)}")
        try:
            chosen = torch.from_numpy(decode_indices(payload[8 : 8 + index_bytes], k, length))
        except IndexBlockError as err:
            raise CodecError(f"{self.spec} index block: {err}") from None
        out = torch.zeros(length)
        out[chosen] = self.values.decode(payload[8 + index_bytes :], k)
        return Decoded(out, chosen)

    # -- low rank (PowerSGD-style: one power iteration, warm-started from the last round)

    def _pieces(self, length: int) -> list[tuple[int, ...]]:
        if self.layout is None:
            raise CodecError("lowrank needs the adapter's matrix shapes; build the codec with a layout")
        if sum(math.prod(s) for s in self.layout) != length:
            raise CodecError(f"lowrank layout covers {sum(math.prod(s) for s in self.layout)} values, the vector has {length}")
        return self.layout

    def _compressible(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and self.settings.rank * (shape[0] + shape[1]) < shape[0] * shape[1]

    def _lowrank_counts(self, length: int) -> list[int]:
        return [self.settings.rank * (s[0] + s[1]) if self._compressible(s) else math.prod(s) for s in self._pieces(length)]

    def _factorise(self, vector: torch.Tensor) -> list[torch.Tensor]:
        parts, offset = [], 0
        for index, shape in enumerate(self._pieces(vector.numel())):
            size = math.prod(shape)
            piece = vector[offset : offset + size]
            offset += size
            if not self._compressible(shape):
                parts.append(piece)
                continue
            matrix = piece.view(shape)
            q = self.warm_start.get(index)
            if q is None:
                q = torch.randn(shape[1], self.settings.rank, generator=torch.Generator().manual_seed(_derive_seed("lowrank", self.settings.seed, index)))
            p = torch.linalg.qr(matrix @ q).Q  # orthonormal basis of the column space M sees
            q = matrix.T @ p  # M ~ P Q^T, exact when rank(M) <= rank
            self.warm_start[index] = q
            parts += [p.reshape(-1), q.reshape(-1)]
        return parts

    def _rebuild(self, factors: torch.Tensor, length: int) -> torch.Tensor:
        out, offset = [], 0
        for shape in self._pieces(length):
            if not self._compressible(shape):
                size = math.prod(shape)
                out.append(factors[offset : offset + size])
                offset += size
                continue
            rows, cols, r = shape[0], shape[1], self.settings.rank
            p = factors[offset : offset + rows * r].view(rows, r)
            q = factors[offset + rows * r : offset + (rows + cols) * r].view(cols, r)
            offset += (rows + cols) * r
            out.append((p @ q.T).reshape(-1))
        return torch.cat(out)


def _derive_seed(purpose: str, *numbers: int) -> int:
    """A 63-bit seed from a purpose and integers (SHA-256, so streams never collide)."""
    digest = hashlib.sha256(purpose.encode() + b"".join(n.to_bytes(8, "little", signed=True) for n in numbers)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def parse_spec(spec: str) -> tuple[str, str]:
    """'topk+int8' -> ('topk', 'int8'); 'int8' -> ('dense', 'int8'); 'topk' -> ('topk', 'fp32')."""
    parts = spec.split("+")
    sparse = [s for s in Codec.STRUCTURES if s != "dense"]
    if len(parts) == 1 and parts[0] in VALUE_ENCODINGS:
        return "dense", parts[0]
    if len(parts) == 1 and parts[0] in sparse:
        return parts[0], "fp32"
    if len(parts) == 2 and parts[0] in sparse and parts[1] in VALUE_ENCODINGS:
        return parts[0], parts[1]
    raise CodecError(f"[gossip] codec: expected a value encoding ({', '.join(VALUE_ENCODINGS)}), optionally after "
                     f"{', '.join(sparse)} and '+' (e.g. 'topk+int8'); got {spec!r}")


def build_codec(spec: str, settings: CodecSettings | None = None, rank: int = 0, layout: list[tuple[int, ...]] | None = None) -> Codec:
    """The codec `spec` names, for peer `rank` (its own stochastic-rounding stream)."""
    settings = settings or CodecSettings()
    structure, values = parse_spec(spec)
    return Codec(spec, structure, value_encoding(values, settings, rank), settings, layout)


def get_codec(name: str) -> Codec:
    """A codec with default settings (tests and tools that need no layout)."""
    return build_codec(name)


@dataclass
class ErrorFeedback:
    """Compresses a stream of increments, carrying what the codec dropped into the next one.

    After every call, (sum of inputs) = (sum of decoded outputs) + residual, exactly in
    real arithmetic: nothing a biased codec drops is lost, only delayed.
    """

    codec: Codec
    residual: torch.Tensor | None = None

    def encode(self, increment: torch.Tensor, round: int = 0, step: int = 0) -> tuple[bytes, torch.Tensor]:
        """(payload, what receivers will decode from it)."""
        target = increment if self.residual is None else increment + self.residual
        payload = self.codec.encode(target, round, step)
        decoded = self.codec.decode(payload, target.numel(), round, step).values
        self.residual = target - decoded
        return payload, decoded
