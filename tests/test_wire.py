"""Signed envelopes: every tampering, replay, misroute and malformed input is refused with its reason."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import identities
from p2pfed.wire import HEADER_SIZE, OVERHEAD, Verifier, WireError, parse, seal

KEYS, ROSTER = identities(4)
PAYLOAD = b"adapter!"


def message(sender=1, receiver=2, round=7, step=0, payload=PAYLOAD, key=None):
    return seal(key or KEYS[sender].signing, sender, receiver, round, step, 0, 0, payload)


def verify(data, source=1, round=7, neighbours=(1, 3), verifier=None):
    verifier = verifier or Verifier(2, ROSTER)
    return verifier.open(data, source, round, 0, list(neighbours), max_payload=64, codec=0)


def reason_of(data, **kwargs):
    with pytest.raises(WireError) as err:
        verify(data, **kwargs)
    return err.value.reason


def test_honest_message_is_accepted():
    assert verify(message()) == PAYLOAD


# Which reasons a flipped bit may give, by the header field it lands in (offsets of "<4sBBHIIIIIQ32s").
FIELDS = [(0, 4, {"malformed"}), (4, 5, {"version"}), (5, 8, {"bad_signature"}), (8, 12, {"unknown_sender", "bad_signature"}),
          (12, 28, {"bad_signature"}), (28, 36, {"oversized", "truncated"}), (36, HEADER_SIZE, {"bad_signature"})]


def test_every_single_bit_flip_is_rejected_with_the_right_reason():
    original = message()
    for bit in range(len(original) * 8):
        byte = bit // 8
        tampered = bytearray(original)
        tampered[byte] ^= 1 << (bit % 8)
        reason = reason_of(bytes(tampered))
        if byte < HEADER_SIZE:
            allowed = next(r for lo, hi, r in FIELDS if lo <= byte < hi)
        elif byte < OVERHEAD:
            allowed = {"bad_signature"}
        else:
            allowed = {"digest"}
        assert reason in allowed, f"bit {bit} (byte {byte}): {reason}"


def test_replays_are_rejected():
    verifier = Verifier(2, ROSTER)
    old = message(round=6)
    assert verify(old, round=6, verifier=verifier) == PAYLOAD
    assert reason_of(old, round=7, verifier=verifier) == "replay"  # last round's message again
    fresh = message(round=7)
    assert verify(fresh, round=7, verifier=verifier) == PAYLOAD
    assert reason_of(fresh, round=7, verifier=verifier) == "replay"  # the same message twice


def test_foreign_key_unknown_sender_wrong_receiver_and_non_neighbour():
    assert reason_of(message(key=Ed25519PrivateKey.generate())) == "bad_signature"
    stranger = Ed25519PrivateKey.generate()
    assert reason_of(seal(stranger, 9, 2, 7, 0, 0, 0, PAYLOAD), source=1) == "unknown_sender"
    assert reason_of(message(receiver=3)) == "wrong_receiver"
    assert reason_of(message(sender=0), source=0) == "not_neighbour"  # valid signature, but 0 is not a neighbour
    assert reason_of(message(sender=3), source=1) == "not_neighbour"  # arrived on 1's link claiming to be 3


def test_truncated_and_oversized_are_rejected_before_reading():
    assert reason_of(message()[:HEADER_SIZE - 1]) == "truncated"
    assert reason_of(message()[:-1]) == "truncated"
    assert reason_of(message() + b"x") == "truncated"
    assert reason_of(message(payload=b"x" * 65)) == "oversized"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_raises_anything_but_wire_error(data):
    try:
        verify(data)
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(message()) - 1), st.integers(min_value=1, max_value=255))
def test_random_corruption_of_a_valid_message_is_refused(position, mask):
    data = bytearray(message())
    data[position] ^= mask
    with pytest.raises(WireError):
        verify(bytes(data))


def test_parse_reads_the_fields():
    header, _, signature, payload = parse(message(), 64)
    assert (header.sender, header.receiver, header.round, payload, len(signature)) == (1, 2, 7, PAYLOAD, 64)


def test_a_digest_computed_once_for_many_receivers_seals_the_same_bytes():
    from blake3 import blake3

    from p2pfed.identity import generate

    key, payload = generate(0).signing, bytes(range(256)) * 40
    digest = blake3(payload).digest()  # computed independently of the code under test
    assert seal(key, 0, 1, 3, 0, 0, 0, payload, digest=digest) == seal(key, 0, 1, 3, 0, 0, 0, payload)
