"""Acceptance tests through the top-level API that both dflockd-client 1.9.0
and 2.1.1 export (``from dflockd_client import SyncDistributedLock`` ...), as
used in the client's Quick Start and Examples (shared/seeds/000, 001).

Every check that matters is made twice: once through the client under test,
once on the server through a separate raw protocol connection (``RawConn``).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from conftest import CLIENT_MAJOR, HoldMonitor, RawConn, find_entry, wait_until
from dflockd_client import (
    AsyncDistributedLock,
    AsyncDistributedSemaphore,
    SyncDistributedLock,
    SyncDistributedSemaphore,
)

TOKEN_RE = re.compile(r"[0-9a-f]{32}")
DEFAULT_LEASE_S = 33


def fence(token: str) -> int:
    assert TOKEN_RE.fullmatch(token), f"token {token!r} is not 32 lowercase hex"
    return int(token[:16], 16)


def expect_limit_mismatch():
    """2.x raises the typed LimitMismatchError; 1.x a RuntimeError that carries
    the wire status. Both carry ``'error_limit_mismatch'`` in the message."""
    if CLIENT_MAJOR >= 2:
        from dflockd_client import LimitMismatchError

        return pytest.raises(LimitMismatchError, match="error_limit_mismatch")
    return pytest.raises(RuntimeError, match="error_limit_mismatch")


def lock_entry(srv, key):
    c = RawConn(srv.addr)
    try:
        return find_entry(c.stats()["locks"], key)
    finally:
        c.close()


def sem_entry(srv, key):
    c = RawConn(srv.addr)
    try:
        return find_entry(c.stats()["semaphores"], key)
    finally:
        c.close()


def waiters_of(srv, key, kind="locks"):
    c = RawConn(srv.addr)
    try:
        e = find_entry(c.stats()[kind], key)
        return None if e is None else e.get("waiters")
    finally:
        c.close()


def later(delay: float, fn, results: list):
    """Run ``fn`` on a timer thread after ``delay`` s; its return value (or
    exception) is appended to ``results``."""

    def run():
        try:
            results.append(fn())
        except Exception as e:  # surfaced by the test's assertion on results
            results.append(e)

    t = threading.Timer(delay, run)
    t.daemon = True
    t.start()
    return t


# ===========================================================================
# Locks: quick start, manual acquire/release, default lease
# ===========================================================================


def test_sync_lock_context_manager(server, key):
    with SyncDistributedLock(key, acquire_timeout_s=10, servers=server.servers) as lock:
        assert TOKEN_RE.fullmatch(lock.token), lock.token
        assert lock.lease == DEFAULT_LEASE_S
        e = lock_entry(server, key)
        assert e is not None, "stats does not list the held lock"
        assert 0 < e["lease_expires_in_s"] <= DEFAULT_LEASE_S
        assert e["waiters"] == 0
    assert lock.token is None
    assert lock_entry(server, key) is None, "lock still listed after release"


def test_async_lock_context_manager(server, key):
    async def main():
        async with AsyncDistributedLock(
            key, acquire_timeout_s=10, servers=server.servers
        ) as lock:
            assert TOKEN_RE.fullmatch(lock.token), lock.token
            assert lock.lease == DEFAULT_LEASE_S
            e = await asyncio.to_thread(lock_entry, server, key)
            assert e is not None, "stats does not list the held lock"
        assert lock.token is None
        assert await asyncio.to_thread(lock_entry, server, key) is None

    asyncio.run(main())


def test_sync_manual_acquire_release(server, key):
    lock = SyncDistributedLock(key, acquire_timeout_s=10, servers=server.servers)
    assert lock.acquire() is True
    try:
        first = lock.token
        assert TOKEN_RE.fullmatch(first)
        assert lock_entry(server, key) is not None
    finally:
        assert lock.release() is True
    assert lock.token is None
    assert lock_entry(server, key) is None
    assert lock.release() is False  # nothing held any more

    # The same object can acquire again; the new fence is larger.
    assert lock.acquire() is True
    try:
        assert fence(lock.token) > fence(first)
    finally:
        assert lock.release() is True


def test_async_manual_acquire_release(server, key):
    async def main():
        lock = AsyncDistributedLock(key, acquire_timeout_s=10, servers=server.servers)
        assert await lock.acquire() is True
        try:
            first = lock.token
            assert TOKEN_RE.fullmatch(first)
        finally:
            assert await lock.release() is True
        assert lock.token is None
        assert await asyncio.to_thread(lock_entry, server, key) is None
        assert await lock.acquire() is True
        try:
            assert fence(lock.token) > fence(first)
        finally:
            assert await lock.release() is True

    asyncio.run(main())


def test_default_lease_ttl_flag(dflockd_factory, key):
    srv = dflockd_factory("--default-lease-ttl", "3")
    with SyncDistributedLock(key, servers=srv.servers) as lock:
        assert lock.lease == 3
        e = lock_entry(srv, key)
        assert e is not None and 0 < e["lease_expires_in_s"] <= 3
    with SyncDistributedLock(key, lease_ttl_s=7, servers=srv.servers) as lock:
        assert lock.lease == 7


# ===========================================================================
# Locks: auto-renewal across several lease periods
# ===========================================================================

HOLD_S = 5.0
SHORT_LEASE_S = 2


def test_sync_lock_auto_renew_over_several_leases(server, key):
    lock = SyncDistributedLock(
        key, acquire_timeout_s=10, lease_ttl_s=SHORT_LEASE_S, servers=server.servers
    )
    assert lock.acquire() is True
    token = lock.token
    assert lock.lease == SHORT_LEASE_S
    mon = HoldMonitor(server, key)
    mon.start()
    try:
        time.sleep(HOLD_S)  # > 2 lease periods; the renew thread keeps it
    finally:
        mon.stop()
    assert lock.token == token, "client dropped its token (a renew failed)"
    assert 1 <= lock.lease <= SHORT_LEASE_S
    assert lock.release() is True, "release after renewals was refused"
    mon.check(min_polls=int(HOLD_S / 0.1 / 2))
    assert lock_entry(server, key) is None


def test_async_lock_auto_renew_over_several_leases(server, key):
    async def main():
        async with AsyncDistributedLock(
            key, acquire_timeout_s=10, lease_ttl_s=SHORT_LEASE_S, servers=server.servers
        ) as lock:
            token = lock.token
            assert lock.lease == SHORT_LEASE_S
            mon = HoldMonitor(server, key)
            mon.start()
            try:
                await asyncio.sleep(HOLD_S)
            finally:
                await asyncio.to_thread(mon.stop)
            assert lock.token == token, "client dropped its token (a renew failed)"
            assert await lock.release() is True, "release after renewals was refused"
        mon.check(min_polls=int(HOLD_S / 0.1 / 2))

    asyncio.run(main())


# ===========================================================================
# Locks: FIFO (seed 000 "FIFO lock ordering", 0.2 s holds, staggered arrival)
# ===========================================================================

N_WORKERS = 9
STAGGER_S = 0.05
LOCK_HOLD_S = 0.2


def test_fifo_async_9_workers(server, key):
    order: list[int] = []
    tokens: dict[int, str] = {}
    overlap: list[str] = []
    active = 0

    async def worker(worker_id: int, t0: float):
        nonlocal active
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, t0 + worker_id * STAGGER_S - loop.time()))
        async with AsyncDistributedLock(
            key, acquire_timeout_s=12, servers=server.servers
        ) as lock:
            active += 1
            if active != 1:
                overlap.append(f"worker {worker_id} acquired with {active - 1} other holder(s)")
            order.append(worker_id)
            tokens[worker_id] = lock.token
            await asyncio.sleep(LOCK_HOLD_S)
            active -= 1

    async def main():
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(*(worker(i, t0) for i in range(N_WORKERS)))

    asyncio.run(main())
    assert not overlap, overlap
    assert order == list(range(N_WORKERS)), f"grant order {order} is not arrival order"
    fences = [fence(tokens[i]) for i in order]
    assert fences == sorted(fences) and len(set(fences)) == N_WORKERS, fences


def test_fifo_threads_9_workers(server, key):
    order: list[int] = []
    tokens: dict[int, str] = {}
    errors: list[str] = []
    mu = threading.Lock()
    active = 0

    def worker(worker_id: int):
        nonlocal active
        try:
            with SyncDistributedLock(
                key, acquire_timeout_s=30, servers=server.servers
            ) as lock:
                with mu:
                    active += 1
                    if active != 1:
                        errors.append(f"worker {worker_id} overlapped ({active} holders)")
                    order.append(worker_id)
                    tokens[worker_id] = lock.token
                time.sleep(LOCK_HOLD_S)
                with mu:
                    active -= 1
        except Exception as e:
            errors.append(f"worker {worker_id}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_WORKERS)]
    t0 = time.monotonic()
    for i, t in enumerate(threads):
        time.sleep(max(0.0, t0 + i * STAGGER_S - time.monotonic()))
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert not errors, errors
    assert order == list(range(N_WORKERS)), f"grant order {order} is not arrival order"
    fences = [fence(tokens[i]) for i in order]
    assert fences == sorted(fences) and len(set(fences)) == N_WORKERS, fences


# ===========================================================================
# Locks: two-phase enqueue / wait
# ===========================================================================


def test_sync_two_phase_fast_path(server, key):
    lock = SyncDistributedLock(
        key, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
    )
    status = lock.enqueue()
    assert status == "acquired"
    assert TOKEN_RE.fullmatch(lock.token)
    assert lock.lease == 20
    t = time.monotonic()
    assert lock.wait(timeout_s=10) is True
    assert time.monotonic() - t < 0.5
    try:
        assert lock_entry(server, key) is not None
    finally:
        assert lock.release() is True
    assert lock_entry(server, key) is None


def test_sync_two_phase_queued_path(server, raw_factory, key):
    holder = raw_factory(server)
    held = holder.lock(key)
    lock = SyncDistributedLock(
        key, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
    )
    assert lock.enqueue() == "queued"
    assert lock.token is None
    assert waiters_of(server, key) == 1
    released: list = []
    releaser = later(0.5, lambda: holder.cmd("r", key, held), released)
    t = time.monotonic()
    assert lock.wait(timeout_s=10) is True
    elapsed = time.monotonic() - t
    releaser.join(timeout=5)  # the grant may reach us before the ok reaches it
    try:
        assert released == ["ok"], f"holder's release answered {released}"
        assert 0.3 < elapsed < 3, f"wait returned after {elapsed:.2f}s"
        assert fence(lock.token) > fence(held)
        assert lock.lease == 20
        e = lock_entry(server, key)
        assert e is not None and e["waiters"] == 0
        # the holder's token is dead now
        assert holder.cmd("r", key, held) == "error"
    finally:
        assert lock.release() is True


def test_sync_two_phase_grant_before_wait(server, raw_factory, key):
    """A grant made between enqueue and wait is handed over by wait."""
    holder = raw_factory(server)
    held = holder.lock(key)
    lock = SyncDistributedLock(
        key, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
    )
    assert lock.enqueue() == "queued"
    assert holder.cmd("r", key, held) == "ok"
    time.sleep(0.3)
    t = time.monotonic()
    assert lock.wait(timeout_s=10) is True
    try:
        assert time.monotonic() - t < 0.5
        assert fence(lock.token) > fence(held)
        assert lock_entry(server, key) is not None
    finally:
        assert lock.release() is True


def test_sync_two_phase_wait_timeout(server, raw_factory, key):
    holder = raw_factory(server)
    holder.lock(key)
    lock = SyncDistributedLock(key, acquire_timeout_s=10, servers=server.servers)
    assert lock.enqueue() == "queued"
    t = time.monotonic()
    assert lock.wait(timeout_s=1) is False
    elapsed = time.monotonic() - t
    assert 0.8 < elapsed < 3, f"wait(timeout_s=1) took {elapsed:.2f}s"
    assert lock.token is None
    assert wait_until(lambda: waiters_of(server, key) == 0, what="waiter removed")


def test_async_two_phase_fast_and_queued(server, raw_factory, key):
    async def main():
        # fast path
        lock = AsyncDistributedLock(
            key, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
        )
        assert await lock.enqueue() == "acquired"
        first = lock.token
        assert TOKEN_RE.fullmatch(first)
        assert await lock.wait(timeout_s=10) is True
        # queued path: a second client queues behind the first
        second = AsyncDistributedLock(
            key, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
        )
        assert await second.enqueue() == "queued"
        assert second.token is None
        assert await asyncio.to_thread(waiters_of, server, key) == 1
        waiter = asyncio.create_task(second.wait(timeout_s=10))
        await asyncio.sleep(0.5)
        assert not waiter.done(), "wait returned while the lock was held"
        assert await lock.release() is True
        assert await asyncio.wait_for(waiter, 5) is True
        try:
            assert fence(second.token) > fence(first)
        finally:
            assert await second.release() is True
        # wait timeout on the queued path
        holder = raw_factory(server)
        await asyncio.to_thread(holder.lock, key)
        third = AsyncDistributedLock(key, acquire_timeout_s=10, servers=server.servers)
        assert await third.enqueue() == "queued"
        t = time.monotonic()
        assert await third.wait(timeout_s=1) is False
        assert 0.8 < time.monotonic() - t < 3

    asyncio.run(main())


# ===========================================================================
# Locks: acquire timeout
# ===========================================================================


def test_sync_acquire_timeout_returns_false(server, raw_factory, key):
    holder = raw_factory(server)
    holder.lock(key)
    lock = SyncDistributedLock(key, acquire_timeout_s=1, servers=server.servers)
    t = time.monotonic()
    assert lock.acquire() is False
    elapsed = time.monotonic() - t
    assert 0.8 < elapsed < 3, f"acquire_timeout_s=1 took {elapsed:.2f}s"
    assert lock.token is None
    # try-once
    t = time.monotonic()
    assert SyncDistributedLock(key, acquire_timeout_s=0, servers=server.servers).acquire() is False
    assert time.monotonic() - t < 0.5
    # context manager: TimeoutError, as documented
    with pytest.raises(TimeoutError):
        with SyncDistributedLock(key, acquire_timeout_s=1, servers=server.servers):
            pytest.fail("entered the critical section of a held lock")
    assert wait_until(lambda: waiters_of(server, key) == 0, what="waiters gone")


def test_async_acquire_timeout_returns_false(server, raw_factory, key):
    holder = raw_factory(server)
    holder.lock(key)

    async def main():
        lock = AsyncDistributedLock(key, acquire_timeout_s=1, servers=server.servers)
        t = time.monotonic()
        assert await lock.acquire() is False
        assert 0.8 < time.monotonic() - t < 3
        assert lock.token is None
        with pytest.raises(TimeoutError):
            async with AsyncDistributedLock(
                key, acquire_timeout_s=1, servers=server.servers
            ):
                pytest.fail("entered the critical section of a held lock")

    asyncio.run(main())


# ===========================================================================
# Locks: hand-over on disconnect and on lease expiry
# ===========================================================================


def _acquire_in_thread(lock, out: dict):
    def run():
        t = time.monotonic()
        try:
            out["ok"] = lock.acquire()
        except Exception as e:
            out["ok"] = e
        out["at"] = time.monotonic()
        out["took"] = out["at"] - t

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_holder_disconnect_passes_lock_to_waiting_client(server, key):
    holder = RawConn(server.addr)
    held = holder.lock(key)
    lock = SyncDistributedLock(key, acquire_timeout_s=10, servers=server.servers)
    out: dict = {}
    th = _acquire_in_thread(lock, out)
    wait_until(lambda: waiters_of(server, key) == 1, what="client queued")
    closed_at = time.monotonic()
    holder.close()
    th.join(timeout=15)
    try:
        assert out.get("ok") is True, out
        assert out["at"] - closed_at < 1.0, (
            f"grant came {out['at'] - closed_at:.2f}s after the holder disconnected"
        )
        assert fence(lock.token) > fence(held)
    finally:
        assert lock.release() is True


def test_expired_lease_passes_lock_to_waiting_client(server, raw_factory, key):
    holder = raw_factory(server)
    granted_at = time.monotonic()
    held = holder.lock(key, lease_s=1)  # never renewed
    lock = SyncDistributedLock(key, acquire_timeout_s=10, servers=server.servers)
    out: dict = {}
    th = _acquire_in_thread(lock, out)
    th.join(timeout=15)
    try:
        assert out.get("ok") is True, out
        since_grant = out["at"] - granted_at
        assert 0.8 < since_grant < 1.5, (
            f"lock with a 1 s lease was handed over {since_grant:.2f}s after its grant"
        )
        assert holder.cmd("n", key, held) == "error"
        assert holder.cmd("r", key, held) == "error"
    finally:
        assert lock.release() is True


def test_no_auto_release_on_disconnect_waits_for_lease(dflockd_factory, key):
    srv = dflockd_factory("--no-auto-release-on-disconnect")
    holder = RawConn(srv.addr)
    holder.lock(key, lease_s=2)
    closed_at = time.monotonic()
    holder.close()
    lock = SyncDistributedLock(key, acquire_timeout_s=10, servers=srv.servers)
    assert lock.acquire() is True
    try:
        waited = time.monotonic() - closed_at
        assert 1.5 < waited < 3.5, f"granted {waited:.2f}s after holder left (lease 2 s)"
    finally:
        assert lock.release() is True


# ===========================================================================
# Multi-server sharding (seed 000)
# ===========================================================================


def test_sharding_routes_by_strategy(dflockd_factory, key):
    a = dflockd_factory()
    b = dflockd_factory()
    servers = a.servers + b.servers
    with SyncDistributedLock(
        key, servers=servers, sharding_strategy=lambda k, n: 1
    ) as lock:
        assert lock.token
        assert lock_entry(b, key) is not None
        assert lock_entry(a, key) is None
    import zlib

    expect = [a, b][zlib.crc32(key.encode()) % 2]
    other = b if expect is a else a
    with SyncDistributedLock(key, servers=servers):
        assert lock_entry(expect, key) is not None
        assert lock_entry(other, key) is None


# ===========================================================================
# Semaphores
# ===========================================================================

SEM_LIMIT = 3
SEM_HOLD_S = 0.3


@pytest.mark.sem
def test_sync_semaphore_context_manager(server, key):
    with SyncDistributedSemaphore(
        key, limit=SEM_LIMIT, acquire_timeout_s=10, servers=server.servers
    ) as sem:
        assert TOKEN_RE.fullmatch(sem.token)
        assert sem.lease == DEFAULT_LEASE_S
        e = sem_entry(server, key)
        assert e is not None, "stats does not list the semaphore"
        assert e["limit"] == SEM_LIMIT and e["holders"] == 1 and e["waiters"] == 0
    assert sem.token is None
    e = sem_entry(server, key)
    assert e is None or e["holders"] == 0, e


@pytest.mark.sem
def test_async_semaphore_context_manager(server, key):
    async def main():
        async with AsyncDistributedSemaphore(
            key, limit=SEM_LIMIT, acquire_timeout_s=10, servers=server.servers
        ) as sem:
            assert TOKEN_RE.fullmatch(sem.token)
            e = await asyncio.to_thread(sem_entry, server, key)
            assert e is not None and e["limit"] == SEM_LIMIT and e["holders"] == 1

    asyncio.run(main())


@pytest.mark.sem
def test_semaphore_threads_9_workers_limit_3(server, key):
    tokens: dict[int, str] = {}
    errors: list[str] = []
    mu = threading.Lock()
    active = 0
    max_active = 0

    def worker(worker_id: int):
        nonlocal active, max_active
        try:
            with SyncDistributedSemaphore(
                key, limit=SEM_LIMIT, acquire_timeout_s=30, servers=server.servers
            ) as sem:
                with mu:
                    active += 1
                    max_active = max(max_active, active)
                    if active > SEM_LIMIT:
                        errors.append(f"worker {worker_id}: {active} concurrent holders")
                    tokens[worker_id] = sem.token
                time.sleep(SEM_HOLD_S)
                with mu:
                    active -= 1
        except Exception as e:
            errors.append(f"worker {worker_id}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_WORKERS)]
    t0 = time.monotonic()
    for i, t in enumerate(threads):
        time.sleep(max(0.0, t0 + i * STAGGER_S - time.monotonic()))
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert not errors, errors
    assert max_active == SEM_LIMIT, f"max concurrency {max_active}, want {SEM_LIMIT}"
    assert len(set(tokens.values())) == N_WORKERS
    # Grants freed at the same moment wake their threads in any order, so
    # the server's grant order is read from the tokens' fencing counters.
    granted = sorted(range(N_WORKERS), key=lambda w: int(tokens[w][:16], 16))
    assert granted == list(range(N_WORKERS)), f"grant order {granted} is not arrival order"


@pytest.mark.sem
def test_semaphore_async_9_workers_limit_3(server, key):
    tokens: dict[int, str] = {}
    errors: list[str] = []
    active = 0
    max_active = 0

    async def worker(worker_id: int, t0: float):
        nonlocal active, max_active
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, t0 + worker_id * STAGGER_S - loop.time()))
        async with AsyncDistributedSemaphore(
            key, limit=SEM_LIMIT, acquire_timeout_s=30, servers=server.servers
        ) as sem:
            active += 1
            max_active = max(max_active, active)
            if active > SEM_LIMIT:
                errors.append(f"worker {worker_id}: {active} concurrent holders")
            tokens[worker_id] = sem.token
            await asyncio.sleep(SEM_HOLD_S)
            active -= 1

    async def main():
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(*(worker(i, t0) for i in range(N_WORKERS)))

    asyncio.run(main())
    assert not errors, errors
    assert max_active == SEM_LIMIT, f"max concurrency {max_active}, want {SEM_LIMIT}"
    # Read the server's grant order from the tokens' fencing counters.
    granted = sorted(range(N_WORKERS), key=lambda w: int(tokens[w][:16], 16))
    assert granted == list(range(N_WORKERS)), f"grant order {granted} is not arrival order"


@pytest.mark.sem
def test_sync_semaphore_two_phase(server, raw_factory, key):
    # fast path: a free slot
    sem = SyncDistributedSemaphore(
        key, limit=SEM_LIMIT, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
    )
    assert sem.enqueue() == "acquired"
    assert sem.wait(timeout_s=10) is True
    assert TOKEN_RE.fullmatch(sem.token) and sem.lease == 20
    assert sem.release() is True
    # queued path: all three slots taken by raw holders
    holders = [raw_factory(server) for _ in range(SEM_LIMIT)]
    held = [h.sem_lock(key, SEM_LIMIT) for h in holders]
    sem = SyncDistributedSemaphore(
        key, limit=SEM_LIMIT, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
    )
    assert sem.enqueue() == "queued"
    e = sem_entry(server, key)
    assert e is not None and e["holders"] == SEM_LIMIT and e["waiters"] == 1, e
    released: list = []
    releaser = later(0.5, lambda: holders[1].cmd("sr", key, held[1]), released)
    t = time.monotonic()
    assert sem.wait(timeout_s=10) is True
    elapsed = time.monotonic() - t
    releaser.join(timeout=5)
    try:
        assert released == ["ok"], released
        assert 0.3 < elapsed < 3, f"sem wait returned after {elapsed:.2f}s"
        assert fence(sem.token) > max(fence(x) for x in held)
        e = sem_entry(server, key)
        assert e["holders"] == SEM_LIMIT and e["waiters"] == 0, e
    finally:
        assert sem.release() is True


@pytest.mark.sem
def test_async_semaphore_two_phase(server, raw_factory, key):
    async def main():
        sem = AsyncDistributedSemaphore(
            key, limit=2, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
        )
        assert await sem.enqueue() == "acquired"
        assert await sem.wait(timeout_s=10) is True
        other = AsyncDistributedSemaphore(
            key, limit=2, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
        )
        assert await other.enqueue() == "acquired"
        third = AsyncDistributedSemaphore(
            key, limit=2, acquire_timeout_s=10, lease_ttl_s=20, servers=server.servers
        )
        assert await third.enqueue() == "queued"
        waiter = asyncio.create_task(third.wait(timeout_s=10))
        await asyncio.sleep(0.5)
        assert not waiter.done(), "sem wait returned while both slots were held"
        assert await other.release() is True
        assert await asyncio.wait_for(waiter, 5) is True
        assert TOKEN_RE.fullmatch(third.token)
        e = await asyncio.to_thread(sem_entry, server, key)
        assert e["holders"] == 2 and e["waiters"] == 0, e
        assert await third.release() is True
        assert await sem.release() is True
        # wait timeout on a full semaphore
        holders = [raw_factory(server) for _ in range(2)]
        for h in holders:
            await asyncio.to_thread(h.sem_lock, key, 2)
        fourth = AsyncDistributedSemaphore(key, limit=2, servers=server.servers)
        assert await fourth.enqueue() == "queued"
        t = time.monotonic()
        assert await fourth.wait(timeout_s=1) is False
        assert 0.8 < time.monotonic() - t < 3

    asyncio.run(main())


@pytest.mark.sem
def test_sync_semaphore_auto_renew_over_several_leases(server, raw_factory, key):
    # limit 2: the client holds one slot, a raw connection the other, so a
    # try-acquire from a third connection must time out all along.
    raw_factory(server).sem_lock(key, 2)
    sem = SyncDistributedSemaphore(
        key, limit=2, acquire_timeout_s=10, lease_ttl_s=SHORT_LEASE_S, servers=server.servers
    )
    assert sem.acquire() is True
    token = sem.token
    mon = HoldMonitor(server, key, kind="sem", limit=2, expect_holders=2)
    mon.start()
    try:
        time.sleep(HOLD_S)
    finally:
        mon.stop()
    assert sem.token == token, "client dropped its token (a renew failed)"
    assert sem.release() is True, "release after renewals was refused"
    mon.check(min_polls=int(HOLD_S / 0.1 / 2))


@pytest.mark.sem
def test_async_semaphore_auto_renew_over_several_leases(server, raw_factory, key):
    raw_factory(server).sem_lock(key, 2)

    async def main():
        async with AsyncDistributedSemaphore(
            key, limit=2, acquire_timeout_s=10, lease_ttl_s=SHORT_LEASE_S,
            servers=server.servers,
        ) as sem:
            token = sem.token
            mon = HoldMonitor(server, key, kind="sem", limit=2, expect_holders=2)
            mon.start()
            try:
                await asyncio.sleep(HOLD_S)
            finally:
                await asyncio.to_thread(mon.stop)
            assert sem.token == token, "client dropped its token (a renew failed)"
            assert await sem.release() is True
        mon.check(min_polls=int(HOLD_S / 0.1 / 2))

    asyncio.run(main())


@pytest.mark.sem
def test_semaphore_acquire_timeout(server, raw_factory, key):
    for _ in range(2):
        raw_factory(server).sem_lock(key, 2)
    sem = SyncDistributedSemaphore(key, limit=2, acquire_timeout_s=1, servers=server.servers)
    t = time.monotonic()
    assert sem.acquire() is False
    assert 0.8 < time.monotonic() - t < 3
    with pytest.raises(TimeoutError):
        with SyncDistributedSemaphore(key, limit=2, acquire_timeout_s=0, servers=server.servers):
            pytest.fail("entered a full semaphore")


# ----- limit mismatch and lock/semaphore sharing one namespace -------------


@pytest.mark.sem
def test_semaphore_limit_mismatch(server, key):
    with SyncDistributedSemaphore(key, limit=3, servers=server.servers):
        other = SyncDistributedSemaphore(
            key, limit=2, acquire_timeout_s=1, servers=server.servers
        )
        with expect_limit_mismatch():
            other.acquire()
        with expect_limit_mismatch():
            SyncDistributedSemaphore(key, limit=4, servers=server.servers).enqueue()
        e = sem_entry(server, key)
        assert e["limit"] == 3 and e["holders"] == 1, e


@pytest.mark.sem
def test_async_semaphore_limit_mismatch(server, key):
    async def main():
        async with AsyncDistributedSemaphore(key, limit=3, servers=server.servers):
            with expect_limit_mismatch():
                await AsyncDistributedSemaphore(
                    key, limit=2, acquire_timeout_s=1, servers=server.servers
                ).acquire()

    asyncio.run(main())


@pytest.mark.sem
def test_lock_then_semaphore_limit_2_mismatch(server, key):
    with SyncDistributedLock(key, servers=server.servers):
        with expect_limit_mismatch():
            SyncDistributedSemaphore(
                key, limit=2, acquire_timeout_s=1, servers=server.servers
            ).acquire()
        with expect_limit_mismatch():
            SyncDistributedSemaphore(key, limit=2, servers=server.servers).enqueue()
        assert lock_entry(server, key) is not None


@pytest.mark.sem
def test_semaphore_limit_2_then_lock_mismatch(server, key):
    with SyncDistributedSemaphore(key, limit=2, servers=server.servers):
        with expect_limit_mismatch():
            SyncDistributedLock(key, acquire_timeout_s=1, servers=server.servers).acquire()
        with expect_limit_mismatch():
            SyncDistributedLock(key, servers=server.servers).enqueue()


@pytest.mark.sem
def test_async_lock_semaphore_mismatch_both_ways(server, dflockd_factory, key):
    async def main():
        async with AsyncDistributedLock(key + ".a", servers=server.servers):
            with expect_limit_mismatch():
                await AsyncDistributedSemaphore(
                    key + ".a", limit=2, acquire_timeout_s=1, servers=server.servers
                ).acquire()
        async with AsyncDistributedSemaphore(key + ".b", limit=2, servers=server.servers):
            with expect_limit_mismatch():
                await AsyncDistributedLock(
                    key + ".b", acquire_timeout_s=1, servers=server.servers
                ).acquire()

    asyncio.run(main())


@pytest.mark.sem
def test_semaphore_limit_1_is_the_lock(server, key):
    """'A Semaphore with limit=1 is exactly equivalent to a Lock': it queues
    behind a lock holder and is granted when the lock is released."""
    lock = SyncDistributedLock(key, servers=server.servers)
    assert lock.acquire() is True
    sem = SyncDistributedSemaphore(key, limit=1, acquire_timeout_s=1, servers=server.servers)
    assert sem.acquire() is False  # held by the lock: server-side timeout
    sem = SyncDistributedSemaphore(key, limit=1, acquire_timeout_s=10, servers=server.servers)
    out: dict = {}
    th = _acquire_in_thread(sem, out)
    wait_until(lambda: waiters_of(server, key) == 1, what="semaphore queued behind lock")
    assert lock.release() is True
    th.join(timeout=15)
    try:
        assert out.get("ok") is True, out
        # and now a Lock queues behind the limit-1 semaphore holder
        assert SyncDistributedLock(key, acquire_timeout_s=0, servers=server.servers).acquire() is False
    finally:
        assert sem.release() is True


# ===========================================================================
# Authentication (seed 000 "Authentication")
# ===========================================================================


@pytest.mark.auth
def test_auth_token(dflockd_factory, key):
    srv = dflockd_factory("--auth-token", "s3cret-token")
    with SyncDistributedLock(key, auth_token="s3cret-token", servers=srv.servers) as lock:
        assert TOKEN_RE.fullmatch(lock.token)
    with pytest.raises(PermissionError):
        SyncDistributedLock(key, auth_token="wrong", servers=srv.servers).acquire()

    async def main():
        async with AsyncDistributedLock(
            key, auth_token="s3cret-token", servers=srv.servers
        ) as lock:
            assert TOKEN_RE.fullmatch(lock.token)
        with pytest.raises(PermissionError):
            await AsyncDistributedLock(key, auth_token="wrong", servers=srv.servers).acquire()

    asyncio.run(main())
    # A client that sends no auth gets error_auth on its first command.
    with pytest.raises(RuntimeError, match="error_auth"):
        SyncDistributedLock(key, servers=srv.servers).acquire()


@pytest.mark.auth
@pytest.mark.sem
def test_auth_token_semaphore(dflockd_factory, key):
    srv = dflockd_factory("--auth-token", "s3cret-token")
    with SyncDistributedSemaphore(
        key, limit=2, auth_token="s3cret-token", servers=srv.servers
    ) as sem:
        assert TOKEN_RE.fullmatch(sem.token)
    with pytest.raises(PermissionError):
        SyncDistributedSemaphore(key, limit=2, auth_token="nope", servers=srv.servers).acquire()


# ===========================================================================
# Graceful shutdown (SIGTERM) as seen by a client holding a lock
# ===========================================================================


def test_sigterm_drains_lets_holder_release_then_exits(server, key):
    holder = SyncDistributedLock(key, servers=server.servers)
    assert holder.acquire() is True
    other = RawConn(server.addr)  # an idle connection opened before shutdown
    assert other.cmd("ping", "_", "") == "ok"
    server.sigterm()
    time.sleep(0.3)
    assert server.proc.poll() is None, "server exited while a lock was still held"
    assert other.cmd("l", key + ".new", "0") == "error_draining"
    assert holder.release() is True, "holder could not release while draining"
    try:
        rc = server.proc.wait(timeout=5)
    except Exception:
        pytest.fail("server did not exit within 5 s after the last lock was released")
    assert rc == 0, f"exit code {rc} after a graceful shutdown"
    other.close()
