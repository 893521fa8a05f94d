"""The torchrun entry point: one peer's whole run (local steps -> gossip -> metrics).

Run as ``python -m p2pfed.peer CONFIG [section.key=value ...]`` under torchrun; the
`p2pfed run` command and the scripts in launch/ do that for you.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import stat
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from p2pfed.codec import Codec, CodecSettings, build_codec
from p2pfed.config import Config, ConfigError, GossipSection, load_config, save_config
from p2pfed.consensus import exact_consensus_distance, gossip_round, is_measured
from p2pfed.data import DataError, PeerData, load_peer_data
from p2pfed.faults import FaultInjector
from p2pfed.gossip import Averager
from p2pfed.identity import Identity, IdentityError, Roster, load_identity
from p2pfed.checkpoint import CheckpointError, Checkpoints, agree_on_round, identity_key, local_key
from p2pfed.memory import keep_freed_memory
from p2pfed.metrics import MetricsWriter, mean_of, read_metrics, summary_table
from p2pfed.model import ModelError, adapter_layout, adapter_to_vector, choose_device, draw_peer_adapter, load_base, save_adapter, vector_to_adapter, wrap_lora
from p2pfed.outer import OuterOptimizer, check_outer
from p2pfed.privacy import PrivacyLedger
from p2pfed.privacy.distributed import NoisePlan
from p2pfed.probe import probe_exchange
from p2pfed.secure import FixedPoint, SecureError
from p2pfed.secure.consentlog import ConsentLog
from p2pfed.simulate.engine import SharedModel
from p2pfed.topology import Topology, TopologyError, describe, load_topology
from p2pfed.train import BlockSampler, LocalTrainer, evaluate
from p2pfed.transport import PeerLost, TorchTransport, Transport, TransportRefused, TransportTimeout

log = logging.getLogger("p2pfed.peer")


@dataclass
class RunPaths:
    """Where one run writes: metrics per peer, adapters per peer, the summary."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def peer_metrics(self, rank: int) -> Path:
        return self.metrics / f"peer{rank}.jsonl"

    def checkpoints(self, rank: int) -> Path:
        return self.root / "checkpoints" / f"peer{rank}"

    def adapter(self, rank: int) -> Path:
        return self.root / "adapters" / f"peer{rank}"

    @property
    def survivors(self) -> Path:
        """Rows of the peers that finished a run some peer left (on_peer_loss = 'continue')."""
        return self.root / "survivors"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"


def key_paths(config: Config) -> tuple[Path, str]:
    """The roster and the key template: from [identity], else the run directory's keys/."""
    if config.identity.roster:
        return Path(config.identity.roster), config.identity.key
    return Path(config.run.out) / "keys" / "roster.json", str(Path(config.run.out) / "keys" / "peer{rank}.pem")


def load_keys(config: Config, rank: int, world_size: int, roster: Roster | None = None) -> tuple[Identity, Roster]:
    """This peer's keys and the roster (read here unless the simulator read it for all); stops
    before training if they do not fit."""
    roster_path, key_template = key_paths(config)
    roster = Roster.load(roster_path) if roster is None else roster
    if len(roster) != world_size:
        raise IdentityError(f"{roster_path}: the roster lists {len(roster)} peers but {world_size} were launched")
    return load_identity(key_template.format(rank=rank), rank, roster), roster


def error_feedback_for(gossip: GossipSection, codec: Codec) -> bool:
    """`error_feedback`: on, off, or (auto) on exactly when the codec is biased (it drops or
    deterministically rounds what it does not send). Secure mode sums messages it never sees
    one by one, so it keeps no per-sender copies."""
    if gossip.secure:
        return False
    return gossip.error_feedback == "on" or (gossip.error_feedback == "auto" and codec.biased)


class StopRequested(RuntimeError):
    """SIGINT/SIGTERM arrived; the peer finished its round, checkpointed and stops."""


class Peer:
    """Holds one peer's model, data and averager; `run` does the rounds."""

    stop_requested: int = 0
    """The signal that asked this peer to stop after the current round (0: none)."""

    def __init__(self, config: Config, transport: Transport, device: torch.device, shared: SharedModel | None = None) -> None:
        self.config = config
        self.transport = transport
        self.rank = transport.rank
        self.device = device
        self.paths = RunPaths(Path(config.run.out))
        self.loud = self.rank == 0  # one peer shows progress, the others stay quiet
        if config.run.peers != transport.world_size:
            raise ConfigError(f"[run] peers = {config.run.peers}, but {transport.world_size} processes were launched")
        seed = config.run.seed
        if shared is None:
            base, self.tokenizer = load_base(config.model)
            self.model = wrap_lora(base, config.lora, seed).to(device)  # same adapter on every peer
        else:  # simulation: one base for all peers, this peer's adapter swapped in while it runs
            self.model, self.tokenizer = shared.model, shared.tokenizer
        if config.lora.init == "per_peer":
            draw_peer_adapter(self.model, seed, self.rank)
        torch.manual_seed(seed * 100_003 + self.rank)  # per-peer randomness (dropout) from (seed, rank)
        self.data: PeerData = load_peer_data(config.data, self.tokenizer, self.rank, transport.world_size, seed)
        sampler = BlockSampler(self.data.train, config.data.batch_size, seed * 100_003 + self.rank)
        self.trainer = LocalTrainer(self.model, config.train, sampler, device)
        self.topology: Topology | None = None
        identity, roster, self.faults = None, None, None
        if config.gossip.mode == "gossip":
            self.topology = shared.topology if shared is not None else load_topology(config.gossip.topology, transport.world_size)
            identity, roster = load_keys(config, self.rank, transport.world_size, shared.roster if shared is not None else None)
            if self.rank in config.faults.peers:
                self.faults = FaultInjector(config.faults, identity, transport.world_size, seed + self.rank)
                log.warning("peer %d: fault injection on (%s from round %d)", self.rank, config.faults.kind, config.faults.from_round)
        self.identity = identity
        self.averager = self._averager(identity, roster)
        self.outer = OuterOptimizer(config.outer) if config.outer.enabled else None
        if self.outer is not None:
            check_outer(config, self.topology)
        self.privacy: PrivacyLedger | None = None
        self.private_rounds: list[int] = []
        """Rounds of this run's history released under [privacy] (kept in the checkpoints)."""
        """[privacy]: opened in `run`, beside the checkpoints (its release count outlives restarts)."""
        self.last_round = config.run.rounds
        """The last round this run attempt runs: [run] rounds, or fewer where the epsilon budget ends it."""

    def _averager(self, identity: Identity | None, roster: Roster | None) -> Averager:
        cfg = self.config
        settings = CodecSettings(fraction=cfg.codec.fraction, rank=cfg.codec.rank, chunk=cfg.codec.chunk, seed=cfg.run.seed)
        codec = build_codec(cfg.gossip.codec, settings, self.rank, adapter_layout(self.model))
        feedback = error_feedback_for(cfg.gossip, codec)
        fixed = FixedPoint(cfg.secure.bound, cfg.secure.frac_bits) if cfg.gossip.secure else None
        # CHOCO / error-feedback copies of a neighbour must start where that neighbour's own does:
        # the common adapter, or (per-peer starts) zeros at every peer
        initial = adapter_to_vector(self.model) if cfg.lora.init == "common" else None
        return Averager(self.transport, cfg.gossip.mode, codec, self.topology, identity, roster, self.faults,
                        algorithm=cfg.gossip.algorithm, gamma=cfg.gossip.gamma, error_feedback=feedback,
                        initial=initial, secure=fixed, seed=cfg.run.seed * 100_003 + self.rank,
                        min_present=cfg.secure.min_present, robust=cfg.gossip.robust, byzantine=cfg.gossip.byzantine,
                        away=cfg.network.away if cfg.network.churn else None, deadline_s=cfg.gossip.deadline_s,
                        keep_going=cfg.run.on_peer_loss == "continue")

    def say(self, text: str) -> None:
        if self.loud:
            print(text, flush=True)

    def evaluate(self) -> dict[str, float | None]:
        batch = self.config.data.batch_size
        own = evaluate(self.model, self.data.own_eval, batch, self.device)
        result: dict[str, float | None] = {"own_loss": own["loss"], "own_ppl": own["ppl"], "global_loss": None, "global_ppl": None}
        if self.data.global_eval is not None and self.config.gossip.mode == "allreduce":
            result.update(self._global_eval_once(batch))
        elif self.data.global_eval is not None:
            glob = evaluate(self.model, self.data.global_eval, batch, self.device)
            result.update(global_loss=glob["loss"], global_ppl=glob["ppl"])
        return result

    def _global_eval_once(self, batch: int) -> dict[str, float]:
        """allreduce: every peer holds the same model (the same start, the exact mean each round),
        so peer 0 evaluates it on the shared set once and the others read its figure."""
        assert self.data.global_eval is not None
        loss = evaluate(self.model, self.data.global_eval, batch, self.device)["loss"] if self.rank == 0 else 0.0
        loss = float(self.transport.all_reduce_sum(torch.tensor([loss], dtype=torch.float64))[0])
        return {"global_loss": loss, "global_ppl": math.exp(min(loss, 50.0))}

    def run(self) -> dict[str, Any]:
        """All rounds; returns this peer's summary row."""
        cfg = self.config
        size = adapter_to_vector(self.model).numel()
        self.say(f"[p2pfed] {cfg.run.peers} peers, mode {cfg.gossip.mode} (codec {cfg.gossip.codec}, {cfg.gossip.algorithm}), "
                 f"{cfg.run.rounds} rounds x {cfg.run.local_steps} local steps, "
                 f"model {cfg.model.name}, adapter {size:,} values ({size * 4 / 1e6:.2f} MB fp32), run dir {self.paths.root}")
        if self.topology is not None:
            self.say(describe(self.topology))
        self.say(f"[p2pfed] peer 0 data: {self.data.description}; {self.data.train.shape[0]} train blocks")
        checkpoints = Checkpoints(self.paths.checkpoints(self.rank), self.checkpoint_key(), keep=2)
        if self.averager.secure is not None:  # kept beside the checkpoints: a redone round gets the lists of the first attempt
            self.averager.secure.consents = ConsentLog.open(self.paths.checkpoints(self.rank))
        resume = agree_on_round(checkpoints.valid_rounds(), self.transport)  # the newest round every peer has
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        writer = MetricsWriter(self.paths.peer_metrics(self.rank), keep_until_round=resume if resume else None)
        if resume:
            self.restore(checkpoints.load(resume))
            kept = read_metrics(self.paths.peer_metrics(self.rank), skip_broken=True)  # rounds 0..resume, as the writer cut them
            if [r["round"] for r in kept] != list(range(resume + 1)):
                raise CheckpointError(f"{self.paths.peer_metrics(self.rank)}: holds rounds {[r['round'] for r in kept][:12]}, "
                                      f"expected 0..{resume} beside the checkpoint of round {resume}; rerun without --resume")
            first, history = kept[0], kept[1:]
            self.say(f"[p2pfed] resuming from the checkpoint of round {resume} (restart {restart}); rounds 1-{resume} are kept")
        else:
            history = []
            first = self.evaluate()
            start_consensus = self._start_consensus() if cfg.consensus.every else None
            writer.write({"rank": self.rank, "round": 0, **first, "consensus": start_consensus, "restart": restart})
            self.say(f"round {0:>3}/{cfg.run.rounds} | global ppl {first['global_ppl'] or float('nan'):.2f} | own ppl {first['own_ppl']:.2f}")
        if cfg.privacy.enabled:
            self.open_privacy(resume)
        _emulated(self.transport)  # the emulated clock's rounds start here
        self.averager.open(size)  # deadline gossip: receiving starts now, not at the first exchange
        for round in range(resume + 1, self.last_round + 1):
            record = self.one_round(round, writer, restart, resumed_from=resume if round == resume + 1 and resume else None)
            history.append(record)
            if round % cfg.run.checkpoint_every == 0 or round == self.last_round:
                checkpoints.save(round, self.state(round))
            if self.stop_requested:
                writer.close()
                raise StopRequested(f"stopped by signal {self.stop_requested} after round {round} (checkpoint of round "
                                    f"{checkpoints.rounds()[-1] if checkpoints.rounds() else 0} kept); continue with `p2pfed run CONFIG --resume`")
        last = history[-1]  # the last round always evaluates
        writer.close()
        save_adapter(self.model, self.paths.adapter(self.rank))
        n = len(history)
        total = lambda key: sum(h[key] for h in history)  # noqa: E731
        probe = self.probe() if cfg.bench.probes else {}
        late = self.averager.finish()  # deadline gossip: its streams read to their ends
        stopped = self.last_round if self.last_round < cfg.run.rounds else None
        privacy = self.privacy.summary(stopped) if self.privacy is not None else {}
        return {
            **probe,
            **privacy,
            "rank": self.rank,
            "global_ppl_before": first["global_ppl"], "global_ppl_after": last["global_ppl"],
            "own_ppl_before": first["own_ppl"], "own_ppl_after": last["own_ppl"],
            "train_loss_first": history[0]["train_loss"], "train_loss_last": history[-1]["train_loss"],
            "bytes_per_round": total("bytes_sent") / n,
            "bytes_total": total("bytes_sent"),
            "compression": _ratio(total("bytes_fp32"), total("bytes_sent")),
            "codec_s_per_round": total("codec_s") / n,
            "bytes_estimated": history[-1]["bytes_estimated"],
            "compute_s_per_round": total("compute_s") / n,
            "comm_s_per_round": total("comm_s") / n,
            "round_s": total("round_s") / n,
            "consensus_final": history[-1]["consensus"],
            "gossip_steps": total("gossip_steps"),
            "rejected": sum(sum(h["rejected"].values()) for h in history),
            "late": sum(h.get("late", 0) for h in history) + late,
            "missing": sum(len(h.get("missing", [])) for h in history),
            "gone": len(self.averager.gone),
            "injected": self.faults.injected if self.faults else 0,
            "crypto_s_per_round": total("crypto_s") / n,
            "mask_s_per_round": total("mask_s") / n,
            "dropouts": total("dropouts"),
            "abandoned": total("abandoned"),
            "inconsistent": total("inconsistent"),
            "repeats": total("repeats"),
            "clipped": total("clipped"),
            **({"sim_round_s": total("sim_round_s") / n, "sim_compute_s": total("sim_compute_s") / n,
                "sim_comm_s": total("sim_comm_s") / n} if "sim_round_s" in last else {}),
        }

    def _start_consensus(self) -> float | None:
        try:
            return exact_consensus_distance(adapter_to_vector(self.model), self.transport, self.averager.monitor())
        except PeerLost:  # a peer was gone before the first round (on_peer_loss = 'continue')
            return None

    def noise_plan(self) -> NoisePlan | None:
        """Distributed noise: this peer's share per round and what the accountant may log for it."""
        nb = self.averager.secure
        if self.config.privacy.noise != "distributed" or nb is None:
            return None
        return NoisePlan.build(nb.topology, self.rank, self.config.privacy.noise_multiplier, max(2, nb.min_present),
                               lambda receiver, epoch: receiver in nb.recovering[epoch])

    def open_privacy(self, resume: int) -> None:
        """Count the releases made so far (every attempt's) and stop before the round that
        would take epsilon past the budget; all peers agree on that round."""
        cfg = self.config.privacy
        try:
            self.privacy = PrivacyLedger.open(cfg, self.paths.checkpoints(self.rank), resume, self.private_rounds, self.noise_plan())
        except ValueError as err:  # a planted file or a second process at the release log
            raise CheckpointError(str(err)) from None
        if self.privacy.unprotected:
            log.warning("peer %d: rounds %d-%d released adapters without [privacy]: epsilon is infinite for this run", self.rank,
                        self.privacy.unprotected[0], self.privacy.unprotected[-1])
        affordable = self.privacy.agreed_rounds(self.config.run.rounds - resume, self.transport)
        self.last_round = resume + affordable
        if affordable == 0 and resume < self.config.run.rounds:
            spent = self.privacy.epsilon()
            raise ConfigError(f"[privacy] epsilon = {cfg.epsilon}: no round is left in the budget (some peer's next release would "
                              f"take epsilon past it; this peer has made {self.privacy.releases} releases, epsilon {spent:.3g})")
        if self.last_round < self.config.run.rounds:
            log.warning("peer %d: the epsilon budget %g affords rounds up to %d of %d; the run stops there", self.rank, cfg.epsilon,
                        self.last_round, self.config.run.rounds)

    def checkpoint_key(self) -> bytes:
        """The MAC key of this peer's checkpoints: from its identity, else a local random key."""
        if self.identity is not None:
            return identity_key(self.identity.signing.private_bytes_raw())
        return local_key(self.paths.checkpoints(self.rank))

    def probe(self) -> dict[str, Any]:
        """[bench] probes: the final adapter's gossip exchange timed against a bare send/recv."""
        if self.config.gossip.mode != "gossip" or not isinstance(self.transport, TorchTransport):
            return {}
        self.say(f"[p2pfed] timing {self.config.bench.probes} gossip exchanges against bare send/recv of the same bytes")
        result = probe_exchange(self.averager, self.transport, adapter_to_vector(self.model), self.config.run.rounds, self.config.bench.probes)
        return {"probe_gossip_s": result.gossip_s, "probe_bare_s": result.bare_s, "probe_bytes": result.message_bytes,
                "probe_plain_s": result.plain_s}

    def state(self, round: int) -> dict[str, Any]:
        """What this peer needs to continue after `round` exactly as if it had never stopped."""
        return {"round": round, "adapter": adapter_to_vector(self.model), "trainer": self.trainer.state(),
                "averager": self.averager.state(), "torch_rng": torch.get_rng_state(),
                "outer": self.outer.state() if self.outer is not None else None,
                "private_rounds": torch.tensor(sorted(set(self.private_rounds)), dtype=torch.int64)}

    def restore(self, state: dict[str, Any]) -> None:
        """Load a verified checkpoint; one that does not fit this run (another run's file under the
        same identity, a changed adapter shape) is one sentence, not a traceback."""
        try:
            vector_to_adapter(self.model, state["adapter"])
            self.trainer.restore(state["trainer"])
            self.averager.restore(state["averager"])
            torch.set_rng_state(state["torch_rng"])
            if self.outer is not None:
                self.outer.restore(state.get("outer") or {}, like=state["adapter"])
            private = state.get("private_rounds")
            self.private_rounds = [int(r) for r in private.tolist()] if isinstance(private, torch.Tensor) and private.dim() == 1 else []
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise CheckpointError(f"peer {self.rank}: its checkpoint does not fit this run's model, optimizer or averager "
                                  f"({type(err).__name__}: {str(err)[:120]}); rerun with --overwrite to start afresh") from None

    def one_round(self, round: int, writer: MetricsWriter, restart: int = 0, resumed_from: int | None = None) -> dict[str, Any]:
        """K local steps, one averaging round, optional eval; writes one metrics line."""
        cfg = self.config
        if self.faults is not None:
            self.faults.maybe_crash(round, restart)
        started = time.perf_counter()
        away = self.rank in cfg.network.away(round)  # emulated churn: no steps, no release, no outer step this round
        before = adapter_to_vector(self.model) if (self.privacy is not None or self.outer is not None) and not away else None
        train_loss = self.trainer.train(0 if away else cfg.run.local_steps)
        if self.faults is not None:  # a straggler: its steps take `strength` times as long
            self.faults.straggle(time.perf_counter() - started, round)
        compute_s = time.perf_counter() - started
        measure = is_measured(round, cfg.consensus, self.last_round)
        shared, own, privacy = adapter_to_vector(self.model), None, {}
        if self.privacy is not None and before is not None:  # the clipped, noised update leaves instead (and is this peer's own term)
            shared, own, privacy = self.privacy.release(shared, before, round, restart)
            self.private_rounds.append(round)
        start = time.perf_counter()
        result = gossip_round(self.averager, shared, round - 1, self.transport, cfg.consensus, measure, own)
        gossip_s = time.perf_counter() - start
        stats, consensus = result.stats, result.consensus
        after = result.vector if self.outer is None or before is None else self.outer.step(before, result.vector)
        vector_to_adapter(self.model, after)
        monitor_s = max(0.0, gossip_s - stats.codec_s - stats.crypto_s - stats.mask_s - stats.comm_s - stats.mix_s)  # monitoring
        record: dict[str, Any] = {"rank": self.rank, "round": round, "train_loss": train_loss, "compute_s": compute_s, **dataclasses.asdict(stats),
                                  "consensus": consensus, "consensus_target": result.target, "gossip_steps": result.steps,
                                  "monitor_s": monitor_s, "injected": self.faults.injected if self.faults else 0, "restart": restart,
                                  **privacy}
        if resumed_from is not None:
            record["resumed_from"] = resumed_from
        if result.monitoring_skipped:
            record["monitoring_skipped"] = True
        if away:
            record["away"] = True
        if round % cfg.run.eval_every == 0 or round == self.last_round:
            start = time.perf_counter()
            record.update(self.evaluate())
            record["eval_s"] = time.perf_counter() - start
        record["round_s"] = time.perf_counter() - started
        record.update(_emulated(self.transport))
        writer.write(record)
        shown = f" | global ppl {record['global_ppl']:.2f}" if record.get("global_ppl") else ""
        agreement = f" | consensus {consensus:.2e}" if consensus is not None else ""
        steps = f" in {result.steps} steps" if result.steps > 1 else ""
        loss = f"train loss {train_loss:.3f}" if train_loss is not None else "gossip only"
        self.say(f"round {round:>3}/{cfg.run.rounds} | {loss}{shown}{agreement}{steps} "
                 f"| {record['round_s']:.1f} s (compute {compute_s:.1f}, comm {stats.comm_s:.3f})")
        return record

    @torch.no_grad()
    def samples(self) -> dict[str, str]:
        """The same prompt completed by the base model and by this peer's adapter (same sampling seed)."""
        self.model.eval()
        inputs = self.tokenizer(self.config.run.prompt, return_tensors="pt").to(self.device)
        generate = dict(max_new_tokens=self.config.run.sample_tokens, do_sample=True, temperature=0.7, top_k=40,
                        repetition_penalty=1.2, pad_token_id=self.tokenizer.pad_token_id)
        with torch.random.fork_rng(), self.model.disable_adapter():
            torch.manual_seed(self.config.run.seed)  # the same sampling noise for both
            base = self.model.generate(**inputs, **generate)
        with torch.random.fork_rng():
            torch.manual_seed(self.config.run.seed)
            tuned = self.model.generate(**inputs, **generate)
        cut = inputs["input_ids"].shape[1]
        decode = lambda ids: self.tokenizer.decode(ids[0, cut:], skip_special_tokens=True)  # noqa: E731
        return {"prompt": self.config.run.prompt, "base": decode(base), "fine_tuned": decode(tuned)}


def _emulated_info(config: Config, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Simulation: the emulated network and its mean seconds per round over peers."""
    if not rows or rows[0].get("sim_round_s") is None:
        return None
    return {**dataclasses.asdict(config.network), "round_s": mean_of(rows, "sim_round_s"),
            "compute_s": mean_of(rows, "sim_compute_s"), "comm_s": mean_of(rows, "sim_comm_s")}


def _emulated_line(emulated: dict[str, Any]) -> str:
    bandwidth = f"{emulated['bandwidth_mbit']:g} Mbit/s uplinks" if emulated["bandwidth_mbit"] else "unlimited bandwidth"
    return (f"Emulated network ({emulated['latency_ms']:g} ms latency, {bandwidth}, loss {emulated['loss']:g}): "
            f"{emulated['round_s']:.3f} simulated s per round, {emulated['compute_s']:.3f} compute and {emulated['comm_s']:.3f} "
            "waiting on the network (means over peers).")


def _emulated(transport: Transport) -> dict[str, float]:
    """The simulator's emulated-network seconds for the round just ended (nothing under torchrun)."""
    emulated = getattr(transport, "emulated", None)
    return emulated() if emulated is not None else {}


def _ratio(uncompressed: int, sent: int) -> float | None:
    """How many times fewer bytes than fp32 envelopes (None when nothing was sent)."""
    return uncompressed / sent if sent else None


def _bytes_line(config: Config, info: dict[str, Any]) -> str:
    if config.gossip.mode == "local":
        return "No messages (mode `local`)."
    ratio = f", {info['compression']:.1f}x fewer than fp32 envelopes" if info["compression"] else ""
    estimated = " (estimated for a ring all-reduce)" if config.gossip.mode == "allreduce" else ""
    line = (f"Bytes sent{estimated}: {info['bytes_total']:,} in total, {info['bytes_per_peer_per_round']:,.0f} per peer per round; "
            f"codec `{config.gossip.codec}`, algorithm `{config.gossip.algorithm}`, LoRA share `{config.lora.share}`{ratio}.")
    if config.gossip.secure:
        rows = info["peers_table"]
        line += (f" Secure (pairwise-masked) averaging: masks took {mean_of(rows, 'mask_s_per_round') or 0:.4f} s per peer per round; "
                 f"{sum(r['dropouts'] for r in rows)} dropped senders recovered, {sum(r['abandoned'] for r in rows)} sums abandoned, "
                 f"{sum(r.get('inconsistent', 0) for r in rows)} releases refused over inconsistent survivor lists, "
                 f"{sum(r['clipped'] for r in rows)} values clipped to +-{config.secure.bound}.")
    return line


def _privacy_info(config: Config, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's privacy figures as this peer (rank 0, the summary's writer) measured them
    itself: other peers' rows are their claims, and a claim must not rewrite this account."""
    own = next((r for r in rows if r.get("rank") == 0), None)
    if not config.privacy.enabled or own is None:  # peer 0 lost (on_peer_loss = 'continue'): no account of its own here
        return None
    return {"clip": config.privacy.clip, "noise_multiplier": config.privacy.noise_multiplier, "delta": config.privacy.delta,
            "budget": config.privacy.epsilon or None, "epsilon": own.get("epsilon"), "epsilon_pld": own.get("epsilon_pld"),
            "epsilon_replace": own.get("epsilon_replace"), "releases": own.get("dp_releases"),
            "stopped_after_round": own.get("budget_stop"), "unprotected_rounds": own.get("dp_unprotected_rounds"),
            "noise": config.privacy.noise, "epsilon_collusion": own.get("epsilon_collusion")}


def _privacy_line(config: Config, privacy: dict[str, Any]) -> str:
    eps = privacy["epsilon"]
    figure = "epsilon infinite (no noise, or rounds run without [privacy])" if eps is None else f"epsilon {eps:.4g} (RDP)"
    if eps is not None and privacy["epsilon_pld"] is not None:
        figure += f", {privacy['epsilon_pld']:.4g} (PLD)"
    if eps is not None and privacy["epsilon_replace"] is not None:
        figure += f"; against one of its records changed or its data replaced, {privacy['epsilon_replace']:.4g} (RDP)"
    line = (f"Differential privacy of each party's whole data (added or removed) against all others: updates clipped to L2 <= "
            f"{privacy['clip']}, Gaussian noise multiplier {privacy['noise_multiplier']}; peer 0 after {privacy['releases']} "
            f"releases: {figure}, at delta = {privacy['delta']:g}.")
    if privacy["noise"] == "distributed":
        collusion = privacy["epsilon_collusion"]
        line += (" Distributed noise: that epsilon holds while the other senders of each masked sum add their shares; if all "
                 f"other parties pool what they know, epsilon {'infinite' if collusion is None else f'{collusion:.4g}'} (RDP).")
    if privacy["stopped_after_round"] is not None and privacy["budget"] is not None:
        line += (f" The epsilon budget {privacy['budget']:g} stopped the run after round {privacy['stopped_after_round']} of "
                 f"{config.run.rounds}: the next release would have exceeded it.")
    return line


def write_summary(config: Config, rows: list[dict[str, Any]], samples: dict[str, str], topology: Topology | None, wall_s: float,
                  lost_note: str = "") -> str:
    """Rank 0: the run summary (markdown for people, JSON for tools); returns the markdown."""
    paths = RunPaths(Path(config.run.out))
    before, after = mean_of(rows, "global_ppl_before"), mean_of(rows, "global_ppl_after")
    change = (after / before - 1) * 100 if before and after else None
    info = {
        "mode": config.gossip.mode, "topology": config.gossip.topology if topology else None,
        "spectral_gap": topology.spectral_gap() if topology else None, "peers": config.run.peers,
        "rounds": config.run.rounds, "local_steps": config.run.local_steps, "model": config.model.name,
        "codec": config.gossip.codec, "algorithm": config.gossip.algorithm, "share": config.lora.share, "secure": config.gossip.secure,
        "global_ppl_before": before, "global_ppl_after": after, "global_ppl_change_pct": change,
        "bytes_total": sum(r["bytes_total"] for r in rows), "bytes_per_peer_per_round": mean_of(rows, "bytes_per_round"),
        "compression": mean_of(rows, "compression"),
        "wall_s": wall_s, "peers_table": rows, "samples": samples, "privacy": _privacy_info(config, rows),
        "emulated": _emulated_info(config, rows),
        "lost": sorted(set(range(config.run.peers)) - {r["rank"] for r in rows}),
    }
    paths.summary_json.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    gap = f", spectral gap {info['spectral_gap']:.3f}" if topology else ""
    text = "\n".join([
        f"# p2pfed run: {paths.root}",
        "",
        f"{config.run.peers} peers, mode `{config.gossip.mode}`{' on ' + config.gossip.topology if topology else ''}{gap}; "
        f"{config.run.rounds} rounds x {config.run.local_steps} local steps; model `{config.model.name}`; wall {wall_s:.0f} s.",
        "",
        summary_table(rows),
        "",
        *([lost_note, ""] if lost_note else []),
        f"Mean global eval perplexity: {before:.2f} -> {after:.2f} ({change:+.1f}%)." if change is not None else "No global eval set.",
        "",
        _bytes_line(config, info),
        "",
        *([_emulated_line(info["emulated"]), ""] if info["emulated"] and config.network.emulated else []),
        *([_privacy_line(config, info["privacy"]), ""] if info["privacy"] else []),
        f"Prompt: {samples['prompt']!r}",
        "",
        "Base model:",
        "```",
        samples["base"],
        "```",
        "Fine-tuned adapter (peer 0):",
        "```",
        samples["fine_tuned"],
        "```",
        "",
        f"Metrics: {paths.metrics}/peer*.jsonl (one line per peer per round). Adapters: {paths.root / 'adapters'}/peer*/ (stock PEFT).",
    ])
    paths.summary_md.write_text(text + "\n", encoding="utf-8")
    return text


def run(config: Config, transport: Transport, device: torch.device, shared: SharedModel | None = None) -> dict[str, Any]:
    """One peer's run, then the gathered summary (written by rank 0). `shared`: the simulator's
    one base model (signals are then the simulator's to handle)."""
    started = time.perf_counter()
    peer = Peer(config, transport, device, shared)
    if shared is None:
        _stop_on_signals(peer)
    if peer.rank == 0:  # multi-node launches bypass `p2pfed run`: record what ran here too
        Path(config.run.out).mkdir(parents=True, exist_ok=True)
        save_config(config, Path(config.run.out) / "config.json")
    row = peer.run()
    try:
        gathered = transport.all_gather_bytes(json.dumps(row).encode())
    except PeerLost:  # a peer is gone: `p2pfed run` writes the summary from the survivors' rows
        write_survivor_row(peer, {**row, "wall_s": time.perf_counter() - started})
        return row
    if peer.rank == 0:  # only peer 0 writes the summary: N peers reading N rows each is N^2 at 1,024 simulated peers
        rows = [summary_row(b, rank, row) for rank, b in enumerate(gathered)]
        write_summary(config, rows, peer.samples(), peer.topology, time.perf_counter() - started)
    return row


def write_survivor_row(peer: Peer, row: dict[str, Any]) -> None:
    """on_peer_loss = 'continue' after a loss: this peer's summary row (and peer 0's samples) on
    disk, where the launcher builds the summary from the peers that finished."""
    folder = peer.paths.survivors
    folder.mkdir(parents=True, exist_ok=True)
    if peer.rank == 0:
        (folder / "samples.json").write_text(json.dumps(peer.samples()), encoding="utf-8")
    (folder / f"peer{peer.rank}.json").write_text(json.dumps(row), encoding="utf-8")
    peer.say(f"[p2pfed] peer(s) lost during the run: this peer's row is in {folder}; `p2pfed run` writes the summary")


def survivors_summary(config: Config, wall_s: float) -> str | None:
    """The summary of a run that went on without lost peers, from the rows the survivors wrote
    (None when no peer wrote one: nothing was lost, or nobody finished). The rows are read as
    any other peer's (numbers under known keys only). `wall_s`: the launcher's, used only when
    no row says how long its peer ran."""
    paths = RunPaths(Path(config.run.out))
    raw = {rank: data for rank in range(config.run.peers) if (data := _small_file(paths.survivors / f"peer{rank}.json")) is not None}
    if not raw:
        return None
    try:  # the columns: the number-valued keys of the first row (each row is then read against them)
        first = json.loads(next(iter(raw.values())))
    except (ValueError, RecursionError):
        first = None
    # the columns: the summary's own, and the first row's number-valued keys, all read as numbers
    # (no row chooses a column's type: a `true` there would turn every other row's figure into one)
    numeric = [k for k, v in first.items() if isinstance(v, (int, float))] if isinstance(first, dict) else []
    template: dict[str, Any] = {key: 0.0 for key in (*SUMMARY_COLUMNS, *SUMMED, *numeric)}
    template["bytes_estimated"] = False
    rows = [summary_row(data, rank, template) for rank, data in sorted(raw.items())]
    samples = _survivor_samples(paths.survivors / "samples.json", config.run.prompt)
    topology = load_topology(config.gossip.topology, config.run.peers) if config.gossip.mode == "gossip" else None
    lost = sorted(set(range(config.run.peers)) - set(raw))
    walls = [r["wall_s"] for r in rows if r.get("wall_s")]
    text = write_summary(config, rows, samples, topology, max(walls) if walls else wall_s,  # as a gathered run's: from the peers' start
                         lost_note=f"Peers lost during the run (on_peer_loss = 'continue'): {lost}; the table lists the "
                                   f"{len(rows)} that finished, and the means are theirs.")
    return text


SURVIVOR_FILE_LIMIT = 1 << 20
"""The most bytes the launcher reads from a survivor's row or samples file."""


def _small_file(path: Path) -> bytes | None:
    """A file another process wrote, if it is there and no larger than SURVIVOR_FILE_LIMIT."""
    try:  # not a FIFO or device that would block the launcher, not a link to elsewhere
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            log.warning("%s: not a regular file; left out of the summary", path)
            return None
        data = handle.read(SURVIVOR_FILE_LIMIT + 1)
    if len(data) > SURVIVOR_FILE_LIMIT:
        log.warning("%s: larger than %d bytes; left out of the summary", path, SURVIVOR_FILE_LIMIT)
        return None
    return data


def _survivor_samples(path: Path, prompt: str) -> dict[str, str]:
    """Peer 0's before/after samples, or a placeholder when it was lost (or wrote something else)."""
    missing = {"prompt": prompt, "base": "(not generated: peer 0 was lost)", "fine_tuned": "(not generated: peer 0 was lost)"}
    data = _small_file(path)
    try:
        samples = json.loads(data) if data is not None else None
    except ValueError:
        samples = None
    keys = ("prompt", "base", "fine_tuned")
    if not isinstance(samples, dict) or not all(isinstance(samples.get(k), str) for k in keys):
        return missing
    return {k: samples[k] for k in keys}


def _plain_number(value: Any) -> bool:
    """A finite float, or an int a float holds exactly (a 1000-digit int would overflow math.isfinite)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**53
    return isinstance(value, float) and math.isfinite(value)


def summary_row(data: bytes, rank: int, own: dict[str, Any]) -> dict[str, Any]:
    """Another peer's summary row, kept only as numbers under the keys this peer's own row has
    (what it sent is hostile: text would land in summary.md); anything else becomes None."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raw = None
    if not isinstance(raw, dict):
        log.warning("peer %d's summary row is not a JSON object; its columns are left empty", rank)
        raw = {}
    numeric = lambda v: v if _plain_number(v) else None  # noqa: E731
    row = {key: numeric(raw.get(key)) if not isinstance(value, bool) else bool(raw.get(key)) for key, value in own.items()}
    row["rank"] = rank
    for key, value in own.items():  # columns the tables add up must stay numbers
        if row[key] is None and isinstance(value, (int, float)) and key in SUMMED:
            row[key] = 0
    return row


SUMMARY_COLUMNS = ("global_ppl_before", "global_ppl_after", "own_ppl_before", "own_ppl_after", "bytes_estimated", "compression")
"""With SUMMED: the columns the summary's table reads from every row."""
SUMMED = ("bytes_per_round", "bytes_total", "rejected", "injected", "dropouts", "abandoned", "inconsistent", "repeats", "clipped",
          "compute_s_per_round", "codec_s_per_round", "crypto_s_per_round", "comm_s_per_round", "mask_s_per_round",
          "round_s", "gossip_steps")


def _stop_on_signals(peer: Peer) -> None:
    """Ctrl+C / SIGTERM: finish the current round, checkpoint it, then stop (a second signal stops at once)."""
    first = [0.0]

    def ask(signum: int, _frame: Any) -> None:
        if peer.stop_requested and time.monotonic() - first[0] > 2.0:  # torchrun forwards Ctrl+C once more: ignore echoes
            raise KeyboardInterrupt
        if peer.stop_requested:
            return
        first[0] = time.monotonic()
        peer.stop_requested = signum
        if peer.loud:
            print(f"[p2pfed] signal {signum}: finishing this round and checkpointing it, then stopping", flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, ask)


def main(argv: list[str] | None = None) -> int:
    """Entry under torchrun: ``python -m p2pfed.peer CONFIG [overrides]``."""
    from p2pfed.transport import TorchTransport, init_process_group, shutdown

    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation chatter, once per peer
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not argv:
        print("usage: python -m p2pfed.peer CONFIG [section.key=value ...]", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "?")
    keep_freed_memory(large_blocks=True)
    try:
        config = load_config(argv[0], argv[1:])
        if config.run.engine == "simulate":
            raise ConfigError("[run] engine = 'simulate' runs every peer in one process: start it with `p2pfed run` or "
                              "`p2pfed simulate`, not under torchrun")
        local_peers = int(os.environ.get("P2PFED_LOCAL_PEERS") or os.environ.get("LOCAL_WORLD_SIZE", "1"))  # one agent per peer: its own
        torch.set_num_threads(config.run.threads or max(1, (os.cpu_count() or 1) // local_peers))
        device = choose_device(config.model)
        init_process_group(device, config.gossip.timeout_s)
        try:
            run(config, TorchTransport(device, config.gossip.timeout_s, keep_going=config.run.on_peer_loss == "continue"), device)
        finally:
            shutdown()
    except StopRequested as err:
        print(f"p2pfed peer {rank}: {err}", file=sys.stderr)
        return 130
    except (ConfigError, TopologyError, DataError, ModelError, IdentityError, TransportTimeout, TransportRefused, CheckpointError,
            SecureError) as err:
        print(f"p2pfed peer {rank}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
