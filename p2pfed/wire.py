"""The envelope every gossip message travels in: header, Ed25519 signature, payload.

The header is canonical (fixed-width little-endian fields, a version byte, the payload's
BLAKE3 digest), and the signature covers it, so it covers the payload through the digest.
BLAKE3 (the `blake3` package) hashes a 1.8 MB payload 3.6x faster than SHA-256 on this
machine (micro-benchmarks, `bench/results/full-2026-12-01.md`), and every byte of every
message is hashed twice, once by its sender and once by its receiver.
Parsing is strict: lengths are checked before anything is read, and nothing but
`WireError` escapes, whose `reason` is one word the metrics count.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blake3 import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfed.identity import Roster

MAGIC = b"P2PF"
VERSION = 4
HEADER_STRUCT = struct.Struct("<4sBBHIIIIIQ32s16s")
SESSION_SIZE = 16
NO_SESSION = bytes(SESSION_SIZE)
HEADER_SIZE = HEADER_STRUCT.size
SIGNATURE_SIZE = 64
OVERHEAD = HEADER_SIZE + SIGNATURE_SIZE


def payload_digest(payload: bytes | memoryview) -> bytes:
    """The 32-byte BLAKE3 digest a header signs for its payload."""
    return blake3(payload).digest()


class WireError(ValueError):
    """A message was refused; `reason` names why in one word (for counting)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """Who sent what to whom, for which session, purpose, round and gossip step."""

    sender: int
    receiver: int
    round: int
    step: int
    epoch: int
    codec: int
    payload_length: int
    digest: bytes
    purpose: int = 0
    session: bytes = NO_SESSION


@dataclass(frozen=True)
class Sealed:
    """A sealed message in two pieces, header + signature and payload, so that one payload
    goes to every receiver without a copy per receiver. `bytes(sealed)` joins them (the
    in-process transport and fault injection work on whole messages)."""

    head: bytes
    payload: bytes | memoryview

    def __len__(self) -> int:
        return len(self.head) + len(self.payload)

    def __bytes__(self) -> bytes:
        return self.head + bytes(self.payload)


def seal_parts(key: Ed25519PrivateKey, sender: int, receiver: int, round: int, step: int, epoch: int, codec: int,
               payload: bytes | memoryview, *, session: bytes = NO_SESSION, purpose: int = 0, digest: bytes | None = None) -> Sealed:
    """Serialise and sign: header || signature(header), and the payload beside them (not copied).
    The session (drawn at every process start) and the purpose bind the message to one run
    attempt and one use. `digest`: `payload_digest(payload)` when the caller already has it
    (one payload for many receivers)."""
    header = HEADER_STRUCT.pack(MAGIC, VERSION, codec, purpose, sender, receiver, round, step, epoch, len(payload),
                                digest or payload_digest(payload), session)
    return Sealed(header + key.sign(header), payload)


def seal(key: Ed25519PrivateKey, sender: int, receiver: int, round: int, step: int, epoch: int, codec: int, payload: bytes,
         *, session: bytes = NO_SESSION, purpose: int = 0, digest: bytes | None = None) -> bytes:
    """`seal_parts` as one byte string: header || signature(header) || payload."""
    return bytes(seal_parts(key, sender, receiver, round, step, epoch, codec, payload, session=session, purpose=purpose, digest=digest))


def parse(data: bytes | memoryview, max_payload: int) -> tuple[Header, memoryview, memoryview, memoryview]:
    """Framing only: (header, header bytes, signature, payload) as views of `data`; no cryptography yet."""
    if len(data) < OVERHEAD:
        raise WireError("truncated", f"{len(data)} bytes, shorter than the {OVERHEAD}-byte header and signature")
    magic, version, codec, purpose, sender, receiver, round, step, epoch, length, digest, session = HEADER_STRUCT.unpack_from(data)
    if magic != MAGIC:
        raise WireError("malformed", "not a p2pfed envelope (bad magic)")
    if version != VERSION:
        raise WireError("version", f"protocol version {version}, expected {VERSION}")
    if length > max_payload:
        raise WireError("oversized", f"payload of {length} bytes exceeds the {max_payload} allowed")
    if len(data) != OVERHEAD + length:
        raise WireError("truncated", f"header announces {length} payload bytes, got {len(data) - OVERHEAD}")
    header = Header(sender, receiver, round, step, epoch, codec, length, digest, purpose, session)
    view = memoryview(data)  # slices of one buffer: the payload is never copied to be verified and decoded
    return header, view[:HEADER_SIZE], view[HEADER_SIZE:OVERHEAD], view[OVERHEAD:]


@dataclass
class Verifier:
    """Checks every incoming envelope for one peer; remembers what it accepted (replays)
    and which (sender, round, step) it has given up on (late messages)."""

    rank: int
    roster: Roster
    session: bytes = NO_SESSION
    """This run attempt's session: a message sealed for another one is refused (`session`)."""
    accepted: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    closed: set[tuple[int, int, int, int]] = field(default_factory=set)

    def open(self, data: bytes, source: int, round: int, step: int, neighbours: list[int], max_payload: int, codec: int,
             purpose: int = 0) -> bytes:
        """Return the payload of a message `source` delivered for (round, step), or raise WireError."""
        return self.open_header(data, source, round, step, neighbours, max_payload, (codec,), purpose)[1]

    def open_header(self, data: bytes, source: int, round: int, step: int, neighbours: list[int], max_payload: int,
                    codecs: tuple[int, ...], purpose: int = 0, epoch: int | None = None) -> tuple[Header, bytes]:
        """Like `open`, accepting any of `codecs` (message kinds), and returning the header too."""
        header, header_bytes, signature, payload = parse(data, max_payload)
        keys = self.roster.get(header.sender)
        if keys is None:
            raise WireError("unknown_sender", f"sender {header.sender} is not in the roster")
        try:
            keys.signing.verify(signature, header_bytes)
        except InvalidSignature:
            raise WireError("bad_signature", f"signature does not verify against peer {header.sender}'s roster key") from None
        if payload_digest(payload) != header.digest:
            raise WireError("digest", "payload does not match the signed BLAKE3 digest")
        if header.session != self.session:
            raise WireError("session", f"sealed for session {header.session.hex()[:8]}, not this run attempt's {self.session.hex()[:8]}")
        if header.purpose != purpose:
            raise WireError("purpose", f"sealed for purpose {header.purpose}, expected {purpose}")
        if epoch is not None and header.epoch != epoch:
            raise WireError("epoch", f"sealed for topology epoch {header.epoch}, expected {epoch} (round {round} of the schedule)")
        if header.receiver != self.rank:
            raise WireError("wrong_receiver", f"addressed to peer {header.receiver}")
        if header.sender != source or header.sender not in neighbours:
            raise WireError("not_neighbour", f"from peer {header.sender}, not a neighbour of peer {self.rank} this round")
        if (header.sender, header.round, header.step, header.codec) in self.closed:
            raise WireError("late", f"round {header.round} step {header.step} from peer {header.sender} was already completed without it")
        if header.codec not in codecs:
            raise WireError("codec", f"codec id {header.codec}, expected {' or '.join(map(str, codecs))}")
        if (header.round, header.step) != (round, step) or self.accepted.get((header.sender, header.codec), (-1, -1)) >= (round, step):
            raise WireError("replay", f"is for round {header.round} step {header.step}, expected round {round} step {step}")
        self.accepted[(header.sender, header.codec)] = (round, step)
        return header, payload

    def close(self, sender: int, round: int, step: int, codecs: tuple[int, ...]) -> None:
        """Refuse messages of the kinds `codecs` that `sender` delivers for (round, step) from now on (it was counted missing)."""
        self.closed.update((sender, round, step, codec) for codec in codecs)
