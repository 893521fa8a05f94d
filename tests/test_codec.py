"""Codecs: round trips within their precision, refusals with a clear message."""

import pytest
import torch

from p2pfed.codec import CodecError, get_codec


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
