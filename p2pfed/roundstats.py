"""What one averaging round cost and what it refused: one metrics line's gossip columns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoundStats:
    """What one averaging round cost and what it refused."""

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_estimated: bool = False
    bytes_fp32: int = 0
    """What the same messages would have weighed as uncompressed fp32 envelopes."""
    codec_s: float = 0.0
    crypto_s: float = 0.0
    """Signing and verifying."""
    comm_s: float = 0.0
    neighbours: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    mask_s: float = 0.0
    """Secure mode: generating pairwise masks (AES-256-CTR keystreams)."""
    mix_s: float = 0.0
    """Combining the adapters heard (the mixing rule) and the local consensus estimate."""
    clipped: int = 0
    """Secure mode: values clipped to the fixed-point bound."""
    dropouts: int = 0
    """Secure mode: senders missing from the sum whose masks were removed by recovery."""
    abandoned: bool = False
    """Secure mode: the sum could not be completed, so this peer kept its own adapter."""
    inconsistent: int = 0
    """Secure mode: receivers this peer released nothing to, because their helpers did not
    all sign the same survivor list (a receiver lying about who is present)."""
    repeats: int = 0
    """Secure mode: exchanges this peer abstained from because its vector was bit-identical
    to one it already sent in this session (two sums of one vector over different present
    senders would differ by one sender's adapter)."""
    late: int = 0
    """Deadline gossip: messages of earlier exchanges that arrived after those went on, dropped."""
    missing: list[int] = field(default_factory=list)
    """Deadline gossip: senders whose message had not arrived by the deadline (their weight went to self)."""
    gone: list[int] = field(default_factory=list)
    """on_peer_loss = 'continue': neighbours found gone in this round (never mixed again)."""
    local_consensus: float | None = None
    """(1/2) sum_j W_ij ||x_i - x_j||^2 over the neighbours heard (free; before mixing). Its
    mean over peers is Xi^2 exactly for a complete graph with uniform weights."""


    @staticmethod
    def combine(steps: list["RoundStats"]) -> "RoundStats":
        """One round's totals over its gossip steps (the local estimate is the first step's)."""
        total = RoundStats(neighbours=steps[0].neighbours, local_consensus=steps[0].local_consensus,
                           bytes_estimated=steps[0].bytes_estimated)
        for s in steps:
            total.bytes_sent += s.bytes_sent
            total.bytes_received += s.bytes_received
            total.bytes_fp32 += s.bytes_fp32
            total.codec_s += s.codec_s
            total.crypto_s += s.crypto_s
            total.comm_s += s.comm_s
            total.mask_s += s.mask_s
            total.mix_s += s.mix_s
            total.clipped += s.clipped
            total.dropouts += s.dropouts
            total.inconsistent += s.inconsistent
            total.repeats += s.repeats
            total.late += s.late
            total.missing += s.missing
            total.gone += s.gone
            total.abandoned = total.abandoned or s.abandoned
            for reason, count in s.rejected.items():
                total.rejected[reason] = total.rejected.get(reason, 0) + count
        return total
