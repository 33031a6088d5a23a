"""dflockd-client 1.x: the module paths and module-level functions used in
shared/seeds/000 (``dflockd_client.client`` / ``dflockd_client.sync_client``):
``stats``, the low-level protocol functions, and ``SignalConn``.

(The lock and semaphore classes are the same objects as the top-level names,
checked below, so ``test_client_common.py`` covers the seed examples that use
them.)
"""

from __future__ import annotations

import asyncio
import queue
import socket
import time

import dflockd_client
import pytest
from conftest import find_entry
from dflockd_client import client as aclient
from dflockd_client import sync_client

TOKEN_LEN = 32


def test_seed_module_paths_are_the_top_level_classes():
    assert aclient.DistributedLock is dflockd_client.AsyncDistributedLock
    assert aclient.DistributedSemaphore is dflockd_client.AsyncDistributedSemaphore
    assert sync_client.DistributedLock is dflockd_client.SyncDistributedLock
    assert sync_client.DistributedSemaphore is dflockd_client.SyncDistributedSemaphore


# ---------------------------------------------------------------------------
# Server stats (seed 000 "Server stats")
# ---------------------------------------------------------------------------


def test_stats_sync_seed(server, key):
    with sync_client.DistributedLock(key, servers=server.servers) as lock:
        sock = socket.create_connection(server.addr)
        rfile = sock.makefile("r", encoding="utf-8")
        result = sync_client.stats(sock, rfile)
        rfile.close()
        sock.close()
        assert result["connections"] >= 2
        e = find_entry(result["locks"], key)
        assert e is not None, result
        assert set(e) >= {"key", "owner_conn_id", "lease_expires_in_s", "waiters"}
        assert e["waiters"] == 0
        assert isinstance(result["semaphores"], list)
        assert isinstance(result["idle_locks"], list)
        assert isinstance(result["idle_semaphores"], list)
        assert lock.token


def test_stats_async_seed(server, key):
    async def main():
        async with aclient.DistributedLock(key, servers=server.servers):
            reader, writer = await asyncio.open_connection(*server.addr)
            result = await aclient.stats(reader, writer)
            writer.close()
            await writer.wait_closed()
            assert result["connections"] >= 2
            assert find_entry(result["locks"], key) is not None, result
        # after release the key is idle, no longer held
        reader, writer = await asyncio.open_connection(*server.addr)
        result = await aclient.stats(reader, writer)
        writer.close()
        await writer.wait_closed()
        assert find_entry(result["locks"], key) is None, result

    asyncio.run(main())


@pytest.mark.sem
def test_stats_lists_semaphore(server, key):
    with sync_client.DistributedSemaphore(key, limit=3, servers=server.servers):
        sock = socket.create_connection(server.addr)
        rfile = sock.makefile("r", encoding="utf-8")
        try:
            result = sync_client.stats(sock, rfile)
        finally:
            rfile.close()
            sock.close()
        e = find_entry(result["semaphores"], key)
        assert e is not None, result
        assert e["limit"] == 3 and e["holders"] == 1 and e["waiters"] == 0, e


# ---------------------------------------------------------------------------
# Low-level protocol functions (sock, rfile)
# ---------------------------------------------------------------------------


def _open(server):
    sock = socket.create_connection(server.addr, timeout=15)
    return sock, sock.makefile("r", encoding="utf-8")


def test_low_level_lock_functions(server, key):
    sock, rfile = _open(server)
    sock2, rfile2 = _open(server)
    try:
        token, lease = sync_client.acquire(sock, rfile, key, 10, 5)
        assert len(token) == TOKEN_LEN and lease == 5
        remaining = sync_client.renew(sock, rfile, key, token, 7)
        assert remaining in (6, 7), remaining
        with pytest.raises(TimeoutError):
            sync_client.acquire(sock2, rfile2, key, 0)
        assert sync_client.enqueue(sock2, rfile2, key, 9) == ("queued", None, None)
        sync_client.release(sock, rfile, key, token)
        token2, lease2 = sync_client.wait(sock2, rfile2, key, 5)
        assert lease2 == 9 and token2 != token
        with pytest.raises(RuntimeError, match="'error'"):
            sync_client.release(sock, rfile, key, token)  # not the holder any more
        sync_client.release(sock2, rfile2, key, token2)
    finally:
        for f in (rfile, rfile2, sock, sock2):
            f.close()


@pytest.mark.sem
def test_low_level_semaphore_functions(server, key):
    sock, rfile = _open(server)
    sock2, rfile2 = _open(server)
    try:
        t1, lease = sync_client.sem_acquire(sock, rfile, key, 10, 2, 5)
        assert lease == 5
        assert sync_client.sem_renew(sock, rfile, key, t1, 5) in (4, 5)
        status, t2, _ = sync_client.sem_enqueue(sock2, rfile2, key, 2)
        assert status == "acquired" and t2 and t2 != t1
        sock3, rfile3 = _open(server)
        try:
            with pytest.raises(RuntimeError, match="error_limit_mismatch"):
                sync_client.sem_acquire(sock3, rfile3, key, 0, 3)
        finally:
            rfile3.close()
            sock3.close()
        sync_client.sem_release(sock, rfile, key, t1)
        sync_client.sem_release(sock2, rfile2, key, t2)
    finally:
        for f in (rfile, rfile2, sock, sock2):
            f.close()


# ---------------------------------------------------------------------------
# Signals (seed 000 "Signals — pub/sub messaging", "Signal queue groups")
# ---------------------------------------------------------------------------


@pytest.mark.sig
def test_signals_sync_seed(server):
    with sync_client.SignalConn(server=server.addr) as listener:
        listener.listen("events.>")
        with sync_client.SignalConn(server=server.addr) as emitter:
            n = emitter.emit("events.user.login", "alice")
            assert n == 1
        for sig in listener:
            assert (sig.channel, sig.payload) == ("events.user.login", "alice")
            break


@pytest.mark.sig
def test_signals_async_seed(server):
    async def main():
        async with aclient.SignalConn(server=server.addr) as listener:
            await listener.listen("events.>")
            async with aclient.SignalConn(server=server.addr) as emitter:
                n = await emitter.emit("events.user.login", "alice smith")
                assert n == 1

            async def first():
                async for sig in listener:
                    return sig

            sig = await asyncio.wait_for(first(), 5)
            assert (sig.channel, sig.payload) == ("events.user.login", "alice smith")

    asyncio.run(main())


@pytest.mark.sig
def test_signal_patterns_and_unlisten(server):
    with sync_client.SignalConn(server=server.addr) as star, sync_client.SignalConn(
        server=server.addr
    ) as emitter:
        star.listen("a.*.c")
        assert emitter.emit("a.b.c", "1") == 1
        assert emitter.emit("a.b.x.c", "2") == 0  # * is exactly one token
        assert emitter.emit("a.c", "3") == 0
        assert star.signals.get(timeout=5) == ("a.b.c", "1")
        star.unlisten("a.*.c")
        assert emitter.emit("a.b.c", "4") == 0
        with pytest.raises(queue.Empty):
            star.signals.get(timeout=0.3)
        with pytest.raises(RuntimeError, match="listen failed"):
            star.listen("a*.b")  # wildcard mixed into a token


@pytest.mark.sig
def test_signal_queue_groups_round_robin(server):
    workers = [sync_client.SignalConn(server=server.addr) for _ in range(3)]
    plain = sync_client.SignalConn(server=server.addr)
    emitter = sync_client.SignalConn(server=server.addr)
    try:
        for w in workers:
            w.connect()
            w.listen("jobs.>", group="workers")
        plain.connect()
        plain.listen("jobs.*")
        emitter.connect()
        for i in range(6):
            # one delivery inside the group + one to the plain subscriber
            assert emitter.emit(f"jobs.j{i}", f"payload {i}") == 2
        got = []
        for w in workers:
            mine = []
            deadline = time.monotonic() + 5
            while len(mine) < 2 and time.monotonic() < deadline:
                try:
                    mine.append(w.signals.get(timeout=0.2))
                except queue.Empty:
                    pass
            with pytest.raises(queue.Empty):
                w.signals.get(timeout=0.2)
            assert len(mine) == 2, f"round-robin: a member got {mine}"
            got += mine
        assert sorted(s.channel for s in got) == [f"jobs.j{i}" for i in range(6)]
        plain_got = [plain.signals.get(timeout=5) for _ in range(6)]
        assert [s.payload for s in plain_got] == [f"payload {i}" for i in range(6)]
    finally:
        for c in (*workers, plain, emitter):
            c.close()


@pytest.mark.sig
def test_signal_heartbeat_keeps_an_idle_listener_alive(dflockd_factory):
    # The read timeout closes idle connections after 2 s; the client's
    # `ping _ <empty>` heartbeat every 0.5 s keeps a quiet listener open.
    srv = dflockd_factory("--read-timeout", "2")
    with sync_client.SignalConn(server=srv.addr, heartbeat_interval_s=0.5) as listener, \
            sync_client.SignalConn(server=srv.addr, heartbeat_interval_s=0.5) as emitter:
        listener.listen("quiet.>")
        time.sleep(4.5)
        assert emitter.emit("quiet.after", "still here") == 1
        assert listener.signals.get(timeout=5) == ("quiet.after", "still here")

    async def main():
        async with aclient.SignalConn(server=srv.addr, heartbeat_interval_s=0.5) as listener:
            await listener.listen("aquiet.*")
            await asyncio.sleep(4.5)
            async with aclient.SignalConn(server=srv.addr) as emitter:
                assert await emitter.emit("aquiet.x", "alive") == 1

            async def first():
                async for sig in listener:
                    return sig

            sig = await asyncio.wait_for(first(), 5)
            assert (sig.channel, sig.payload) == ("aquiet.x", "alive")

    asyncio.run(main())
    # Without a heartbeat the same idle listener is closed by the server.
    with sync_client.SignalConn(server=srv.addr, heartbeat_interval_s=0) as silent:
        silent.listen("gone.>")
        time.sleep(3)
        with sync_client.SignalConn(server=srv.addr, heartbeat_interval_s=0) as emitter:
            assert emitter.emit("gone.x", "nobody") == 0
