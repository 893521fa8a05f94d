"""Moving bytes between peers: torch.distributed point-to-point, or in-process for tests.

The only module that touches `torch.distributed`. A gossip exchange sends each
out-neighbour its own byte string and receives one from each in-neighbour, in one round
trip: every message goes as two pieces posted together, its 8-byte length with its first
`head` bytes (an envelope's header and signature), then the rest (the payload, sent from the
sender's buffer, one for all receivers), and a receiver posts a buffer of the largest
message the exchange can carry (its own bound, never a size a sender asks for) and receives
the rest in place after the head. Collectives here (all-reduce, all-gather) serve the
`allreduce` baseline and monitoring only: no aggregate replaces an adapter in gossip mode,
and no process acts as
a server.

What gloo itself does not let a receiver refuse: a message longer than the buffer it
posted aborts the receiving process inside gloo. Bounding the buffer by the exchange (not
by a prefix the sender chose) leaves that only to a peer that sends more than any honest
message of the exchange can weigh; the README's threat model says so.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from p2pfed.wire import Sealed

if TYPE_CHECKING:
    from p2pfed.stream import Streams

Rank = int
_FRAME_TAG = 1
_LENGTH_TAG = 2
_BARE_TAG = 3
PREFIX = 8
"""Bytes of a message's length (little-endian signed 64-bit), sent before its first `head` bytes."""
UNBOUNDED_EXCHANGE = 1 << 26
"""The buffer an exchange called without `max_length` posts (tests only: gossip always bounds)."""


def _tag(exchange: int, kind: int) -> int:
    """A tag per exchange and kind, so a payload that was never received (its length was
    refused) can never be matched by a later exchange's receive."""
    return ((exchange % (1 << 24)) << 2) | kind


class _EndMarker(bytes):
    """A stream's end (p2pfed.stream.END as its length, no bytes after the zeroed head)."""

    announced = -1

    def __new__(cls, head: int) -> "_EndMarker":
        return super().__new__(cls, bytes(head))


class LyingLength(bytes):
    """Fault injection (`hugelength`): a message whose length prefix announces `announced`
    bytes, more or fewer than it carries; the transport sends the lie with the real bytes."""

    announced: int = 0

    @classmethod
    def of(cls, data: bytes, announced: int) -> "LyingLength":
        message = cls(data)
        message.announced = announced
        return message


def announced_length(data: bytes) -> int:
    return getattr(data, "announced", len(data))


def length_refusal(source: Rank, length: int, max_length: int | None) -> str | None:
    """Why a length prefix is refused before anything is allocated, or None."""
    if length < 0 or (max_length is not None and length > max_length):
        return f"peer {source} announced {length} bytes, outside [0, {max_length}] for this exchange"
    return None


def receive_buffers(bound: int, head: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one message is received: its length and first `head` bytes, then the rest in place
    after the head, in a buffer of this exchange's bound (never a size a sender asks for). Zeroed:
    gloo does not say how many bytes arrived, so a short message reads as zeros, never stale memory."""
    return (torch.zeros(PREFIX + head, dtype=torch.uint8, device=device),
            torch.zeros(max(bound, head + 1), dtype=torch.uint8, device=device))


def assemble(source: Rank, front: torch.Tensor, rest: torch.Tensor, bound: int, head: int) -> tuple[int, memoryview | None, str | None]:
    """(announced length, the message, why it is refused) from a received pair of buffers. The
    length is checked against the bound before anything is sliced; the message is a view of its
    own buffer (no copy of a large message). A negative length is returned, not refused, only
    for the caller to read as a marker (p2pfed.stream's END): no message goes with it."""
    front = front.cpu()
    length = int.from_bytes(front[:PREFIX].numpy().tobytes(), "little", signed=True)
    if why := length_refusal(source, length, bound):
        return length, None, why
    message = rest.cpu()
    message[:head] = front[PREFIX:]
    return length, memoryview(message.numpy())[:length], None


def gloo_reason(err: Exception) -> str:
    """What broke, from a gloo error: its first sentence without the source location."""
    return str(err).split("] ")[-1].split(". This is typically")[0][:120]


class TransportTimeout(RuntimeError):
    """A neighbour sent nothing within the exchange timeout; the message names it."""


class PeerLost(TransportTimeout):
    """[run] on_peer_loss = 'continue': a collective (monitoring, the summary) needs every peer
    and one is gone; callers skip it, and every later one, for the rest of the run."""


class TransportRefused(RuntimeError):
    """A peer announced a length outside what this exchange can carry; the message names it."""


DEFAULT_GATHER_LIMIT = 1 << 20
"""The most bytes any peer may contribute to an all-gather unless the caller says otherwise."""


def check_gather_lengths(lengths: list[int], max_length: int | None, me: Rank) -> None:
    """Refuse, naming the peer, a length below 0 or above the bound, before any allocation."""
    bound = DEFAULT_GATHER_LIMIT if max_length is None else max_length
    for rank, length in enumerate(lengths):
        if not 0 <= length <= bound:
            raise TransportRefused(f"peer {me}: peer {rank} announced {length} bytes for an all-gather that carries at most {bound}")


class Transport(Protocol):
    """What gossip needs from the network."""

    rank: Rank
    world_size: int

    refused: dict[Rank, str]
    """After each exchange: the senders whose length prefix was refused, and why."""

    def exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, partial: bool = False,
                 patience: int = 1, max_length: int | None = None, head: int = 0) -> dict[Rank, bytes]:
        """Send `outgoing[j]` to each j, receive one message from each of `incoming_from`.

        A neighbour silent past `patience` timeouts raises TransportTimeout naming it; with
        `partial`, a transport that can skip a message safely returns without it instead.
        (A later phase of a protocol waits longer: its senders may each have waited out an
        earlier phase.) A message announced longer than `max_length` (the largest envelope
        this exchange can carry) is refused before any buffer is allocated: it is left out
        of the result and named in `refused`. `head`: where every message of this exchange splits
        into a part per receiver and a part the receivers share (an envelope's header and
        signature, then its payload: `p2pfed.wire.Sealed`), so the shared part is sent as is.
        """
        ...

    def all_reduce_sum(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Element-wise sum over all peers (baseline averaging and monitoring only), taken in
        `dtype` where given (monitoring sums float32 adapters in float64)."""
        ...

    def all_gather_bytes(self, data: bytes, max_length: int | None = None) -> list[bytes]:
        """Every peer's byte string, in rank order (session nonces, run summary). A peer that
        announces more than `max_length` bytes is refused before anything is allocated."""
        ...


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the torchrun group: gloo on CPU, nccl on CUDA. The store only bootstraps."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and "MASTER_ADDR" in os.environ:
        # After an elastic restart the agent's store still holds the dead group's addresses,
        # and a fresh group reading them hangs; a key prefix per attempt keeps them apart.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
        kwargs.update(store=dist.PrefixStore(f"p2pfed/attempt{attempt}", store), rank=rank, world_size=world)
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def shutdown() -> None:
    """Leave the group (safe to call when it was never joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class TorchTransport:
    """Point-to-point exchange over the default torch.distributed group."""

    def __init__(self, device: torch.device | None = None, timeout_s: float = 300.0, keep_going: bool = False) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or torch.device("cpu")
        self.timeout_s = timeout_s
        self.refused: dict[Rank, str] = {}
        self.streams: Streams | None = None
        """Deadline gossip's streams, opened by the first `deadline_exchange`."""
        self.keep_going = keep_going
        """[run] on_peer_loss = 'continue': a neighbour whose connection breaks is gone, not fatal."""
        self.gone: dict[Rank, str] = {}
        """keep_going: neighbours found gone, and what broke."""
        self.silence: dict[Rank, float] = {}
        """keep_going, lockstep: seconds each neighbour has been waited on since it last finished anything."""
        self.unfinished: set[Rank] = set()
        """keep_going, lockstep: the neighbours left out of the last exchange, silent at its deadline."""
        self.pending: dict[Rank, list[threading.Thread]] = {}
        """keep_going, lockstep: threads still waiting on a silent neighbour's works (left out of their exchange)."""
        self.collectives: PeerCollectives | None = PeerCollectives(timeout_s) if keep_going else None

    def exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, partial: bool = False,
                 patience: int = 1, max_length: int | None = None, head: int = 0) -> dict[Rank, bytes]:
        # A point-to-point stream cannot skip a message (a late one would be read as the next),
        # so `partial` does not apply here: a silent neighbour stops this peer, naming it. With
        # keep_going, one whose connection breaks (or times out, which closes it) is gone instead:
        # left out of this exchange and every later one.
        if self.keep_going:
            outgoing = {j: m for j, m in outgoing.items() if j not in self.gone}
            incoming_from = [j for j in incoming_from if j not in self.gone]
        with _terminable():
            return self._exchange(outgoing, incoming_from, tag, time.monotonic() + self.timeout_s * patience, max_length, head)

    def _exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, deadline: float,
                  max_length: int | None, head: int) -> dict[Rank, bytes]:
        # One round trip, two messages per neighbour posted together: the length and the first
        # `head` bytes, then the rest (a payload shared by all receivers goes from one tensor).
        # Per sender one buffer of this exchange's largest message (never a size a sender asks
        # for), the rest received in place after the head: a message is read without a copy.
        bound = UNBOUNDED_EXCHANGE if max_length is None else max_length
        head = min(head, bound)
        works: list[tuple[str, Rank, dist.Work]] = []
        broken: dict[Rank, str] = {}

        def post(action: str, peer: Rank, start: Callable[[], dist.Work]) -> None:
            try:
                works.append((action, peer, start()))
            except RuntimeError as err:  # gloo refuses to post on a connection already broken
                if not self.keep_going:
                    raise TransportTimeout(f"peer {self.rank} lost its connection to peer {peer} while trying to {action} it "
                                           f"(peer {peer} probably stopped: {gloo_reason(err)})") from None
                broken[peer] = gloo_reason(err)

        for j, (front, body) in self._pieces(outgoing, head).items():
            post("deliver to", j, lambda: dist.isend(front, dst=j, tag=_tag(tag, _LENGTH_TAG)))
            post("deliver to", j, lambda: dist.isend(body, dst=j, tag=_tag(tag, _FRAME_TAG)))
        buffers = {j: receive_buffers(bound, head, self.device) for j in incoming_from}
        for j, (front, rest) in buffers.items():
            post("hear from", j, lambda: dist.irecv(front, src=j, tag=_tag(tag, _LENGTH_TAG)))
            post("hear from", j, lambda: dist.irecv(rest[head:], src=j, tag=_tag(tag, _FRAME_TAG)))
        broken.update(self._wait([w for w in works if w[1] not in broken], deadline))
        self._lose(broken)
        self.refused, messages = {}, {}
        for j, (front, rest) in buffers.items():
            if j in broken or j in self.unfinished:  # gone, or silent this time: its buffers may still be written
                continue
            length, message, why = assemble(j, front, rest, bound, head)
            if why is not None:
                self.refused[j] = why
            elif message is not None:
                messages[j] = message
        return messages

    def _pieces(self, outgoing: dict[Rank, bytes], head: int) -> dict[Rank, tuple[torch.Tensor, torch.Tensor]]:
        """Each message as the tensors it travels in: its length and first `head` bytes, then the
        rest (one tensor for a payload that several receivers share)."""
        pieces, shared = {}, {}
        for j, data in outgoing.items():
            if isinstance(data, Sealed) and len(data.head) == head:
                # one tensor per shared payload, keyed by the object `outgoing` keeps alive (its id is not reused mid-loop)
                first, rest, key = data.head, data.payload, id(data.payload)
            else:
                whole = memoryview(bytes(data))
                first, rest, key = whole[:head], whole[head:], None
            front = bytearray(announced_length(data).to_bytes(PREFIX, "little", signed=True) + bytes(first)).ljust(PREFIX + head, b"\0")
            body = shared[key] if key in shared else self._body(rest)
            if key is not None:
                shared[key] = body
            pieces[j] = (torch.frombuffer(front, dtype=torch.uint8).to(self.device), body)
        return pieces

    def open_streams(self, senders: list[Rank], exchange: int, max_length: int, head: int) -> None:
        """Deadline gossip: start receiving from `senders` before the first exchange, numbered `exchange`."""
        self._streams().open(senders, exchange, max_length, min(head, max_length))

    def _streams(self) -> Streams:
        from p2pfed.stream import Streams

        if self.streams is None:
            self.streams = Streams(self.rank, self.device, self.timeout_s, self.keep_going)
        return self.streams

    def deadline_exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, max_length: int, head: int,
                          wait_s: float, skip_behind: bool = False) -> tuple[dict[Rank, memoryview], int, list[Rank]]:
        """Deadline gossip (p2pfed.stream): send on this peer's streams, take each sender's message of
        exchange `tag` that arrives within `wait_s` (not waiting for a sender a whole exchange behind,
        with `skip_behind`); (messages, late messages dropped, senders missing). Senders whose length
        is refused are named in `refused`, as after `exchange`."""
        head = min(head, max_length)
        pieces, copies = self._pieces(outgoing, head), {}
        for j, (front, body) in pieces.items():  # sent later, from a thread: a copy the caller cannot change meanwhile
            if id(body) not in copies:  # one copy of a payload that several receivers share
                copies[id(body)] = body.clone()
            pieces[j] = (front, copies[id(body)])
        with _terminable():
            result = self._streams().exchange(pieces, incoming_from, tag, max_length, head, wait_s, skip_behind)
        self.refused = result.refused
        self._lose(result.gone)
        return result.messages, result.late, result.missing

    def _lose(self, gone: dict[Rank, str]) -> None:
        """Remember neighbours found gone, and tell every peer (collectives skip from now on)."""
        if gone and self.collectives is not None:
            self.gone.update(gone)
            self.collectives.report(f"peer {self.rank} lost peer(s) {sorted(gone)}")

    def finish_streams(self) -> int:
        """End deadline gossip's streams (every peer calls it after its last exchange); the late messages dropped."""
        if self.streams is None or self.streams.shape is None:
            return 0
        end = self._pieces({-1: _EndMarker(self.streams.shape[1])}, self.streams.shape[1])[-1]
        with _terminable():
            late = self.streams.finish(end)
        self._lose({j: why for j, why in self.streams.gone.items() if j not in self.gone})
        self.streams = None
        return late

    def _body(self, data: bytes | memoryview) -> torch.Tensor:
        """The bytes to send as a tensor sharing the sender's buffer (gloo only reads it, so a
        read-only one is fine); one zero byte for none (the receiver always posts a receive)."""
        if not len(data):
            return torch.zeros(1, dtype=torch.uint8, device=self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(data, dtype=torch.uint8).to(self.device)

    def all_reduce_sum(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        work = tensor.detach().to(self.device, dtype=dtype or tensor.dtype, copy=True)
        self._collective(lambda group: dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group, async_op=True))
        return work.to(tensor.device)

    def all_gather_bytes(self, data: bytes, max_length: int | None = None) -> list[bytes]:
        length = torch.tensor([announced_length(data)], dtype=torch.int64, device=self.device)
        lengths = [torch.zeros_like(length) for _ in range(self.world_size)]
        self._collective(lambda group: dist.all_gather(lengths, length, group=group, async_op=True))
        check_gather_lengths([int(t.item()) for t in lengths], max_length, self.rank)
        size = max(int(t.item()) for t in lengths)
        padded = torch.zeros(size, dtype=torch.uint8, device=self.device)
        if data:
            padded[: len(data)] = self._to_tensor(data)
        gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
        self._collective(lambda group: dist.all_gather(gathered, padded, group=group, async_op=True))
        return [g[: int(n.item())].cpu().numpy().tobytes() for g, n in zip(gathered, lengths)]

    def barrier(self) -> None:
        """Wait until every peer gets here (benchmark probes start timing together)."""
        self._collective(lambda group: dist.barrier(group=group, async_op=True))

    def _collective(self, start: Callable[[Any], dist.Work]) -> None:
        """Run one collective: on the default group, or (keep_going) on the peers' own group,
        given up with PeerLost when a peer is gone."""
        if self.collectives is None:
            start(None).wait()
        else:
            self.collectives.run(start)

    def bare_exchange(self, size: int, send_to: list[Rank], receive_from: list[Rank]) -> float:
        """Seconds to send `size` bytes to each of `send_to` and receive as many from each of
        `receive_from` with plain isend/irecv: no lengths, envelope, codec or crypto. The
        baseline that benchmark probes compare a gossip exchange with."""
        outgoing = [torch.zeros(size, dtype=torch.uint8, device=self.device) for _ in send_to]
        # zeros, not empty: the pages are touched before timing, so a large baseline does not
        # count the page faults of fresh memory that moving the bytes itself would not need
        incoming = [torch.zeros(size, dtype=torch.uint8, device=self.device) for _ in receive_from]
        start = time.perf_counter()
        works = [dist.isend(t, dst=j, tag=_BARE_TAG) for t, j in zip(outgoing, send_to)]
        works += [dist.irecv(t, src=j, tag=_BARE_TAG) for t, j in zip(incoming, receive_from)]
        for work in works:
            work.wait()
        return time.perf_counter() - start

    def _to_tensor(self, data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)

    def _wait(self, works: list[tuple[str, Rank, dist.Work]], deadline: float) -> dict[Rank, str]:
        """Wait for every send and receive; the first one past the deadline names its peer. With
        keep_going, the peers whose connection broke or who were silent to the deadline instead:
        (peer, what happened)."""
        if self.keep_going:
            return self._wait_keeping_going(works, deadline)
        for action, peer, work in works:
            try:
                work.wait(datetime.timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except RuntimeError as err:
                if "Timed out" in str(err):
                    raise TransportTimeout(f"peer {self.rank} could not {action} peer {peer} within the {self.timeout_s:g} s timeout "
                                           f"([gossip] timeout_s); peer {peer} may have stopped or be stuck") from None
                raise TransportTimeout(f"peer {self.rank} lost its connection to peer {peer} while trying to {action} it "
                                       f"(peer {peer} probably stopped: {gloo_reason(err)})") from None
        return {}


    def _wait_keeping_going(self, works: list[tuple[str, Rank, dist.Work]], deadline: float) -> dict[Rank, str]:
        """keep_going's lockstep wait (p2pfed.stream.SILENT_TIMEOUTS): a neighbour not done by the
        deadline is left out of this exchange, its works left pending; it is gone once it has been
        waited on that many timeouts with nothing of it finishing in between (a late work, or any
        work of a later exchange, resets it: a neighbour that is only late keeps talking)."""
        from p2pfed.stream import SILENT_TIMEOUTS

        self._prune_pending()
        start = time.monotonic()
        broken, unfinished, talked = _wait_each(works, deadline)
        self._prune_pending()
        self.unfinished = set(unfinished)
        for peer in talked:
            self.silence.pop(peer, None)
        for peer, threads in unfinished.items():
            self.pending.setdefault(peer, []).extend(threads)
            if peer in talked:
                continue
            self.silence[peer] = self.silence.get(peer, 0.0) + time.monotonic() - start
            if self.silence[peer] >= SILENT_TIMEOUTS * self.timeout_s * 0.999:
                broken.setdefault(peer, f"silent for {SILENT_TIMEOUTS} x the {self.timeout_s:g} s timeout")
        return broken

    def _prune_pending(self) -> None:
        """Forget the finished ones of the receives left pending; a neighbour one of them finished for is talking."""
        for peer, threads in list(self.pending.items()):
            alive = [t for t in threads if t.is_alive()]
            if len(alive) < len(threads):
                self.silence.pop(peer, None)
            if alive:
                self.pending[peer] = alive
            else:
                del self.pending[peer]


def _wait_each(works: list[tuple[str, Rank, dist.Work]], deadline: float
               ) -> tuple[dict[Rank, str], dict[Rank, list[threading.Thread]], set[Rank]]:
    """Each send or receive waited on by a thread of its own that never lets gloo's timeout expire
    (an expired one fails every connection of the process, not only the silent neighbour's), until
    `deadline`: (peers whose connection broke, with what broke; peers with receives still pending, with
    the threads left waiting on them; peers at least one of whose messages arrived). A send still
    pending is left to its thread."""
    from p2pfed.stream import wait

    outcome: dict[int, str | None] = {}

    def waiter(index: int, work: dist.Work) -> None:
        try:
            wait(work, keep_going=True)
            outcome[index] = None
        except RuntimeError as err:
            outcome[index] = gloo_reason(err)

    threads = [threading.Thread(target=waiter, args=(i, work), daemon=True, name="p2pfed-wait") for i, (_, _, work) in enumerate(works)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    broken: dict[Rank, str] = {}
    unfinished: dict[Rank, list[threading.Thread]] = {}
    talked: set[Rank] = set()
    for index, (action, peer, _) in enumerate(works):
        if index not in outcome:
            if action == "hear from":  # a send still pending says nothing of whether the peer talks
                unfinished.setdefault(peer, []).append(threads[index])
        elif outcome[index] is not None:
            broken.setdefault(peer, outcome[index])  # type: ignore[arg-type]
        elif action == "hear from":  # something arrived from it (a finished send may only have left this machine)
            talked.add(peer)
    return (broken, {peer: threads for peer, threads in unfinished.items() if peer not in broken},
            {peer for peer in talked if peer not in broken})


class PeerCollectives:
    """Collectives that a lost peer cannot hang (on_peer_loss = 'continue').

    A collective with a dead member never completes, and gloo fails it at only some of the
    others (those whose part touches the dead peer's connection); the rest would wait out the
    timeout, and a timed-out gloo wait closes the connection it waited on. So collectives run
    on a process group of their own (whatever breaks there, gossip's connections stay whole), and
    a peer that finds a neighbour gone posts it on the rendezvous store: every peer waiting in,
    or about to start, a collective sees the post and gives it up at once. From then on every
    collective raises PeerLost without starting: all peers skip the same ones.
    """

    POLL_S = 0.005
    BOARD_EVERY_S = 0.1
    """How often a waiting collective asks the store for a posted loss (a network round trip)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))  # every peer calls it, at start
        self.board = _loss_board(timeout_s)
        self.lost: str | None = None
        """Why collectives stopped (None while they run)."""

    def report(self, why: str) -> None:
        """This peer found a peer gone: stop collectives here, and post it for every peer."""
        self.lost = self.lost or why
        if self.board is not None:
            with contextlib.suppress(Exception):  # a store that is gone too leaves the others to find it themselves
                self.board.set("lost", b"1")

    def run(self, start: Callable[[Any], dist.Work]) -> None:
        self._check()
        work = start(self.group)
        deadline = time.monotonic() + self.timeout_s
        asked = time.monotonic()
        while not work.is_completed():  # a collective's work completes without a wait (point-to-point's would not)
            if time.monotonic() - asked >= self.BOARD_EVERY_S:
                self._check()
                asked = time.monotonic()
            if time.monotonic() > deadline:
                self.report(f"a collective did not complete within the {self.timeout_s:g} s timeout ([gossip] timeout_s)")
                self._check()
            time.sleep(self.POLL_S)
        try:
            work.wait()
        except RuntimeError as err:
            self.report(f"a collective failed: {gloo_reason(err)}")
            self._check()

    def _check(self) -> None:
        if self.lost is None and self.board is not None:
            try:  # only whether the key is there: its value is another peer's bytes, never read
                if self.board.check(["lost"]):
                    self.lost = "a peer posted the loss of a neighbour on the rendezvous store"
            except Exception as err:  # the store's host is gone: so is a peer (its agent, or the peer that held it)
                self.lost = f"the rendezvous store is unreachable ({type(err).__name__})"
        if self.lost is not None:
            raise PeerLost(f"collectives need every peer, and one is gone: {self.lost}")


LOSS_BOARD_ENV = "P2PFED_LOSS_BOARD"
"""host:port of the store `p2pfed run` holds for a run that goes on without lost peers."""


def _loss_board(timeout_s: float) -> dist.Store | None:
    """Where a loss is posted: the launcher's store (it outlives any peer and its agent), else
    the workers' rendezvous store, under a key prefix of this run attempt (None without one: tests)."""
    address = os.environ.get(LOSS_BOARD_ENV) or (f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
                                                 if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ else None)
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=min(timeout_s, 30.0)))
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"p2pfed/loss/{attempt}", store)


@contextlib.contextmanager
def _terminable() -> Iterator[None]:
    """SIGTERM ends the process at once while it waits on the network (a Python handler
    would only run after the wait): the round is abandoned, the last checkpoint stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LocalHub:
    """Shared mailboxes for `LocalTransport` peers living as threads in one process."""

    def __init__(self, world_size: int, timeout_s: float = 30.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.mail: dict[tuple[Rank, Rank, int], bytes] = {}
        self.pending: dict[tuple[str, int], list] = {}
        self.lock = threading.Lock()
        self.condition = threading.Condition(self.lock)
        """Collectives wait here."""
        self.inboxes = [threading.Condition(self.lock) for _ in range(world_size)]
        """Each receiver waits on its own: a letter wakes its addressee, not every thread."""
        self.failed: str | None = None
        """Set when a peer thread died: the others stop waiting for it (simulation)."""

    def fail(self, reason: str) -> None:
        with self.lock:
            self.failed = self.failed or reason
            self.condition.notify_all()
            for inbox in self.inboxes:
                inbox.notify_all()

    def check(self, rank: Rank) -> None:
        if self.failed is not None:
            raise TransportTimeout(f"peer {rank} stops: {self.failed}")

    def transport(self, rank: Rank) -> "LocalTransport":
        return LocalTransport(self, rank)


class LocalTransport:
    """In-process transport with the same interface, for tests and simulation."""

    def __init__(self, hub: LocalHub, rank: Rank) -> None:
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.calls = 0
        self.refused: dict[Rank, str] = {}

    def exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, partial: bool = False,
                 patience: int = 1, max_length: int | None = None, head: int = 0) -> dict[Rank, bytes]:
        got = self._exchange(outgoing, incoming_from, tag, partial, patience)
        self.refused = {j: why for j, data in got.items() if (why := length_refusal(j, announced_length(data), max_length))}
        return {j: data for j, data in got.items() if j not in self.refused}

    def _exchange(self, outgoing: dict[Rank, bytes], incoming_from: list[Rank], tag: int, partial: bool,
                  patience: int) -> dict[Rank, bytes]:
        hub = self.hub
        with hub.lock:
            for j, data in outgoing.items():
                hub.mail[(self.rank, j, tag)] = data if isinstance(data, LyingLength) else bytes(data)
                hub.inboxes[j].notify_all()
            keys = [(j, self.rank, tag) for j in incoming_from]
            arrived = hub.inboxes[self.rank].wait_for(lambda: hub.failed is not None or all(k in hub.mail for k in keys), timeout=hub.timeout_s * patience)
            hub.check(self.rank)
            if not arrived:
                missing = [k[0] for k in keys if k not in hub.mail]
                if not partial:
                    raise TransportTimeout(f"peer {self.rank} could not hear from peer {missing[0]} within the {hub.timeout_s:g} s timeout "
                                           f"([gossip] timeout_s); peer {missing[0]} may have stopped or be stuck")
            return {k[0]: hub.mail.pop(k) for k in keys if k in hub.mail}  # mailboxes skip safely: a late letter is never read

    def _collective(self, kind: str, value, combine=list, fold=None):
        """Every peer contributes one value; all get `combine` of the values in rank order,
        computed once by the last to arrive; the last to read frees it. With `fold(total,
        value)` values are added up as they arrive instead (total None at first), so N peers
        never hold N contributions at once."""
        hub = self.hub
        self.calls += 1
        key = (kind, self.calls)
        with hub.condition:
            entry = hub.pending.setdefault(key, {"values": None if fold else [None] * self.world_size, "arrived": 0,
                                                 "result": None, "done": False, "readers": 0})
            if fold is None:
                entry["values"][self.rank] = value
            else:
                entry["values"] = fold(entry["values"], value)
            entry["arrived"] += 1
            if entry["arrived"] == self.world_size:
                entry["result"] = combine(entry["values"]) if fold is None else entry["values"]
                entry["values"], entry["done"] = None, True
                hub.condition.notify_all()
            arrived = hub.condition.wait_for(lambda: hub.failed is not None or entry["done"], timeout=hub.timeout_s)
            hub.check(self.rank)
            if not arrived:
                raise TransportTimeout(f"peer {self.rank}: collective {kind} timed out")
            entry["readers"] += 1
            if entry["readers"] == self.world_size:
                del hub.pending[key]
            return entry["result"]

    def all_reduce_sum(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """float64 and int64 sums (monitoring: consensus distance, losses, masked words) are
        folded as they arrive: the order of arrival may change the last bits of a float64 figure
        (integers stay exact, wrapping alike in any order). A float32 sum, the allreduce mode's
        mean that becomes every adapter, stays in rank order so that runs repeat bit for bit."""
        dtype = dtype or tensor.dtype
        if dtype not in (torch.float64, torch.int64):
            return self._collective("sum", tensor.detach().to(dtype, copy=True), lambda values: torch.stack(values).sum(dim=0)).clone()

        def fold(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
            if total is not None and total.shape != value.shape:
                raise ValueError(f"peer {self.rank}: all_reduce_sum of shape {tuple(value.shape)}, others sent {tuple(total.shape)}")
            return value.detach().to(dtype, copy=True) if total is None else total.add_(value.detach().to(dtype))

        return self._collective("sum", tensor, fold=fold).clone()

    def all_gather_bytes(self, data: bytes, max_length: int | None = None) -> list[bytes]:
        gathered = self._collective("gather", data)
        check_gather_lengths([announced_length(g) for g in gathered], max_length, self.rank)
        return gathered
