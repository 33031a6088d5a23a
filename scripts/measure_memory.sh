#!/usr/bin/env bash
# Memory and size of the server (`make bench`): idle RSS, the RSS added by
# 10,000 idle connections (never used, then after one `ping` each, so that
# buffers allocated while in use show if they are kept), and the size of the
# stripped release binary. Targets: idle <= 3 MiB, +10,000 idle connections
# <= 25 MiB, binary <= 2.5 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${MEMORY_CONNECTIONS:-10000}

cargo build --release --quiet -p dflockd --bin dflockd
BIN=target/release/dflockd

# Both the server and the client need a file descriptor per connection.
ulimit -n $((N + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d)
SERVER_PID=
CLIENT_PID=
cleanup() {
    if [ -n "$CLIENT_PID" ]; then kill "$CLIENT_PID" 2>/dev/null || true; fi
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.2f MiB", k / 1024}'; }

"$BIN" --host 127.0.0.1 --port 0 --read-timeout 0 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 200); do
    grep -q 'listening on' "$WORK/server.log" 2>/dev/null && break
    sleep 0.05
done
PORT=$(grep -m1 'listening on' "$WORK/server.log" | grep -oE '[0-9]+' | tail -1)
sleep 0.5
IDLE=$(rss_kib "$SERVER_PID")

# A client holding N connections: opens them all, reports, then pings on
# each when told (a line on stdin), reports again, and holds them.
mkfifo "$WORK/ctl"
cat >"$WORK/client.py" <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
for s in socks:
    s.sendall(b"ping\n_\n\n")
for s in socks:
    buf = b""
    while not buf.endswith(b"\n"):
        buf += s.recv(64)
    assert buf == b"ok\n", buf
print("pinged", flush=True)
sys.stdin.readline()
PY
python3 "$WORK/client.py" "$PORT" "$N" <"$WORK/ctl" >"$WORK/client.out" &
CLIENT_PID=$!
exec 3>"$WORK/ctl"

wait_for() {
    for _ in $(seq 1 1200); do
        grep -q "$1" "$WORK/client.out" 2>/dev/null && return 0
        kill -0 "$CLIENT_PID" 2>/dev/null || { echo "client failed" >&2; exit 1; }
        sleep 0.05
    done
    echo "timed out waiting for the client ($1)" >&2
    exit 1
}
# Every connection accepted: the server holds N + a few descriptors.
wait_accepted() {
    for _ in $(seq 1 1200); do
        [ "$(ls "/proc/$SERVER_PID/fd" | wc -l)" -ge "$N" ] && return 0
        sleep 0.05
    done
}

wait_for open
wait_accepted
sleep 0.5
OPEN=$(rss_kib "$SERVER_PID")
echo >&3
wait_for pinged
sleep 0.5
USED=$(rss_kib "$SERVER_PID")
echo >&3
exec 3>&-

cp "$BIN" "$WORK/dflockd.stripped"
strip "$WORK/dflockd.stripped" 2>/dev/null || true
SIZE=$(stat -c %s "$WORK/dflockd.stripped")

echo "idle server RSS:                          $IDLE KiB ($(mib "$IDLE"))   target <= 3 MiB"
echo "RSS with $N idle connections:          $OPEN KiB (+$((OPEN - IDLE)) KiB = +$(mib $((OPEN - IDLE))), $(((OPEN - IDLE) * 1024 / N)) bytes each)   target <= +25 MiB"
echo "RSS after one ping on each (idle again):  $USED KiB (+$((USED - IDLE)) KiB = +$(mib $((USED - IDLE))))"
echo "release binary, stripped:                 $SIZE bytes ($(mib $((SIZE / 1024))))   target <= 2.5 MiB"
ulimit -n 20000 2>/dev/null || true
python3 "$(dirname "$0")/measure_state.py" "$BIN"
