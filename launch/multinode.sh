#!/usr/bin/env bash
# One node's share of a multi-node run. Start it on every node with the same CONFIG,
# NNODES, ENDPOINT and RUN_ID; each node starts PEERS_PER_NODE peers, and torchrun's c10d
# rendezvous at ENDPOINT (host:port of any one node) only bootstraps the group: gossip
# goes peer to peer, nothing is aggregated there.
#
#   launch/multinode.sh CONFIG NNODES PEERS_PER_NODE ENDPOINT [RUN_ID] [section.key=value ...]
#
# The config's run.peers must equal NNODES * PEERS_PER_NODE. MAX_RESTARTS (default 3) is
# passed to torchrun: when a peer dies, the group restarts and resumes from the newest
# round every peer checkpointed. Example, two nodes:
#   node A: launch/multinode.sh launch/configs/demo.toml 2 2 nodeA:29400 demo
#   node B: launch/multinode.sh launch/configs/demo.toml 2 2 nodeA:29400 demo
set -euo pipefail
usage="usage: launch/multinode.sh CONFIG NNODES PEERS_PER_NODE ENDPOINT [RUN_ID] [section.key=value ...]"
config=${1:?$usage}; nnodes=${2:?$usage}; per_node=${3:?$usage}; endpoint=${4:?$usage}
shift 4
run_id=p2pfed
if [[ $# -gt 0 && $1 != *=* ]]; then run_id=$1; shift; fi
PYTHON=${PYTHON:-python}
"$PYTHON" -m p2pfed.cli prepare "$config" "run.peers=$((nnodes * per_node))" "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / per_node > 0 ? $(nproc) / per_node : 1 ))}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$nnodes" --nproc-per-node="$per_node" \
  --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="$run_id" --max-restarts="${MAX_RESTARTS:-3}" \
  -m p2pfed.peer "$config" "run.peers=$((nnodes * per_node))" "$@"
