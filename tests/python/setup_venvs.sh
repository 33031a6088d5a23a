#!/usr/bin/env bash
# Create the two virtualenvs used by the real-client acceptance suite:
#   $REPO/.venv/c211  -> dflockd-client==2.1.1
#   $REPO/.venv/c190  -> dflockd-client==1.9.0
# Both client releases declare Requires-Python >= 3.12 but run fine on 3.11,
# hence --ignore-requires-python.  Idempotent: a venv whose pinned packages
# already import is left alone, so a second run takes well under a second.
#
# Env: PYTHON (interpreter for the venvs; default python3.11, else python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV_ROOT="$REPO/.venv"

PYTEST_PIN="pytest==9.2.0"
PYTEST_TIMEOUT_PIN="pytest-timeout==2.4.0"
# Parses the server's /metrics output in test_metrics.py.
PROM_PIN="prometheus-client==0.26.0"

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then
        PYTHON=python3.11
    else
        PYTHON=python3
    fi
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup_venvs: $PYTHON is older than 3.11; the dflockd clients need >= 3.11" >&2
    exit 1
fi

mkdir -p "$VENV_ROOT"

# venv_ok DIR VERSION: the venv exists and has the pinned client + pytest deps.
venv_ok() {
    local dir=$1 want=$2
    [[ -x "$dir/bin/python" ]] || return 1
    "$dir/bin/python" - "$want" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("dflockd-client") == sys.argv[1]
assert version("pytest") == "9.2.0"
assert version("pytest-timeout") == "2.4.0"
assert version("prometheus-client") == "0.26.0"
import dflockd_client, pytest, pytest_timeout, prometheus_client  # noqa: F401
EOF
}

make_venv() {
    local name=$1 client_version=$2
    local dir="$VENV_ROOT/$name"
    if venv_ok "$dir" "$client_version"; then
        echo "setup_venvs: $name ok (dflockd-client==$client_version)"
        return 0
    fi
    echo "setup_venvs: creating $dir (dflockd-client==$client_version)"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
        --ignore-requires-python \
        "dflockd-client==$client_version" "$PYTEST_PIN" "$PYTEST_TIMEOUT_PIN" "$PROM_PIN"
    if ! venv_ok "$dir" "$client_version"; then
        echo "setup_venvs: $dir is still incomplete after pip install" >&2
        return 1
    fi
}

make_venv c211 2.1.1
make_venv c190 1.9.0
