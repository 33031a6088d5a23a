"""Helpers shared by the cluster-mode test modules."""

from __future__ import annotations

import re
import threading
import time

from conftest import find_entry

TOKEN_RE = re.compile(r"[0-9a-f]{32}")


def fence(token: str) -> int:
    assert TOKEN_RE.fullmatch(token or ""), f"token {token!r} is not 32 lowercase hex"
    return int(token[:16], 16)


def node_of(conn_id: int) -> int:
    """Cluster connection ids carry the owning node's id in the top 16 bits."""
    return conn_id >> 48


def held(st: dict, key: str) -> dict | None:
    return find_entry(st["locks"], key)


def others(ids, *exclude):
    return [i for i in ids if i not in exclude]


def is_unavailable(exc: BaseException) -> bool:
    """What the published clients raise on ``error_unavailable`` (1.x: a
    RuntimeError quoting the status; 2.x: DflockdError, a RuntimeError) or
    on a connection the server closed."""
    if isinstance(exc, (ConnectionError, EOFError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        return True
    return isinstance(exc, RuntimeError) and "error_unavailable" in str(exc)


def acquire_in_thread(lock) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        out["started"] = time.monotonic()
        try:
            out["ok"] = lock.acquire()
        except Exception as e:  # surfaced by the test's assertions
            out["ok"] = e
        out["at"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out
