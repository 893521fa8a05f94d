"""Deadline gossip over torch.distributed: one stream per neighbour, received off the critical path.

Lockstep gossip (`TorchTransport.exchange`) waits for every neighbour's message, so the
slowest peer sets every round's pace. With `[gossip] deadline_s`, each ordered pair of
neighbours has one stream instead. A thread per out-neighbour sends this peer's messages in
exchange order under two fixed tags (the length and head, then the rest), and a thread per
in-neighbour keeps the next message of its stream posted and files it in a mailbox as it
arrives, while the peer trains. An exchange takes from each mailbox the message of this
exchange if it is there by the deadline; a missing sender's weight goes to the receiver's own
term (the mixing rule). (Threads, because gloo reports a finished send or receive only to a
`wait`, and a `wait` that times out closes the connection.)

The stream is never misread: every message is consumed, in order. Every peer exchanges once
per round and sends one message per exchange to each out-neighbour, so a stream's m-th
message belongs to the m-th exchange since the streams opened. A message taken after its
exchange went on without it is dropped as late and counted. What a message claims is still
checked by the receiver: the one taken as an exchange's is verified as that round's, or
refused (a sender that skips or repeats messages only spoils its own stream).

Nothing here grows with what a sender asks for: receive buffers have the exchange's bound, as
in lockstep, and a mailbox holds at most MAX_AHEAD messages; while it is full its thread
posts no receive, so a sender that runs ahead waits (a peer runs at most 2 x MAX_AHEAD + 1
exchanges ahead of a neighbour). At the end (`finish`) every peer sends each out-neighbour an end
marker and reads each of its streams up to the marker, so nothing stays posted or queued
when the group shuts down.

With `keep_going` ([run] on_peer_loss = 'continue'), a stream whose connection breaks (the
neighbour died, or was silent past gloo's timeout, which closes it) ends instead of stopping
this peer: the neighbour is gone, named in `Streams.gone`, and nothing more is sent to it.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from p2pfed.transport import Rank, TransportTimeout, assemble, gloo_reason, receive_buffers

FRONT_TAG, BODY_TAG = 0, 4
"""Kind 0 of tags 0 and 1: lockstep exchanges use kinds 1-3 (p2pfed.transport._tag), so the
two never match each other's messages."""
MAX_AHEAD = 4
"""Messages a mailbox holds, and a sender may queue for one receiver, before it waits."""
END = -1
"""The length an end-of-stream marker announces."""


@dataclass
class StreamResult:
    """What one deadline exchange took: messages by sender, and what it left out."""

    messages: dict[Rank, memoryview]
    gone: dict[Rank, str] = field(default_factory=dict)
    """Neighbours found gone in this exchange (their connection broke), and what broke."""
    refused: dict[Rank, str] = field(default_factory=dict)
    """Senders whose message announced a length outside the bound (as lockstep's `refused`)."""
    late: int = 0
    """Messages of earlier exchanges that arrived after those exchanges went on: dropped."""
    missing: list[Rank] = field(default_factory=list)
    """Senders whose message for this exchange had not arrived by the deadline."""


@dataclass
class _Arrival:
    message: memoryview | None
    refusal: str | None = None
    end: bool = False


class _Inbox(threading.Thread):
    """Receives one sender's stream into a bounded mailbox, in order, until its end marker."""

    def __init__(self, rank: Rank, sender: Rank, bound: int, head: int, device: torch.device, keep_going: bool = False) -> None:
        super().__init__(name=f"p2pfed-inbox-{sender}", daemon=True)
        self.rank, self.sender, self.bound, self.head, self.device = rank, sender, bound, head, device
        self.keep_going = keep_going
        """A broken connection ends the stream (the sender is gone) instead of stopping this peer."""
        self.mailbox: queue.Queue[_Arrival] = queue.Queue(maxsize=MAX_AHEAD)
        self.error: str | None = None
        self.taken = 0
        self.waited = 0.0
        """Seconds this peer has waited on this stream since its last arrival (keep_going: the timeout's worth = gone)."""
        self.ended = False
        """Its end marker was taken: the sender sends nothing more (early only if it is hostile)."""

    def run(self) -> None:
        try:
            while True:
                arrival = self._receive()
                self.mailbox.put(arrival)  # blocks while the mailbox is full: no receive is posted meanwhile
                if arrival.end:
                    return
        except RuntimeError as err:  # the connection broke, or gloo's own timeout ([gossip] timeout_s) passed
            self.error = gloo_reason(err)
            self.mailbox.put(_Arrival(None, end=True))

    def _receive(self) -> _Arrival:
        front, rest = receive_buffers(self.bound, self.head, self.device)
        for work in [dist.irecv(front, src=self.sender, tag=FRONT_TAG), dist.irecv(rest[self.head:], src=self.sender, tag=BODY_TAG)]:
            wait(work, self.keep_going)
        length, message, why = assemble(self.sender, front, rest, self.bound, self.head)
        return _Arrival(None, end=True) if length == END else _Arrival(message, why)

    def take(self, timeout_s: float) -> _Arrival | None:
        start = time.monotonic()
        try:
            arrival = self.mailbox.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            self.waited += time.monotonic() - start
            return None
        self.waited = 0.0
        if self.error is not None and arrival.end and not self.keep_going:
            raise TransportTimeout(f"peer {self.rank} lost its connection to peer {self.sender} while trying to hear from it "
                                   f"(peer {self.sender} probably stopped, or was silent past [gossip] timeout_s: {self.error})")
        self.taken += 1
        self.ended = arrival.end
        return arrival


SILENT_TIMEOUTS = 2
"""keep_going: waiting this many timeouts in a row with nothing arriving makes a neighbour gone.
One would not do: a neighbour that itself waits out a timeout for a silent peer of its own is
that late, and its receivers would drop it too, and theirs it (seen in a test)."""
FOREVER = datetime.timedelta(days=3650)


def wait(work: dist.Work, keep_going: bool) -> None:
    """Wait for one send or receive. gloo's own timeout, once it expires, fails every
    connection of the process ("Application timeout caused pair closure"), so under
    keep_going it never does: a silent neighbour leaves this thread blocked, and the exchange,
    which waits on a mailbox with its own deadline, names it missing, then gone."""
    work.wait(FOREVER) if keep_going else work.wait()


class _Outbox(threading.Thread):
    """Sends this peer's messages to one receiver in order; each waits until the receiver takes
    it. The end marker is its last: the thread ends after sending it (or at a broken connection)."""

    def __init__(self, rank: Rank, receiver: Rank, keep_going: bool = False) -> None:
        super().__init__(name=f"p2pfed-outbox-{receiver}", daemon=True)
        self.rank, self.receiver, self.keep_going = rank, receiver, keep_going
        self.queue: queue.Queue[tuple[torch.Tensor, torch.Tensor, bool]] = queue.Queue(maxsize=MAX_AHEAD)
        self.error: str | None = None

    def run(self) -> None:
        last = False
        while not last:
            front, body, last = self.queue.get()
            try:
                for work in [dist.isend(front, dst=self.receiver, tag=FRONT_TAG), dist.isend(body, dst=self.receiver, tag=BODY_TAG)]:
                    wait(work, self.keep_going)
            except RuntimeError as err:  # the connection broke, or the receiver took nothing for gloo's timeout
                self.error = gloo_reason(err)
                return

    def send(self, pieces: tuple[torch.Tensor, torch.Tensor], timeout_s: float, last: bool = False) -> None:
        if self.keep_going and self.error is not None:  # the receiver is gone: nothing more goes to it
            return
        self._check()
        try:  # blocks while MAX_AHEAD messages wait for this receiver: it is that many exchanges behind
            self.queue.put((*pieces, last), timeout=max(0.0, timeout_s))
        except queue.Full:
            if self.keep_going:  # it takes nothing: gone, for this peer (the thread stays blocked on its send)
                self.error = self.error or f"it took none of {MAX_AHEAD} messages within the {timeout_s:g} s timeout"
                return
            self._check()
            raise TransportTimeout(f"peer {self.rank} could not deliver to peer {self.receiver} within the {timeout_s:g} s timeout "
                                   f"([gossip] timeout_s): peer {self.receiver} is {MAX_AHEAD} exchanges behind") from None

    def _check(self) -> None:
        if self.error is not None and not self.keep_going:
            raise TransportTimeout(f"peer {self.rank} lost its connection to peer {self.receiver} while trying to deliver to it "
                                   f"(peer {self.receiver} probably stopped: {self.error})")


class Streams:
    """This peer's ends of every stream it sends or receives on."""

    def __init__(self, rank: Rank, device: torch.device, timeout_s: float, keep_going: bool = False) -> None:
        self.rank, self.device, self.timeout_s = rank, device, timeout_s
        self.keep_going = keep_going
        """[run] on_peer_loss = 'continue': a neighbour whose connection breaks is gone (its stream
        ends, nothing more is sent to it) instead of stopping this peer."""
        self.gone: dict[Rank, str] = {}
        """Neighbours found gone, and what broke (keep_going only)."""
        self.first: int | None = None
        """The exchange the streams opened at (after a restart: the resumed count, the same at every peer)."""
        self.shape: tuple[int, int] | None = None
        """(bound, head) of every message: a stream's receives are posted before their exchange is known."""
        self.inboxes: dict[Rank, _Inbox] = {}
        self.outboxes: dict[Rank, _Outbox] = {}

    def open(self, senders: list[Rank], exchange: int, bound: int, head: int) -> None:
        """Start receiving from `senders` now, before the first exchange (`exchange`): a neighbour
        that runs ahead finds its first messages taken while this peer still trains."""
        if self.first is None:
            self.first, self.shape = exchange, (bound, head)
        for j in senders:
            self._inbox(j)

    def exchange(self, pieces: dict[Rank, tuple[torch.Tensor, torch.Tensor]], incoming_from: list[Rank], exchange: int,
                 bound: int, head: int, wait_s: float, skip_behind: bool = False) -> StreamResult:
        """Queue `pieces` (front, body per receiver), then take each sender's message of `exchange`
        that arrives within `wait_s` seconds. `skip_behind` (deadline gossip): a sender whose
        previous message has not even arrived is a whole exchange behind, and is not waited for
        (its message is taken only if it is already here). Waiting the deadline for it in every
        round would make this peer that late for its other neighbours, and they for theirs: the
        whole graph would fall into step with the straggler's neighbours, each message arriving
        just after its receiver's deadline (seen on the 8-peer churn bench before this rule)."""
        self.open([], exchange, bound, head)
        if (bound, head) != self.shape:
            raise ValueError(f"peer {self.rank}: a deadline exchange of bound {bound} and head {head}, but the streams carry "
                             f"{self.shape}: deadline gossip needs messages of one size (plain gossip, one codec)")
        wanted = exchange - self.first + 1
        for j, piece in pieces.items():
            self._outbox(j).send(piece, self.timeout_s)
        result = StreamResult({})
        deadline = time.monotonic() + wait_s
        for j in incoming_from:
            inbox = self._inbox(j)
            behind = skip_behind and inbox.taken + inbox.mailbox.qsize() < wanted - 1
            while inbox.taken < wanted:
                arrival = None if inbox.ended else inbox.take(0.0 if behind else deadline - time.monotonic())
                if self.keep_going and inbox.error is not None and inbox.ended:
                    break  # gone: named below, not missing
                if arrival is None and self.keep_going and inbox.waited >= SILENT_TIMEOUTS * self.timeout_s * 0.999:
                    self.gone.setdefault(j, f"silent for {SILENT_TIMEOUTS} x the {self.timeout_s:g} s timeout")  # not waited for again
                    result.gone[j] = self.gone[j]
                    break
                if arrival is None or arrival.end:
                    result.missing.append(j)
                    break
                if inbox.taken < wanted:  # an earlier exchange's message, after that exchange went on
                    result.late += 1
                elif arrival.refusal is not None:
                    result.refused[j] = arrival.refusal
                elif arrival.message is not None:
                    result.messages[j] = arrival.message
        result.gone.update(self._newly_gone())
        return result

    def _newly_gone(self) -> dict[Rank, str]:
        """keep_going: the neighbours whose stream broke since the last call (either way)."""
        if not self.keep_going:
            return {}
        broken = {j: inbox.error for j, inbox in self.inboxes.items() if inbox.error is not None and inbox.ended}
        broken.update({j: outbox.error for j, outbox in self.outboxes.items() if outbox.error is not None and j not in broken})
        fresh = {j: why or "" for j, why in broken.items() if j not in self.gone}
        self.gone.update(fresh)
        return fresh

    def finish(self, end: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Send every receiver the end marker, read every stream up to its marker, and wait until
        everything queued has left; returns the late messages dropped on the way."""
        late, deadline = 0, time.monotonic() + self.timeout_s
        for j, outbox in self.outboxes.items():  # every wait below ends by the deadline: a neighbour cannot hold this peer
            if j not in self.gone:
                outbox.send(end, deadline - time.monotonic(), last=True)
        for j, inbox in self.inboxes.items():
            while not inbox.ended and j not in self.gone:
                arrival = inbox.take(deadline - time.monotonic())
                if arrival is None and self.keep_going:  # silent to the end: left to its thread (a daemon)
                    self.gone.setdefault(j, "its stream did not end within the timeout")
                    break
                if arrival is None:
                    raise TransportTimeout(f"peer {self.rank} did not hear the end of peer {j}'s stream within the {self.timeout_s:g} s "
                                           "timeout ([gossip] timeout_s)")
                late += 0 if arrival.end else 1
        for j, outbox in self.outboxes.items():
            if j in self.gone:
                continue
            outbox.join(max(0.0, deadline - time.monotonic()))
            outbox._check()
            if outbox.is_alive() and self.keep_going:
                self.gone.setdefault(j, "it did not take its last messages within the timeout")
            elif outbox.is_alive():
                raise TransportTimeout(f"peer {self.rank} could not deliver its last messages to peer {j} within the "
                                       f"{self.timeout_s:g} s timeout ([gossip] timeout_s)")
        self.inboxes, self.outboxes, self.first = {}, {}, None
        return late

    def _inbox(self, j: Rank) -> _Inbox:
        if j not in self.inboxes:
            assert self.shape is not None
            self.inboxes[j] = _Inbox(self.rank, j, *self.shape, self.device, self.keep_going)
            self.inboxes[j].start()
        return self.inboxes[j]

    def _outbox(self, j: Rank) -> _Outbox:
        if j not in self.outboxes:
            self.outboxes[j] = _Outbox(self.rank, j, self.keep_going)
            self.outboxes[j].start()
        return self.outboxes[j]
