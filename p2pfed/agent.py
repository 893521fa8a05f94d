"""One torchrun agent for one peer: `p2pfed run` with [run] on_peer_loss = 'continue'.

Under one torchrun agent for all local peers, a dead peer makes the agent stop (or restart)
all of them. With an agent per peer, a death ends only its own agent, and its neighbours go
on without it (p2pfed.stream, p2pfed.transport.PeerCollectives). The agents meet through a c10d
rendezvous on a store that `p2pfed run` itself holds, so no peer's death takes the store down.

One change to stock torchrun: no exit barrier. An agent whose peer finished would otherwise
wait up to 300 s (not settable from the command line) for the agent of a dead peer, which
never comes; the barrier only guards a store held by an agent, and here the launcher holds it.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def _no_exit_barrier(_agent: SimpleElasticAgent) -> None:
    """The launcher holds the rendezvous store: an agent may leave as soon as its peer ends."""


def main(argv: list[str] | None = None) -> int:
    """torchrun's command line (one node of `--nnodes` peers, one process), without the exit barrier."""
    SimpleElasticAgent._exit_barrier = _no_exit_barrier  # type: ignore[method-assign]
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:  # one line, not torchrun's banner: the peer said what happened
        failure = next(iter(err.failures.values()), None)
        status = failure.exitcode if failure is not None else 1
        print(f"p2pfed agent: its peer ended with status {status}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
