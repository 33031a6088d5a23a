#!/usr/bin/env bash
# `make bench-cluster`: installs what the comparison needs when it is
# missing (etcd from Debian's etcd-server package; protoc >= 3.12 from
# protobuf-compiler, which the etcd client crate compiles its .proto files
# with), builds the server and the load generator with its etcd driver,
# then runs scripts/bench_cluster.py with the arguments given (BENCH_CLUSTER_ARGS
# from make). Takes about 12 minutes on 2 cores with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if ! command -v protoc >/dev/null 2>&1 ||
    ! protoc --version | awk '{split($2, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 12))}'; then
    need+=(protobuf-compiler)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}" >&2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "bench-cluster: needs ${need[*]} (no apt-get here to install them)" >&2
        exit 2
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    # The Debian package starts a system etcd on the default ports; the
    # benchmark runs its own members on ephemeral ports and needs no other.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop etcd 2>/dev/null || true; fi
fi

echo "==> building release binaries" >&2
cargo build --release --quiet -p dflockd --bin dflockd
cargo build --release --quiet -p dflockd-bench --features etcd
exec python3 scripts/bench_cluster.py "$@"
