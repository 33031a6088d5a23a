"""dflockd-client 2.x specifics: ``SyncConn``/``AsyncConn`` with the
module-level ``stats`` and protocol functions, the typed errors
(``LimitMismatchError``, ``NotQueuedError``, ``AlreadyQueuedError``,
``LeaseExpiredError``, ``MaxLocksError``, ``MaxWaitersError``,
``DrainingError``, ``DflockdTimeoutError``) and ``fence_from_token``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import find_entry
from dflockd_client import (
    AlreadyQueuedError,
    AsyncDistributedLock,
    DflockdTimeoutError,
    DrainingError,
    LeaseExpiredError,
    LimitMismatchError,
    MaxLocksError,
    MaxWaitersError,
    NotQueuedError,
    SyncDistributedLock,
    SyncDistributedSemaphore,
    _async,
    _sync,
    fence_from_token,
)


@pytest.fixture
def conns(server):
    opened = []

    def make(srv=server):
        c = _sync.open_conn(srv.host, srv.port, ssl_context=None, connect_timeout_s=5)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


# ---------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------


def test_stats_sync(server, conns, key):
    with SyncDistributedLock(key, servers=server.servers):
        result = _sync.stats(conns())
        assert result["connections"] >= 2
        e = find_entry(result["locks"], key)
        assert e is not None, result
        assert set(e) >= {"key", "owner_conn_id", "lease_expires_in_s", "waiters"}
    result = _sync.stats(conns())
    assert find_entry(result["locks"], key) is None, result


def test_stats_async(server, key):
    async def main():
        async with AsyncDistributedLock(key, servers=server.servers):
            conn = await _async.open_conn(
                server.host, server.port, ssl_context=None, connect_timeout_s=5
            )
            try:
                result = await _async.stats(conn)
            finally:
                await conn.close()
            assert result["connections"] >= 2
            assert find_entry(result["locks"], key) is not None, result

    asyncio.run(main())


@pytest.mark.sem
def test_stats_lists_semaphore(server, conns, key):
    with SyncDistributedSemaphore(key, limit=3, servers=server.servers):
        e = find_entry(_sync.stats(conns())["semaphores"], key)
        assert e is not None
        assert e["limit"] == 3 and e["holders"] == 1 and e["waiters"] == 0, e


# ---------------------------------------------------------------------------
# Low-level functions and typed errors
# ---------------------------------------------------------------------------


def test_low_level_lock_functions(conns, key):
    a, b = conns(), conns()
    token, lease = _sync.acquire(a, key, 10, 5)
    assert lease == 5
    assert _sync.renew(a, key, token, 7) in (6, 7)
    with pytest.raises(DflockdTimeoutError):
        _sync.acquire(b, key, 0)
    assert _sync.enqueue(b, key, 9) == ("queued", None, None)
    with pytest.raises(AlreadyQueuedError):
        _sync.enqueue(b, key, 9)
    _sync.release(a, key, token)
    token2, lease2 = _sync.wait(b, key, 5)
    assert lease2 == 9
    assert fence_from_token(token2) > fence_from_token(token)
    _sync.release(b, key, token2)


def test_wait_without_enqueue_is_not_queued(conns, key):
    with pytest.raises(NotQueuedError):
        _sync.wait(conns(), key, 1)


def test_wait_after_granted_lease_expired(conns, key):
    holder, waiter = conns(), conns()
    token, _ = _sync.acquire(holder, key, 0)
    assert _sync.enqueue(waiter, key, 1)[0] == "queued"
    _sync.release(holder, key, token)  # grant goes to waiter, lease 1 s
    time.sleep(1.6)
    with pytest.raises(LeaseExpiredError):
        _sync.wait(waiter, key, 5)


def test_wait_resets_lease_of_early_grant(conns, key):
    holder, waiter, observer = conns(), conns(), conns()
    token, _ = _sync.acquire(holder, key, 0)
    assert _sync.enqueue(waiter, key, 3)[0] == "queued"
    _sync.release(holder, key, token)
    time.sleep(1.5)
    token2, lease2 = _sync.wait(waiter, key, 5)
    assert lease2 == 3
    e = find_entry(_sync.stats(observer)["locks"], key)
    assert e is not None and e["lease_expires_in_s"] > 2, (
        f"wait must reset the lease to a full TTL: {e}"
    )
    _sync.release(waiter, key, token2)


def test_fence_tokens_strictly_increase(server, key):
    fences = []
    for i in range(5):
        with SyncDistributedLock(f"{key}.{i % 2}", servers=server.servers) as lock:
            fences.append(fence_from_token(lock.token))
    assert all(x < y for x, y in zip(fences, fences[1:])), fences


def test_max_locks(dflockd_factory, key):
    srv = dflockd_factory("--max-locks", "2")
    a = SyncDistributedLock(key + ".1", servers=srv.servers)
    b = SyncDistributedLock(key + ".2", servers=srv.servers)
    assert a.acquire() and b.acquire()
    try:
        with pytest.raises(MaxLocksError):
            SyncDistributedLock(key + ".3", servers=srv.servers).acquire()
    finally:
        assert a.release() and b.release()


def test_max_waiters(dflockd_factory, key):
    srv = dflockd_factory("--max-waiters", "1")
    holder = SyncDistributedLock(key, servers=srv.servers)
    assert holder.acquire()
    first = SyncDistributedLock(key, servers=srv.servers)
    try:
        assert first.enqueue() == "queued"
        with pytest.raises(MaxWaitersError):
            SyncDistributedLock(key, acquire_timeout_s=5, servers=srv.servers).acquire()
    finally:
        first.close()
        assert holder.release()


def test_draining_error(server, conns, key):
    holder = SyncDistributedLock(key, servers=server.servers)
    assert holder.acquire()
    idle = conns()
    server.sigterm()
    time.sleep(0.3)
    with pytest.raises(DrainingError):
        _sync.acquire(idle, key + ".new", 0)
    assert holder.release() is True
    assert server.proc.wait(timeout=5) == 0


@pytest.mark.sem
def test_limit_mismatch_typed(server, conns, key):
    c = conns()
    token, _ = _sync.sem_acquire(c, key, 0, 3)
    with pytest.raises(LimitMismatchError):
        _sync.sem_acquire(conns(), key, 0, 2)
    with pytest.raises(LimitMismatchError):
        _sync.sem_enqueue(conns(), key, 5)
    with pytest.raises(LimitMismatchError):
        _sync.acquire(conns(), key, 0)  # a lock is limit 1
    _sync.sem_release(c, key, token)


@pytest.mark.sem
def test_low_level_semaphore_functions(conns, key):
    a, b, c = conns(), conns(), conns()
    t1, lease = _sync.sem_acquire(a, key, 10, 2, 5)
    assert lease == 5
    assert _sync.sem_renew(a, key, t1, 5) in (4, 5)
    status, t2, _ = _sync.sem_enqueue(b, key, 2)
    assert status == "acquired" and t2 != t1
    assert _sync.sem_enqueue(c, key, 2) == ("queued", None, None)
    _sync.sem_release(a, key, t1)
    t3, _ = _sync.sem_wait(c, key, 5)
    assert fence_from_token(t3) > fence_from_token(t2) > fence_from_token(t1)
    _sync.sem_release(b, key, t2)
    _sync.sem_release(c, key, t3)
