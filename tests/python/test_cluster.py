"""Cluster mode (``--node-id``/``--peers``/``--data-dir``) with real
processes on loopback, driven through the published ``dflockd-client``
(``SyncDistributedLock``; both 1.9.0 and 2.1.1) and observed through raw
``stats`` on every node. Signals, and the exact ``error_unavailable`` status,
go through raw sockets (the client under test has no signal API in common).

Timings: ``--heartbeat-interval 50 --election-timeout 500`` (ET), so a node
without a leader gives up at 3 x ET = 1.5 s and a leader declares a silent
node lost at 6 x ET = 3 s.

Covered:

1. Formation: three nodes agree on one leader and term; a lock taken through
   one node blocks a waiter on another and a try-once on the third; release
   hands it over; after every step all nodes report the same replicated
   state (compared once their applied indexes are equal).
2. Leader ``kill -9`` while a client of a follower holds a 2 s lease renewed
   by the client's renew thread and two clients of followers wait in a known
   order: every renewal succeeds, the hold is continuously visible, the
   waiters are granted in FIFO order after the release, fences increase
   across the failover. A second 2 s holder, renewed by hand, sends a renewal
   timed so that it is answered after its lease ran out by the wall clock:
   the election's grace keeps it. The pause is measured and printed.
3. The killed leader restarts with its data dir and catches up (its state
   equals the others'). Before that: its client's lock passes to a waiter on
   a survivor no sooner than 6 x ET after the kill (node-loss rule), and a
   request through the restarted node works.
4. A node restarted with a wiped (new, empty) data dir catches up from the
   others, then is one of the two nodes left when the leader is killed: the
   state and the fence counter survive through it.
5. ``kill -9`` of all three nodes during lock/release load from six clients
   (``--no-auto-release-on-disconnect``, so holdings are lease-only across
   the crash): after restarting all three with their data dirs the cluster
   comes back, the first new grant's fence is above every acknowledged fence,
   every node reports the same holdings, every holding is one a client had
   in flight or acknowledged and not released (the lease-only holders that
   were renewing at the crash are all there), no waiter of a dead connection
   is left, and the leases then expire.
6. Signals across nodes: plain listeners on two nodes get a signal published
   on a third (``ok <n>`` counts them, one line per connection even when two
   of its patterns match); a queue group with members on two nodes gets each
   signal exactly once, published from either a member's node or another.
7. ``error_unavailable``: with the two other nodes SIGSTOPped (survivor a
   follower, and a leader), a request on the survivor gets
   ``error_unavailable`` or a closed connection, and its older connections are
   closed, between 2 x ET and 3 x ET + 0.5 s after the other two stopped,
   whatever the survivor's role (contract: 3 x ET); nothing is granted; after
   SIGCONT the cluster converges, the survivor's closed holder's lock is
   released, and requests through the survivor work again.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from conftest import HoldMonitor, wait_until
from cluster_helpers import (
    acquire_in_thread,
    fence,
    held,
    is_unavailable,
    node_of,
    others,
)
from dflockd_client import SyncDistributedLock

HB_MS = 50
ET_MS = 500
ET = ET_MS / 1000.0
# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class RenewLog:
    """Records every renewal the client's renew thread makes (both client
    majors call ``self._proto_renew`` from their renew loop): start, end,
    and the remaining lease or the exception."""

    def __init__(self, lock):
        self.events: list[tuple[float, float, bool, object]] = []
        orig = lock._proto_renew

        def wrapped(*args, **kwargs):
            t0 = time.monotonic()
            try:
                r = orig(*args, **kwargs)
            except BaseException as e:
                self.events.append((t0, time.monotonic(), False, repr(e)))
                raise
            self.events.append((t0, time.monotonic(), True, r))
            return r

        lock._proto_renew = wrapped

    def failures(self):
        return [e for e in self.events if not e[2] or not (isinstance(e[3], int) and e[3] > 0)]

    def timeline(self, t_ref: float) -> str:
        return ", ".join(
            f"[{a - t_ref:+.2f}s..{b - t_ref:+.2f}s {'ok ' + str(r) if ok else r}]"
            for a, b, ok, r in self.events
        )


class LineConn:
    """A raw protocol connection with per-read timeouts: ``readline``
    returns the next line, ``""`` when the server closed the connection,
    ``None`` on timeout (the socket stays usable)."""

    def __init__(self, addr, timeout: float = 5.0):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""

    def send(self, cmd: str, key: str, arg: str) -> None:
        self.sock.sendall(f"{cmd}\n{key}\n{arg}\n".encode())

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except (ConnectionResetError, BrokenPipeError):
                return ""
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().rstrip("\r")

    def cmd(self, cmd: str, key: str, arg: str, timeout: float = 10.0) -> str:
        self.send(cmd, key, arg)
        line = self.readline(timeout)
        assert line, f"{cmd} {key} {arg!r}: {'no answer' if line is None else 'connection closed'}"
        return line

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def line_conns():
    opened: list[LineConn] = []

    def make(srv) -> LineConn:
        c = LineConn(srv.addr)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


@pytest.fixture
def locks():
    """Client lock objects created through ``make`` are closed at teardown
    (a test that fails midway must not leave renew threads behind)."""
    made = []

    def make(*args, **kwargs) -> SyncDistributedLock:
        lk = SyncDistributedLock(*args, **kwargs)
        made.append(lk)
        return lk

    yield make
    for lk in made:
        try:
            lk.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------
# 1. Formation and a hand-off observed on every node
# ---------------------------------------------------------------------------


def test_cluster_forms_and_every_node_sees_the_same_handoff(cluster_factory, locks, key):
    cl = cluster_factory()
    leader = cl.wait_leader()
    sts = cl.wait_converged()
    terms = {s["cluster"]["term"] for s in sts.values()}
    assert len(terms) == 1 and terms.pop() >= 1
    assert [s["cluster"]["node_id"] for s in sts.values()] == cl.ids
    assert sorted(s["cluster"]["role"] for s in sts.values()) == ["follower", "follower", "leader"]
    assert all(s["cluster"]["voters"] == 3 for s in sts.values()), sts
    wait_until(
        lambda: all(s["cluster"]["peers_connected"] == 2 for s in cl.all_stats().values()),
        timeout=5,
        what="every node connected to both peers",
    )

    a, c = others(cl.ids, leader)  # a, c: followers; b: the leader
    b = leader
    A, B, C = cl.node(a), cl.node(b), cl.node(c)

    lock_a = locks(key, acquire_timeout_s=5, lease_ttl_s=30, servers=A.servers)
    assert lock_a.acquire() is True
    fa = fence(lock_a.token)
    sts = cl.wait_converged()
    for i, st in sts.items():
        e = held(st, key)
        assert e is not None, f"node {i} does not list the lock taken through node {a}: {st}"
        assert node_of(e["owner_conn_id"]) == a and e["waiters"] == 0, (i, e)

    lock_b = locks(key, acquire_timeout_s=15, servers=B.servers)
    th, out = acquire_in_thread(lock_b)
    sts = cl.wait_converged(until=lambda st: (held(st, key) or {}).get("waiters") == 1)
    assert node_of(held(sts[c], key)["owner_conn_id"]) == a
    time.sleep(0.3)
    assert th.is_alive() and "ok" not in out, f"waiter on node {b} returned: {out}"

    probe = locks(key, acquire_timeout_s=0, servers=C.servers)
    assert probe.acquire() is False, "try-once on a third node got a held lock"

    released_at = time.monotonic()
    assert lock_a.release() is True
    th.join(timeout=10)
    assert out.get("ok") is True, f"waiter on node {b} after the release: {out}"
    assert out["at"] - released_at < 1.0, f"hand-off took {out['at'] - released_at:.2f}s"
    fb = fence(lock_b.token)
    assert fb > fa, (fa, fb)
    sts = cl.wait_converged()
    for i, st in sts.items():
        e = held(st, key)
        assert e is not None and node_of(e["owner_conn_id"]) == b, (i, st)
        assert e["waiters"] == 0, (i, e)

    assert lock_b.release() is True
    sts = cl.wait_converged()
    for i, st in sts.items():
        assert held(st, key) is None, f"node {i} still lists the released lock: {st}"


# ---------------------------------------------------------------------------
# 2. Leader kill -9: holder keeps renewing, waiters keep their FIFO order
# ---------------------------------------------------------------------------

FAILOVER_LEASE_S = 2
HOLD_AFTER_KILL_S = 4.0  # two lease periods past the kill
# The hand-renewed holder: the leader dies KILL_AT s after a renewal was
# answered, the next renewal is sent RENEW_AT s after it. A new leader
# cannot exist before the kill + ET (followers wait at least ET), so that
# renewal is answered after the 2 s lease has run out by the wall clock:
# only the election's grace (cluster time) keeps the lock.
KILL_AT_S = 1.7
RENEW_AT_S = 1.95


def test_leader_kill_keeps_renewing_holder_and_fifo_waiters(
    cluster_factory, locks, line_conns, key
):
    cl = cluster_factory()
    leader = cl.wait_leader()
    f1, f2 = others(cl.ids, leader)
    F1, F2 = cl.node(f1), cl.node(f2)

    holder = locks(key, acquire_timeout_s=5, lease_ttl_s=FAILOVER_LEASE_S, servers=F1.servers)
    renews = RenewLog(holder)
    assert holder.acquire() is True
    t_grant = time.monotonic()
    token = holder.token
    grants = [("holder", fence(token))]

    w1 = locks(key, acquire_timeout_s=30, servers=F2.servers)
    th1, out1 = acquire_in_thread(w1)
    cl.wait_converged(until=lambda st: (held(st, key) or {}).get("waiters") == 1)
    w2 = locks(key, acquire_timeout_s=30, servers=F1.servers)
    th2, out2 = acquire_in_thread(w2)
    cl.wait_converged(until=lambda st: (held(st, key) or {}).get("waiters") == 2)

    # A second holder, on the other follower, renewed by hand.
    hand_key = f"{key}.hand"
    hand = line_conns(F2)
    resp = hand.cmd("l", hand_key, f"5 {FAILOVER_LEASE_S}")
    assert resp.startswith("ok "), resp
    hand_token = resp.split()[1]
    grants.append(("hand", fence(hand_token)))
    hand_renews: list[tuple[float, float, str]] = []

    def renew_by_hand():
        t0 = time.monotonic()
        r = hand.cmd("n", hand_key, f"{hand_token} {FAILOVER_LEASE_S}")
        hand_renews.append((t0, time.monotonic(), r))
        return r

    mon = HoldMonitor(F2, key, interval=0.1)
    mon.start()
    try:
        assert renew_by_hand().startswith("ok ")
        t_prev = hand_renews[-1][1]
        time.sleep(max(0.0, t_prev + KILL_AT_S - time.monotonic()))
        t_kill = time.monotonic()
        cl.kill(leader)

        # The pause: a request sent through a follower right at the kill,
        # answered once a new leader has committed it.
        probe = locks(f"{key}.probe", acquire_timeout_s=10, servers=F2.servers)
        pth, pout = acquire_in_thread(probe)

        time.sleep(max(0.0, t_prev + RENEW_AT_S - time.monotonic()))
        straddle = renew_by_hand()
        t_straddle = hand_renews[-1][1]

        pth.join(timeout=10)
        assert pout.get("ok") is True, f"probe lock after the leader's death: {pout}"
        pause = pout["at"] - t_kill
        grants.insert(2, ("probe", fence(probe.token)))
        assert probe.release() is True
        new_leader = cl.wait_leader(ids=[f1, f2])
        t_leader = time.monotonic() - t_kill
        print(
            f"\n[failover] leader {leader} killed; node {new_leader} leads "
            f"(seen <= {t_leader:.3f}s after the kill); a request sent through a "
            f"follower at the kill was answered after {pause:.3f}s"
        )
        print(
            f"[failover] hand renewal sent {RENEW_AT_S}s after the previous one was "
            f"answered got {straddle!r} {t_straddle - t_prev:.3f}s after it "
            f"(lease {FAILOVER_LEASE_S}s)"
        )
        while time.monotonic() < t_kill + HOLD_AFTER_KILL_S:
            time.sleep(max(0.0, hand_renews[-1][1] + 1.0 - time.monotonic()))
            renew_by_hand()
    finally:
        mon.stop()

    print(f"[failover] client renewals (relative to the kill): {renews.timeline(t_kill)}")
    hand_tl = ", ".join(f"[{a - t_kill:+.2f}s..{b - t_kill:+.2f}s {r}]" for a, b, r in hand_renews)
    print(f"[failover] hand renewals (relative to the kill): {hand_tl}")
    assert t_straddle - t_prev > FAILOVER_LEASE_S, (
        "test precondition: the straddling renewal was answered within the lease"
    )
    bad = [r for _, _, r in hand_renews if not r.startswith("ok ")]
    assert not bad, f"a hand renewal failed around the failover: {hand_tl}"
    assert not renews.failures(), (
        f"a client renewal failed around the failover: {renews.timeline(t_kill)}"
    )
    after_kill = [e for e in renews.events if e[0] > t_kill]
    assert len(after_kill) >= 2, f"too few renewals after the kill: {renews.timeline(t_kill)}"
    assert holder.token == token, "the client dropped its token"
    assert pause < 3 * ET, f"failover pause {pause:.2f}s reached the 3 x ET no-leader margin"
    mon.check(min_polls=10)

    sts = cl.wait_converged(ids=[f1, f2])
    e = held(sts[f1], key)
    assert e is not None and node_of(e["owner_conn_id"]) == f1 and e["waiters"] == 2, e
    e = held(sts[f1], hand_key)
    assert e is not None and node_of(e["owner_conn_id"]) == f2, e
    assert th1.is_alive() and th2.is_alive(), (out1, out2)
    assert hand.cmd("r", hand_key, hand_token) == "ok"

    released_at = time.monotonic()
    assert holder.release() is True, "release after the failover was refused"
    th1.join(timeout=10)
    assert out1.get("ok") is True, f"first waiter (node {f2}): {out1}"
    assert out1["at"] - released_at < 1.0, f"hand-off took {out1['at'] - released_at:.2f}s"
    grants.append(("w1", fence(w1.token)))
    # FIFO: the second waiter is still queued behind the first
    time.sleep(0.3)
    assert th2.is_alive() and "ok" not in out2, f"second waiter overtook the first: {out2}"
    sts = cl.wait_converged(ids=[f1, f2])
    e = held(sts[f2], key)
    assert e is not None and node_of(e["owner_conn_id"]) == f2 and e["waiters"] == 1, e

    assert w1.release() is True
    th2.join(timeout=10)
    assert out2.get("ok") is True, f"second waiter (node {f1}): {out2}"
    grants.append(("w2", fence(w2.token)))
    assert w2.release() is True

    values = [f for _, f in grants]
    assert all(x < y for x, y in zip(values, values[1:])), f"fences not increasing: {grants}"
    print(f"[failover] lease {FAILOVER_LEASE_S}s held {time.monotonic() - t_grant:.1f}s in all")


# ---------------------------------------------------------------------------
# 3. The killed node restarts with its data dir and catches up
# ---------------------------------------------------------------------------


def test_killed_leader_restarts_with_its_data_dir_and_catches_up(cluster_factory, locks, key):
    cl = cluster_factory()
    leader = cl.wait_leader()
    f1, f2 = others(cl.ids, leader)
    L, F1, F2 = cl.node(leader), cl.node(f1), cl.node(f2)

    on_leader = locks(f"{key}.a", acquire_timeout_s=5, lease_ttl_s=30, servers=L.servers)
    assert on_leader.acquire() is True
    fences = [fence(on_leader.token)]
    waiter = locks(f"{key}.a", acquire_timeout_s=30, lease_ttl_s=30, servers=F1.servers)
    th, out = acquire_in_thread(waiter)
    kept = locks(f"{key}.b", acquire_timeout_s=5, lease_ttl_s=30, servers=F2.servers)
    assert kept.acquire() is True
    fences.append(fence(kept.token))
    cl.wait_converged(until=lambda st: (held(st, f"{key}.a") or {}).get("waiters") == 1)

    t_kill = time.monotonic()
    cl.kill(leader)
    new_leader = cl.wait_leader(ids=[f1, f2])
    # state the dead node misses
    extra = locks(f"{key}.c", acquire_timeout_s=5, lease_ttl_s=30, servers=F2.servers)
    assert extra.acquire() is True
    fences.append(fence(extra.token))
    assert kept.release() is True

    # The dead node's holder: released by the node-loss rule, not before.
    th.join(timeout=15)
    assert out.get("ok") is True, f"waiter for the dead node's lock: {out}"
    handed = out["at"] - t_kill
    print(f"\n[node lost] lock of a client of killed node {leader} granted on node {f1} "
          f"{handed:.3f}s after the kill (6 x ET = {6 * ET:.1f}s; new leader {new_leader})")
    assert handed >= 6 * ET - 0.05, (
        f"the dead node's lock was handed on {handed:.2f}s after the kill, before the "
        f"6 x ET = {6 * ET}s node-loss margin"
    )
    assert handed <= 6 * ET + 2 * ET + 1.0, f"node-loss hand-off took {handed:.2f}s"
    fences.append(fence(waiter.token))

    before = cl.wait_converged(ids=[f1, f2])[f1]
    cl.start(leader)
    sts = cl.wait_converged(timeout=15)
    assert sts[leader]["cluster"]["applied_index"] >= before["cluster"]["applied_index"]
    st = sts[leader]
    e = held(st, f"{key}.a")
    assert e is not None and node_of(e["owner_conn_id"]) == f1, st
    assert held(st, f"{key}.b") is None, st
    assert held(st, f"{key}.c") is not None, st

    through = locks(f"{key}.d", acquire_timeout_s=5, servers=cl.node(leader).servers)
    assert through.acquire() is True, "lock through the restarted node"
    fences.append(fence(through.token))
    sts = cl.wait_converged()
    assert all(node_of(held(s, f"{key}.d")["owner_conn_id"]) == leader for s in sts.values())
    assert through.release() is True
    assert all(x < y for x, y in zip(fences, fences[1:])), fences


# ---------------------------------------------------------------------------
# 4. A node with a wiped data dir catches up from the others
# ---------------------------------------------------------------------------


def test_wiped_node_catches_up_from_the_others(cluster_factory, locks, key):
    cl = cluster_factory()
    leader = cl.wait_leader()
    victim, other = others(cl.ids, leader)
    fences = []

    first = locks(f"{key}.a", acquire_timeout_s=5, lease_ttl_s=30, servers=cl.node(leader).servers)
    assert first.acquire() is True
    fences.append(fence(first.token))
    for i in range(5):
        lk = locks(f"{key}.cyc", acquire_timeout_s=5, servers=cl.node(cl.ids[i % 3]).servers)
        assert lk.acquire() is True
        fences.append(fence(lk.token))
        assert lk.release() is True
    cl.wait_converged()

    cl.kill(victim)
    cl.wipe(victim)
    missed = locks(f"{key}.b", acquire_timeout_s=5, lease_ttl_s=30, servers=cl.node(other).servers)
    assert missed.acquire() is True
    fences.append(fence(missed.token))

    cl.start(victim)
    t0 = time.monotonic()
    sts = cl.wait_converged(timeout=15)
    print(f"\n[wiped] node {victim} caught up {time.monotonic() - t0:.3f}s after its restart")
    st = sts[victim]
    assert held(st, f"{key}.a") is not None and held(st, f"{key}.b") is not None, st
    assert held(st, f"{key}.cyc") is None, st

    # The wiped node now carries the state: kill the leader, so that every
    # commit needs it.
    cl.kill(leader)
    new_leader = cl.wait_leader(ids=[victim, other], timeout=10)
    sts = cl.wait_converged(ids=[victim, other])
    e = held(sts[victim], f"{key}.b")
    assert e is not None and node_of(e["owner_conn_id"]) == other, sts[victim]
    through = locks(f"{key}.c", acquire_timeout_s=5, servers=cl.node(victim).servers)
    assert through.acquire() is True, f"lock through the wiped node (leader {new_leader})"
    f = fence(through.token)
    assert f > max(fences), f"fence {f:#x} after the wipe not above {max(fences):#x}"
    assert missed.release() is True
    assert through.release() is True
    sts = cl.wait_converged(ids=[victim, other])
    assert held(sts[victim], f"{key}.b") is None and held(sts[victim], f"{key}.c") is None


# ---------------------------------------------------------------------------
# 5. kill -9 of every node under load, then a full restart
# ---------------------------------------------------------------------------

LOAD_WORKERS = 6
LOAD_S = 1.5
LOAD_LEASE_S = 3
LEASE_ONLY_S = 4


def test_full_cluster_crash_under_load_and_restart(cluster_factory, locks, key):
    cl = cluster_factory(extra_args=("--no-auto-release-on-disconnect",))
    cl.wait_leader()
    nodes = [cl.node(i) for i in cl.ids]
    load_keys = [f"{key}.load{i}" for i in range(LOAD_WORKERS // 2)]
    lo_keys = [f"{key}.lo{i}" for i in range(2)]

    # Lease-only holders, renewing until the crash.
    lease_only = []
    for i, k in enumerate(lo_keys):
        lk = locks(k, acquire_timeout_s=5, lease_ttl_s=LEASE_ONLY_S, servers=nodes[i].servers)
        assert lk.acquire() is True
        lease_only.append((k, lk.token))

    mu = threading.Lock()
    acked: list[tuple[int, str, str, int]] = []  # (worker, key, token, fence)
    states: list[dict] = []
    stop = threading.Event()
    t_kill_box: list[float] = []

    def worker(w: int):
        k, srv = load_keys[w // 2], nodes[w % 3]
        st = {"worker": w, "key": k, "node": cl.ids[w % 3], "phase": "idle",
              "cycles": 0, "error": None, "error_at": None}
        states.append(st)
        while not stop.is_set():
            lk = SyncDistributedLock(
                k, acquire_timeout_s=10, lease_ttl_s=LOAD_LEASE_S, servers=srv.servers
            )
            st["phase"] = "acquiring"
            try:
                ok = lk.acquire()
            except Exception as e:
                st["error"], st["error_at"] = repr(e), time.monotonic()
                lk.close()
                return
            if not ok:
                st["error"], st["error_at"] = "acquire timed out", time.monotonic()
                lk.close()
                return
            with mu:
                acked.append((w, k, lk.token, fence(lk.token)))
            st["phase"] = "releasing"
            if lk.release():
                st["phase"] = "released"
                st["cycles"] += 1
            else:
                st["error"], st["error_at"] = "release not acknowledged", time.monotonic()
                return

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(LOAD_WORKERS)]
    for t in threads:
        t.start()
    time.sleep(LOAD_S)
    t_kill = time.monotonic()
    t_kill_box.append(t_kill)
    cl.kill(*cl.ids)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    assert not any(t.is_alive() for t in threads), "a load worker hung after the crash"

    early = [s for s in states if s["error_at"] is not None and s["error_at"] < t_kill]
    assert not early, f"load failed before the crash: {early}"
    cycles = sum(s["cycles"] for s in states)
    assert cycles >= LOAD_WORKERS, f"load too light to mean anything: {states}"
    by_worker: dict[int, list[int]] = {}
    for w, _, _, f in acked:
        by_worker.setdefault(w, []).append(f)
    for w, fs in by_worker.items():
        assert all(x < y for x, y in zip(fs, fs[1:])), f"worker {w}'s fences: {fs}"
    max_acked = max(f for *_, f in acked)
    lo_fences = [fence(t) for _, t in lease_only]
    print(f"\n[crash] {len(acked)} acknowledged grants ({cycles} full cycles) before kill -9 "
          f"of all nodes; phases at the crash: "
          f"{[(s['worker'], s['phase']) for s in states]}")

    cl.start()
    t_up = time.monotonic()
    leader = cl.wait_leader(timeout=15)
    print(f"[crash] restarted: leader {leader} after {time.monotonic() - t_up:.3f}s")

    # The first new grant.
    fresh = locks(f"{key}.fresh", acquire_timeout_s=5, servers=cl.node(cl.ids[0]).servers)
    assert fresh.acquire() is True
    ff = fence(fresh.token)
    assert ff > max(max_acked, *lo_fences), (
        f"first grant after the restart has fence {ff:#x}, not above the largest "
        f"acknowledged {max(max_acked, *lo_fences):#x}"
    )
    assert fresh.release() is True

    sts = cl.wait_converged(timeout=10)
    st = sts[cl.ids[0]]
    holding = {e["key"]: e for e in st["locks"]}
    for k in lo_keys:
        e = holding.get(k)
        assert e is not None, f"lease-only holding {k!r} (renewed until the crash) lost: {st}"
        assert 0 < e["lease_expires_in_s"] <= LEASE_ONLY_S, e
    in_flight = {s["key"] for s in states if s["phase"] != "released"}
    for k, e in holding.items():
        assert k in lo_keys or k in load_keys, f"unexpected holding after restart: {e}"
        if k in load_keys:
            assert k in in_flight, (
                f"{k!r} is held after the restart but every operation on it was "
                f"acknowledged as released: {e}; workers: {states}"
            )
            assert 0 < e["lease_expires_in_s"] <= LOAD_LEASE_S, e
        assert e["waiters"] == 0, f"a waiter of a dead connection survived: {e}"
    for sem in st["semaphores"]:
        assert sem["waiters"] == 0, sem

    # Lease-only holdings run out on their leases.
    t_exp = time.monotonic()
    cl.wait_converged(
        timeout=LEASE_ONLY_S + 3,
        until=lambda s: not any(e["key"] in holding for e in s["locks"]),
    )
    print(f"[crash] held after restart: "
          f"{ {k: e['lease_expires_in_s'] for k, e in holding.items()} }; "
          f"all expired {time.monotonic() - t_exp:.2f}s after the check")
    after = locks(load_keys[0], acquire_timeout_s=5, servers=cl.node(cl.ids[1]).servers)
    assert after.acquire() is True
    assert fence(after.token) > ff
    assert after.release() is True


# ---------------------------------------------------------------------------
# 6. Signals across nodes
# ---------------------------------------------------------------------------


def _collect(conns: dict, seconds: float) -> dict:
    """Reads pushed lines from several connections for ``seconds``."""
    got = {name: [] for name in conns}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, c in conns.items():
            line = c.readline(0.02)
            if line == "":
                raise AssertionError(f"listener {name} was disconnected")
            if line is not None:
                got[name].append(line)
    return got


@pytest.mark.sig
def test_signals_cross_nodes_and_queue_group_delivers_once(cluster_factory, line_conns):
    cl = cluster_factory()
    cl.wait_leader()
    n1, n2, n3 = (cl.node(i) for i in cl.ids)
    tag = f"t{os.getpid()}"

    plain1 = line_conns(n1)
    assert plain1.cmd("listen", f"ev.{tag}.*", "") == "ok"
    plain3 = line_conns(n3)
    assert plain3.cmd("listen", f"ev.{tag}.*", "") == "ok"
    assert plain3.cmd("listen", f"ev.{tag}.>", "") == "ok"  # same conn, matched twice
    g1 = line_conns(n1)
    assert g1.cmd("listen", f"job.{tag}.>", "workers") == "ok"
    g3 = line_conns(n3)
    assert g3.cmd("listen", f"job.{tag}.>", "workers") == "ok"

    def subscribed(st):
        chans = {(c["pattern"], c["group"]): c["listeners"] for c in st["signal_channels"]}
        return (
            chans.get((f"ev.{tag}.*", "")) == 2
            and chans.get((f"ev.{tag}.>", "")) == 1
            and chans.get((f"job.{tag}.>", "workers")) == 2
        )

    cl.wait_converged(until=subscribed)

    pub2 = line_conns(n2)
    assert pub2.cmd("signal", f"ev.{tag}.x", "hello from node 2") == "ok 2"
    got = _collect({"plain1": plain1, "plain3": plain3}, 1.0)
    want = f"sig ev.{tag}.x hello from node 2"
    assert got == {"plain1": [want], "plain3": [want]}, got

    pub1 = line_conns(n1)
    payloads = []
    for i in range(12):
        pub = pub2 if i % 2 == 0 else pub1
        payload = f"job {i}"
        payloads.append(payload)
        assert pub.cmd("signal", f"job.{tag}.run", payload) == "ok 1", f"signal {i}"
    got = _collect({"g1": g1, "g3": g3, "plain1": plain1, "plain3": plain3}, 1.5)
    assert got["plain1"] == [] and got["plain3"] == [], got
    received = [line.split(" ", 2)[2] for line in got["g1"] + got["g3"]]
    assert sorted(received) == sorted(payloads), (
        f"queue group spanning nodes {cl.ids[0]} and {cl.ids[2]}: {got}"
    )
    assert got["g1"] and got["g3"], f"round-robin never reached one member: {got}"
    print(f"\n[signals] group split: node {cl.ids[0]} got {len(got['g1'])}, "
          f"node {cl.ids[2]} got {len(got['g3'])}")


# ---------------------------------------------------------------------------
# 7. error_unavailable on a node cut from the majority
# ---------------------------------------------------------------------------


# "about 3 x ET": tick granularity (50 ms heartbeat) and scheduling.
UNAVAILABLE_SLACK_S = 0.5


@pytest.mark.parametrize("survivor_role", ["follower", "leader"])
def test_minority_node_answers_unavailable_and_recovers(
    cluster_factory, locks, line_conns, key, survivor_role
):
    cl = cluster_factory()
    leader = cl.wait_leader()
    s = leader if survivor_role == "leader" else others(cl.ids, leader)[0]
    stopped = others(cl.ids, s)
    S = cl.node(s)

    holder = locks(key, acquire_timeout_s=5, lease_ttl_s=30, servers=S.servers)
    assert holder.acquire() is True
    idle = line_conns(S)
    assert idle.cmd("ping", "_", "_") == "ok"
    cl.wait_converged()
    time.sleep(0.1)

    wait_max = 3 * ET + 3.0
    for i in stopped:
        cl.sigstop(i)
    t_stop = time.monotonic()
    try:
        client = locks(f"{key}.client", acquire_timeout_s=10, servers=S.servers)
        cth, cout = acquire_in_thread(client)
        req = line_conns(S)
        t_req = time.monotonic()
        req.send("l", f"{key}.raw", "10")
        resp = req.readline(wait_max)
        t_resp = time.monotonic() - t_req
        closed = idle.readline(max(0.1, t_stop + wait_max - time.monotonic()))
        t_closed = time.monotonic() - t_stop
        cth.join(timeout=max(0.1, t_stop + wait_max - time.monotonic()))
    finally:
        for i in stopped:
            cl.sigcont(i)
    t_cont = time.monotonic() - t_stop
    t_client = cout["at"] - cout["started"] if "at" in cout else float("nan")
    print(f"\n[unavailable] survivor {s} ({survivor_role}): request answered {resp!r} after "
          f"{t_resp:.3f}s; older idle connection got {closed!r} {t_closed:.3f}s after SIGSTOP; "
          f"client acquire -> {cout.get('ok')!r} after {t_client:.3f}s; "
          f"SIGCONT at {t_cont:.3f}s")

    # What the cut-off node did (timing checked last, after recovery).
    assert resp in ("error_unavailable", ""), (
        f"request on a node cut off from the majority answered {resp!r} "
        f"(None = nothing within {wait_max}s)"
    )
    assert closed == "", f"older connection not closed: read {closed!r}"
    assert "at" in cout, "client acquire on the cut-off node still blocked"
    assert cout["ok"] is not True, "a node cut off from the majority granted a lock"
    assert isinstance(cout["ok"], BaseException) and is_unavailable(cout["ok"]), (
        f"client acquire on the cut-off node: {cout['ok']!r}"
    )

    # Back together: the cluster converges, the survivor's closed holder's
    # lock is released, and requests through the survivor work.
    cl.wait_leader(timeout=10)
    cl.wait_converged(timeout=10, until=lambda st: held(st, key) is None)
    again = locks(f"{key}.again", acquire_timeout_s=5, servers=S.servers)
    assert again.acquire() is True, "lock through the survivor after SIGCONT"
    sts = cl.wait_converged()
    assert all(held(st, f"{key}.again") is not None for st in sts.values())
    assert again.release() is True
    assert holder.release() is False, "release on a connection the survivor closed"

    # Timing: not before an ordinary election could have finished (2 x ET),
    # and about 3 x ET after the survivor lost its majority.
    hi = 3 * ET + UNAVAILABLE_SLACK_S
    late = []
    for what, t in (
        ("the request's error_unavailable", t_resp),
        ("the closing of the older connection", t_closed),
        ("the client's failed acquire", t_client),
    ):
        assert t >= 2 * ET, f"{what} came {t:.2f}s after the cut, under 2 x ET"
        if t > hi:
            late.append(f"{what} came {t:.3f}s after the cut (3 x ET + slack = {hi}s)")
    assert not late, f"survivor was the {survivor_role}: " + "; ".join(late)
