#!/usr/bin/env bash
# The deterministic simulation of cluster mode (tests/cluster_sim.rs), in
# release mode: three- and five-node clusters of real Raft nodes and real
# Cores, a network that drops, delays, reorders, duplicates and partitions
# (random_one_way_links also cuts links in one direction only), crashes
# with torn logs, wiped data dirs, snapshots, and random clients, with the
# invariants checked at every simulated millisecond: mutual exclusion as
# clients believe it, fence order, identical applied state at equal
# indexes, apply-once, FIFO; at the end the cluster must settle.
#
#   scripts/cluster_sim.sh                 1,000,000 simulated ms per run, default seed
#   scripts/cluster_sim.sh SEED            another seed ("random" picks one)
#   scripts/cluster_sim.sh SEED STEPS      a longer (or shorter) run
#
# A failure prints its seed, the simulated time, the last events and the
# command that replays it exactly (CLUSTER_SIM_SEED=... CLUSTER_SIM_STEPS=...
# cargo test --release --test cluster_sim -- NAME). CLUSTER_SIM_VERBOSE=1
# prints progress; CLUSTER_SIM_TRACE=N keeps N events for the failure report.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ge 1 ]; then export CLUSTER_SIM_SEED=$1; fi
export CLUSTER_SIM_STEPS=${2:-${CLUSTER_SIM_STEPS:-1000000}}

echo "cluster sim: CLUSTER_SIM_SEED=${CLUSTER_SIM_SEED:-default} CLUSTER_SIM_STEPS=$CLUSTER_SIM_STEPS"
exec cargo test --release -p dflockd --test cluster_sim -- --nocapture random_
