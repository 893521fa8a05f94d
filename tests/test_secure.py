"""Secure averaging: masks cancel bit-exactly, a masked message looks uniform, the sum
matches plain mixing within the fixed-point bound, dropouts are recovered exactly, and
unsafe or pointless settings are refused with a clear message."""

import math
import threading
from pathlib import Path

import networkx as nx
import numpy as np

import pytest
import torch

from conftest import identities, on_threads
from p2pfed.codec import CodecSettings, build_codec
from p2pfed.config import ConfigError, FaultSection, load_config
from p2pfed.faults import FaultInjector
from p2pfed.gossip import Averager
from p2pfed.secure import Context, FixedPoint, PairwiseMasks, Purpose, SecureError, check_secure_topology, prg_words
from p2pfed.secure.masks import derive
from p2pfed.topology import load_topology
from p2pfed.transport import LocalHub
from p2pfed.wire import Verifier, WireError, seal

ROOT = Path(__file__).resolve().parents[1]
FIXED = FixedPoint(bound=4.0, frac_bits=20)
SESSION = bytes(range(16))


def ctx(round: int, step: int, receiver: int, session: bytes = SESSION, purpose: int = Purpose.TRAIN) -> Context:
    return Context(session, purpose, round, step, receiver)


def random_neighbourhoods(n: int, seed: int) -> nx.Graph:
    graph = nx.gnp_random_graph(n, 0.5, seed=seed)
    while not nx.is_connected(graph):
        seed += 1000
        graph = nx.gnp_random_graph(n, 0.5, seed=seed)
    return graph


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_cancel_bit_exactly_in_every_neighbourhood_and_round(seed):
    n = 7
    keys, roster = identities(n)
    masks = [PairwiseMasks(k, roster) for k in keys]
    graph = random_neighbourhoods(n, seed)
    for round, step in ((0, 0), (5, 1), (2**31, 3)):
        for i in graph.nodes:
            senders = sorted(graph.neighbors(i))
            total = np.zeros(64, dtype=np.uint32)
            for j in senders:
                mask = masks[j].mask(ctx(round, step, i), senders, 64)
                if len(senders) > 1:
                    assert mask.any()  # each single mask is far from zero ...
                total += mask
            assert not total.any()  # ... and together they cancel exactly


def test_masks_never_repeat_across_rounds_steps_receivers_purposes_or_sessions():
    secret = bytes(range(32))
    contexts = [ctx(r, s, i, session, purpose) for r in range(3) for s in range(2) for i in range(3)
                for session in (SESSION, bytes(16)) for purpose in Purpose]
    streams = [prg_words(derive(secret, b"mask", c), 16).tobytes() for c in contexts]
    assert len(set(streams)) == len(streams) == 3 * 2 * 3 * 2 * len(Purpose)


def test_pair_secrets_agree_at_both_ends_and_differ_between_pairs():
    keys, roster = identities(3)
    a, b, c = (PairwiseMasks(k, roster) for k in keys)
    assert a.secret(1) == b.secret(0) and a.secret(2) == c.secret(0)
    assert a.secret(1) != a.secret(2) and len(a.secret(1)) == 32


def chi_square_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("topology_file, world, holders", [("ring.toml", 3, None), ("torus.toml", 6, [2, 4])])
def test_what_a_real_sender_puts_on_the_wire_is_indistinguishable_from_uniform(topology_file, world, holders):
    """Capture peer 0's data message to peer 1 from a real secure exchange (in-process, keys and
    rounding seeded), take the masked words out of the envelope, and test their bytes: uniform
    to a chi-square test, while the same adapter's plain encoding is not. On a ring of 3 the
    receiver needs both senders, so the words carry pair masks alone; on a 2x3 torus
    (receiver 1 hears 0, 2 and 4: a sum of two can complete) they carry a self mask too."""
    from p2pfed.secure.messages import decode_data
    from p2pfed.wire import parse

    count = 50_000
    hub, (keys, roster) = LocalHub(world, timeout_s=20), identities(world)
    ring = load_topology(ROOT / f"topologies/{topology_file}", world)
    values = torch.linspace(-0.05, 0.05, count)  # a smooth, very non-uniform adapter slice
    captured: dict = {}

    def peer(rank):
        transport = hub.transport(rank)
        if rank == 0:
            send = transport.exchange

            def record(outgoing, *args, **kwargs):
                captured.setdefault("data", {j: bytes(m) for j, m in outgoing.items()})  # the first exchange is the data phase
                return send(outgoing, *args, **kwargs)

            transport.exchange = record
        Averager(transport, "gossip", build_codec("fp32", CodecSettings()), ring, keys[rank], roster, secure=FIXED, seed=rank).average(values, 0)

    on_threads(peer, world)
    _, _, _, payload = parse(captured["data"][1], 10 * count)
    words = decode_data(payload, count, holders).words  # the length must be exactly the layout's
    critical = 400.0  # chi-square with 255 degrees of freedom, p ~ 1e-10 (the self mask's seed is fresh by design)
    assert chi_square_bytes(words.tobytes()) < critical
    plain, _ = FIXED.encode(values * float(ring.weights(0)[1, 0]), torch.Generator().manual_seed(0))
    assert chi_square_bytes(plain.tobytes()) > 10 * critical  # the unmasked encoding is obviously not uniform
    assert abs((words >> 31).mean() - 0.5) < 0.01


def test_fixed_point_round_trip_and_sums_stay_within_the_bound():
    values = torch.randn(10_000) * 0.3
    generator = torch.Generator().manual_seed(1)
    words, clipped = FIXED.encode(values, generator)
    assert clipped == 0
    assert (FIXED.decode(words) - values).abs().max() <= FIXED.resolution
    big, clipped = FIXED.encode(torch.tensor([5.0, -9.0, 1.0]), generator)
    assert clipped == 2 and FIXED.decode(big).tolist()[:2] == [4.0, -4.0]


def test_non_finite_and_huge_values_are_clipped_into_range_and_counted():
    """NaN encodes as 0 and infinities at the bound, like any out-of-range value: a word
    outside the signed range would wrap a neighbour's sum (on an earlier encoder a NaN
    turned clipping off and reached the sum as -2048)."""
    words, clipped = FIXED.encode(torch.tensor([float("nan"), 5.0, -100.0, float("inf"), 1e9, 0.5, -float("inf")]),
                                  torch.Generator().manual_seed(0))
    assert FIXED.decode(words).tolist() == [0.0, 4.0, -4.0, 4.0, 4.0, 0.5, -4.0] and clipped == 6
    total = words + FIXED.encode(torch.tensor([-4.0] * 7), torch.Generator().manual_seed(1))[0]
    assert FIXED.decode(total).tolist() == [-4.0, 0.0, -8.0, 0.0, 0.0, -3.5, -8.0]  # sums stay within 2 x bound


@pytest.mark.parametrize("steps", [0.3, -0.3, -2.75, 5.5])
def test_stochastic_rounding_is_unbiased_for_positive_and_negative_values(steps):
    """A value `steps` resolution steps from zero rounds to its two neighbouring steps with
    probabilities that make the mean exact: the mean of 200,000 encodings lies within 5
    standard errors of `steps` (Bernoulli(frac) variance, closed form)."""
    count, frac = 200_000, steps - math.floor(steps)
    words, _ = FIXED.encode(torch.full((count,), steps * FIXED.resolution), torch.Generator().manual_seed(7))
    decoded = FIXED.decode(words).double() / FIXED.resolution
    assert set(decoded.unique().tolist()) <= {math.floor(steps), math.floor(steps) + 1}
    assert abs(decoded.mean().item() - steps) <= 5 * math.sqrt(frac * (1 - frac) / count)


def test_overflow_check_refuses_an_unsafe_configuration():
    FixedPoint(4.0, 20).check(100)  # 100 * 2^22 < 2^31
    with pytest.raises(SecureError, match="past the signed 32-bit range"):
        FixedPoint(4.0, 29).check(2)
    ring = load_topology(ROOT / "topologies/ring.toml", 6)
    with pytest.raises(ConfigError, match="frac_bits"):
        check_secure_topology(ring, FixedPoint(1000.0, 22))


def test_a_neighbourhood_with_one_sender_is_refused():
    onepeer = load_topology(ROOT / "topologies/onepeer-exponential.toml", 8)
    with pytest.raises(ConfigError, match="two or more senders"):
        check_secure_topology(onepeer, FIXED)


@pytest.mark.parametrize("override, message", [
    ("gossip.codec=topk+int8", "secure mode sums masked messages"),
    ("gossip.codec=int8", "secure mode sums masked messages"),
    ("gossip.algorithm=choco", "per-sender copy"),
    ("gossip.mode=allreduce", "masking applies to neighbour gossip"),
])
def test_codecs_with_per_sender_coordinates_or_state_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "launch/configs/tiny.toml", ["gossip.secure=true", override])
    load_config(ROOT / "launch/configs/tiny.toml", ["gossip.secure=true", "gossip.codec=randk"])  # shared coordinates: fine


def test_dropout_corrections_restore_the_exact_sum_of_the_remaining_masks():
    n = 6
    keys, roster = identities(n)
    masks = [PairwiseMasks(k, roster) for k in keys]
    receiver, senders = 0, [1, 2, 3, 4, 5]
    for missing in ([3], [2, 5], [1, 2, 4]):
        present = [j for j in senders if j not in missing]
        total = np.zeros(32, dtype=np.uint32)
        for j in present:
            total += masks[j].mask(ctx(9, 0, receiver), senders, 32)
            total -= masks[j].mask(ctx(9, 0, receiver), missing, 32)  # j's correction
        assert not total.any()


def test_a_message_from_a_sender_counted_missing_is_refused_as_late():
    keys, roster = identities(3)
    verifier = Verifier(0, roster)
    verifier.close(1, 4, 0, (0xE0,))
    late = seal(keys[1].signing, 1, 0, 4, 0, 0, 0xE0, b"\x00" * 8)
    with pytest.raises(WireError, match="late"):
        verifier.open(late, 1, 4, 0, [1, 2], 8, 0xE0)


def secure_rounds(world: int, topology_file: str, rounds: int, secure: bool, abstain: tuple[int, int] | None = None, spec: str = "fp32"):
    """Run pure gossip on threads; returns each peer's vectors per round and its stats."""
    hub = LocalHub(world, timeout_s=20)
    topology = load_topology(ROOT / "topologies" / topology_file, world)
    keys, roster = identities(world)
    history: dict = {}

    def peer(rank):
        faults = None
        if abstain and abstain[0] == rank:
            faults = FaultInjector(FaultSection(peers=[rank], kind="abstain", from_round=abstain[1], until_round=abstain[1]), keys[rank], world, 0)
        averager = Averager(hub.transport(rank), "gossip", build_codec(spec, CodecSettings(fraction=0.5)), topology, keys[rank], roster, faults,
                            secure=FIXED if secure else None, seed=rank)
        x = torch.randn(200, generator=torch.Generator().manual_seed(rank)) * 0.1
        history[rank] = [(x, None)]
        for t in range(rounds):
            x, stats = averager.average(x, t)
            history[rank].append((x, stats))

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return topology, history


@pytest.mark.parametrize("spec", ["fp32", "randk"])
def test_secure_mixing_equals_plain_mixing_within_the_fixed_point_bound(spec):
    rounds = 4
    topology, secure = secure_rounds(6, "ring.toml", rounds, True, spec=spec)
    _, plain = secure_rounds(6, "ring.toml", rounds, False, spec=spec)
    bound = rounds * 2 * FIXED.resolution  # two senders each round, each off by < one step
    for rank in range(6):
        for t in range(1, rounds + 1):
            assert (secure[rank][t][0] - plain[rank][t][0]).abs().max() <= bound
        stats = secure[rank][1][1]
        assert stats.mask_s > 0 and stats.dropouts == 0 and not stats.abandoned and stats.local_consensus is None


def test_an_abstaining_sender_is_recovered_and_the_sum_covers_the_rest():
    world = 6  # a 2x3 torus: three senders per peer, so two remain when one abstains
    topology, history = secure_rounds(world, "torus.toml", 2, True, abstain=(4, 2))
    weights = topology.weights(0)
    silent, round_index = 4, 1  # metrics round 2 = gossip round index 1
    for rank in range(world):
        before, (after, stats) = history[rank][round_index][0], history[rank][round_index + 1]
        senders = topology.in_neighbours(rank, round_index)
        heard = [j for j in senders if j != silent]
        expected = (1 - sum(weights[rank, j] for j in heard)) * before + sum(weights[rank, j] * history[j][round_index][0] for j in heard)
        assert (after - expected).abs().max() <= len(heard) * FIXED.resolution + 1e-6
        assert stats.dropouts == (1 if silent in senders else 0)
        assert not stats.abandoned
        if silent in senders:
            assert stats.rejected == {"abstain": 1}


@pytest.mark.parametrize("topology_file, world, recovered", [("complete8.toml", 8, True), ("torus.toml", 6, False)])
def test_a_sender_that_never_arrives_is_recovered_only_where_enough_helpers_remain(topology_file, world, recovered):
    """Seven senders (complete graph of 8): six helpers remain, each present seed has five
    holders among them, above the threshold of 4, so the sum of the six is completed. Three
    senders (2x3 torus): each present seed has one holder left, below the threshold of 2,
    so the receiver keeps its own adapter."""
    dead = 4
    hub = LocalHub(world, timeout_s=1.0)
    topology = load_topology(ROOT / "topologies" / topology_file, world)
    keys, roster = identities(world)
    vectors = {r: torch.randn(50, generator=torch.Generator().manual_seed(r)) * 0.1 for r in range(world)}
    results: dict = {}

    def peer(rank):
        if rank == dead:
            return  # crashed before the round: sends nothing, answers nothing
        averager = Averager(hub.transport(rank), "gossip", build_codec("fp32"), topology, keys[rank], roster, secure=FIXED, seed=rank,
                            session=SESSION)
        results[rank] = averager.average(vectors[rank], 0)

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    weights = topology.weights(0)
    for rank, (mixed, stats) in results.items():
        senders = topology.in_neighbours(rank, 0)
        heard = [j for j in senders if j != dead]
        expected = (1 - sum(weights[rank, j] for j in heard)) * vectors[rank] + sum(weights[rank, j] * vectors[j] for j in heard)
        if dead not in senders or recovered:
            assert (mixed - expected).abs().max() <= len(heard) * FIXED.resolution + 1e-6
            assert not stats.abandoned
        else:
            assert torch.equal(mixed, vectors[rank]) and stats.abandoned
        assert stats.dropouts == (1 if dead in senders else 0)


def test_the_consent_log_reads_back_only_well_formed_records_and_keeps_the_first_list(tmp_path):
    from p2pfed.secure.consentlog import CONSENT_FILE, ConsentLog
    from p2pfed.secure.messages import Survivors

    log = ConsentLog.open(tmp_path)
    log.record((0, 3, 0, 1), Survivors((0, 2), (0, 2, 4)))
    with open(tmp_path / CONSENT_FILE, "a", encoding="utf-8") as handle:  # planted or torn lines
        handle.write('junk\n[1, 2]\n{"key": [0, 3, 0], "present": [0], "helpers": [0]}\n{"key": [0, 4, 0, 1], "present": [true], "helpers": []}\n')
        handle.write("[" * 50_000 + "\n")
        handle.write('{"key": [0, 3, 0, 1], "present": [0, 4], "helpers": [0, 2, 4]}\n')  # a second list for a recorded key
    reopened = ConsentLog.open(tmp_path)
    assert reopened.lists == {(0, 3, 0, 1): Survivors((0, 2), (0, 2, 4))}
    assert reopened.admits((0, 3, 0, 1), Survivors((0, 2), (0, 2, 4))) and not reopened.admits((0, 3, 0, 1), Survivors((0, 4), (0, 2, 4)))
    assert reopened.admits((0, 5, 0, 1), Survivors((0, 4), (0, 2, 4)))  # another round: anything sound


def test_a_torn_consent_line_does_not_swallow_the_next_record_and_a_planted_log_is_one_sentence(tmp_path):
    import os

    from p2pfed.secure.consentlog import CONSENT_FILE, ConsentLog
    from p2pfed.secure.messages import Survivors

    (tmp_path / CONSENT_FILE).write_bytes(b'{"key": [0, 1, 0, 1], "pres')  # a crash in the middle of a write
    log = ConsentLog.open(tmp_path)
    log.record((0, 3, 0, 1), Survivors((0, 2), (0, 2, 4)))
    assert ConsentLog.open(tmp_path).lists == {(0, 3, 0, 1): Survivors((0, 2), (0, 2, 4))}  # seen lost before the fix
    for planted, make in (("link", lambda p: p.symlink_to(tmp_path / "elsewhere")), ("dir", lambda p: p.mkdir()),
                          ("fifo", lambda p: os.mkfifo(p))):
        (tmp_path / planted).mkdir()
        make(tmp_path / planted / CONSENT_FILE)
        with pytest.raises(SecureError, match="consent log is not a"):  # neither followed nor waited on
            ConsentLog.open(tmp_path / planted)
