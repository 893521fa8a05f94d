"""Run configuration: dataclasses per section, TOML in, ``key=value`` overrides, clear errors.

Every field is checked against its default's type, so a typo or a wrong type in a config
file stops the run before any peer starts, with one sentence naming the file and field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


@dataclass(kw_only=True)
class RunSection:
    """How many peers, how long, where results go."""

    peers: int = 4
    """Number of peers (torchrun processes)."""
    rounds: int = 8
    """Gossip rounds; each round is `local_steps` optimizer steps then one exchange."""
    local_steps: int = 2
    """0: no training, the rounds only gossip (consensus studies, e.g. with lora.init = 'per_peer')."""
    eval_every: int = 2
    """Evaluate (own held-out + global) every E rounds, and always before and after."""
    seed: int = 0
    """Common seed: all peers start from the same adapter, or averaging means nothing."""
    out: str = "runs/demo"
    threads: int = 0
    """Torch threads per peer; 0 = cores / local peers (at least 1)."""
    checkpoint_every: int = 1
    """Each peer checkpoints every C rounds (and after the last), keeping the newest two."""
    max_restarts: int = 3
    """torchrun restarts the whole group up to this many times when a peer dies; peers
    then resume from the newest round every peer has a checkpoint for."""
    prompt: str = "ROMEO.\n"
    """Prompt for the before/after samples printed at the end of a run."""
    sample_tokens: int = 40
    engine: str = "torchrun"
    """'torchrun': a process per peer; 'simulate': every peer a thread of one process on one
    shared base model (`p2pfed simulate` sets it; p2pfed.simulate)."""
    on_peer_loss: str = "restart"
    """When a peer dies: 'restart' (torchrun restarts the whole group from the newest common
    checkpoint, up to max_restarts times; runs repeat bit for bit) or 'continue' (`p2pfed run`
    starts one torchrun agent per peer, so a death takes no sibling down; its neighbours mark
    it gone and the survivors finish the run without it: README, When things fail)."""

    def check(self) -> None:
        _positive(self, "peers", "rounds", "eval_every", "checkpoint_every")
        _at_least(self, 0, "threads", "sample_tokens", "max_restarts", "local_steps")
        _one_of(self, "engine", ("torchrun", "simulate"))
        _one_of(self, "on_peer_loss", ("restart", "continue"))


@dataclass(kw_only=True)
class ModelSection:
    """Which base model every peer loads."""

    name: str = "smollm2-135m"
    """'smollm2-135m' (embedded), 'tiny' (random Llama for tests), or a local HF directory/id."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""

    def check(self) -> None:
        _one_of(self, "device", ("auto", "cpu", "cuda"))


@dataclass(kw_only=True)
class LoraSection:
    """The LoRA adapter that peers train and gossip."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    share: str = "AB"
    """'AB': both factors trained and gossiped; 'B': A frozen at the common seed, only B."""
    init: str = "common"
    """'common': every peer starts from the adapter of run.seed (averaging needs it);
    'per_peer': A from (seed, rank), so peers start apart (consensus studies)."""

    def check(self) -> None:
        _positive(self, "r", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"[lora] dropout: expected a number in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("[lora] target_modules: expected at least one module name")
        _one_of(self, "share", ("AB", "B"))
        _one_of(self, "init", ("common", "per_peer"))
        if self.init == "per_peer" and self.share == "B":
            raise ConfigError("[lora] init = 'per_peer' draws each peer's A, but share = 'B' needs A common to every peer; use share = 'AB'")


@dataclass(kw_only=True)
class DataSection:
    """Where each peer's private data comes from and how it is cut into blocks."""

    source: str = "shakespeare"
    """'shakespeare' (embedded) or 'jsonl' (one file per peer, see `path`)."""
    split: str = "play"
    """Shakespeare only: 'play', 'role' (LEAF style: each speaking role is a client) or
    'slice' (the plays as one text cut into one equal slice per peer: for hundreds of peers,
    where the smallest of 1,313 roles are a line long)."""
    path: str = ""
    """JSONL only: path template with {rank}, e.g. 'data/peer{rank}.jsonl'."""
    eval: str = ""
    """Optional global eval JSONL that every peer evaluates on."""
    block_size: int = 128
    batch_size: int = 4
    eval_fraction: float = 0.1
    """Share of each peer's data held out for its own evaluation."""
    eval_blocks: int = 16
    """Blocks evaluated per eval set (own and global), to bound eval time."""
    pool: int = 0
    """Shakespeare only: deal the documents into this many shares and give peer r every
    share s with s % peers == r; 0 = one share per peer. With `run.peers = 1` and
    `pool = 8` one process trains on the pooled data of an 8-peer run (the centralised
    baseline) and evaluates on the same global held-out set."""

    def check(self) -> None:
        _one_of(self, "source", ("shakespeare", "jsonl"))
        _one_of(self, "split", ("play", "role", "slice"))
        _positive(self, "block_size", "batch_size", "eval_blocks")
        _at_least(self, 0, "pool")
        if self.pool and self.source != "shakespeare":
            raise ConfigError("[data] pool: pooling shares applies to source 'shakespeare'; give each peer's JSONL file instead")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"[data] eval_fraction: expected a number in (0, 1), got {self.eval_fraction}")
        if self.source == "jsonl" and "{rank}" not in self.path:
            raise ConfigError("[data] path: source 'jsonl' needs a path template with {rank}, e.g. 'data/peer{rank}.jsonl'")


@dataclass(kw_only=True)
class TrainSection:
    """Local optimisation on each peer."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    optimizer_state: str = "keep"
    """'keep': AdamW's moments carry over from round to round (they are local, never gossiped);
    'reset': each round's local steps start from a fresh AdamW, as FedAvg implementations do."""

    def check(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"[train] lr: expected a positive number, got {self.lr}")
        _at_least(self, 0, "weight_decay", "warmup_steps", "grad_clip")
        _one_of(self, "optimizer_state", ("keep", "reset"))


@dataclass(kw_only=True)
class OuterSection:
    """An outer optimizer over gossip (DiLoCo, Douillard et al. 2023; NoLoCo for gossip):
    after a round's H = run.local_steps inner steps and the mix, the change of the round
    (start minus mix, the outer gradient) takes a Nesterov-momentum step from the start."""

    enabled: bool = False
    lr: float = 0.7
    """Outer learning rate (DiLoCo: 0.7); lr = 1 with momentum = 0 is plain gossip."""
    momentum: float = 0.9
    nesterov: bool = True

    def check(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"[outer] lr: expected a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"[outer] momentum: expected a number in [0, 1), got {self.momentum}")


@dataclass(kw_only=True)
class GossipSection:
    """How adapters are averaged between peers."""

    mode: str = "gossip"
    """'gossip' (neighbours on the topology), 'allreduce' (exact mean: FedAvg without a
    server, a baseline), 'local' (no communication, a baseline)."""
    topology: str = "topologies/ring.toml"
    codec: str = "fp32"
    """Value encoding (fp32, fp16, bf16, int8, int4, int2), optionally after a structure and '+':
    'topk+int8', 'randk+fp16', 'lowrank+int8'. Numbers they leave open are in [codec]."""
    algorithm: str = "plain"
    """'plain': mix what neighbours sent as if exact; 'choco': CHOCO-gossip (Koloskova et
    al. 2019) on public copies, moving toward them with step `gamma`."""
    gamma: float = 0.5
    """CHOCO consensus step size in (0, 1]."""
    error_feedback: str = "auto"
    """'on': send each round's change plus what the codec dropped before (receivers keep a
    copy of each neighbour); 'off': send the compressed adapter itself; 'auto': on for
    biased codecs (topk, randk, lowrank), off for the others. CHOCO is always 'on'."""
    secure: bool = False
    """Pairwise-masked secure averaging: a peer learns only the weighted sum of its
    neighbours' adapters (see [secure] for the fixed-point encoding)."""
    timeout_s: float = 300.0
    """How long a peer waits for its neighbours before giving up."""
    deadline_s: float = 0.0
    """0 (the default): every exchange waits for all neighbours (lockstep). > 0: deadline
    gossip: neighbours' messages are received in the background, an exchange takes those that
    arrive within deadline_s seconds, and a late neighbour's weight goes to the peer's own
    term (plain gossip on a static topology only; see README, When things fail)."""
    robust: str = "none"
    """Byzantine-robust mixing of decoded neighbour values: 'none' (weighted average),
    'clip' (ClippedGossip: self-centred clipping, adaptive radius), 'trimmed'
    (coordinate-wise trimmed mean), 'median' (coordinate-wise median). Needs individual
    values: not with secure mode or CHOCO."""
    byzantine: int = 1
    """How many attackers a robust rule must tolerate in any one neighbourhood."""

    def check(self) -> None:
        from p2pfed.codec import CodecError, parse_spec

        _one_of(self, "mode", ("gossip", "allreduce", "local"))
        _one_of(self, "algorithm", ("plain", "choco"))
        _one_of(self, "error_feedback", ("auto", "on", "off"))
        _one_of(self, "robust", ("none", "clip", "trimmed", "median"))
        _at_least(self, 1, "byzantine")
        if self.robust != "none" and self.secure:
            raise ConfigError(f"[gossip] robust = '{self.robust}': robust rules look at each neighbour's adapter, but secure mode only "
                              "ever reveals their sum; choose one (a secure sender's values are bounded by [secure] bound)")
        if self.robust != "none" and self.algorithm == "choco":
            raise ConfigError(f"[gossip] robust = '{self.robust}': CHOCO mixes public copies by its own step; use algorithm = 'plain'")
        try:
            parse_spec(self.codec)
        except CodecError as err:
            raise ConfigError(str(err)) from None
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"[gossip] gamma: expected a number in (0, 1], got {self.gamma}")
        if self.algorithm == "choco" and self.error_feedback == "off":
            raise ConfigError("[gossip] error_feedback: CHOCO-gossip always carries what the codec dropped (its public copies are "
                              "error feedback); use 'auto' or 'on', or algorithm = 'plain'")
        if self.timeout_s <= 0:
            raise ConfigError(f"[gossip] timeout_s: expected a positive number, got {self.timeout_s}")
        if not 0.0 <= self.deadline_s < self.timeout_s:
            raise ConfigError(f"[gossip] deadline_s: expected 0 (wait for every neighbour) or a number of seconds below timeout_s "
                              f"({self.timeout_s:g}), got {self.deadline_s}")
        if self.secure:
            self._check_secure(parse_spec(self.codec))

    def _check_secure(self, spec: tuple[str, str]) -> None:
        """Masks cancel only in a sum every sender builds the same way, from its own values."""
        if self.mode != "gossip":
            raise ConfigError(f"[gossip] secure: masking applies to neighbour gossip, not mode '{self.mode}'")
        if spec[0] not in ("dense", "randk") or spec[1] != "fp32":
            raise ConfigError(f"[gossip] codec: secure mode sums masked messages, so every sender must encode the same coordinates the "
                              f"same way; use 'fp32' (sent as fixed point) or 'randk' (coordinates from the shared seed), not {self.codec!r}")
        if self.algorithm == "choco" or self.error_feedback == "on":
            raise ConfigError("[gossip] secure: CHOCO and error feedback keep a per-sender copy of each neighbour, which a masked "
                              "sum never reveals; use algorithm = 'plain' and error_feedback = 'auto' or 'off'")


@dataclass(kw_only=True)
class CodecSection:
    """The numbers a codec spec leaves open."""

    fraction: float = 0.1
    """topk / randk: share of the coordinates each message carries."""
    rank: int = 2
    """lowrank: rank of the factors sent for each adapter matrix."""
    chunk: int = 256
    """int8 / int4: values sharing one fp32 scale."""

    def check(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"[codec] fraction: expected a number in (0, 1], got {self.fraction}")
        _positive(self, "rank", "chunk")


@dataclass(kw_only=True)
class SecureSection:
    """Fixed-point encoding for secure mode: values live in Z_2^32 while masked."""

    bound: float = 4.0
    """Each weighted value W_ij x_j is clipped to [-bound, bound] (clips are counted in the metrics)."""
    frac_bits: int = 20
    """Fractional bits: rounding error 2^-frac_bits per value; start-up refuses settings
    whose largest neighbourhood sum could wrap around."""

    min_present: int = 2
    """The fewest present senders a receiver's sum completes with. A receiver can declare an
    honest sender's message refused, so a receiver colluding with c senders isolates one
    victim when the sum may shrink to c + 1 senders; raising this trades dropout tolerance
    for collusion resistance (at most a peer's number of senders)."""

    def check(self) -> None:
        if not 0 < self.bound < math.inf:
            raise ConfigError(f"[secure] bound: expected a positive, finite number, got {self.bound}")
        if not 1 <= self.frac_bits <= 30:
            raise ConfigError(f"[secure] frac_bits: expected an integer in 1..30, got {self.frac_bits}")
        if self.min_present < 2:
            raise ConfigError(f"[secure] min_present: expected an integer of at least 2 (one sender's sum is its adapter), got {self.min_present}")


@dataclass(kw_only=True)
class ConsensusSection:
    """Tracking how far peers are from their average, and optionally steering it."""

    every: int = 1
    """Exact consensus distance (a monitoring all-reduce) every E rounds; 0 = never. The
    local estimate from received messages is logged every round regardless."""
    target: float = 0.0
    """Consensus control (Kong et al. 2021): after a round's gossip step, run extra gossip
    steps while Xi^2 > target, up to `max_steps` in all; 0 = off."""
    relative: bool = False
    """Read `target` relative to the mean squared adapter norm (1/n) sum_i ||x_i||^2."""
    max_steps: int = 4
    """Cap on gossip steps in one round, the first included."""

    def check(self) -> None:
        _at_least(self, 0, "every", "target")
        _positive(self, "max_steps")


@dataclass(kw_only=True)
class IdentitySection:
    """Signing keys. Empty: `p2pfed run` creates keys and a roster in RUN_DIR/keys."""

    roster: str = ""
    """Roster JSON of every peer's public keys (from `p2pfed keygen`)."""
    key: str = ""
    """This peer's private key file; a template with {rank}, e.g. 'keys/peer{rank}.pem'."""

    def check(self) -> None:
        if bool(self.roster) != bool(self.key):
            raise ConfigError("[identity] roster and key: give both (from `p2pfed keygen`) or neither")
        if self.key and "{rank}" not in self.key:
            raise ConfigError("[identity] key: expected a path template with {rank}, e.g. 'keys/peer{rank}.pem'")


FAULT_KINDS = ("flip", "foreign_key", "replay", "misaddress", "abstain", "crash", "nan", "scale", "signflip", "noise", "alie",
               "shortpayload", "hugelength", "slow", "vanish")
VALUE_FAULTS = ("nan", "scale", "signflip", "noise", "alie")
"""Fault kinds that change the adapter a faulty peer sends, under a valid signature."""


@dataclass(kw_only=True)
class FaultSection:
    """Fault injection for tests and demos: chosen peers misbehave through the real path."""

    peers: list[int] = field(default_factory=list)
    """Ranks that misbehave (empty: everyone is honest)."""
    kind: str = "flip"
    """'flip' (a payload bit), 'foreign_key' (signed with a key outside the roster),
    'replay' (last round's message again), 'misaddress' (a message meant for a non-neighbour),
    'abstain' (a signed abstain instead of the data: secure mode's dropout path),
    'crash' (the process kills itself with SIGKILL at the start of `from_round`, on the
    first attempt only: exercises elastic restart and resume). Byzantine kinds, validly
    signed: 'nan' (a NaN in the adapter), 'scale' (adapter x strength, default 100),
    'signflip' (-adapter), 'noise' (+ Gaussian noise of std strength, default 1),
    'alie' ("a little is enough": the mean of what it heard last round minus strength,
    default 1.5, standard deviations), 'shortpayload' (a truncated payload), 'hugelength'
    (a length prefix of 2^62 bytes and no payload). 'slow': a straggler, honest but
    `strength` times slower (default 3): after its local steps it sleeps (strength - 1) times
    the time they took. 'vanish': a party that walks away: the process exits (status 0, no
    goodbye) at the start of `from_round`, on the first attempt only."""
    strength: float = 0.0
    """The Byzantine kind's parameter; 0 = its default."""
    from_round: int = 1
    until_round: int = 0
    """Last round that misbehaves; 0 = to the end."""

    def check(self) -> None:
        _one_of(self, "kind", FAULT_KINDS)
        _positive(self, "from_round")
        if self.kind == "slow" and self.strength and self.strength < 1:
            raise ConfigError(f"[faults] strength: a 'slow' peer is strength times slower, so expected a number >= 1, got {self.strength}")
        _at_least(self, 0, "until_round")


@dataclass(kw_only=True)
class PrivacySection:
    """Differential privacy of a party's whole data against everyone else (p2pfed.privacy)."""

    enabled: bool = False
    clip: float = 1.0
    """Each round's local update (trained adapter minus the round's starting mix) is scaled to
    L2 norm <= clip before it leaves."""
    noise_multiplier: float = 1.0
    """Gaussian noise of std noise_multiplier * clip per value is added to what is shared."""
    delta: float = 1e-5
    """The delta at which epsilon is reported."""
    epsilon: float = 0.0
    """A budget: the round whose release would take epsilon past it is not run (0 = none)."""
    noise: str = "local"
    """'local': every release carries the full noise. 'distributed' (secure mode): a sender adds
    only its share to what it sends, so a receiver's sum carries the full noise if the sum's
    other senders add theirs; its own term keeps the full noise (p2pfed.privacy.distributed)."""

    def check(self) -> None:
        _one_of(self, "noise", ("local", "distributed"))
        if not 0 < self.clip < math.inf:
            raise ConfigError(f"[privacy] clip: expected a positive, finite L2 norm, got {self.clip}")
        if not (self.noise_multiplier == 0 or 1e-6 <= self.noise_multiplier <= 1e6):
            raise ConfigError(f"[privacy] noise_multiplier: expected 0 (no noise) or a number in [1e-6, 1e6], got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"[privacy] delta: expected a number in (0, 1), got {self.delta}")
        if not self.epsilon >= 0:
            raise ConfigError(f"[privacy] epsilon: expected a budget >= 0 (0 = none), got {self.epsilon}")
        if self.enabled and self.epsilon > 0 and self.noise_multiplier == 0:
            raise ConfigError("[privacy] epsilon: a budget needs noise (noise_multiplier > 0); without it epsilon is infinite")


@dataclass(kw_only=True)
class NetworkSection:
    """The network `p2pfed simulate` emulates (a simulated clock beside the measured one);
    a torchrun run has a real network and refuses these settings."""

    latency_ms: float = 0.0
    """One-way delay of every message."""
    bandwidth_mbit: float = 0.0
    """Each peer's uplink in Mbit/s (its messages leave one after another); 0 = unlimited."""
    loss: float = 0.0
    """Probability that a message is lost and sent again after `retransmit_ms` (each try alike)."""
    retransmit_ms: float = 200.0
    slow_peers: list[int] = field(default_factory=list)
    """Stragglers: these peers' compute takes `slowdown` times as long."""
    slowdown: float = 1.0
    churn: list[list[int]] = field(default_factory=list)
    """Peers away for a while, each [rank, leave, rejoin]: away in rounds leave .. rejoin - 1
    (counted from 1, as the metrics are), it takes no local step and sends and hears nothing;
    its neighbours give its weight to their own term. Monitoring still sees every peer."""

    def away(self, round: int) -> frozenset[int]:
        """The peers away in `round` (1-based)."""
        return frozenset(rank for rank, leave, rejoin in self.churn if leave <= round < rejoin)

    def check(self) -> None:
        for entry in self.churn:
            if not (len(entry) == 3 and entry[0] >= 0 and 1 <= entry[1] < entry[2]):
                raise ConfigError(f"[network] churn: expected entries [rank, leave, rejoin] of whole numbers with rank >= 0 and "
                                  f"1 <= leave < rejoin, got {entry!r}")
        for name in ("latency_ms", "retransmit_ms"):
            if not 0 <= getattr(self, name) <= 1e7:
                raise ConfigError(f"[network] {name}: expected milliseconds in [0, 1e7], got {getattr(self, name)}")
        if not (self.bandwidth_mbit == 0 or 1e-3 <= self.bandwidth_mbit <= 1e9):
            raise ConfigError(f"[network] bandwidth_mbit: expected 0 (unlimited) or Mbit/s in [1e-3, 1e9], got {self.bandwidth_mbit}")
        if not 0 <= self.loss < 1:
            raise ConfigError(f"[network] loss: expected a probability in [0, 1), got {self.loss}")
        if not 1 <= self.slowdown <= 1e6:
            raise ConfigError(f"[network] slowdown: expected a factor >= 1, got {self.slowdown}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in self.slow_peers):
            raise ConfigError(f"[network] slow_peers: expected a list of peer ranks, got {self.slow_peers!r}")

    @property
    def emulated(self) -> bool:
        return self != NetworkSection()


@dataclass(kw_only=True)
class BenchSection:
    """Measurements the benchmark suite asks a run to take on top of its rounds."""

    probes: int = 0
    """After the last round, time this many extra gossip exchanges of the final adapter and
    as many bare torch.distributed send/recv of the same bytes to the same neighbours, each
    after a barrier: the ratio is what our envelope, codec and crypto add (gossip mode only)."""

    def check(self) -> None:
        _at_least(self, 0, "probes")


@dataclass(kw_only=True)
class Config:
    """A whole run; one section per component."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    codec: CodecSection = field(default_factory=CodecSection)
    consensus: ConsensusSection = field(default_factory=ConsensusSection)
    secure: SecureSection = field(default_factory=SecureSection)
    identity: IdentitySection = field(default_factory=IdentitySection)
    faults: FaultSection = field(default_factory=FaultSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    outer: OuterSection = field(default_factory=OuterSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    bench: BenchSection = field(default_factory=BenchSection)

    def check(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).check()
        if self.gossip.secure and self.consensus.target > 0:
            raise ConfigError("[consensus] target: consensus control exchanges again the very adapters whose network mean monitoring "
                              "just gave every peer, and that mean less a neighbourhood's sum is the rest of the network (one peer's "
                              "adapter on a ring of 4); set target = 0 in secure mode")
        if self.network.emulated and self.run.engine != "simulate":
            raise ConfigError("[network]: an emulated network is for `p2pfed simulate` (run.engine = 'simulate'); a torchrun run "
                              "has the real one (remove [network])")
        if self.gossip.deadline_s and (self.gossip.mode != "gossip" or self.run.engine != "torchrun" or self.consensus.target > 0):
            raise ConfigError("[gossip] deadline_s: deadline gossip is for neighbour gossip under torchrun (gossip.mode = 'gossip', "
                              "run.engine = 'torchrun') without consensus control (consensus.target = 0): every peer must make "
                              "the same exchanges")
        if self.run.on_peer_loss == "continue":
            self._check_continue()
        if self.run.engine == "simulate" and self.bench.probes:
            raise ConfigError("[bench] probes: bare send/recv probes time a real network; set probes = 0 to simulate")
        if self.run.engine == "simulate" and self.faults.peers and self.faults.kind in ("crash", "vanish"):
            raise ConfigError(f"[faults] kind = '{self.faults.kind}' ends its process, which in simulation holds every peer; "
                              "use network.slow_peers for a straggler, or run it under torchrun")
        if any(r >= self.run.peers for r in self.network.slow_peers):
            raise ConfigError(f"[network] slow_peers: {self.network.slow_peers} names a rank outside the {self.run.peers} peers (0..{self.run.peers - 1})")
        if any(entry[0] >= self.run.peers for entry in self.network.churn):
            raise ConfigError(f"[network] churn: {self.network.churn} names a rank outside the {self.run.peers} peers (0..{self.run.peers - 1})")
        if self.network.churn and (self.gossip.mode != "gossip" or self.gossip.secure or self.gossip.algorithm == "choco"
                                   or self.gossip.error_feedback == "on"):
            raise ConfigError("[network] churn: emulated only for plain gossip (gossip.mode = 'gossip', not secure, no CHOCO or "
                              "error feedback): an absent sender would leave masks unmatched and public copies out of step")
        if self.run.local_steps == 0 and (self.gossip.mode != "gossip" or self.privacy.enabled or self.outer.enabled or self.gossip.secure):
            raise ConfigError("[run] local_steps = 0 (no training, gossip only) needs gossip.mode = 'gossip' without [privacy], "
                              "[outer] or gossip.secure: with no local update there is nothing to clip or to take an outer step on, "
                              "and once peers agree a secure sender would have to mask the same adapter twice, which it refuses")
        if self.privacy.enabled and self.gossip.mode == "local":
            raise ConfigError("[privacy] enabled: gossip.mode = local shares nothing, so there is nothing to make private; "
                              "use gossip or allreduce")
        if self.privacy.enabled and self.privacy.noise == "distributed" and not (self.gossip.mode == "gossip" and self.gossip.secure):
            raise ConfigError("[privacy] noise = 'distributed': a sender's share of the noise is enough only inside a masked sum; "
                              "it needs gossip.mode = 'gossip' with gossip.secure = true (or use noise = 'local')")

    def _check_continue(self) -> None:
        """What going on without a dead peer needs: neighbour gossip between processes, and no
        exchange that needs every peer's message (a secure sum's masks, consensus control)."""
        if self.gossip.mode != "gossip" or self.run.engine != "torchrun":
            raise ConfigError("[run] on_peer_loss = 'continue': survivors go on by gossiping without the dead peer, so it needs "
                              "gossip.mode = 'gossip' under run.engine = 'torchrun' (allreduce needs every peer in every round)")
        if self.consensus.target > 0:
            raise ConfigError("[run] on_peer_loss = 'continue': consensus control needs every peer's consensus figure each round; "
                              "set consensus.target = 0")
        if self.bench.probes:
            raise ConfigError("[run] on_peer_loss = 'continue': [bench] probes time lockstep exchanges with every neighbour; "
                              "set probes = 0")
        if self.gossip.algorithm == "choco" or self.gossip.error_feedback == "on":
            raise ConfigError("[run] on_peer_loss = 'continue': a message missed at the timeout would leave CHOCO's or error "
                              "feedback's public copies out of step; use algorithm = 'plain' and error_feedback = 'off'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj: Any, *names: str) -> None:
    _at_least(obj, 1, *names)


def _at_least(obj: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < low:
            raise ConfigError(f"[{_section_name(obj)}] {name}: expected a number >= {low}, got {value}")


def _one_of(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"[{_section_name(obj)}] {name}: expected one of {', '.join(allowed)}; got {value!r}")


def _section_name(obj: Any) -> str:
    return type(obj).__name__.removesuffix("Section").lower()


def _coerce(section: str, name: str, value: Any, default: Any, declared: str = "") -> Any:
    """Check `value` against the type of the field's default; ints are accepted for floats."""
    where = f"[{section}] {name}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, list) and declared == "list[list[int]]":
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if not isinstance(value, list) or not all(isinstance(row, list) and all(whole(v) for v in row) for row in value):
            raise ConfigError(f"{where}: expected a list of lists of integers, got {value!r}")
        return [list(row) for row in value]
    if isinstance(default, list):
        want_int = declared == "list[int]"
        ok = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if want_int else (lambda v: isinstance(v, str))
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise ConfigError(f"{where}: expected a list of {'integers' if want_int else 'strings'}, got {value!r}")
        return list(value)
    raise AssertionError(f"unsupported field type for {where}")  # internal invariant


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from nested dicts; errors are prefixed with `source`."""
    try:
        if not isinstance(raw, dict):
            raise ConfigError("expected a table of sections")
        sections: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(Config)}
        for name, values in raw.items():
            if name not in known:
                raise ConfigError(f"unknown section [{name}]; expected one of {', '.join(known)}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{name}]: expected a table of settings, got {values!r}")
            section_cls = known[name].default_factory  # type: ignore[misc]
            defaults = section_cls()
            fields = {f.name: str(f.type) for f in dataclasses.fields(defaults)}
            kwargs = {}
            for key, value in values.items():
                if key not in fields:
                    raise ConfigError(f"[{name}] {key}: unknown setting; expected one of {', '.join(sorted(fields))}")
                kwargs[key] = _coerce(name, key, value, getattr(defaults, key), fields[key])
            sections[name] = section_cls(**kwargs)
        config = Config(**sections)
        config.check()
        return config
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides; values are parsed as TOML, else taken as strings."""
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. gossip.mode=allreduce")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: [{section}] is not a table")
        raw[section][name] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a TOML (or resolved JSON) config file and apply command-line overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config file ({err})") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({err})") from None
    raw = _with_base(raw, path, seen=[path.resolve()])
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path))


def _with_base(raw: dict[str, Any], path: Path, seen: list[Path]) -> dict[str, Any]:
    """`extends = "other.toml"` (relative to this file): start from that file's settings."""
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: extends: expected a file name string, got {base_name!r}")
    base_path = (path.parent / base_name).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: extends: {base_name} is already being loaded (a cycle)")
    try:
        base = tomllib.loads(base_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: extends: {base_path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: extends: cannot read {base_path} as a TOML file ({type(err).__name__})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{base_path}: not valid TOML ({err})") from None
    base = _with_base(base, base_path, seen + [base_path])
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return base


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config (defaults filled in) so a run directory says what ran."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
