"""One secure exchange, phase by phase (SecAgg's double masking with a consistency check,
Bonawitz et al. 2017; Flower's SecAgg+), in a receiver's neighbourhood.

Every peer is at once a sender (to its out-neighbours) and a receiver (of its
in-neighbours), so each phase is one lockstep exchange in which it plays both parts:

1. data       sender j -> receiver i: enc(W_ij x_j) + PRG(b_j) + pair masks, a hash
              committing to b_j, and b_j's Shamir shares sealed for i's other senders.
2. survivors  i -> helpers: the present senders P (data verified) and the helpers H
              (P and those whose message arrived but was refused), plus each helper's
              sealed shares of the present senders' seeds.
3. consent    helper k -> i: k's signature over (context, P, H), if the list is sound.
4. consents   i -> helpers: every helper's signature; a helper goes on only if all of H
              signed the same (context, P, H), so every helper acts on one agreed list.
5. release    helper k -> i: its shares of b_j for j in P, and, for the missing senders
              M = S \\ P, its pair correction (k in P only). Never a share of a missing
              sender's seed, so a refused-but-received message stays behind PRG(b_m).
6. unmask     i rebuilds each b_j from t shares, checks it against j's commitment,
              removes PRG(b_j) and the corrections; the pair masks cancel in the sum.

Any failure (too few present, a helper that declines or lies) abandons the sum: the
receiver keeps its own adapter; nothing partial is ever unmasked.

Only a receiver whose sum can complete without one of its senders (more senders than
`max(2, min_present)`) needs phases 2-6. A receiver that needs every sender (a ring, or
`min_present` at its degree) gets one exchange: each sender adds the pair masks and a
receiver mask from its pair key with the receiver, which only the receiver can remove (the
pair masks alone cancel in the sum of a receiver's messages, which an eavesdropper could
then read off the wire). The receiver sums them if all arrived: with no correction ever
released, no pair mask can be peeled off, so a refused or lying count gains nothing, and
self masks, shares and the consent check would be pure cost.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature

from p2pfed.identity import Identity, Roster
from p2pfed.secure.consentlog import ConsentLog
from p2pfed.secure.fixedpoint import FixedPoint, SecureError
from p2pfed.secure.masks import PairwiseMasks, self_mask
from p2pfed.secure.messages import (SIGNATURE_SIZE, Data, Survivors, data_length, decode_consents, decode_data, decode_release,
                                    decode_survivors, encode_data, encode_release, encode_survivors, release_length)
from p2pfed.secure.scratch import Scratch
from p2pfed.secure.session import Context
from p2pfed.secure.shares import SEALED_SHARE_SIZE, SEED_SIZE, TAG_SIZE, combine, open_from, open_share, seal_for, seal_share, split_seed, threshold
from p2pfed.topology import Topology

SECURE_CODEC = 0xE0
"""Envelope kind of masked data: SECURE_CODEC + the codec's structure index (0 dense, 2 random-k)."""
ABSTAIN, SURVIVORS, RELEASE, CONSENT, CONSENTS = 0xF0, 0xF1, 0xF2, 0xF3, 0xF4
"""Envelope kinds of the other messages: an explicit abstain instead of data, and phases 2-5."""
_CONSENT_LABEL = b"p2pfed consent v1"


class Channel(Protocol):
    """What a phase needs from the averager: sealed, verified, counted exchanges."""

    rank: int

    def exchange(self, outgoing: dict[int, bytes], kind: int, listen: list[int], accept: tuple[int, ...], max_payload: int,
                 patience: int, tamper: bool = False) -> tuple[dict[int, tuple[int, bytes]], set[int]]:
        """Seal and send; return ({source: (kind, payload)} verified, every source whose bytes arrived)."""
        ...

    def refuse(self, source: int | None, error: SecureError) -> None:
        """Count and log a payload that verified but is not what this phase expects (None: the
        sum as a whole, no one sender to name)."""
        ...


@dataclass
class SecureCost:
    """What masking cost in one exchange, for the metrics."""

    mask_s: float = 0.0
    clipped: int = 0
    dropouts: int = 0
    inconsistent: int = 0
    """Receivers this peer released nothing to: their lists were not signed alike by all helpers."""


@dataclass
class Neighbourhood:
    """This peer's long-lived secure state: keys, topology, encoding, rounding randomness."""

    identity: Identity
    roster: Roster
    topology: Topology
    fixed: FixedPoint
    data_kind: int
    generator: torch.Generator
    min_present: int = 2
    """The fewest present senders a sum completes with (helpers check it too)."""
    consents: ConsentLog = field(default_factory=ConsentLog)
    """Lists consented to in this run (on disk under a peer: a redone round gets the same list)."""
    masks: PairwiseMasks = field(init=False)
    recovering: tuple[frozenset[int], ...] = field(init=False)
    """Per topology epoch, the receivers whose sum can complete with a sender missing."""
    feeds_recovery: bool = field(init=False)
    """Whether this peer ever sends to such a receiver (only then can a repeated vector leak)."""
    scratch: Scratch = field(default_factory=Scratch)
    """Work arrays (encodings, keystreams, sums) that stay mapped from one exchange to the next."""

    def __post_init__(self) -> None:
        self.masks = PairwiseMasks(self.identity, self.roster)
        floor, topology = max(2, self.min_present), self.topology
        self.recovering = tuple(frozenset(i for i in range(topology.n) if len(topology.in_neighbours(i, epoch)) > floor)
                                for epoch in range(topology.period))
        self.feeds_recovery = any(i in self.recovering[epoch] for epoch in range(topology.period)
                                  for i in topology.out_neighbours(self.rank, epoch))

    @property
    def rank(self) -> int:
        return self.identity.rank


@dataclass
class Exchange:
    """One exchange at one peer: its contexts and what each phase left for the next."""

    round: int
    step: int
    purpose: int
    session: bytes
    count: int
    cost: SecureCost = field(default_factory=SecureCost)
    data: dict[int, Data] = field(default_factory=dict)
    survivors: Survivors | None = None
    """As a receiver: the list its helpers are asked to sign (None once the sum is abandoned)."""
    helpers: list[int] = field(default_factory=list)
    """As a receiver: whom phases 2-5 talk to (senders whose data arrived, verified or not)."""
    pending: dict[int, tuple[Survivors, dict[int, bytes]]] = field(default_factory=dict)
    """As a helper: receiver -> (its list, my opened shares of its present senders' seeds)."""

    def context(self, receiver: int) -> Context:
        return Context(self.session, self.purpose, self.round, self.step, receiver)


def consent_message(context: Context, survivors: Survivors) -> bytes:
    """What a helper signs: the context and the one list every helper must agree on."""
    return _CONSENT_LABEL + context.encode() + survivors.encode()


def viable(survivors: Survivors, senders: int, min_present: int = 2) -> bool:
    """Enough present (two or more, and `min_present`), and every present seed rebuildable
    from the other helpers."""
    return len(survivors.present) >= max(2, min_present) and len(survivors.helpers) - 1 >= threshold(senders)


def recovers(nb: Neighbourhood, receiver: int, round: int) -> bool:
    """Whether `receiver`'s sum can complete with a sender missing (more senders than
    `max(2, min_present)`): only then are self masks, shares and phases 2-6 needed (every
    peer reads the same topology, so all agree)."""
    return receiver in nb.recovering[round % nb.topology.period]


def any_recovery(nb: Neighbourhood, round: int) -> bool:
    """Whether any receiver of this round recovers: if none does, no peer runs phases 2-5."""
    return bool(nb.recovering[round % nb.topology.period])


def _timed(cost: SecureCost, start: float) -> None:
    cost.mask_s += time.perf_counter() - start


def send_data(nb: Neighbourhood, state: Exchange, values: torch.Tensor) -> dict[int, bytes | memoryview]:
    """Phase 1, as a sender: for each receiver, masked words, seed commitment, sealed shares
    (a payload may be a view of a reused buffer: seal it before the next exchange)."""
    me, round, out = nb.rank, state.round, {}
    weights = nb.topology.weights(round)
    receivers = nb.topology.out_neighbours(me, round)
    scratch = nb.scratch
    encoded = nb.fixed.encode_weighted(values, {i: float(weights[i, me]) for i in receivers}, nb.generator, scratch)
    stream = scratch.array("stream", state.count, np.uint32)
    for i in receivers:
        context, senders = state.context(i), nb.topology.in_neighbours(i, round)
        plain_words, clipped = encoded[i]
        state.cost.clipped += clipped
        start = time.perf_counter()
        if not recovers(nb, i, round):  # pair masks (cancel only in the sum of all) and the receiver's mask
            words = scratch.array(f"words{i}", state.count, np.dtype("<u4"))  # the payload itself until sealed: no copy
            np.add(plain_words, nb.masks.receiver_mask(i, context, state.count, out=stream), out=words)
            nb.masks.mask(context, senders, state.count, onto=words, stream=stream)
            out[i] = memoryview(words).cast("B")
            _timed(state.cost, start)
            continue
        words = scratch.array("words", state.count, np.uint32)  # copied out by encode_data before the next receiver
        seed = os.urandom(SEED_SIZE)  # fresh per context, never stored
        np.add(plain_words, self_mask(seed, context, state.count, out=stream), out=words)  # plain_words may serve another receiver
        nb.masks.mask(context, senders, state.count, onto=words, stream=stream)
        holders = [k for k in senders if k != me]
        shares = split_seed(seed, len(holders), threshold(len(senders)))
        sealed = [seal_share(nb.masks.share_key(k, context), s, context, me, k) for k, s in zip(holders, shares)]
        out[i] = encode_data(words, commit(seed, context), sealed)
        _timed(state.cost, start)
    return out


def commit(seed: bytes, context: Context) -> bytes:
    return hashlib.sha256(b"p2pfed seed commitment" + context.encode() + seed).digest()


def max_data_payload(nb: Neighbourhood, state: Exchange) -> int:
    """The exact size of every data message this peer receives in this exchange."""
    if not recovers(nb, nb.rank, state.round):
        return 4 * state.count
    return data_length(state.count, len(nb.topology.in_neighbours(nb.rank, state.round)) - 1)


def choose_survivors(nb: Neighbourhood, state: Exchange, channel: Channel, heard: dict[int, tuple[int, bytes]],
                     arrived: set[int]) -> dict[int, bytes]:
    """Phase 2, as a receiver: who is present and who helps; each helper's list and shares."""
    senders, recovering = nb.topology.in_neighbours(nb.rank, state.round), recovers(nb, nb.rank, state.round)
    for j, (kind, payload) in sorted(heard.items()):
        if kind != nb.data_kind:
            channel.refuse(j, SecureError(f"peer {j} abstained", "abstain"))
            continue
        try:
            state.data[j] = decode_data(payload, state.count, [k for k in senders if k != j] if recovering else None)
        except SecureError as err:
            channel.refuse(j, err)
    if not recovering:  # all or nothing, and no one to ask
        state.cost.dropouts = len(senders) - len(state.data)
        state.survivors = Survivors(tuple(sorted(state.data)), ()) if len(state.data) == len(senders) else None
        return {}
    survivors = Survivors(tuple(sorted(state.data)), tuple(j for j in senders if j in arrived))
    state.helpers = list(survivors.helpers)
    state.cost.dropouts = len(senders) - len(survivors.present)
    if not viable(survivors, len(senders), nb.min_present):
        return {k: b"" for k in survivors.helpers}  # an empty list: no sum this time, nothing to release
    state.survivors = survivors
    return {k: encode_survivors(survivors, [state.data[j].sealed[k] for j in survivors.present if j != k])
            for k in survivors.helpers}


def max_survivors_payload(nb: Neighbourhood) -> int:
    n = nb.topology.n
    return 8 + 8 * n + SEALED_SHARE_SIZE * n


def consent(nb: Neighbourhood, state: Exchange, channel: Channel, lists: dict[int, tuple[int, bytes]],
            answer_to: list[int]) -> dict[int, bytes]:
    """Phase 3, as a helper: sign each receiver's list if it is sound and the shares open
    (an empty answer to every other receiver that wrote, so no one waits in vain)."""
    me, out = nb.rank, {i: b"" for i in answer_to}
    for i, (_, payload) in sorted(lists.items()):
        if not payload:
            continue  # the receiver gave up on this sum
        context, senders = state.context(i), nb.topology.in_neighbours(i, state.round)
        try:
            survivors, forwarded = decode_survivors(payload, senders, me)
            if me not in survivors.helpers or not viable(survivors, len(senders), nb.min_present):
                raise SecureError(f"list {survivors} does not make peer {me} a helper of a sum that can be completed", "malformed")
            opened = {j: open_share(nb.masks.share_key(j, context), sealed, context, j, me) for j, sealed in forwarded.items()}
            key = (state.purpose, state.round, state.step, i)
            if not nb.consents.admits(key, survivors):
                raise SecureError(f"list {survivors} for round {state.round + 1} differs from {nb.consents.lists[key]}, consented to "
                                  "in an earlier attempt of this run: two sums of one redone adapter would unmask a sender", "redo")
            nb.consents.record(key, survivors)  # on disk before the consent leaves; if it cannot be, no consent
        except SecureError as err:
            channel.refuse(i, err)
            continue
        state.pending[i] = (survivors, opened)
        out[i] = nb.identity.signing.sign(consent_message(context, survivors))
    return out


def collect_consents(nb: Neighbourhood, state: Exchange, channel: Channel, consents: dict[int, tuple[int, bytes]]) -> dict[int, bytes]:
    """Phase 4, as a receiver: forward every helper's signature, or give up if one is missing or false."""
    survivors = state.survivors
    if survivors is None:
        return {k: b"" for k in state.helpers}
    context, signatures = state.context(nb.rank), []
    for k in survivors.helpers:
        signature = consents.get(k, (0, b""))[1]
        if not verify_consent(nb.roster, k, signature, context, survivors):
            if signature:
                channel.refuse(k, SecureError(f"peer {k}'s consent does not verify over this round's list", "consent"))
            state.survivors = None
            return {j: b"" for j in survivors.helpers}
        signatures.append(signature)
    return {k: b"".join(signatures) for k in survivors.helpers}


def verify_consent(roster: Roster, signer: int, signature: bytes, context: Context, survivors: Survivors) -> bool:
    keys = roster.get(signer)
    if keys is None or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        keys.signing.verify(signature, consent_message(context, survivors))
        return True
    except InvalidSignature:
        return False


def release(nb: Neighbourhood, state: Exchange, channel: Channel, bundles: dict[int, tuple[int, bytes]],
            answer_to: list[int]) -> dict[int, bytes]:
    """Phase 5, as a helper: shares for present senders, corrections for missing ones, only
    where every helper signed the same list; never both for one sender."""
    me, out = nb.rank, {i: b"" for i in answer_to}
    for i, (survivors, opened) in sorted(state.pending.items()):
        payload = bundles.get(i, (0, b""))[1]
        if not payload:
            continue
        context = state.context(i)
        try:
            signatures = decode_consents(payload, survivors.helpers)
        except SecureError as err:
            channel.refuse(i, err)
            continue
        if not all(verify_consent(nb.roster, k, signatures[k], context, survivors) for k in survivors.helpers):
            state.cost.inconsistent += 1
            channel.refuse(i, SecureError(f"peer {i}'s helpers did not all sign the list {survivors}: releasing nothing", "inconsistent"))
            continue
        missing = survivors.missing(nb.topology.in_neighbours(i, state.round))
        start = time.perf_counter()
        correction = nb.masks.mask(context, missing, state.count) if me in survivors.present and missing else None
        _timed(state.cost, start)
        release = encode_release([opened[j] for j in survivors.present if j != me], correction)
        out[i] = seal_for(nb.masks.release_key(i, context), release, context, me, i)  # for the receiver's eyes only
    return out


def _in_range(nb: Neighbourhood, channel: Channel, total: torch.Tensor, present: int) -> torch.Tensor | None:
    """The unmasked sum if it lies where `present` clipped senders can put it (each weighted
    value within the bound, plus rounding), else None, refused as `range`. Masked words cannot
    be range-checked one by one, so a hostile sender's offset shows only here."""
    limit = present * (nb.fixed.bound + nb.fixed.resolution)
    if total.numel() == 0 or max(-float(total.min()), float(total.max())) <= limit:
        return total
    channel.refuse(None, SecureError(f"the unmasked sum leaves [-{limit:g}, {limit:g}], where {present} clipped senders put it: "
                                     "a sender added an offset to its masked words", "range"))
    return None


def max_release_payload(nb: Neighbourhood, count: int) -> int:
    return release_length(nb.topology.n, count, True) + TAG_SIZE


def unmask(nb: Neighbourhood, state: Exchange, channel: Channel, releases: dict[int, tuple[int, bytes]]) -> torch.Tensor | None:
    """Phase 6, as a receiver: the weighted sum of the present senders, or None (abandoned)."""
    survivors = state.survivors
    if survivors is None:
        return None
    if not recovers(nb, nb.rank, state.round):  # every sender present: the pair masks cancel in the sum
        start, context = time.perf_counter(), state.context(nb.rank)
        total, stream = _zeroed(nb.scratch, state.count), nb.scratch.array("stream", state.count, np.uint32)
        for j in survivors.present:
            total += state.data[j].words
            total -= nb.masks.receiver_mask(j, context, state.count, out=stream)
        _timed(state.cost, start)
        return _in_range(nb, channel, _decoded(nb, total), len(survivors.present))
    context, senders = state.context(nb.rank), nb.topology.in_neighbours(nb.rank, state.round)
    missing, needed = survivors.missing(senders), threshold(len(senders))
    held: dict[int, dict[int, bytes]] = {j: {} for j in survivors.present}
    total, stream = _zeroed(nb.scratch, state.count), nb.scratch.array("stream", state.count, np.uint32)
    culprit = survivors.helpers[0]
    try:
        for culprit in survivors.helpers:
            k = culprit
            owners = [j for j in survivors.present if j != k]
            payload = releases.get(k, (0, b""))[1]
            if not payload:
                raise SecureError(f"helper {k} released nothing", "declined")
            opened = open_from(nb.masks.release_key(k, context), payload, context, k, nb.rank, "release")
            shares, correction = decode_release(opened, owners, state.count, k in survivors.present and bool(missing))
            for j, share in shares.items():
                holders = [h for h in senders if h != j]
                held[j][holders.index(k) + 1] = share
            if correction is not None:
                total -= correction
        start = time.perf_counter()
        for j in survivors.present:
            used = sorted(held[j].items())[:needed]
            culprit = j
            seed = combine(dict(used))
            if commit(seed, context) != state.data[j].commitment:
                holders = [h for h in senders if h != j]
                suspects = [holders[x - 1] for x, _ in used]
                raise SecureError(f"the shares of peer {j}'s seed from helpers {suspects} do not rebuild what peer {j} "
                                  f"committed to (a helper or peer {j} lied)", "share")
            total += state.data[j].words
            total -= self_mask(seed, context, state.count, out=stream)
        _timed(state.cost, start)
    except SecureError as err:
        channel.refuse(culprit, err)
        return None
    return _in_range(nb, channel, _decoded(nb, total), len(survivors.present))


def _zeroed(scratch: Scratch, count: int) -> np.ndarray:
    """The receiver's running sum, in a reused buffer."""
    total = scratch.array("total", count, np.uint32)
    total.fill(0)
    return total


def _decoded(nb: Neighbourhood, total: np.ndarray) -> torch.Tensor:
    """The unmasked sum as floats, in a reused buffer: the caller mixes it at once and keeps
    only the mix (valid until the next exchange)."""
    return nb.fixed.decode(total, out=nb.scratch.array("sum", total.size, np.float32))
