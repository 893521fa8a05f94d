"""The four attacks on secure averaging, played through the real Averager on threads: a
receiver (or an eavesdropper) records every byte it gets and tries to recover one sender's
weighted adapter. Each test was seen failing against the earlier protocol (the attacker
recovered the adapter to ~2^-21) before the double-masked, consent-checked, session-bound
protocol made it pass.

Recovery is judged two ways: the best of every signed combination of what the attacker
holds is still far from the victim's value, and the attacker's best guess is
indistinguishable from uniform bytes (chi-square, 255 degrees of freedom, p ~ 1e-10: the
masks use fresh random seeds, so the threshold leaves no room for a chance failure).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import identities, on_threads
from p2pfed.codec import build_codec
from p2pfed.config import FaultSection
from p2pfed.faults import FaultInjector
from p2pfed.gossip import Averager
from p2pfed.secure import ABSTAIN, CONSENT, CONSENTS, RELEASE, SURVIVORS, Context, Purpose, FixedPoint, PairwiseMasks, SecureError, self_mask
from p2pfed.secure.consentlog import ConsentLog
from p2pfed.secure.messages import Survivors, decode_data, encode_survivors
from p2pfed.secure.protocol import commit
from p2pfed.secure.shares import SHARE_SIZE, combine, threshold
from p2pfed.topology import load_topology
from p2pfed.transport import LocalHub
from p2pfed.wire import HEADER_STRUCT, OVERHEAD, Verifier, WireError, seal

ROOT = Path(__file__).resolve().parents[1]
FIXED = FixedPoint(4.0, 20)
N = 4096  # values per adapter: enough bytes for a chi-square test of the attacker's best guess
WORLD, RECEIVER = 6, 1  # a 2x3 torus: receiver 1 hears 0, 2 and 4
DATA = 0xE0
CRITICAL = 400.0  # chi-square, 255 degrees of freedom, p ~ 1e-10: masks draw fresh seeds, so a run must not fail by chance
# (the adapter itself scores in the tens of thousands)


class Tap:
    """A receiver's transport that records every message it gets (verified or not) and may
    rewrite what it sends: the attacker sits here, holding the receiver's own keys."""

    def __init__(self, inner, rewrite=None) -> None:
        self.inner, self.rank, self.world_size, self.rewrite = inner, inner.rank, inner.world_size, rewrite
        self.seen: list[tuple[int, int, bytes]] = []
        self.raw: list[bytes] = []

    def exchange(self, outgoing, incoming_from, tag, partial=False, patience=1, max_length=None, head=0):
        outgoing = {j: bytes(m) for j, m in outgoing.items()}  # a sealed message may come in two parts (wire.Sealed)
        if self.rewrite is not None:
            outgoing = {j: self.rewrite(self, j, m) for j, m in outgoing.items()}
        got = self.inner.exchange(outgoing, incoming_from, tag, partial, patience, max_length, head)
        self.refused = self.inner.refused
        self.seen += [(j, HEADER_STRUCT.unpack_from(m)[2], m[OVERHEAD:]) for j, m in got.items()]
        self.raw += list(got.values())
        return got

    def payloads(self, source: int | None, kind: int) -> list[bytes]:
        return [p for j, k, p in self.seen if k == kind and (source is None or j == source)]

    def all_reduce_sum(self, tensor, dtype=None):
        return self.inner.all_reduce_sum(tensor, dtype)

    def all_gather_bytes(self, data, max_length=None):
        return self.inner.all_gather_bytes(data, max_length)


def vectors(seed: int = 0) -> dict[int, torch.Tensor]:
    return {r: torch.randn(N, generator=torch.Generator().manual_seed(seed * 100 + r)) * 0.1 for r in range(WORLD)}


def run(values, keys, roster, rewrite=None, flip_peer: int | None = None, min_present: int = 2, topology_file: str = "torus.toml",
        consents: Path | None = None):
    """One secure round (the torus unless told); returns (topology, the receiver's tap, every peer's (vector, stats))."""
    hub = LocalHub(WORLD, timeout_s=10)
    topology = load_topology(ROOT / "topologies" / topology_file, WORLD)
    taps, results = {}, {}

    def peer(rank):
        transport = hub.transport(rank)
        if rank == RECEIVER:
            transport = taps[rank] = Tap(transport, rewrite)
        faults = None
        if rank == flip_peer:
            faults = FaultInjector(FaultSection(peers=[rank], kind="flip", from_round=1), keys[rank], WORLD, 0)
        averager = Averager(transport, "gossip", build_codec("fp32"), topology, keys[rank], roster, faults, secure=FIXED, seed=rank,
                            min_present=min_present)
        if consents is not None:  # each peer's log of the run, as a restarted process reopens it
            averager.secure.consents = ConsentLog.open(consents / f"peer{rank}")
        results[rank] = averager.average(values[rank], 0)

    on_threads(peer, WORLD)
    return topology, taps[RECEIVER], results


def words(data: bytes) -> np.ndarray:
    return np.frombuffer(data[: 4 * N], dtype="<u4").astype(np.uint32)


def correction_tails(tap: Tap) -> list[np.ndarray]:
    """Every released payload long enough to carry a pair correction: its last N words."""
    return [np.frombuffer(p[-4 * N:], dtype="<u4").astype(np.uint32) for p in tap.payloads(None, RELEASE) if len(p) >= 4 * N]


def best_guess(masked: np.ndarray, extras: list[np.ndarray], truth: torch.Tensor) -> np.ndarray:
    """The signed combination of the masked words and the attacker's extras closest to the truth."""
    best, best_error = masked, float("inf")
    for signs in itertools.product((-1, 0, 1), repeat=len(extras)):
        guess = masked.copy()
        for sign, extra in zip(signs, extras):
            guess = guess + extra if sign > 0 else guess - extra if sign < 0 else guess
        error = float((FIXED.decode(guess) - truth).abs().median())
        if error < best_error:
            best, best_error = guess, error
    return best


def chi_square_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def assert_hidden(guess: np.ndarray, truth: torch.Tensor) -> None:
    """Far from the victim's value, and uniform to a chi-square test."""
    assert float((FIXED.decode(guess) - truth).abs().median()) > 1.0  # the victim's values are ~0.03
    assert chi_square_bytes(guess.tobytes()) < CRITICAL


def test_attack_1_a_refused_message_plus_the_released_corrections_reveals_nothing():
    keys, roster = identities(WORLD)
    values, victim = vectors(), 4
    topology, tap, results = run(values, keys, roster, flip_peer=victim)
    truth = float(topology.weights(0)[RECEIVER, victim]) * values[victim]
    refused = tap.payloads(victim, DATA)
    assert len(refused) == 1  # the victim's bytes did reach the receiver ...
    corrections = correction_tails(tap)
    assert len(corrections) == 2  # ... and both present senders released their corrections with it
    assert_hidden(best_guess(words(refused[0]), corrections, truth), truth)
    # the honest sum of the two others still completes, here and at every receiver of the victim
    for rank, (mixed, stats) in results.items():
        senders = topology.in_neighbours(rank, 0)
        heard = [j for j in senders if j != victim]
        weights = topology.weights(0)
        expected = (1 - sum(weights[rank, j] for j in heard)) * values[rank] + sum(weights[rank, j] * values[j] for j in heard)
        if rank != victim:
            assert (mixed - expected).abs().max() <= len(heard) * FIXED.resolution + 1e-6
            assert not stats.abandoned and stats.dropouts == (1 if victim in senders else 0)
            assert stats.rejected == ({"digest": 1} if victim in senders else {})


def test_attack_1_on_a_ring_the_receiver_gets_only_pair_masked_data_and_no_correction_exists():
    """A ring receiver needs both senders, so the exchange is the data phase alone: when the
    victim's message is refused (one flipped bit), nothing else is ever sent to the receiver,
    the refused words stay uniform, and the only thing the two messages can give together is
    the sum of both senders (what secure averaging reveals anyway); the receiver abandons."""
    keys, roster = identities(WORLD)
    values, victim, other = vectors(3), 0, 2  # ring of 6: receiver 1 hears 0 and 2
    topology, tap, results = run(values, keys, roster, flip_peer=victim, topology_file="ring.toml")
    weights = topology.weights(0)
    assert sorted({k for _, k, _ in tap.seen}) == [DATA] and len(tap.seen) == 2  # no list, consent or release at all
    refused, heard = words(tap.payloads(victim, DATA)[0]), words(tap.payloads(other, DATA)[0])
    # the receiver removes what it can (its own receiver masks): the refused words stay behind the pair mask
    context, masks = Context(HEADER_STRUCT.unpack_from(tap.raw[0])[11], 0, 0, 0, RECEIVER), PairwiseMasks(keys[RECEIVER], roster)
    refused, heard = refused - masks.receiver_mask(victim, context, N), heard - masks.receiver_mask(other, context, N)
    assert_hidden(refused, float(weights[RECEIVER, victim]) * values[victim])
    both = float(weights[RECEIVER, victim]) * values[victim] + float(weights[RECEIVER, other]) * values[other]
    off = (FIXED.decode(refused + heard) - both).abs() > 2 * FIXED.resolution + 1e-6
    assert int(off.sum()) <= 1  # together only the sum of both (what secure averaging reveals), but for the flipped word
    mixed, stats = results[RECEIVER]
    assert stats.abandoned and stats.rejected == {"digest": 1} and torch.equal(mixed, values[RECEIVER])
    assert not results[3][1].abandoned and results[3][1].dropouts == 0  # a receiver the victim does not send to completes


def test_an_eavesdropper_summing_every_receivers_ring_messages_learns_nothing():
    """Everything every peer of a ring of 6 puts on the wire, read by someone with no keys: the
    data messages to each receiver summed per receiver, then W x = s solved for every adapter
    (the off-diagonal weights of a ring of 6 are invertible). Pair masks alone cancel in those
    sums (seen recovering all six adapters to 3e-6); the receiver masks keep them uniform."""
    keys, roster = identities(WORLD)
    values, hub = vectors(4), LocalHub(WORLD, timeout_s=10)
    topology = load_topology(ROOT / "topologies/ring.toml", WORLD)
    wire: list[bytes] = []

    class Wiretap(Tap):
        def exchange(self, outgoing, *args, **kwargs):
            wire.extend(bytes(m) for m in outgoing.values())
            return super().exchange(outgoing, *args, **kwargs)

    def peer(rank):
        Averager(Wiretap(hub.transport(rank)), "gossip", build_codec("fp32"), topology, keys[rank], roster, secure=FIXED,
                 seed=rank).average(values[rank], 0)

    on_threads(peer, WORLD)
    sums = np.zeros((WORLD, N), dtype=np.uint32)
    for message in wire:
        header = HEADER_STRUCT.unpack_from(message)
        sums[header[5]] += words(message[OVERHEAD:])  # header[5]: the receiver
    weights = topology.weights(0).astype(np.float64)
    np.fill_diagonal(weights, 0.0)
    solved = np.linalg.solve(weights, np.stack([FIXED.decode(sums[i]).double().numpy() for i in range(WORLD)]))
    for rank in range(WORLD):
        assert float(np.median(np.abs(solved[rank] - values[rank].double().numpy()))) > 1.0  # the values are ~0.07
        assert chi_square_bytes(sums[rank].tobytes()) < CRITICAL


def test_a_vector_already_sent_in_the_session_is_never_sent_again_so_no_two_sums_share_it():
    """A helper that spoils its releases leaves its receivers' sums abandoned, so their adapters
    stay as they were; a second exchange of the same vectors (a consensus step, a probe) would
    let a receiver drop one sender and subtract the two sums (seen recovering the victim to
    1e-5 through consensus control). Now every peer abstains from re-sending an identical
    vector, counts it, and no sum of the second exchange completes."""
    keys, roster = identities(WORLD)
    values, hub = vectors(5), LocalHub(WORLD, timeout_s=10)
    topology = load_topology(ROOT / "topologies/torus.toml", WORLD)
    taps, second = {}, {}

    def peer(rank):
        transport = taps[rank] = Tap(hub.transport(rank))
        averager = Averager(transport, "gossip", build_codec("fp32"), topology, keys[rank], roster, secure=FIXED, seed=rank)
        first, _ = averager.average(values[rank], 0)
        second[rank] = averager.average(values[rank], 0, 1, Purpose.CONSENSUS)  # the very same vector again
        averager.average(first, 1)  # a changed vector is sent as usual

    on_threads(peer, WORLD)
    for rank in range(WORLD):
        mixed, stats = second[rank]
        assert stats.repeats == 1 and stats.abandoned and torch.equal(mixed, values[rank])
        kinds = [k for j, k, _ in taps[rank].seen]
        assert kinds.count(DATA) == 2 * len(topology.in_neighbours(rank, 0)) and kinds.count(ABSTAIN) == len(topology.in_neighbours(rank, 0))


def test_consensus_control_is_refused_in_secure_mode():
    from p2pfed.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"\[consensus\] target: .*secure mode"):
        load_config(ROOT / "launch/configs/tiny.toml", ["gossip.secure=true", "consensus.target=0.01"])


def test_a_sender_adding_an_offset_to_its_masked_words_gets_its_receivers_sum_refused():
    """Masked words cannot be range-checked, so a sender may skip the clipping encoder and add
    2^30 to its words to receiver 0 (seen moving the receiver's adapter by 1024 per value with
    nothing refused); the unmasked sum then leaves what clipped senders can reach: refused."""
    keys, roster = identities(WORLD)
    values = vectors(6)

    def offset(tap, to, message):
        header = list(HEADER_STRUCT.unpack_from(message))
        if header[2] != DATA or to != 0:
            return message
        payload = bytearray(message[OVERHEAD:])
        payload[: 4 * N] = (words(bytes(payload)) + np.uint32(2**30)).astype("<u4").tobytes()
        return seal(keys[RECEIVER].signing, RECEIVER, to, header[6], header[7], header[8], header[2], bytes(payload),
                    session=header[11], purpose=header[3])

    _, _, results = run(values, keys, roster, rewrite=offset)  # peer 1 (a sender of 0, 2 and 4) adds the offset
    mixed, stats = results[0]
    assert stats.rejected == {"range": 1} and stats.abandoned and torch.equal(mixed, values[0])
    assert not results[2][1].abandoned and not results[4][1].abandoned  # its other receivers got honest words


def test_a_round_redone_after_a_restart_completes_only_over_the_list_of_its_first_attempt(tmp_path):
    """A restart redoes a round with bit-identical adapters under a new session. A receiver that
    completed the full sum in the first attempt and drops the victim in the second would get
    w * x_victim as the difference (seen recovering it to 4e-6). Helpers keep the lists they
    consented to beside their checkpoints and refuse a different one for the same round."""
    keys, roster = identities(WORLD)
    values, victim = vectors(7), 4
    _, _, first = run(values, keys, roster, consents=tmp_path)  # attempt 1: everyone present
    assert not first[RECEIVER][1].abandoned
    _, _, second = run(values, keys, roster, flip_peer=victim, consents=tmp_path)  # attempt 2, new session: victim refused
    for rank in (RECEIVER, 3, 5):  # the victim's receivers ask for lists without it: refused as a redo
        assert second[rank][1].abandoned and torch.equal(second[rank][0], values[rank])
    helpers_refusing = sum(stats.rejected.get("redo", 0) for _, stats in second.values())
    assert helpers_refusing >= 2 * 3  # each of those three receivers' two present helpers said no
    _, _, third = run(values, keys, roster, consents=tmp_path)  # the same list as the first attempt completes again
    assert all(not stats.abandoned for _, stats in third.values())


def lying_receiver(keys):
    """Tells each sender a different one of its fellows is missing, then forwards whatever
    consents it got: sender a hears 'b is missing', b hears 'c', c hears 'a'."""

    def rewrite(tap: Tap, to: int, message: bytes) -> bytes:
        header = list(HEADER_STRUCT.unpack_from(message))
        kind, senders = header[2], sorted({j for j, k, _ in tap.seen if k == DATA})
        if kind == SURVIVORS and message[OVERHEAD:]:
            present = told(senders, to)
            data = {j: decode_data(p, N, [k for k in senders if k != j]) for j, _, p in [(j, 0, tap.payloads(j, DATA)[0]) for j in senders]}
            payload = encode_survivors(Survivors(present, tuple(senders)), [data[j].sealed[to] for j in present if j != to])
        elif kind == CONSENTS:
            payload = b"".join(tap.payloads(j, CONSENT)[0] for j in senders)  # everything it holds, as is
        else:
            return message
        return seal(keys[RECEIVER].signing, RECEIVER, to, header[6], header[7], header[8], kind, payload, session=header[11],
                    purpose=header[3])

    return rewrite


def told(senders: list[int], helper: int) -> tuple[int, ...]:
    """The present list the liar gives `helper`: everyone but the next sender after it."""
    lie = dict(zip(senders, senders[1:] + senders[:1]))
    return tuple(j for j in senders if j != lie[helper])


def unmask_with_released_shares(tap: Tap, senders: list[int], victim: int, values: torch.Tensor) -> np.ndarray:
    """The victim's words less its self mask, if the releases hold enough shares of its seed."""
    masked = words(tap.payloads(victim, DATA)[0])
    holders = [k for k in senders if k != victim]
    shares = {}
    for helper in senders:
        released = tap.payloads(helper, RELEASE)[0]
        owners = [j for j in told(senders, helper) if j != helper]
        if victim in owners and len(released) >= SHARE_SIZE * len(owners):
            n = owners.index(victim)
            shares[holders.index(helper) + 1] = released[n * SHARE_SIZE: (n + 1) * SHARE_SIZE]
    if len(shares) < threshold(len(senders)):
        return masked
    context = Context(HEADER_STRUCT.unpack_from(tap.raw[0])[11], 0, 0, 0, RECEIVER)
    return masked - self_mask(combine(dict(sorted(shares.items())[: threshold(len(senders))])), context, N)


def test_attack_2_a_receiver_lying_about_who_is_missing_gets_nothing_and_every_sender_counts_it():
    keys, roster = identities(WORLD)
    values = vectors()
    topology, tap, results = run(values, keys, roster, rewrite=lying_receiver(keys))
    senders = topology.in_neighbours(RECEIVER, 0)
    assert len(senders) == 3
    extras = correction_tails(tap)
    for victim in senders:
        truth = float(topology.weights(0)[RECEIVER, victim]) * values[victim]
        assert_hidden(best_guess(unmask_with_released_shares(tap, senders, victim, values[victim]), extras, truth), truth)
        assert results[victim][1].inconsistent == 1  # the refusal is in the victim's own metrics
    assert all(not p for p in tap.payloads(None, RELEASE))  # no sender released anything to the liar


@pytest.mark.parametrize("case", ["restart redoes round 0 with another adapter", "second run with the same keys"])
def test_attacks_3_and_4_two_runs_of_one_round_share_no_mask(case):
    keys, roster = identities(WORLD)
    first, second = vectors(0), vectors(1)
    if case.startswith("restart"):
        second = {r: v + 0.01 * torch.randn(N, generator=torch.Generator().manual_seed(50 + r)) for r, v in first.items()}
    topology, tap_a, _ = run(first, keys, roster)
    _, tap_b, _ = run(second, keys, roster)
    for victim in topology.in_neighbours(RECEIVER, 0):
        w = float(topology.weights(0)[RECEIVER, victim])
        truth = w * (first[victim] - second[victim])
        difference = words(tap_a.payloads(victim, DATA)[0]) - words(tap_b.payloads(victim, DATA)[0])
        assert_hidden(difference, truth)


def test_an_averager_refuses_to_exchange_the_same_round_twice_in_one_session():
    keys, roster = identities(3)
    hub = LocalHub(3, timeout_s=5)
    topology = load_topology(ROOT / "topologies/ring.toml", 3)
    errors = {}

    def peer(rank):
        averager = Averager(hub.transport(rank), "gossip", build_codec("fp32"), topology, keys[rank], roster, secure=FIXED, seed=rank)
        x = torch.zeros(8)
        averager.average(x, 0)
        try:
            averager.average(x + 1, 0)  # what a probe or a redone round would have done
        except SecureError as err:
            errors[rank] = str(err)

    on_threads(peer, 3)
    assert sorted(errors) == [0, 1, 2] and all("reuse its masks" in e for e in errors.values())


def test_a_message_recorded_in_one_run_is_refused_in_the_next_and_masks_differ_between_sessions():
    keys, roster = identities(WORLD)
    _, tap_a, _ = run(vectors(0), keys, roster)
    _, tap_b, _ = run(vectors(0), keys, roster)
    session_a, session_b = (HEADER_STRUCT.unpack_from(t.raw[0])[11] for t in (tap_a, tap_b))
    assert session_a != session_b  # drawn afresh by all peers at every start
    verifier = Verifier(RECEIVER, roster, session_b)
    old = next(m for m in tap_a.raw if HEADER_STRUCT.unpack_from(m)[2] == DATA)
    sender = HEADER_STRUCT.unpack_from(old)[4]
    with pytest.raises(WireError, match="session"):
        verifier.open(old, sender, 0, 0, [sender], len(old), DATA)
    masks = PairwiseMasks(keys[0], roster)
    same_round = [masks.mask(Context(s, 0, 0, 0, RECEIVER), [0, 2], 64) for s in (session_a, session_b)]
    assert not np.array_equal(*same_round)


def test_an_eavesdropper_cannot_read_the_releases_so_cannot_rebuild_any_sum():
    """Releases travel sealed for the receiver: read as plaintext, their share bytes rebuild no
    seed (an eavesdropper holding every receiver's sum could solve for each adapter)."""
    keys, roster = identities(WORLD)
    topology, tap, _ = run(vectors(), keys, roster)
    senders = topology.in_neighbours(RECEIVER, 0)
    session = HEADER_STRUCT.unpack_from(tap.raw[0])[11]
    context = Context(session, 0, 0, 0, RECEIVER)
    releases = {j: tap.payloads(j, RELEASE)[0] for j in senders}
    for victim in senders:
        holders = [k for k in senders if k != victim]
        shares = {}
        for helper in holders:
            owners = [j for j in senders if j != helper]
            n = owners.index(victim)
            shares[holders.index(helper) + 1] = releases[helper][n * SHARE_SIZE: (n + 1) * SHARE_SIZE]
        guess = combine(dict(sorted(shares.items())[: threshold(len(senders))]))
        data = decode_data(tap.payloads(victim, DATA)[0], N, holders)
        assert commit(guess, context) != data.commitment


def test_min_present_stops_a_receiver_from_shrinking_the_sum_to_isolate_a_victim():
    """With three senders a receiver that refuses one honest message learns the sum of two,
    and with one colluder the other's adapter; `secure.min_present = 3` abandons such sums."""
    keys, roster = identities(WORLD)
    values = vectors()
    topology, _, results = run(values, keys, roster, flip_peer=4, min_present=3)
    for rank, (mixed, stats) in results.items():
        if 4 in topology.in_neighbours(rank, 0):
            assert stats.abandoned and torch.equal(mixed, values[rank])
        else:
            assert not stats.abandoned


def test_consensus_monitoring_in_secure_mode_hands_the_network_only_masked_words():
    """An all-reduce passes pieces of each input through other peers (gloo's ring sends a raw
    chunk to the next rank), so secure mode's monitoring sums masked words; Xi^2 is unchanged."""
    from p2pfed.consensus import consensus_distance_of, exact_consensus_distance

    keys, roster = identities(WORLD)
    values = vectors()
    hub = LocalHub(WORLD, timeout_s=10)
    topology = load_topology(ROOT / "topologies/torus.toml", WORLD)
    handed, distances = {}, {}

    class Recording:
        def __init__(self, inner):
            self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def all_reduce_sum(self, tensor, dtype=None):
            handed.setdefault(self.rank, []).append(tensor.clone())
            return self.inner.all_reduce_sum(tensor, dtype)

    def peer(rank):
        transport = Recording(hub.transport(rank))
        averager = Averager(transport, "gossip", build_codec("fp32"), topology, keys[rank], roster, secure=FIXED, seed=rank)
        distances[rank] = exact_consensus_distance(values[rank], transport, averager.monitor())

    on_threads(peer, WORLD)
    expected = consensus_distance_of([values[r] for r in range(WORLD)])
    assert all(abs(d - expected) <= 1e-6 * expected for d in distances.values())
    for rank, tensors in handed.items():
        vector_words = tensors[0]
        assert vector_words.dtype == torch.int64 and vector_words.numel() == N
        assert chi_square_bytes(vector_words.numpy().tobytes()) < CRITICAL  # uniform, not the adapter
        assert float((vector_words.double() / 2**32 - values[rank].double()).abs().median()) > 1.0
