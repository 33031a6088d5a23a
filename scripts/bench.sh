#!/usr/bin/env bash
# `make bench`: our server, the reference Python server (dflockd 0.5.0 from
# PyPI) and Redis, side by side on ephemeral loopback ports, driven by the
# one-thread closed-loop load generator (bench/, `dflockd-bench`) at 1, 10,
# 100 and 500 connections. Writes bench/results/latest.json (every run plus
# the target checks), bench/results/latest.txt (the table) and
# bench/results/chart.svg.
#
# Environment: BENCH_DURATION (s, default 3), BENCH_WARMUP (s, default 1),
# BENCH_CONNECTIONS (default "1 10 100 500"), BENCH_SERVERS (default
# "dflockd python redis"). The whole run takes about 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-3}
WARMUP=${BENCH_WARMUP:-1}
CONNECTIONS=${BENCH_CONNECTIONS:-"1 10 100 500"}
SERVERS=${BENCH_SERVERS:-"dflockd python redis"}
PIPE_DEPTH=32
RESULTS=bench/results
PYREF=.venv/pyref
mkdir -p "$RESULTS"

log() { printf '==> %s\n' "$*" >&2; }

log "building release binaries"
cargo build --release --quiet -p dflockd --bin dflockd
cargo build --release --quiet -p dflockd-bench
BENCH=target/release/dflockd-bench

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
RUNS="$WORK/runs.jsonl"
: >"$RUNS"

# Waits for a "listening on ..." line in $1 and prints the port (the last
# number on that line: "127.0.0.1:PORT" or "('127.0.0.1', PORT)").
wait_port() {
    local logf=$1 pid=$2
    for _ in $(seq 1 200); do
        if line=$(grep -m1 'listening on' "$logf" 2>/dev/null); then
            grep -oE '[0-9]+' <<<"$line" | tail -1
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "server did not start; its log:" >&2
    cat "$logf" >&2
    return 1
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ---- the servers ----

start_ours() {
    target/release/dflockd --host 127.0.0.1 --port 0 --max-locks 0 2>"$WORK/dflockd.log" &
    OURS_PID=$!
    PIDS+=("$OURS_PID")
    OURS_PORT=$(wait_port "$WORK/dflockd.log" "$OURS_PID")
}

setup_python() {
    if "$PYREF/bin/python" -c 'import dflockd.server' 2>/dev/null; then
        return 0
    fi
    log "installing the reference server dflockd==0.5.0 into $PYREF"
    python3 -m venv "$PYREF" &&
        "$PYREF/bin/pip" install --quiet --disable-pip-version-check \
            --ignore-requires-python dflockd==0.5.0
}

start_python() {
    "$PYREF/bin/python" -m dflockd.server --host 127.0.0.1 --port 0 \
        --max-locks 1000000 2>"$WORK/python.log" &
    PY_PID=$!
    PIDS+=("$PY_PID")
    PY_PORT=$(wait_port "$WORK/python.log" "$PY_PID")
}

setup_redis() {
    if command -v redis-server >/dev/null; then
        return 0
    fi
    log "installing redis-server from the package registry"
    if ! apt-get install -y -qq redis-server >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq redis-server >/dev/null 2>&1
    fi
}

start_redis() {
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --protected-mode no --loglevel warning >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "redis-server did not start:" >&2
    cat "$WORK/redis.log" >&2
    return 1
}

# ---- one run ----

# run LABEL PORT PID MODE CONNECTIONS [extra flags...]
run() {
    local label=$1 port=$2 pid=$3 mode=$4 conns=$5
    shift 5
    local out
    if out=$("$BENCH" --addr "127.0.0.1:$port" --mode "$mode" --connections "$conns" \
        --duration "$DURATION" --warmup "$WARMUP" --server-pid "$pid" \
        --label "$label" --json --quiet "$@" 2>"$WORK/run.err"); then
        echo "$out" >>"$RUNS"
        # The table row (second line of the generator's stderr).
        sed -n 2p "$WORK/run.err" >&2
    else
        echo "   $label $mode c=$conns failed: $(tail -1 "$WORK/run.err")" >&2
    fi
}


START=$(date +%s)
AVAILABLE=()
for s in $SERVERS; do
    case $s in
    dflockd)
        start_ours
        log "dflockd (ours) pid $OURS_PID on port $OURS_PORT"
        AVAILABLE+=(dflockd)
        ;;
    python)
        if setup_python && start_python; then
            log "reference Python dflockd 0.5.0 pid $PY_PID on port $PY_PORT"
            AVAILABLE+=(python)
        else
            log "SKIPPING the Python reference server: dflockd==0.5.0 could not be installed or started"
        fi
        ;;
    redis)
        if setup_redis && start_redis; then
            log "redis-server $(redis-server --version | grep -oE 'v=[0-9.]+') pid $REDIS_PID on port $REDIS_PORT"
            AVAILABLE+=(redis)
        else
            log "SKIPPING Redis: redis-server could not be installed or started"
        fi
        ;;
    *) log "unknown server $s" ;;
    esac
done

log "runs of ${WARMUP}s warm-up + ${DURATION}s measured; columns: server mode conns depth cycles/s requests/s p50 p99 p99.9 max errors(/FIFO violations) server-CPU-us/cycle server-CPU-us/request server-CPU RSS"
for s in "${AVAILABLE[@]}"; do
    for c in $CONNECTIONS; do
        case $s in
        dflockd)
            run dflockd "$OURS_PORT" "$OURS_PID" lock "$c"
            run dflockd "$OURS_PORT" "$OURS_PID" contended "$c" --keys 1
            run dflockd "$OURS_PORT" "$OURS_PID" sem "$c" --keys $(((c + 7) / 8))
            run dflockd "$OURS_PORT" "$OURS_PID" twophase "$c"
            run dflockd "$OURS_PORT" "$OURS_PID" pipeline "$c" --depth "$PIPE_DEPTH"
            ;;
        python)
            run python "$PY_PORT" "$PY_PID" lock "$c"
            run python "$PY_PORT" "$PY_PID" contended "$c" --keys 1
            # dflockd 0.5.0 has no semaphore commands (sl/sr).
            run python "$PY_PORT" "$PY_PID" twophase "$c"
            run python "$PY_PORT" "$PY_PID" pipeline "$c" --depth "$PIPE_DEPTH"
            ;;
        redis)
            run redis "$REDIS_PORT" "$REDIS_PID" redis-lock "$c"
            run redis "$REDIS_PORT" "$REDIS_PID" redis-lock "$c" --depth "$PIPE_DEPTH"
            ;;
        esac
    done
    if [ "$s" = python ]; then
        log "python: mode sem skipped (dflockd 0.5.0 has no semaphores)"
    fi
done
log "load runs took $(($(date +%s) - START)) s"

MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
MACHINE="$(nproc) cores, ${MODEL:-unknown CPU}, $(uname -sr)"
"$BENCH" report --input "$RUNS" --output "$RESULTS/latest.json" --svg "$RESULTS/chart.svg" \
    --machine "$MACHINE" --command "make bench" | tee "$RESULTS/latest.txt"
echo "machine: $MACHINE" >>"$RESULTS/latest.txt"
