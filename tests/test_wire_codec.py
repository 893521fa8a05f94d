"""Envelopes and codecs: round trips, and refusals with a reason."""

import pytest
import torch

from p2pfed.codec import CodecError, get_codec
from p2pfed.wire import HEADER_SIZE, WireError, open_envelope, seal


def test_envelope_roundtrip():
    message = seal(1, 2, 7, 0, 1, 0, b"payload")
    header, payload = open_envelope(message, max_payload=100)
    assert (header.sender, header.receiver, header.round, header.epoch, payload) == (1, 2, 7, 1, b"payload")


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda m: m[:10], "truncated"),
        (lambda m: m[:-1], "truncated"),
        (lambda m: b"XXXX" + m[4:], "malformed"),
        (lambda m: m[:4] + bytes([9]) + m[5:], "version"),
        (lambda m: m[:-1] + bytes([m[-1] ^ 1]), "digest"),
    ],
)
def test_bad_envelopes_are_refused_with_a_reason(mutate, reason):
    message = seal(1, 2, 7, 0, 0, 0, b"payload bytes")
    with pytest.raises(WireError) as err:
        open_envelope(mutate(message), max_payload=100)
    assert err.value.reason == reason


def test_oversized_payload_refused_before_reading():
    with pytest.raises(WireError) as err:
        open_envelope(seal(0, 1, 0, 0, 0, 0, b"x" * 64), max_payload=32)
    assert err.value.reason == "oversized"


@pytest.mark.parametrize("name, tolerance", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_codecs_roundtrip_within_their_precision(name, tolerance):
    codec = get_codec(name)
    vector = torch.randn(1000)
    payload = codec.encode(vector)
    assert len(payload) == codec.max_payload(1000)
    decoded = codec.decode(payload, 1000)
    assert torch.allclose(decoded, vector, rtol=tolerance, atol=tolerance)
    with pytest.raises(CodecError):
        codec.decode(payload[:-2], 1000)


def test_unknown_codec():
    with pytest.raises(CodecError, match="codec: expected one of"):
        get_codec("zip")
