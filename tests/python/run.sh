#!/usr/bin/env bash
# Real-client acceptance suite: runs the pytest suite in this directory once
# with dflockd-client 2.1.1 and once with 1.9.0 against $DFLOCKD_BIN
# (default $REPO/target/debug/dflockd; build it first, this script does not).
# Extra arguments go to pytest, e.g.:  tests/python/run.sh -m "not sem" -x
# Exit status: 0 only if both runs pass.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

bash "$HERE/setup_venvs.sh" || { echo "run.sh: venv setup failed" >&2; exit 1; }

export DFLOCKD_BIN="${DFLOCKD_BIN:-$REPO/target/debug/dflockd}"
if [[ ! -x "$DFLOCKD_BIN" ]]; then
    echo "run.sh: server binary not found or not executable: $DFLOCKD_BIN" >&2
    exit 1
fi
export PYTHONDONTWRITEBYTECODE=1

status=0
summary=()
for venv in c211 c190; do
    echo "=== dflockd-client via .venv/$venv ==="
    (cd "$HERE" && "$REPO/.venv/$venv/bin/python" -m pytest "$@")
    rc=$?
    case $rc in
        0) summary+=("$venv: passed") ;;
        5) summary+=("$venv: no tests selected") ;;  # e.g. a -k that matches one version only
        *) summary+=("$venv: FAILED (pytest exit $rc)"); status=1 ;;
    esac
done
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
exit $status
