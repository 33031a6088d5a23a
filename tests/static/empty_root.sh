#!/usr/bin/env bash
# Empty-root test: the static binary runs with nothing around it, which is
# what the `FROM scratch` Dockerfile needs. It stands in for `docker build` +
# `docker run` (no Docker engine here), so keep it in step with ./Dockerfile:
#   binary      target/static/dflockd  ->  /dflockd in the root (COPY ... /dflockd)
#   user        65532:65532                (USER 65532:65532)
#   arguments   --host 0.0.0.0             (CMD ["--host", "0.0.0.0"])
#   environment none                       (scratch has no ENV; we use env -i)
# plus `--port 0` so the test never collides with a running server.
#
# Steps: copy only the binary into an empty temp directory, chroot into it as
# root (dropping to 65532:65532 like the container) with an empty environment,
# read the bound port from the log (kept outside the root), connect over
# loopback with bash's /dev/tcp, acquire and release a lock, SIGTERM, and
# check that the process ends.
#
#   tests/static/empty_root.sh [path/to/static/dflockd]   (default target/static/dflockd)
#
# Exit 0 on success, or with a "SKIP:" line when chroot is not permitted
# (not root, or no CAP_SYS_CHROOT). Any other problem exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${1:-${DFLOCKD_STATIC_BIN:-target/static/dflockd}}
USERSPEC=${EMPTY_ROOT_USERSPEC:-65532:65532}

fail() {
    echo "FAIL: $*" >&2
    if [[ -n "${LOG:-}" && -s "$LOG" ]]; then
        echo "--- server log ---" >&2
        cat "$LOG" >&2
    fi
    exit 1
}

[[ -x "$BIN" ]] || fail "$BIN not found or not executable; build it first with scripts/static.sh (make static)"
CHROOT=$(command -v chroot) || fail "chroot(8) not installed (coreutils)"

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/dflockd-empty-root.XXXXXX")
LOG=$(mktemp "${TMPDIR:-/tmp}/dflockd-empty-root-log.XXXXXX")
PID=
cleanup() {
    exec 3>&- 2>/dev/null || true
    if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
        kill -KILL "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf -- "$ROOT"
    rm -f -- "$LOG"
}
trap cleanup EXIT

# The root holds one file and nothing else: no /etc, /dev, /proc, /tmp, libc.
# It must be searchable by the unprivileged user (mktemp makes it 0700).
cp -- "$BIN" "$ROOT/dflockd"
chmod 0755 "$ROOT" "$ROOT/dflockd"
contents=$(cd "$ROOT" && find . -mindepth 1 | sort | tr '\n' ' ')
[[ "$contents" == "./dflockd " ]] || fail "root is not just the binary: $contents"
echo "root $ROOT contains: $contents"

# Probe: can we chroot at all? Only "not permitted" (not root, or no
# CAP_SYS_CHROOT/CAP_SETUID in this container) is a skip.
if ! probe=$(env -i "$CHROOT" --userspec="$USERSPEC" "$ROOT" /dflockd --version 2>&1); then
    if [[ "$probe" == *"Operation not permitted"* ]]; then
        echo "SKIP: chroot is not permitted here (uid $(id -u)): $probe"
        exit 0
    fi
    fail "the binary does not run in the empty root: $probe"
fi
echo "in empty root: $probe"

# Start it exactly like the container would (plus --port 0). stderr goes to a
# file outside the root; the process sees no environment at all.
env -i "$CHROOT" --userspec="$USERSPEC" "$ROOT" /dflockd --host 0.0.0.0 --port 0 2>"$LOG" &
PID=$!

port=
for _ in $(seq 100); do
    if ! kill -0 "$PID" 2>/dev/null; then
        wait "$PID" && st=0 || st=$?
        PID=
        fail "server exited during startup with status $st"
    fi
    port=$(sed -n 's/.*listening on .*:\([0-9][0-9]*\)[[:space:]]*$/\1/p' "$LOG" | head -n1)
    [[ -n "$port" ]] && break
    sleep 0.05
done
[[ -n "$port" ]] || fail "no 'listening on' line within 5 s"
echo "server pid $PID (chroot, uid:gid $USERSPEC, env -i) listening on port $port"

# Who is it really running as? (the chroot process execs dflockd, same pid)
if [[ -r /proc/$PID/status ]]; then
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$PID/status")
    groot=$(readlink "/proc/$PID/root" || true)
    echo "process uid $uid, root $groot, environment bytes $(wc -c <"/proc/$PID/environ")"
    [[ "$uid" == "${USERSPEC%%:*}" ]] || fail "expected uid ${USERSPEC%%:*}, got $uid"
    [[ "$groot" == "$ROOT" ]] || fail "expected root $ROOT, got $groot"
    [[ $(wc -c <"/proc/$PID/environ") == 0 ]] || fail "environment is not empty"
fi

exec 3<>"/dev/tcp/127.0.0.1/$port" || fail "cannot connect to 127.0.0.1:$port"
printf 'l\nk\n0\n' >&3
IFS= read -r -t 5 reply <&3 || fail "no reply to the lock request"
echo "l k 0 -> $reply"
[[ "$reply" =~ ^ok\ ([0-9a-f]{32})\ ([0-9]+)$ ]] || fail "unexpected lock reply: $reply"
token=${BASH_REMATCH[1]}
printf 'r\nk\n%s\n' "$token" >&3
IFS= read -r -t 5 reply <&3 || fail "no reply to the release request"
echo "r k <token> -> $reply"
[[ "$reply" == "ok" ]] || fail "unexpected release reply: $reply"
exec 3>&-

# SIGTERM. Today the default action kills it; with the graceful drain it
# exits 0 once nothing is held (nothing is). Accept either, report which.
kill -TERM "$PID"
for _ in $(seq 100); do
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$PID" 2>/dev/null; then
    fail "still running 10 s after SIGTERM"
fi
wait "$PID" && st=0 || st=$?
PID=
case $st in
    0) echo "after SIGTERM: exited with status 0 (graceful shutdown)" ;;
    143) echo "after SIGTERM: killed by SIGTERM (default signal action, no graceful drain yet)" ;;
    *) fail "after SIGTERM: unexpected exit status $st" ;;
esac
echo "PASS: static binary served a lock from an empty root"
