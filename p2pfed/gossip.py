"""One averaging round at one peer: encode -> seal -> exchange -> open -> decode -> mix.

Orchestration only: the codec, the envelope and the transport hold the logic. Three modes
share this path so baselines are honest: `gossip` (neighbours on the topology), `allreduce`
(exact mean every round, FedAvg without a server), `local` (no communication).

Compressed gossip comes in two shapes. Stateless: each message is the compressed adapter
(right for unbiased codecs). Stateful (error feedback, CHOCO): each message is the
compressed change since the last one plus what the codec dropped before, and every peer
keeps a public copy x_hat_j of each neighbour (and of itself) that the messages update
identically on both ends. Plain mixing uses the copies as the neighbours' adapters; CHOCO
moves x_i by gamma * sum_j W_ij (x_hat_j - x_hat_i), which keeps the network mean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from p2pfed.codec import Codec, CodecError, Decoded, ErrorFeedback, StochasticInt
from p2pfed.config import ConfigError
from p2pfed.faults import FaultInjector
from p2pfed.identity import Identity, Roster
from p2pfed.mixing import WeightedAverage, build_rule, check_topology
from p2pfed.roundstats import RoundStats  # noqa: F401 - re-exported: metrics lines are built from it
from p2pfed.topology import Topology
from p2pfed.secure import FixedPoint, Purpose, SecureError, check_secure_topology, establish_session
from p2pfed.secure import protocol as secure_phases
from p2pfed.secure.monitor import MaskedSum
from p2pfed.transport import Transport, TransportTimeout
from p2pfed.wire import OVERHEAD, Verifier, WireError, payload_digest, seal_parts

log = logging.getLogger("p2pfed.gossip")


class Averager:
    """Mixes this peer's adapter vector with its neighbours' once per round."""

    def __init__(self, transport: Transport, mode: str, codec: Codec, topology: Topology | None,
                 identity: Identity | None = None, roster: Roster | None = None, faults: FaultInjector | None = None,
                 *, algorithm: str = "plain", gamma: float = 0.5, error_feedback: bool = False,
                 initial: torch.Tensor | None = None, secure: FixedPoint | None = None, seed: int = 0,
                 session: bytes | None = None, min_present: int = 2, robust: str = "none", byzantine: int = 1,
                 away: Callable[[int], frozenset[int]] | None = None, deadline_s: float = 0.0, keep_going: bool = False) -> None:
        if mode == "gossip" and (topology is None or identity is None or roster is None):
            raise ValueError("gossip mode needs a topology, this peer's identity and the roster")
        self.transport = transport
        self.rank = transport.rank
        self.mode = mode
        self.codec = codec
        self.topology = topology
        self.identity = identity
        self.verifier: Verifier | None = None
        self.faults = faults
        self.algorithm = algorithm
        self.gamma = gamma
        self.stateful = mode == "gossip" and (algorithm == "choco" or error_feedback)
        if self.stateful and topology is not None and topology.period > 1:
            raise ConfigError("[gossip] algorithm/error_feedback: CHOCO and error feedback keep a copy of each neighbour, "
                              f"so they need a static topology; {topology.source} changes neighbours every round")
        self.feedback = ErrorFeedback(codec) if self.stateful else None
        if away is not None and (self.stateful or secure is not None):
            raise ConfigError("[network] churn: emulated only for plain gossip; this codec turns error feedback on (auto), and an "
                              "absent sender would leave its public copy out of step: set gossip.error_feedback = 'off'")
        self.away = away
        """Emulated churn (simulation): the peers away in a round (1-based); they send and hear nothing."""
        self.deadline_s = deadline_s if mode == "gossip" else 0.0
        """Deadline gossip (p2pfed.stream): wait this long for neighbours' messages; 0: for all of them."""
        self.keep_going = keep_going and mode == "gossip"
        """[run] on_peer_loss = 'continue': a neighbour whose connection breaks is gone, and mixing goes on without it."""
        self.streaming = bool(self.deadline_s) or (self.keep_going and secure is None)
        """Exchanges go over p2pfed.stream's per-neighbour streams (deadline gossip, or plain gossip going on
        without the gone). Secure mode's phases are lockstep exchanges of several sizes: there the transport
        leaves a gone neighbour out, and the protocol recovers the sum of the senders present."""
        self.wait_s = self.deadline_s or getattr(transport, "timeout_s", 0.0)
        """How long a streamed exchange waits for its senders: the deadline, else the timeout."""
        self.gone: set[int] = set()
        """Neighbours found gone (keep_going): never heard from or sent to again."""
        if self.streaming and (self.stateful or secure is not None or (topology is not None and topology.period > 1)):
            what = "[gossip] deadline_s: deadline gossip" if self.deadline_s else "[run] on_peer_loss = 'continue': going on without a gone peer"
            raise ConfigError(f"{what} skips a missing neighbour's message, so it needs plain gossip on a "
                              "static topology: not secure mode (a missing sender leaves masks unmatched), not CHOCO or error "
                              "feedback (public copies would fall out of step; this codec turns it on under 'auto': set "
                              "gossip.error_feedback = 'off'), and a topology whose neighbours do not change from round to round")
        self.rule = build_rule(robust, byzantine)
        if mode == "gossip" and topology is not None:
            check_topology(robust, byzantine, topology)
        self.initial = initial if self.stateful else None
        """The common starting adapter: every public copy starts there (zeros if not given);
        kept only where there are copies (CHOCO, error feedback): a simulation of N peers
        would otherwise hold N more adapters."""
        self.last_sent: torch.Tensor | None = None
        self.own_copy: torch.Tensor | None = None
        self.copies: dict[int, torch.Tensor] = {}
        self.lost: set[int] = set()
        """Neighbours whose copy fell out of step (a refused message); no longer mixed."""
        self.exchanges = 0
        """Exchanges so far: every peer counts the same, so it tags messages in lockstep."""
        self.secure: secure_phases.Neighbourhood | None = None
        if secure is not None:
            assert topology is not None and identity is not None and roster is not None
            check_secure_topology(topology, secure, min_present)
            self.secure = secure_phases.Neighbourhood(identity, roster, topology, secure, secure_phases.SECURE_CODEC +
                                                      Codec.STRUCTURES.index(codec.structure), torch.Generator().manual_seed(seed),
                                                      min_present)
        self._monitor: MaskedSum | None = None
        self.sent_digests: set[bytes] = set()
        """Secure mode: digests of the vectors sent in this session (none is sent twice)."""
        self.contexts: set[tuple[int, int, int]] = set()
        """(purpose, round, step) exchanged in this session: none may repeat (masks would)."""
        self.session = b""
        if mode == "gossip" and roster is not None:
            # drawn afresh at every start (all peers together): binds every message and mask to this attempt
            self.session = session if session is not None else establish_session(transport)
            self.verifier = Verifier(self.rank, roster, self.session)

    def average(self, vector: torch.Tensor, round: int, step: int = 0, purpose: Purpose = Purpose.TRAIN,
                own: torch.Tensor | None = None) -> tuple[torch.Tensor, RoundStats]:
        """Return the mixed vector for gossip step `step` of `round`, and what it cost. `own`
        (secure mode only): this peer's own term where it differs from what it sends (the
        sender's noise share is topped up in it: p2pfed.privacy.distributed)."""
        if own is not None and self.secure is None:
            raise ValueError("a separate own term is for distributed noise, which needs secure mode")
        if self.mode == "local":
            return vector, RoundStats()
        if self.mode == "allreduce":
            return self._allreduce(vector)
        if (purpose, round, step) in self.contexts:
            raise SecureError(f"peer {self.rank}: round {round} step {step} (purpose {purpose.name}) was already exchanged in this "
                              "session; a second exchange would reuse its masks and keys")
        self.contexts.add((purpose, round, step))
        try:
            if self.secure is not None:
                return self._secure_gossip(vector, round, step, purpose, vector if own is None else own)
            return self._gossip(vector, round, step, purpose)
        except TransportTimeout as err:
            raise TransportTimeout(f"round {round + 1}{f' step {step}' if step else ''}: {err}") from None

    def open(self, length: int) -> None:
        """Before the first round: deadline gossip starts receiving its neighbours' messages of
        `length`-value adapters (a neighbour that runs ahead is not held up by this peer's training)."""
        if self.streaming and self.topology is not None:
            self.transport.open_streams(self.topology.in_neighbours(self.rank, 0), self.exchanges + 1,  # type: ignore[attr-defined]
                                        OVERHEAD + self.codec.max_payload(length), OVERHEAD)

    def finish(self) -> int:
        """After the last exchange: deadline gossip reads its streams to their ends (every peer
        calls this), so nothing is left in flight; returns the late messages dropped."""
        if not self.streaming:
            return 0
        late = self.transport.finish_streams()  # type: ignore[attr-defined]
        self._note_gone(None)
        return late

    def monitor(self) -> MaskedSum | None:
        """Secure mode: the masked sum consensus monitoring must use (None: plain sums are fine)."""
        if self.secure is None:
            return None
        if self._monitor is None:
            self._monitor = MaskedSum(self.secure.masks, self.transport.world_size, self.session)
        return self._monitor

    def state(self) -> dict:
        """Codec randomness, error-feedback and CHOCO copies: what a restart must not lose."""
        values = self.codec.values
        return {
            "exchanges": self.exchanges, "last_sent": self.last_sent, "own_copy": self.own_copy, "copies": self.copies,
            "lost": sorted(self.lost), "residual": self.feedback.residual if self.feedback else None,
            "warm_start": self.codec.warm_start,
            "rounding": values.generator.get_state() if isinstance(values, StochasticInt) else None,
            "secure": self.secure.generator.get_state() if self.secure is not None else None,
        }

    def restore(self, state: dict) -> None:
        self.exchanges, self.last_sent, self.own_copy = state["exchanges"], state["last_sent"], state["own_copy"]
        self.copies, self.lost = state["copies"], set(state["lost"])
        if self.feedback is not None:
            self.feedback.residual = state["residual"]
        self.codec.warm_start = state["warm_start"]
        if state["rounding"] is not None and isinstance(self.codec.values, StochasticInt):
            self.codec.values.generator.set_state(state["rounding"])
        if state["secure"] is not None and self.secure is not None:
            self.secure.generator.set_state(state["secure"])

    def _exchange(self, outgoing: dict[int, bytes], incoming_from: list[int], stats: RoundStats, max_length: int,
                  partial: bool = False, patience: int = 1, deadline: bool = False, round: int | None = None) -> dict[int, bytes]:
        """One exchange, timed and counted: lockstep, or with `deadline` what arrives within
        deadline_s (p2pfed.stream). A message announced longer than `max_length` (the largest
        envelope it can carry) is refused before it is received."""
        self.exchanges += 1
        stats.bytes_sent += sum(len(m) for m in outgoing.values())
        start = time.perf_counter()
        if deadline:
            incoming, late, missing = self.transport.deadline_exchange(outgoing, incoming_from, self.exchanges, max_length, OVERHEAD,  # type: ignore[attr-defined]
                                                                       self.wait_s, skip_behind=bool(self.deadline_s))
            stats.late, stats.missing = stats.late + late, stats.missing + missing
            if missing:
                log.info("peer %d: no message from peer(s) %s within %g s", self.rank, missing, self.wait_s)
            stats.gone += self._note_gone(round)
        else:
            incoming = self.transport.exchange(outgoing, incoming_from, self.exchanges, partial, patience, max_length, head=OVERHEAD)
            if self.keep_going:
                stats.gone += self._note_gone(round)
        stats.comm_s += time.perf_counter() - start
        for j, why in sorted(getattr(self.transport, "refused", {}).items()):
            stats.rejected["length"] = stats.rejected.get("length", 0) + 1
            log.warning("peer %d: message from peer %d refused before receiving it: %s", self.rank, j, why)
        stats.bytes_received += sum(len(m) for m in incoming.values())
        return incoming

    def _note_gone(self, round: int | None) -> list[int]:
        """keep_going: the neighbours the transport found gone since the last call, each named once in the log."""
        fresh = sorted(set(getattr(self.transport, "gone", {})) - self.gone)
        for j in fresh:
            self.gone.add(j)
            when = f"in round {round + 1}" if round is not None else "at the end of the run"
            left = [k for k in self._neighbours() if k not in self.gone]
            log.warning("peer %d: peer %d is gone (%s: %s); mixing goes on over %s", self.rank, j, when,
                        self.transport.gone[j] or "its connection broke", f"peers {left}" if left else "no neighbour: it trains alone")  # type: ignore[attr-defined]
        return fresh

    def _neighbours(self) -> list[int]:
        if self.topology is None:
            return []
        return sorted(set(self.topology.in_neighbours(self.rank, 0)) | set(self.topology.out_neighbours(self.rank, 0)))

    def _seal_all(self, payloads: dict[int, bytes], round: int, step: int, codec: int, stats: RoundStats,
                  purpose: Purpose = Purpose.TRAIN) -> dict[int, bytes]:
        assert self.identity is not None and self.topology is not None
        start = time.perf_counter()
        epoch = round % self.topology.period
        digests: dict[int, bytes] = {}  # by payload object (kept alive by `payloads`): one hash for a payload receivers share
        sealed = {}
        for j, p in payloads.items():
            if id(p) not in digests:
                digests[id(p)] = payload_digest(p)
            parts = seal_parts(self.identity.signing, self.rank, j, round, step, epoch, codec, p, session=self.session, purpose=purpose,
                               digest=digests[id(p)])
            sealed[j] = parts if self.faults is None else bytes(parts)  # fault injection rewrites whole messages
        stats.crypto_s += time.perf_counter() - start
        return sealed

    def _open(self, message: bytes, source: int, round: int, step: int, senders: list[int], max_payload: int,
              codecs: tuple[int, ...], stats: RoundStats, purpose: Purpose = Purpose.TRAIN) -> tuple[int, bytes] | None:
        """(codec id, payload) of a verified message, or None after counting and logging the refusal."""
        assert self.verifier is not None and self.topology is not None
        start = time.perf_counter()
        try:
            header, payload = self.verifier.open_header(message, source, round, step, senders, max_payload, codecs, purpose,
                                                        round % self.topology.period)
            return header.codec, payload
        except WireError as err:
            stats.rejected[err.reason] = stats.rejected.get(err.reason, 0) + 1
            log.warning("peer %d, round %d: message from peer %d rejected: %s", self.rank, round + 1, source, err)
            return None
        finally:
            stats.crypto_s += time.perf_counter() - start

    def _secure_gossip(self, vector: torch.Tensor, round: int, step: int, purpose: Purpose,
                       own: torch.Tensor) -> tuple[torch.Tensor, RoundStats]:
        """The phases of p2pfed.secure.protocol in order, then the mix of `own` with what they unmasked."""
        assert self.topology is not None and self.secure is not None
        nb, phases = self.secure, secure_phases
        senders, receivers = self.topology.in_neighbours(self.rank, round), self.topology.out_neighbours(self.rank, round)
        stats = RoundStats(neighbours=senders)
        chosen = self.codec.shared_indices(vector.numel(), round, step) if self.codec.structure == "randk" else None
        values = vector if chosen is None else vector[chosen]
        sent = values if self.faults is None else self.faults.poison(values, round + 1)
        state = phases.Exchange(round, step, int(purpose), self.session, values.numel())
        channel = _SecureChannel(self, round, step, purpose, stats)

        start = time.perf_counter()
        kind = nb.data_kind
        repeated = nb.feeds_recovery and self._sent_before(sent)  # remembered in every round, whatever its receivers
        if repeated and any(phases.recovers(nb, i, round) for i in receivers):  # a second sum over other senders would unmask one
            data, kind, stats.repeats = {i: b"" for i in receivers}, phases.ABSTAIN, 1
            log.warning("peer %d, round %d: abstaining from a secure exchange of a vector it already sent in this session",
                        self.rank, round + 1)
        else:
            data = phases.send_data(nb, state, sent)
        stats.codec_s += time.perf_counter() - start - state.cost.mask_s
        stats.bytes_fp32 = len(data) * (OVERHEAD + 4 * vector.numel())
        heard, arrived = channel.exchange(data, kind, senders, (nb.data_kind, phases.ABSTAIN),
                                          phases.max_data_payload(nb, state), patience=1, tamper=True)
        for j in senders:
            if j not in heard:  # a late copy must not count after the exchange went on without it
                self.verifier.close(j, round, step, (nb.data_kind, phases.ABSTAIN))  # type: ignore[union-attr]
        lists = phases.choose_survivors(nb, state, channel, heard, arrived)
        releases_heard: dict[int, tuple[int, bytes]] = {}
        if phases.any_recovery(nb, round):  # the same answer at every peer: all run phases 2-5, or none
            # phases 2-5 talk only between a recovering receiver and its helpers: those whose data arrived
            recovering = [i for i in receivers if phases.recovers(nb, i, round)]
            lists_heard, writers = channel.exchange(lists, phases.SURVIVORS, recovering, (phases.SURVIVORS,),
                                                    phases.max_survivors_payload(nb), 2)
            writers = sorted(writers)
            consents = phases.consent(nb, state, channel, lists_heard, writers)
            consents_heard, _ = channel.exchange(consents, phases.CONSENT, state.helpers, (phases.CONSENT,), phases.SIGNATURE_SIZE, 3)
            bundles = phases.collect_consents(nb, state, channel, consents_heard)
            bundles_heard, _ = channel.exchange(bundles, phases.CONSENTS, writers, (phases.CONSENTS,),
                                                phases.SIGNATURE_SIZE * self.topology.n, 4)
            releases = phases.release(nb, state, channel, bundles_heard, writers)
            releases_heard, _ = channel.exchange(releases, phases.RELEASE, state.helpers, (phases.RELEASE,),
                                                 phases.max_release_payload(nb, state.count), 5)
        total = phases.unmask(nb, state, channel, releases_heard)

        cost = state.cost
        stats.mask_s, stats.clipped, stats.dropouts, stats.inconsistent = cost.mask_s, cost.clipped, cost.dropouts, cost.inconsistent
        if total is None:
            stats.abandoned = True
            log.warning("peer %d, round %d: secure sum abandoned (%d of %d senders present): keeping its own adapter",
                        self.rank, round + 1, len(state.data), len(senders))
            return own, stats
        start = time.perf_counter()
        present = state.survivors.present if state.survivors is not None else ()
        weights = self.topology.weights(round)[self.rank]
        self_weight = 1.0 - sum(float(weights[j]) for j in present)
        if chosen is None:
            mixed = own * self_weight + total
        else:
            mixed = own.clone()
            mixed[chosen] = own[chosen] * self_weight + total
        stats.codec_s += time.perf_counter() - start
        return mixed, stats

    def _sent_before(self, values: torch.Tensor) -> bool:
        """Secure mode: whether this exact vector was already sent in this session (and remember it).
        A sum abandoned by a spoiled release leaves a peer's adapter unchanged for the next step;
        sent again, a receiver could choose a different present list and subtract the two sums.
        (Asked only by a peer that feeds some receiver that recovers dropouts: an all-or-nothing
        sum is always over every sender, so a repeat there adds nothing to what sums over time
        already tell.)"""
        digest = payload_digest(memoryview(values.detach().contiguous().numpy()).cast("B"))  # hashed in place, no copy
        if digest in self.sent_digests:
            return True
        self.sent_digests.add(digest)
        return False

    def _allreduce(self, vector: torch.Tensor) -> tuple[torch.Tensor, RoundStats]:
        n = self.transport.world_size
        start = time.perf_counter()
        mean = self.transport.all_reduce_sum(vector) / n
        # A ring all-reduce moves 2(n-1)/n of the vector each way; gloo does not report bytes.
        estimate = int(2 * (n - 1) / n * vector.numel() * 4)
        return mean, RoundStats(bytes_sent=estimate, bytes_received=estimate, bytes_estimated=True, bytes_fp32=estimate, comm_s=time.perf_counter() - start, neighbours=[])

    def _gossip(self, vector: torch.Tensor, round: int, step: int, purpose: Purpose) -> tuple[torch.Tensor, RoundStats]:
        assert self.topology is not None and self.identity is not None
        weights = self.topology.weights(round)[self.rank]
        away = (self.away(round + 1) if self.away is not None else frozenset()) | self.gone
        senders = [j for j in self.topology.in_neighbours(self.rank, round) if j not in away]
        receivers = [j for j in self.topology.out_neighbours(self.rank, round) if j not in away]
        stats = RoundStats(neighbours=senders)
        if self.rank in away:  # emulated churn: away, it sends and hears nothing and keeps its own adapter
            self.exchanges += 1  # in step with the others' count, which tags the messages after it rejoins
            stats.neighbours = []
            return vector.clone(), stats

        start = time.perf_counter()
        payload = self._encode(vector if self.faults is None else self.faults.poison(vector, round + 1), round, step)
        stats.codec_s += time.perf_counter() - start
        if self.faults is not None:
            payload = self.faults.mangle(payload, round + 1)
        outgoing = self._seal_all({j: payload for j in receivers}, round, step, self.codec.id, stats, purpose)
        if self.faults is not None:
            outgoing = self.faults.corrupt(outgoing, round + 1)
        stats.bytes_fp32 = len(outgoing) * (OVERHEAD + 4 * vector.numel())
        incoming = self._exchange(outgoing, senders, stats, OVERHEAD + self.codec.max_payload(vector.numel()), deadline=self.streaming, round=round)

        heard: dict[int, torch.Tensor] = {}
        for j in senders:  # fixed order: the same inputs give the same bits
            message = None if j not in incoming else self._accept(incoming[j], j, round, step, senders, vector.numel(), stats, purpose)
            if message is not None and j not in self.lost:
                heard[j] = self._neighbour_value(j, message, vector)
            elif message is None and self.stateful and j not in self.lost:  # refused, or its length refused by the transport
                self.lost.add(j)
                log.warning("peer %d: no longer mixing peer %d: its public copy fell out of step with a refused message", self.rank, j)
        if self.faults is not None:
            self.faults.observe(list(heard.values()))
        start = time.perf_counter()
        if self.algorithm != "choco" and isinstance(self.rule, WeightedAverage) and vector.is_contiguous():
            mixed, stats.local_consensus = self.rule.mix_with_distance(vector, heard, weights)  # one pass over the vectors
        else:
            mixed = self._mix(vector, heard, weights)
            stats.local_consensus = local_consensus(vector, heard, weights)
        stats.mix_s = time.perf_counter() - start
        return mixed, stats

    def _encode(self, vector: torch.Tensor, round: int, step: int) -> bytes:
        """Stateless: the compressed adapter. Stateful: the change since the last message plus the residual."""
        if self.feedback is None:
            return self.codec.encode(vector, round, step)
        if self.last_sent is None:
            self.last_sent = self._start_point(vector)
            self.own_copy = self.last_sent.clone()
        payload, decoded = self.feedback.encode(vector - self.last_sent, round, step)
        self.own_copy += decoded
        self.last_sent = vector.detach().clone()
        return payload

    def _start_point(self, vector: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(vector) if self.initial is None else self.initial.detach().to(vector.dtype).clone()

    def _neighbour_value(self, j: int, message: Decoded, vector: torch.Tensor) -> torch.Tensor:
        """What this peer takes as neighbour j's adapter: the updated copy, or the message (own values where it is silent)."""
        if not self.stateful:
            return message.fill(vector)
        if j not in self.copies:
            self.copies[j] = self._start_point(vector)
        self.copies[j] += message.values
        return self.copies[j]

    def _mix(self, vector: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """CHOCO: the gamma step on public copies; otherwise the chosen rule (p2pfed.mixing)."""
        if self.algorithm == "choco":
            assert self.own_copy is not None
            pull = torch.zeros_like(vector)
            for j in sorted(heard):
                pull.add_(heard[j] - self.own_copy, alpha=float(weights[j]))
            return vector + self.gamma * pull
        return self.rule.mix(vector, heard, weights)

    def _accept(self, message: bytes, source: int, round: int, step: int, senders: list[int], length: int, stats: RoundStats,
                purpose: Purpose) -> Decoded | None:
        """Verify and decode one neighbour's message; None (and one log line) if refused."""
        opened = self._open(message, source, round, step, senders, self.codec.max_payload(length), (self.codec.id,), stats, purpose)
        if opened is None:
            return None
        start = time.perf_counter()
        try:
            decoded = self.codec.decode(opened[1], length, round, step)
            if not finite(decoded.values):
                stats.rejected["nonfinite"] = stats.rejected.get("nonfinite", 0) + 1
                log.warning("peer %d, round %d: message from peer %d rejected: nonfinite: NaN, infinite or overflowing values", self.rank, round + 1, source)
                return None
            return decoded
        except CodecError as err:
            stats.rejected["codec"] = stats.rejected.get("codec", 0) + 1
            log.warning("peer %d, round %d: message from peer %d rejected: %s", self.rank, round + 1, source, err)
            return None
        finally:
            stats.codec_s += time.perf_counter() - start


def finite(values: torch.Tensor) -> bool:
    """No NaN or infinity, and no value so large its square overflows: one pass, no mask tensor.
    (A sum of squares is finite exactly when every value is finite and below ~1.8e19.)"""
    return bool(torch.isfinite(torch.dot(values, values))) if values.dtype.is_floating_point else True


def local_consensus(vector: torch.Tensor, heard: dict[int, torch.Tensor], weights: torch.Tensor) -> float:
    """1/2 sum_j W_ij |x_i - x_j|^2 over the neighbours heard, through one reused buffer."""
    if not heard:
        return 0.0
    difference, total = torch.empty_like(vector), 0.0
    for j in sorted(heard):
        torch.sub(vector, heard[j], out=difference)
        total += float(weights[j]) * float(torch.dot(difference, difference))
    return 0.5 * total


class _SecureChannel:
    """The averager's sealed, verified, counted exchanges, bound to one secure exchange."""

    def __init__(self, averager: Averager, round: int, step: int, purpose: Purpose, stats: RoundStats) -> None:
        self.averager, self.rank, self.round, self.step, self.purpose, self.stats = averager, averager.rank, round, step, purpose, stats

    def exchange(self, outgoing: dict[int, bytes], kind: int, listen: list[int], accept: tuple[int, ...], max_payload: int,
                 patience: int, tamper: bool = False) -> tuple[dict[int, tuple[int, bytes]], set[int]]:
        averager, stats, faults = self.averager, self.stats, self.averager.faults
        if tamper and faults is not None:
            outgoing = {j: faults.mangle(p, self.round + 1) for j, p in outgoing.items()}
        sealed = averager._seal_all(outgoing, self.round, self.step, kind, stats, self.purpose)
        if tamper and faults is not None:
            sealed = faults.corrupt(sealed, self.round + 1)
        incoming = averager._exchange(sealed, listen, stats, OVERHEAD + max_payload, partial=True, patience=patience, round=self.round)
        heard = {}
        for j, message in sorted(incoming.items()):
            opened = averager._open(message, j, self.round, self.step, listen, max_payload, accept, stats, self.purpose)
            if opened is not None:
                heard[j] = opened
        # alive: sent something, even if it was refused (a refused length included)
        return heard, set(incoming) | set(getattr(averager.transport, "refused", {}))

    def refuse(self, source: int | None, error: SecureError) -> None:
        self.stats.rejected[error.reason] = self.stats.rejected.get(error.reason, 0) + 1
        what = "the secure sum" if source is None else f"message from peer {source}"
        log.warning("peer %d, round %d: %s refused: %s", self.rank, self.round + 1, what, error)
