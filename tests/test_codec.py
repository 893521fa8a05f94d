"""Codecs: round trips within their stated bounds, unbiasedness, top-k and random-k rules,
error feedback, and refusals of malformed payloads."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed.codec import CodecError, CodecSettings, ErrorFeedback, build_codec, get_codec, parse_spec
from p2pfed.indices import IndexBlockError, decode_indices, encode_indices

N = 1000


def vector(seed: int = 0, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("name, tolerance", [("fp32", 0.0), ("fp16", 2**-11), ("bf16", 2**-8)])
def test_float_codecs_roundtrip_within_their_precision(name, tolerance):
    codec = get_codec(name)
    x = vector()
    payload = codec.encode(x)
    assert len(payload) == codec.max_payload(N)
    decoded = codec.decode(payload, N)
    assert decoded.support is None
    assert ((decoded.values - x).abs() <= tolerance * x.abs()).all()
    with pytest.raises(CodecError):
        codec.decode(payload[:-2], N)


@pytest.mark.parametrize("name, levels, bytes_per_value", [("int8", 127, 1), ("int4", 7, 0.5)])
def test_stochastic_ints_stay_within_one_step_of_each_chunk_scale(name, levels, bytes_per_value):
    codec = build_codec(name, CodecSettings(chunk=100))
    x = vector()
    x[:100] *= 50  # one loud chunk must not coarsen the others
    payload = codec.encode(x)
    assert len(payload) == 4 * 10 + int(N * bytes_per_value)
    error = (codec.decode(payload, N).values - x).abs().view(10, 100)
    step = x.abs().view(10, 100).amax(dim=1, keepdim=True) / levels
    assert (error < step).all()
    assert error[1:].max() < step[0] / 10  # quiet chunks keep their own fine scale


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(name):
    codec = build_codec(name, CodecSettings(chunk=N, seed=3))
    x = vector()
    draws = 4000
    mean = torch.stack([codec.decode(codec.encode(x), N).values for _ in range(draws)]).mean(dim=0)
    step = float(x.abs().max()) / codec.values.levels
    # each draw errs by at most one step, so its std is <= step/2; the mean's by step/(2 sqrt(draws))
    assert (mean - x).abs().max() < 5 * step / (2 * draws**0.5)
    nearest = torch.round(x / step) * step  # what a biased (round-to-nearest) quantiser would give
    assert (nearest - x).abs().max() > 20 * step / (2 * draws**0.5)  # so the test can tell them apart


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    codec = build_codec("topk", CodecSettings(fraction=0.05))
    x = vector()
    decoded = codec.decode(codec.encode(x), N)
    k = 50
    largest = set(torch.topk(x.abs(), k).indices.tolist())
    assert set(decoded.support.tolist()) == largest
    assert torch.equal(decoded.values[decoded.support], x[decoded.support])
    others = torch.ones(N, dtype=torch.bool)
    others[decoded.support] = False
    assert (decoded.values[others] == 0).all()
    size = len(codec.encode(x))
    assert size <= codec.max_payload(N)
    assert size <= 8 + 1 + k * (4 + 2)  # fp32 values + at most 2 bytes per index (gaps < 2^14)


def test_topk_with_int8_values_composes_both_bounds():
    codec = build_codec("topk+int8", CodecSettings(fraction=0.1, chunk=64))
    x = vector()
    decoded = codec.decode(codec.encode(x), N)
    kept = x[decoded.support]
    assert (decoded.values[decoded.support] - kept).abs().max() < kept.abs().max() / 127
    assert len(codec.encode(x)) < 0.1 * N * 2.2  # ~1 byte value + ~1 byte index + scales


def test_random_k_indices_agree_without_being_sent():
    settings = CodecSettings(fraction=0.1, seed=7)
    sender, receiver = build_codec("randk", settings, rank=0), build_codec("randk", settings, rank=3)
    x = vector()
    payload = sender.encode(x, round=5, step=1)
    assert len(payload) == 100 * 4  # the values alone: no index is sent
    decoded = receiver.decode(payload, N, round=5, step=1)
    assert torch.equal(decoded.support, sender.shared_indices(N, 5, 1))
    assert torch.equal(decoded.values[decoded.support], x[decoded.support])
    assert not torch.equal(sender.shared_indices(N, 5, 1), sender.shared_indices(N, 6, 1))
    other_run = build_codec("randk", CodecSettings(fraction=0.1, seed=8))
    assert not torch.equal(other_run.shared_indices(N, 5, 1), sender.shared_indices(N, 5, 1))


def test_low_rank_is_exact_for_low_rank_matrices_and_small_on_the_wire():
    layout = [(8, 96), (96, 8), (16,)]
    gen = torch.Generator().manual_seed(1)
    pieces = [torch.randn(8, 2, generator=gen) @ torch.randn(2, 96, generator=gen),
              torch.randn(96, 2, generator=gen) @ torch.randn(2, 8, generator=gen), torch.randn(16, generator=gen)]
    x = torch.cat([p.reshape(-1) for p in pieces])
    codec = build_codec("lowrank", CodecSettings(rank=2), layout=layout)
    payload = codec.encode(x)
    assert len(payload) == 4 * (2 * (8 + 96) * 2 + 16)
    assert torch.allclose(codec.decode(payload, x.numel()).values, x, atol=1e-4)
    full_rank = torch.randn(x.numel(), generator=gen)
    error = codec.decode(codec.encode(full_rank), x.numel()).values - full_rank
    assert error.norm() > 0.1 * full_rank.norm()  # a rank-2 sketch of a full-rank matrix is lossy


def test_low_rank_without_a_layout_is_refused():
    with pytest.raises(CodecError, match="layout"):
        build_codec("lowrank").encode(vector())


@pytest.mark.parametrize("spec", ["topk", "topk+int8", "lowrank+int8", "int4"])
def test_error_feedback_keeps_the_residual_exactly(spec):
    layout = [(10, 100)]
    feedback = ErrorFeedback(build_codec(spec, CodecSettings(fraction=0.05, rank=1), layout=layout))
    inputs, outputs = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    for t in range(20):
        increment = vector(seed=t)
        _, decoded = feedback.encode(increment, round=t)
        inputs += increment.double()
        outputs += decoded.double()
        assert torch.allclose(inputs, outputs + feedback.residual.double(), atol=1e-5)
    assert feedback.residual.abs().max() > 0  # something was held back and is still owed


def test_malformed_payloads_are_refused():
    x = vector()
    topk = build_codec("topk+int8")
    payload = topk.encode(x)
    for bad in (payload[:5], payload[:-1], b"\xff" * 8 + payload[8:], payload + b"\x00"):
        with pytest.raises(CodecError):
            topk.decode(bad, N)
    int4 = build_codec("int4")
    good = int4.encode(x)
    scales = 4 * 4  # N=1000 with chunk 256 -> 4 scales
    with pytest.raises(CodecError, match="code beyond"):
        int4.decode(good[:scales] + b"\x00" + good[scales + 1 :], N)  # nibble 0 would be -8
    with pytest.raises(CodecError, match="scale"):
        int4.decode(np.float32(-1).tobytes() + good[4:], N)


@pytest.mark.parametrize("spec, expected", [("int8", ("dense", "int8")), ("topk", ("topk", "fp32")), ("randk+fp16", ("randk", "fp16"))])
def test_specs_parse(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["zip", "int8+topk", "topk+randk", "topk+int8+fp16", ""])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(CodecError, match=r"\[gossip\] codec: expected a value encoding"):
        parse_spec(spec)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 4999), max_size=400), st.sampled_from([5000, 6000]))
def test_index_blocks_roundtrip(chosen, n):
    indices = np.array(sorted(chosen), dtype=np.int64)
    block = encode_indices(indices, n)
    assert np.array_equal(decode_indices(block, len(indices), n), indices)


def test_index_blocks_pick_the_smaller_format_and_refuse_garbage():
    dense = np.arange(0, 1000, 2)
    assert encode_indices(dense, 1000)[0] == 1 and len(encode_indices(dense, 1000)) == 1 + 125  # bitmap
    sparse = np.array([3, 700, 999])
    assert encode_indices(sparse, 1000)[0] == 0 and len(encode_indices(sparse, 1000)) <= 1 + 6
    for bad, k in ((b"\x00\x85", 1), (b"\x02\x00", 1), (encode_indices(sparse, 1000), 2), (b"\x00\x05\xff\x7f", 2)):
        with pytest.raises(IndexBlockError):
            decode_indices(bad, k, 1000)


@pytest.mark.parametrize("spec, setting, secure, expected", [
    ("fp32", "auto", False, False),  # exact: nothing to carry over
    ("int8", "auto", False, False),  # stochastic rounding is unbiased
    ("fp16", "auto", False, False),  # rounding to nearest: error far below gossip noise
    ("topk+int8", "auto", False, True),  # drops coordinates: carried to the next round
    ("lowrank+int8", "auto", False, True),
    ("fp32", "on", False, True),
    ("topk+int8", "off", False, False),
    ("randk+fp16", "auto", True, False),  # secure mode never keeps per-sender copies
])
def test_error_feedback_auto_is_on_exactly_for_codecs_that_drop_or_bias(spec, setting, secure, expected):
    from p2pfed.config import GossipSection
    from p2pfed.peer import error_feedback_for

    gossip = GossipSection(codec=spec, error_feedback=setting, secure=secure)
    assert error_feedback_for(gossip, build_codec(spec, CodecSettings())) is expected


def test_int2_is_ternary_unbiased_within_one_step_and_two_bits_a_value():
    """Each chunk maps to {-s, 0, s} with s = max|chunk|: every decoded value is within one
    step s of the input; the mean of 4,000 encodings of the same vector lies within 5
    standard errors (s / (2 sqrt(4000)) bounds a Bernoulli step's std) of the input; the
    payload is 4 bytes of scale per chunk plus 2 bits a value, exactly."""
    from p2pfed.codec import CodecSettings, build_codec

    count, chunk = 1003, 64
    codec = build_codec("int2", CodecSettings(chunk=chunk), rank=0)
    vector = torch.randn(count, generator=torch.Generator().manual_seed(1))
    payload = codec.encode(vector)
    assert len(payload) == 4 * math.ceil(count / chunk) + math.ceil(count * 2 / 8) == codec.max_payload(count)
    decoded = codec.decode(payload, count).values
    steps = vector.view(-1)[: (count // chunk) * chunk].view(-1, chunk).abs().amax(dim=1)
    step = torch.cat([steps.repeat_interleave(chunk), vector[(count // chunk) * chunk:].abs().max().expand(count % chunk)])
    assert set(torch.unique(torch.round(decoded / step)).tolist()) <= {-1.0, 0.0, 1.0}
    assert bool(((decoded - vector).abs() <= step * (1 + 1e-6)).all())
    trials = 4000
    mean = sum(codec.decode(codec.encode(vector), count).values for _ in range(trials)) / trials
    assert bool(((mean - vector).abs() <= 5 * step / (2 * math.sqrt(trials))).all())


def test_an_int2_code_beyond_one_is_refused():
    from p2pfed.codec import CodecError, CodecSettings, build_codec

    codec = build_codec("int2", CodecSettings(chunk=8), rank=0)
    payload = bytearray(codec.encode(torch.randn(8)))
    payload[-1] |= 0b11  # the first code of the last byte becomes 3: +2 steps
    with pytest.raises(CodecError, match="beyond"):
        codec.decode(bytes(payload), 8)
