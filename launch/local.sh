#!/usr/bin/env bash
# Run N peers on this machine: launch/local.sh CONFIG [PEERS] [section.key=value ...]
# Same as `p2pfed run CONFIG --peers PEERS`, which also prepares the model/data first.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [PEERS] [section.key=value ...]}
shift
peers=""
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then peers=$1; shift; fi
exec p2pfed run "$config" ${peers:+--peers "$peers"} "$@"
