"""The `p2pfed` command: run (spawns torchrun here), simulate (all peers in this process), peer (entry under torchrun),
prepare, keygen, topology show, report, bench."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pfed.config import Config, ConfigError, load_config, save_config
from p2pfed.data import DataError, shakespeare_dir
from p2pfed.identity import IdentityError, keygen
from p2pfed.model import EMBEDDED_NAME, ModelError, embedded_model_dir
from p2pfed.provenance import code_version, read_code_version, write_code_version
from p2pfed.secure import FixedPoint, check_secure_topology
from p2pfed.topology import TopologyError, describe, draw, load_topology

RUN_OUTPUTS = ("metrics", "adapters", "keys", "checkpoints", "summary.md", "summary.json", "config.json", "code.json")


def prepare(config: Config) -> None:
    """Fetch/convert what peers would otherwise each prepare: the embedded model and data."""
    if config.model.name == EMBEDDED_NAME:
        embedded_model_dir()
    if config.data.source == "shakespeare":
        shakespeare_dir()
    else:  # every peer's file, read once here: a bad one stops the launch with one sentence, not N peers and restarts
        check_data_files(config)
    if config.gossip.mode == "gossip":
        topology = load_topology(config.gossip.topology, config.run.peers)  # fail here, not in N peers
        if config.gossip.secure:
            check_secure_topology(topology, FixedPoint(config.secure.bound, config.secure.frac_bits))
    if config.outer.enabled and config.gossip.mode != "local":
        from p2pfed.outer import check_outer

        check_outer(config, topology if config.gossip.mode == "gossip" else None)


def check_data_files(config: Config) -> None:
    """Read and parse every JSONL file the peers will read (chat rows rendered without a
    tokenizer: the structure is what can be wrong); DataError names the file and line."""
    from p2pfed.data import read_jsonl

    paths = dict.fromkeys(Path(config.data.path.format(rank=rank)) for rank in range(config.run.peers))
    for path in [*paths, *([Path(config.data.eval)] if config.data.eval else [])]:
        read_jsonl(path, None)


def claim_run_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to clobber an earlier run's results unless asked to (`--overwrite`), or keep them to continue it (`--resume`)."""
    existing = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if resume:
        if not (out / "checkpoints").exists():
            raise ConfigError(f"{out}: --resume, but there is no checkpoints/ to resume from; drop --resume to start the run")
        return
    if existing and not overwrite:
        raise ConfigError(f"{out}: already holds a run ({existing[0].name}); pass --resume to continue it, --overwrite to replace it, "
                          "or choose another run.out")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def record_code(out: Path, resume: bool) -> None:
    """code.json: the commit behind this run; a run resumed on other code is marked dirty (never reused by a bench)."""
    current = code_version()
    if resume and read_code_version(out) != current:
        current = {**current, "dirty": True}
    write_code_version(out, current)


def torchrun_command(config_path: Path, peers: int, max_restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={peers}", f"--max-restarts={max_restarts}",
            "-m", "p2pfed.peer", str(config_path)]


def start_run(args: argparse.Namespace) -> tuple[Config, Path]:
    """What `run` and `simulate` do before the peers start: config, model and data, the run
    directory claimed, keys, the resolved config and the code's commit on disk."""
    overrides = list(args.overrides) + ([f"run.peers={args.peers}"] if args.peers else [])
    config = load_config(args.config, overrides)
    prepare(config)
    out = Path(config.run.out)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run, or replace it)")
    claim_run_dir(out, args.overwrite, args.resume)
    if config.gossip.mode == "gossip" and not config.identity.roster and not (args.resume and (out / "keys" / "roster.json").exists()):
        roster = keygen(config.run.peers, out / "keys")
        print(f"[p2pfed] [identity] names no keys: created {config.run.peers} peer keys and {roster} for this run", flush=True)
    resolved = out / "config.json"
    save_config(config, resolved)
    record_code(out, args.resume)
    return config, resolved


def cmd_run(args: argparse.Namespace) -> int:
    config, resolved = start_run(args)
    if config.run.engine == "simulate":
        return simulate_run(config, resolved)
    out = Path(config.run.out)
    threads = config.run.threads or max(1, (os.cpu_count() or 1) // config.run.peers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if config.run.on_peer_loss == "continue":
        return run_with_survivors(config, resolved, env)
    print(f"[p2pfed] launching {config.run.peers} peers with torchrun; resolved config in {resolved}", flush=True)
    code = subprocess.call(torchrun_command(resolved, config.run.peers, config.run.max_restarts), env=env)
    if code != 0:
        print(f"p2pfed run: torchrun exited with status {code}; see the peer messages above", file=sys.stderr)
        return code
    print("\n" + (out / "summary.md").read_text(encoding="utf-8"))
    return 0


def agent_command(config_path: Path, peers: int, endpoint: str, run_id: str) -> list[str]:
    """One torchrun agent of one peer (p2pfed.agent), meeting the others at `endpoint`."""
    return [sys.executable, "-m", "p2pfed.agent", f"--nnodes={peers}", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", "--rdzv-conf=is_host=false", "--max-restarts=0",
            "--monitor-interval=0.5", "-m", "p2pfed.peer", str(config_path)]


def run_with_survivors(config: Config, resolved: Path, env: dict[str, str]) -> int:
    """on_peer_loss = 'continue': one torchrun agent per peer around a rendezvous store held
    here, so a dead peer takes none of the others down; the summary from those that finished."""
    import torch.distributed as dist

    from p2pfed.transport import LOSS_BOARD_ENV

    started = time.perf_counter()
    out = Path(config.run.out)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # lives as long as this launcher
    endpoint, run_id = f"127.0.0.1:{store.port}", f"p2pfed-{os.getpid()}"
    env = {**env, "P2PFED_LOCAL_PEERS": str(config.run.peers), LOSS_BOARD_ENV: endpoint}
    shutil.rmtree(out / "survivors", ignore_errors=True)  # rows of an earlier attempt are not this run's
    print(f"[p2pfed] launching {config.run.peers} peers, one torchrun agent each (on_peer_loss = 'continue'); "
          f"resolved config in {resolved}", flush=True)
    codes = run_children([agent_command(resolved, config.run.peers, endpoint, run_id) for _ in range(config.run.peers)], env)
    del store
    failed = sum(code != 0 for code in codes)
    from p2pfed.peer import survivors_summary

    text = survivors_summary(config, time.perf_counter() - started)
    if text is None and failed:
        print(f"p2pfed run: {failed} of {config.run.peers} peer agents failed and no peer finished; see the peer messages above",
              file=sys.stderr)
        return max(codes)
    if text is None:
        text = (out / "summary.md").read_text(encoding="utf-8")
    print("\n" + text)
    return 0


def run_children(commands: list[list[str]], env: dict[str, str]) -> list[int]:
    """Run every command to its end, passing Ctrl+C and SIGTERM on to each; their statuses."""
    children = [subprocess.Popen(command, env=env) for command in commands]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_simulate(args: argparse.Namespace) -> int:
    args.overrides = [*args.overrides, "run.engine=simulate"]
    config, resolved = start_run(args)
    return simulate_run(config, resolved)


SIMULATOR_ENV = {"MKL_DISABLE_FAST_MM": "1"}
"""Read once, when torch loads, so the simulator gets a process of its own: MKL keeps a cache
of work buffers for every thread that calls it, and the simulator's peers are threads."""


def simulate_run(config: Config, resolved: Path) -> int:
    """Every peer in one child process (run.engine = 'simulate'); the run directory is ready."""
    print(f"[p2pfed] simulating {config.run.peers} peers in one process on one base model; resolved config in {resolved}", flush=True)
    env = {**os.environ, **SIMULATOR_ENV, "P2PFED_PARENT_PID": str(os.getpid())}
    return run_child([sys.executable, "-m", "p2pfed.simulate", str(resolved)], env)


def run_child(command: list[str], env: dict[str, str]) -> int:
    """Run `command` to its end, passing Ctrl+C and SIGTERM on to it (it decides what a stop means)."""
    child = subprocess.Popen(command, env=env)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_prepare(args: argparse.Namespace) -> int:
    prepare(load_config(args.config, args.overrides))
    print("[p2pfed] model, data and topology are ready")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    existing = sorted(out.glob("peer*.pem")) + ([out / "roster.json"] if (out / "roster.json").exists() else [])
    if existing and not args.overwrite:
        raise IdentityError(f"{out}: already holds keys ({existing[0].name}); pass --overwrite to replace them")
    roster = keygen(args.peers, out, overwrite=args.overwrite)
    print(f"wrote {args.peers} private keys ({out}/peer{{rank}}.pem, mode 600) and the roster {roster}")
    print(f'use them with: identity.roster="{roster}" identity.key="{out}/peer{{rank}}.pem"')
    return 0


def cmd_topology_show(args: argparse.Namespace) -> int:
    topology = load_topology(args.file, args.peers or _declared_size(args.file))
    print(describe(topology))
    if args.png:  # drawn only when asked: nothing is written into the current directory unasked
        draw(topology, Path(args.png))
        print(f"drawing    {args.png}")
    return 0


def _declared_size(path: str) -> int:
    from p2pfed.topology import graphs_from_spec, load_spec

    spec = load_spec(path)
    if spec.generator is not None and spec.n is None:
        raise TopologyError(f"{path}: the file does not fix n; pass --peers N")
    return graphs_from_spec(spec, spec.n or 0)[0].number_of_nodes()


def cmd_peer(args: argparse.Namespace) -> int:
    from p2pfed.peer import main as peer_main

    return peer_main([args.config, *args.overrides])


def cmd_report(args: argparse.Namespace) -> int:
    from p2pfed.analysis import AnalysisError, write_report

    out = Path(args.out) if args.out else (Path(args.run_dirs[0]) / "report" if len(args.run_dirs) == 1 else Path("report"))
    try:
        path = write_report(args.run_dirs, out, args.reference)
    except AnalysisError as err:
        print(f"p2pfed report: {err}", file=sys.stderr)
        return 1
    print(f"[p2pfed] report written to {path} with its plots in {out}/")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    """Regenerate (or, with --check, compare) the README's result blocks from their results files."""
    from p2pfed.readmetables import TablesError, render, stale

    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    try:
        if args.check:
            differences = stale(text, readme.parent)
            for d in differences:
                print(f"{readme}: the block from {d.source} ({d.view}) differs from that file; run `p2pfed tables`", file=sys.stderr)
            return 1 if differences else 0
        updated = render(text, readme.parent)
    except TablesError as err:
        print(f"p2pfed tables: {err}", file=sys.stderr)
        return 1
    readme.write_text(updated, encoding="utf-8")
    print(f"{readme}: {'regenerated' if updated != text else 'already matches'} its result blocks")
    return 0


def results_tag(text: str) -> str:
    """A file-name part: letters, digits and '-' only (it becomes part of bench/results/ names)."""
    if not re.fullmatch(r"[A-Za-z0-9-]{1,32}", text):
        raise argparse.ArgumentTypeError(f"--tag {text!r}: expected 1-32 letters, digits or '-'")
    return text


def cmd_bench(args: argparse.Namespace) -> int:
    from p2pfed.bench import SUITES, BenchRun

    if args.suite not in SUITES:
        raise ConfigError(f"bench: unknown suite {args.suite!r}; expected one of {', '.join(SUITES)}")
    only = [r.strip() for r in args.rows.split(",")] if args.rows else []
    try:
        path = BenchRun(args.suite, Path(args.out), only, args.fresh, args.tag or "").run()
    except (ValueError, RuntimeError) as err:
        print(f"p2pfed bench: {err}", file=sys.stderr)
        return 1
    print("\n" + path.read_text(encoding="utf-8"))
    print(f"[bench] table written to {path} (and {path.with_suffix('.json').name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pfed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, help_text in (("run", cmd_run, "launch N peers on this machine with torchrun"),
                                  ("simulate", cmd_simulate, "all N peers in this process on one shared base model (same code path, "
                                                             "in-process network)")):
        launch = sub.add_parser(name, help=help_text)
        launch.add_argument("config")
        launch.add_argument("overrides", nargs="*", help="section.key=value, e.g. gossip.mode=allreduce")
        launch.add_argument("--peers", type=int, help="number of peers (overrides run.peers)")
        launch.add_argument("--overwrite", action="store_true", help="replace results already in run.out")
        launch.add_argument("--resume", action="store_true", help="continue the run in run.out from its newest common checkpoint")
        launch.set_defaults(func=func)

    peer = sub.add_parser("peer", help="one peer; run under torchrun")
    peer.add_argument("config")
    peer.add_argument("overrides", nargs="*")
    peer.set_defaults(func=cmd_peer)

    prep = sub.add_parser("prepare", help="fetch the embedded model and data (run once per machine before a multi-node launch)")
    prep.add_argument("config")
    prep.add_argument("overrides", nargs="*")
    prep.set_defaults(func=cmd_prepare)

    keys = sub.add_parser("keygen", help="create peer keys (Ed25519 + X25519) and the roster of public keys")
    keys.add_argument("--peers", type=int, required=True)
    keys.add_argument("--out", required=True, help="directory for peer{rank}.pem and roster.json")
    keys.add_argument("--overwrite", action="store_true")
    keys.set_defaults(func=cmd_keygen)

    topo = sub.add_parser("topology", help="inspect topology files")
    topo_sub = topo.add_subparsers(dest="topology_command", required=True)
    show = topo_sub.add_parser("show", help="print n, degrees, spectral gap; draw a PNG")
    show.add_argument("file")
    show.add_argument("--peers", type=int, help="size for files that leave n open")
    show.add_argument("--png", "--out", dest="png", help="write a drawing of the graph to this PNG (default: no drawing)")
    show.set_defaults(func=cmd_topology_show)

    report = sub.add_parser("report", help="summary and plots of one or more run directories (several are overlaid)")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="where to write report.md and the PNGs (default: RUN_DIR/report, or ./report for several)")
    report.add_argument("--reference", metavar="RUN_DIR", help="the run whose final global perplexity is the bytes-to-target "
                        "target (default: the first of several run directories)")
    report.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="run a benchmark suite and write its table to bench/results/")
    bench.add_argument("suite", help="quick (tiny model, ~6 min), full (8 SmolLM2 peers: baselines, topologies, scaling, micro-benchmarks; ~1.5 h), "
                                     "compression (SmolLM2 demo task, ~1 h), secure (~15 min), robust, robust-tiny, choco-gamma, privacy, "
                                     "communication or scale (the simulator)")
    bench.add_argument("--rows", help="comma-separated parts of row names to run, or row numbers '#N' / '#N-M' (1-based), 'micro' for the "
                       "micro-benchmarks (default: all)")
    bench.add_argument("--out", default="bench", help="directory for runs/ and results/ (default: bench)")
    bench.add_argument("--fresh", action="store_true", help="rerun rows whose identical config already finished under OUT/runs")
    bench.add_argument("--tag", default=None, type=results_tag,  # None: argparse would pass a str default through the type
                       help="name the results <suite>-<date>-TAG (a run of some rows then leaves the day's full table alone)")
    bench.set_defaults(func=cmd_bench)

    tables = sub.add_parser("tables", help="regenerate the README's result tables from bench/results (no figure typed by hand)")
    tables.add_argument("--readme", default=str(Path(__file__).resolve().parent.parent / "README.md"), help="default: this checkout's README.md")
    tables.add_argument("--check", action="store_true", help="only compare; exit 1 naming each block that differs from its results file")
    tables.set_defaults(func=cmd_tables)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after an option (`run CONFIG --overwrite a.b=1`) land here
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ConfigError, TopologyError, DataError, ModelError, IdentityError) as err:
        print(f"p2pfed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
