#!/usr/bin/env bash
# The deterministic simulation of the whole request path (tests/sim.rs), in
# release mode: 300 simulated clients, bytes split at random points, leases
# running out, abrupt disconnects, garbage, with the state machine's
# invariants and the clients' view of who holds what checked at every step.
#
#   scripts/sim.sh                 1,000,000 steps per simulation, default seed
#   scripts/sim.sh SEED            the same with another seed ("random" picks one)
#   scripts/sim.sh SEED STEPS      a longer (or shorter) run
#
# A failure prints its seed, step and the command that replays it exactly
# (SIM_SEED=... SIM_STEPS=... cargo test --release --test sim -- NAME).
# Set SIM_VERBOSE=1 for a progress line every 100,000 steps.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ge 1 ]; then export SIM_SEED=$1; fi
export SIM_STEPS=${2:-${SIM_STEPS:-1000000}}

echo "sim: SIM_SEED=${SIM_SEED:-default} SIM_STEPS=$SIM_STEPS"
exec cargo test --release -p dflockd --test sim -- --nocapture
