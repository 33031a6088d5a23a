#!/usr/bin/env bash
# Three dflockd nodes on this machine: a replicated cluster to try out.
#
#   scripts/cluster.sh            (what `make cluster` runs)
#
# Clients:     127.0.0.1:6391, 127.0.0.1:6392, 127.0.0.1:6393 (any node serves every command)
# Peer links:  127.0.0.1:7391, 127.0.0.1:7392, 127.0.0.1:7393
# Data dirs:   ${CLUSTER_DIR:-target/cluster}/n1 .. n3 (kept between runs; delete them to start afresh)
# Logs:        each node's lines are prefixed with [nN]; Ctrl-C stops all three.
#
# Set DFLOCKD_BIN to run another binary (default: the release build, built
# here if missing). Extra arguments go to every node, e.g. --auth-token.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${DFLOCKD_BIN:-target/release/dflockd}
if [[ -z "${DFLOCKD_BIN:-}" ]]; then
    cargo build --release -p dflockd --bin dflockd
fi
DIR=${CLUSTER_DIR:-target/cluster}
PEERS=1=127.0.0.1:7391,2=127.0.0.1:7392,3=127.0.0.1:7393
pids=()
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT INT TERM
for i in 1 2 3; do
    mkdir -p "$DIR/n$i"
    "$BIN" --port "639$i" --node-id "$i" --peers "$PEERS" --data-dir "$DIR/n$i" "$@" 2>&1 |
        sed -u "s/^/[n$i] /" &
    pids+=($!)
done
echo "cluster: clients on 127.0.0.1:6391,6392,6393; try: dflock -s '127.0.0.1:6391|127.0.0.1:6392|127.0.0.1:6393' stats" >&2
wait
