"""Cluster mode under a real network partition, driven through the published
``dflockd-client`` (``SyncDistributedLock``; 1.9.0 and 2.1.1) and observed
through raw ``stats``.

Topology (built once for the module, torn down at its end, even on failure;
the module is skipped when this host does not let us create a network
namespace or a bridge):

* two bridges in the root namespace: a *peer* bridge (no address in the
  root namespace) and a *client* bridge holding 10.89.2.254/24;
* three namespaces ``dfp<pid>n<i>``, each with ``lo`` up, a veth on the peer
  bridge (10.89.1.<i>/24) and a veth on the client bridge (10.89.2.<i>/24);
* node ``i`` runs in namespace ``i`` with ``--host 10.89.2.<i> --port 7000``
  and ``--peers 1=10.89.1.1:7100,2=10.89.1.2:7100,3=10.89.1.3:7100``
  (``--heartbeat-interval 50 --election-timeout 500``: ET = 0.5 s). Clients
  in the root namespace reach node ``i`` at 10.89.2.<i>:7000.

*Cutting node k off* sets the root-side end of node k's peer veth down: the
node loses its peers but its clients still reach it over the client bridge.
*Healing* sets it up again. Every test gets three fresh nodes (new data
dirs) in the module's namespaces.

Covered (contract: ../shared/CLUSTER.md, "What clients see"):

1. A follower is cut off while its client holds a lock (30 s lease, so only
   the cut matters) and a client of the other follower waits for that lock.
   The cut-off node grants nothing (a try-lock through it waits and then
   fails: ``error_unavailable`` or a closed connection); it closes the
   holder's connection about 3 x ET after the cut; the majority grants the
   waiter about 6 x ET after the cut, strictly after that close; the new
   fence is above the old holder's.
2. The same with the leader cut off: the majority elects a new leader among
   themselves, the old leader closes its clients about 3 x ET after the cut,
   the majority grants the waiter only after about 6 x ET.
3. Heal (the cut node a follower, and the leader; and a follower cut for
   6.5 s, as a partition longer than the node-loss margin): while cut, the
   majority keeps granting; after the link comes back the cut node rejoins
   (same leader, term and applied index on all three within 5 s, and the
   same replicated state), and a lock taken through it works.

Each test prints its measured timings (relative to the cut).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    DflockdCluster,
    RawConn,
    cluster_view,
    server_binary,
)
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
CLIENT_PORT = 7000
PEER_PORT = 7100
PEER_NET = "10.89.1"
CLIENT_NET = "10.89.2"
ROOT_CLIENT_ADDR = f"{CLIENT_NET}.254/24"
NODES = (1, 2, 3)

# "About 3 x ET after the cut": not before an ordinary election could have
# finished (2 x ET), and no later than 3 x ET plus scheduling slack.
CLOSE_MIN_S = 2 * ET
CLOSE_MAX_S = 3 * ET + 0.5
# "About 6 x ET": the leader may have heard from the node up to one
# heartbeat before the cut; a new leader (leader cut off) counts from its
# election, which takes up to 2 x ET more.
GRANT_MIN_S = 6 * ET - HB_MS / 1000.0
GRANT_MAX_S = 6 * ET + 2 * ET + 1.0
REJOIN_MAX_S = 5.0
# A cut longer than an election plus the node-loss margin, as a real
# partition would be.
LONG_CUT_S = 6.5
LONG_LEASE_S = 30

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def client_socket(lock):
    """The socket of a connected ``SyncDistributedLock`` (2.x keeps it in a
    ``SyncConn``, 1.x on the lock itself)."""
    conn = getattr(lock, "_conn", None)
    sock = getattr(conn, "_sock", None) if conn is not None else getattr(lock, "_sock", None)
    assert sock is not None, f"no connected socket on {lock!r}"
    return sock


class EofWatch(threading.Thread):
    """Records when the server closes a client's connection, without touching
    the client: polls a duplicate of the socket's descriptor for the peer's
    FIN (POLLRDHUP) or a reset (POLLHUP/POLLERR). Data arriving instead is
    recorded once as unexpected."""

    def __init__(self, sock):
        super().__init__(name="eof-watch", daemon=True)
        self.fd = os.dup(sock.fileno())
        self.closed_at: float | None = None
        self.how = ""
        self.unexpected: list[str] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        p = select.poll()
        mask = select.POLLIN | select.POLLRDHUP
        p.register(self.fd, mask)
        try:
            while not self._stop_evt.is_set():
                for _, ev in p.poll(10):
                    now = time.monotonic()
                    if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                        self.closed_at = now
                        self.how = "reset" if ev & (select.POLLHUP | select.POLLERR) else "eof"
                        return
                    if ev & select.POLLIN:
                        self.unexpected.append(f"data readable at {now:.3f}")
                        mask = select.POLLRDHUP
                        p.modify(self.fd, mask)
        finally:
            os.close(self.fd)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=2)


class StatsSampler(threading.Thread):
    """Polls ``stats`` of every node (a fresh connection each time) every
    ``interval`` s and keeps ``(t, node, cluster, owner node of key,
    waiters)`` for the timing report."""

    def __init__(self, cl: "NetnsCluster", key: str, interval: float = 0.05):
        super().__init__(name="stats-sampler", daemon=True)
        self.cl, self.key, self.interval = cl, key, interval
        cl.threads.append(self)  # stopped at teardown whatever happens
        self.samples: list[tuple[float, int, dict | None, int | None, int | None, str]] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            for i in self.cl.ids:
                t = time.monotonic()
                try:
                    c = RawConn(self.cl.node(i).addr, timeout=0.5)
                    try:
                        st = c.stats()
                    finally:
                        c.close()
                    e = held(st, self.key)
                    self.samples.append(
                        (t, i, st["cluster"], node_of(e["owner_conn_id"]) if e else None,
                         e["waiters"] if e else None, "")
                    )
                except Exception as ex:  # recorded, not fatal
                    self.samples.append((t, i, None, None, None, repr(ex)))
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        if self.is_alive():
            self.join(timeout=5)

    def first(self, node: int, pred, after: float) -> float | None:
        for t, i, c, owner, waiters, err in self.samples:
            if i == node and t >= after and c is not None and pred(c, owner, waiters):
                return t
        return None

    def timeline(self, node: int, t_ref: float) -> str:
        """The node's distinct (leader, term, role, owner) states over time."""
        out, last = [], None
        for t, i, c, owner, waiters, err in self.samples:
            if i != node:
                continue
            if c is None:
                state = cur = f"error {err}"
            else:
                state = (c["leader_id"], c["term"], c["role"], owner, waiters)
                cur = (
                    f"leader={c['leader_id']} term={c['term']} role={c['role']} "
                    f"applied={c['applied_index']} owner={owner} waiters={waiters}"
                )
            if state != last:
                out.append(f"{t - t_ref:+.3f}s {cur}")
                last = state
        return "\n    ".join(out)


# ---------------------------------------------------------------------------
# The network: bridges, namespaces, veths
# ---------------------------------------------------------------------------


class IpError(RuntimeError):
    pass


def ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise IpError(f"ip {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


class Topology:
    """Names are unique per pytest process (``dfp<pid>...``, <= 15 chars)."""

    def __init__(self):
        pid = os.getpid()
        self.prefix = f"dfp{pid}"
        self.peer_br = f"{self.prefix}bp"
        self.client_br = f"{self.prefix}bc"
        assert len(self.peer_br) <= 15, self.peer_br
        self.created_ns: list[str] = []
        self.created_links: list[str] = []

    def ns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def peer_veth(self, i: int) -> str:
        """Root-namespace end of node i's peer veth (the cut switch)."""
        return f"{self.prefix}p{i}"

    def client_veth(self, i: int) -> str:
        return f"{self.prefix}c{i}"

    def build(self) -> None:
        # Refuse to collide with another run (or leftovers) using our subnets.
        for net in (PEER_NET, CLIENT_NET):
            used = ip("-o", "addr", "show", "to", f"{net}.0/24").strip()
            routes = ip("route", "show", f"{net}.0/24").strip()
            if used or routes:
                pytest.skip(
                    f"{net}.0/24 is already in use in the root namespace "
                    f"(another partition run, or leftovers): {used or routes}"
                )
        try:
            for br in (self.peer_br, self.client_br):
                ip("link", "add", br, "type", "bridge")
                self.created_links.append(br)
            for i in NODES:
                ip("netns", "add", self.ns(i))
                self.created_ns.append(self.ns(i))
        except IpError as e:
            self.destroy()
            pytest.skip(f"cannot create a bridge or a network namespace here: {e}")
        try:
            ip("addr", "add", ROOT_CLIENT_ADDR, "dev", self.client_br)
            for br in (self.peer_br, self.client_br):
                ip("link", "set", br, "up")
            for i in NODES:
                ns = self.ns(i)
                ip("-n", ns, "link", "set", "lo", "up")
                for root_end, ns_end, br, addr in (
                    (self.peer_veth(i), "peer0", self.peer_br, f"{PEER_NET}.{i}/24"),
                    (self.client_veth(i), "cli0", self.client_br, f"{CLIENT_NET}.{i}/24"),
                ):
                    ip("link", "add", root_end, "type", "veth", "peer", "name", ns_end,
                       "netns", ns)
                    self.created_links.append(root_end)
                    ip("link", "set", root_end, "master", br, "up")
                    ip("-n", ns, "addr", "add", addr, "dev", ns_end)
                    ip("-n", ns, "link", "set", ns_end, "up")
        except BaseException:
            self.destroy()
            raise

    def cut(self, i: int) -> float:
        """Cuts node i off its peers; returns the moment the command returned."""
        ip("link", "set", self.peer_veth(i), "down")
        return time.monotonic()

    def heal(self, i: int) -> float:
        ip("link", "set", self.peer_veth(i), "up")
        return time.monotonic()

    def heal_all(self) -> None:
        for i in NODES:
            try:
                self.heal(i)
            except IpError:
                pass

    @staticmethod
    def root_links() -> set[str]:
        out = ip("-o", "link", "show").splitlines()
        return {ln.split(":")[1].strip().split("@")[0] for ln in out if ln.count(":") >= 2}

    def destroy(self) -> list[str]:
        """Deletes the namespaces (which takes their veths, asynchronously),
        then whatever of our links is left; returns the problems seen."""
        problems = []
        for ns in self.created_ns:
            try:
                ip("netns", "del", ns)
            except IpError as e:
                problems.append(str(e))
        self.created_ns.clear()
        for link in reversed(self.created_links):
            try:
                ip("link", "del", link)
            except IpError as e:
                if "Cannot find device" not in str(e):
                    problems.append(str(e))
        deadline = time.monotonic() + 5
        while True:
            left = sorted(self.root_links() & set(self.created_links))
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if left:
            problems.append(f"links still present: {left}")
        self.created_links.clear()
        return problems


@pytest.fixture(scope="module")
def topology():
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and bridges")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip`")
    topo = Topology()
    topo.build()
    try:
        yield topo
    finally:
        problems = topo.destroy()
        left = [n for n in ip("netns", "list").split() if n.startswith(topo.prefix)]
        assert not problems and not left, f"topology teardown: {problems}; left: {left}"


class NetnsCluster(DflockdCluster):
    """Three nodes, node i inside namespace i, client address
    10.89.2.<i>:7000, peer address 10.89.1.<i>:7100."""

    def __init__(self, binary: Path, root: Path, topo: Topology):
        super().__init__(binary, root, len(NODES), HB_MS, ET_MS)
        self.topo = topo
        self.threads: list[threading.Thread] = []  # observers, stopped first
        self.stats_retries: list[str] = []
        self.peers = ",".join(f"{i}={PEER_NET}.{i}:{PEER_PORT}" for i in self.ids)

    def data_dir(self, i: int) -> Path:
        return self.root / f"n{i}"

    def stats(self, i: int, timeout: float = 5.0) -> dict:
        """``stats`` on a fresh connection, tried again (3 attempts) when the
        node closes it unanswered: a node that rejoins after a cut closes
        every client connection of its lost incarnation, including an
        observer's that arrived during the cut."""
        for attempt in range(3):
            try:
                return super().stats(i, timeout=timeout)
            except (ConnectionError, EOFError) as e:
                self.stats_retries.append(f"node {i}: {e!r}")
                if attempt == 2:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def args(self, i: int) -> list[str]:
        return [
            "ip", "netns", "exec", self.topo.ns(i),
            str(self.binary),
            "--host", f"{CLIENT_NET}.{i}",
            "--port", str(CLIENT_PORT),
            "--node-id", str(i),
            "--peers", self.peers,
            "--data-dir", str(self.data_dir(i)),
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
        ]


@pytest.fixture
def pcluster(topology, request):
    """Three fresh nodes in the module's namespaces, every link up. At
    teardown the links are healed, the nodes SIGKILLed, the data dirs
    removed; every node's stderr is printed when the test failed."""
    binary = server_binary()
    if not binary.exists():
        pytest.fail(f"dflockd binary not found: {binary} (set DFLOCKD_BIN)")
    topology.heal_all()
    root = Path(tempfile.mkdtemp(prefix="dflockd-partition-"))
    cl = NetnsCluster(binary, root, topology)
    try:
        cl.start()
        for i in cl.ids:
            assert cl.node(i).addr == (f"{CLIENT_NET}.{i}", CLIENT_PORT), cl.node(i).addr
        yield cl
    finally:
        for th in cl.threads:
            th.stop()
        topology.heal_all()
        problems = cl.close()
        failed = any(
            getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
            for when in ("setup", "call")
        )
        if problems or failed or os.environ.get("DFP_PRINT_LOGS"):
            print(cl.logs())
        shutil.rmtree(root, ignore_errors=True)
        if problems:
            pytest.fail("; ".join(problems))


@pytest.fixture
def locks():
    """Client lock objects created through ``make`` are closed at teardown."""
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


@pytest.fixture
def key(request) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    return f"k.{name}.{os.getpid()}"


LOG_EXCERPT_RE = r"leader|lost|contact|clos|unavail|join|declar|term|panick"


def log_excerpt(cl: NetnsCluster, pattern: str = LOG_EXCERPT_RE) -> str:
    """The servers' lines about leadership, contact and closing."""
    out = []
    for i, srv in cl.history:
        lines = [ln for ln in srv.log().splitlines() if re.search(pattern, ln, re.I)]
        out.append(f"  node {i}: " + ("\n    ".join(lines[-15:]) or "(nothing)"))
    return "\n".join(out)


# ---------------------------------------------------------------------------
# 1 and 2: a holder on the cut-off node, a waiter on the majority side
# ---------------------------------------------------------------------------


def run_cut_with_holder(cl: NetnsCluster, locks, key: str, k: int, w: int, label: str) -> dict:
    """Node ``k`` is cut off while its client holds ``key`` and a client of
    node ``w`` (majority side) waits for it. Returns the measurements."""
    majority = others(cl.ids, k)
    K, W = cl.node(k), cl.node(w)
    cl_role_was_leader = cl.stats(k)["cluster"]["role"] == "leader"

    holder = locks(key, acquire_timeout_s=5, lease_ttl_s=LONG_LEASE_S, servers=K.servers)
    assert holder.acquire() is True
    f_old = fence(holder.token)
    waiter = locks(key, acquire_timeout_s=30, lease_ttl_s=LONG_LEASE_S, servers=W.servers)
    wth, wout = acquire_in_thread(waiter)
    cl.wait_converged(until=lambda st: (held(st, key) or {}).get("waiters") == 1)
    time.sleep(0.2)
    assert wth.is_alive() and "ok" not in wout, f"waiter returned before the cut: {wout}"

    watch = EofWatch(client_socket(holder))
    watch.start()
    sampler = StatsSampler(cl, key)
    sampler.start()
    time.sleep(0.1)

    t_before = time.monotonic()
    t_cut = cl.topo.cut(k)
    try:
        # A try-lock of a free key through the cut-off node.
        trylock = locks(f"{key}.try", acquire_timeout_s=0, servers=K.servers)
        tth, tout = acquire_in_thread(trylock)
        new_leader = cl.wait_leader(ids=majority, exclude=(k,), timeout=4 * ET + 2)
        t_leader = time.monotonic()
        tth.join(timeout=max(0.1, t_cut + CLOSE_MAX_S + 3 - time.monotonic()))
        watch.join(timeout=max(0.1, t_cut + CLOSE_MAX_S + 3 - time.monotonic()))
        wth.join(timeout=max(0.1, t_cut + GRANT_MAX_S + 3 - time.monotonic()))
    finally:
        watch.stop()
        time.sleep(0.3)  # a few samples after the grant
        sampler.stop()

    m = {
        "k": k, "w": w, "new_leader": new_leader, "cut_cmd_s": t_cut - t_before,
        "leader_seen_s": t_leader - t_cut,
        "try": (tout.get("ok"), tout["at"] - t_cut if "at" in tout else None),
        "closed_s": watch.closed_at - t_cut if watch.closed_at is not None else None,
        "closed_how": watch.how,
        "granted_s": wout["at"] - t_cut if "at" in wout else None,
        "grant_seen_by_majority_s": None,
        "k_lost_leader_s": None,
    }
    t_owner = sampler.first(w, lambda c, owner, _: owner == w, t_cut)
    m["grant_seen_by_majority_s"] = t_owner - t_cut if t_owner else None
    # When the cut node stopped reporting a leader (or, the leader, its role).
    if cl_role_was_leader:
        t_k0 = sampler.first(k, lambda c, *_: c["role"] != "leader", t_cut)
    else:
        t_k0 = sampler.first(k, lambda c, *_: c["leader_id"] == 0, t_cut)
    m["k_lost_leader_s"] = t_k0 - t_cut if t_k0 else None

    def fmt(x):
        return "never" if x is None else f"{x:.3f}s"

    print(
        f"\n[{label}] node {k} cut off (ip link down took {m['cut_cmd_s'] * 1000:.1f} ms); "
        f"majority leader {new_leader} agreed by {fmt(m['leader_seen_s'])}\n"
        f"[{label}] try-lock through node {k}: {tout.get('ok')!r} at {fmt(m['try'][1])}\n"
        f"[{label}] holder's connection on node {k} closed ({watch.how or '-'}) at "
        f"{fmt(m['closed_s'])}; node {k} stopped reporting a leader at {fmt(m['k_lost_leader_s'])}\n"
        f"[{label}] majority shows node {w}'s waiter as owner at "
        f"{fmt(m['grant_seen_by_majority_s'])}; waiter's acquire returned "
        f"{wout.get('ok')!r} at {fmt(m['granted_s'])}\n"
        f"[{label}] (3 x ET = {3 * ET:.1f}s, 6 x ET = {6 * ET:.1f}s)\n"
        f"[{label}] node {k} timeline:\n    {sampler.timeline(k, t_cut)}\n"
        f"[{label}] node {w} timeline:\n    {sampler.timeline(w, t_cut)}"
    )
    print(f"[{label}] server log excerpts:\n{log_excerpt(cl)}")

    # --- the cut-off node granted nothing ---------------------------------
    assert "at" in tout, f"try-lock through cut-off node {k} still blocked"
    assert tout["ok"] is not True, f"cut-off node {k} granted a try-lock of a free key"
    assert isinstance(tout["ok"], BaseException) and is_unavailable(tout["ok"]), (
        f"try-lock through cut-off node {k}: {tout['ok']!r} (want error_unavailable "
        f"or a closed connection)"
    )
    assert CLOSE_MIN_S <= m["try"][1] <= CLOSE_MAX_S, (
        f"try-lock through cut-off node {k} failed {m['try'][1]:.3f}s after the cut "
        f"(want {CLOSE_MIN_S}..{CLOSE_MAX_S}s: it must wait, then ~3 x ET)"
    )
    assert not watch.unexpected, f"holder's connection received data: {watch.unexpected}"

    # --- the holder's connection closed at ~3 x ET ------------------------
    assert watch.closed_at is not None, (
        f"cut-off node {k} never closed its holder's connection "
        f"(waited {CLOSE_MAX_S + 3:.1f}s after the cut)"
    )
    assert CLOSE_MIN_S <= m["closed_s"] <= CLOSE_MAX_S, (
        f"holder's connection closed {m['closed_s']:.3f}s after the cut "
        f"(want about 3 x ET: {CLOSE_MIN_S}..{CLOSE_MAX_S}s)"
    )

    # --- the waiter granted at ~6 x ET, strictly after the close -----------
    assert "at" in wout, f"waiter on node {w} not granted {GRANT_MAX_S + 3:.1f}s after the cut"
    assert wout["ok"] is True, f"waiter on node {w}: {wout['ok']!r}"
    assert watch.closed_at < wout["at"], (
        f"waiter granted at {m['granted_s']:.3f}s, before the holder's connection "
        f"closed at {m['closed_s']:.3f}s: two holders at once"
    )
    if t_owner is not None:
        assert watch.closed_at < t_owner, (
            f"majority showed the waiter as owner at {m['grant_seen_by_majority_s']:.3f}s, "
            f"before the holder's connection closed at {m['closed_s']:.3f}s"
        )
    assert GRANT_MIN_S <= m["granted_s"] <= GRANT_MAX_S, (
        f"waiter granted {m['granted_s']:.3f}s after the cut "
        f"(want about 6 x ET: {GRANT_MIN_S}..{GRANT_MAX_S}s)"
    )
    f_new = fence(waiter.token)
    assert f_new > f_old, f"new grant's fence {f_new:#x} not above the old holder's {f_old:#x}"
    m["fences"] = (f_old, f_new)

    # The old holder's client finds its connection gone.
    assert holder.release() is False, "release through the closed connection succeeded"

    # --- heal: the cut node rejoins, nothing of its closed clients is held --
    t_heal = cl.topo.heal(k)
    sts = cl.wait_converged(
        timeout=REJOIN_MAX_S,
        until=lambda st: (
            (e := held(st, key)) is not None
            and node_of(e["owner_conn_id"]) == w
            and e["waiters"] == 0
            and held(st, f"{key}.try") is None
        ),
    )
    m["rejoined_s"] = time.monotonic() - t_heal
    print(f"[{label}] healed: all three converged {m['rejoined_s']:.3f}s after the heal "
          f"(leader {sts[k]['cluster']['leader_id']}, term {sts[k]['cluster']['term']}); "
          f"stats connections closed unanswered: {cl.stats_retries or 'none'}")
    assert waiter.release() is True
    return m


def test_cut_off_follower_closes_holder_before_majority_grants(pcluster, locks, key):
    cl = pcluster
    leader = cl.wait_leader()
    k, w = others(cl.ids, leader)
    m = run_cut_with_holder(cl, locks, key, k=k, w=w, label="follower cut")
    assert m["new_leader"] == leader, (
        f"cutting follower {k} changed the majority's leader {leader} -> {m['new_leader']}"
    )


def test_cut_off_leader_closes_holder_before_majority_grants(pcluster, locks, key):
    cl = pcluster
    leader = cl.wait_leader()
    w = others(cl.ids, leader)[0]
    m = run_cut_with_holder(cl, locks, key, k=leader, w=w, label="leader cut")
    assert m["new_leader"] != leader and m["new_leader"] in others(cl.ids, leader), m


# ---------------------------------------------------------------------------
# 3. Heal: the cut-off node rejoins and serves again
# ---------------------------------------------------------------------------


def peer_sockets(cl: NetnsCluster, i: int) -> str:
    """``ss -tino`` of node i's peer connections (retransmission state)."""
    r = subprocess.run(
        ["ip", "netns", "exec", cl.topo.ns(i), "ss", "-tino", "state", "established",
         f"( sport = :{PEER_PORT} or dport = :{PEER_PORT} )"],
        capture_output=True, text=True, timeout=10,
    )
    return "\n    ".join(ln.strip() for ln in r.stdout.splitlines()[1:])


@pytest.mark.parametrize(
    "cut_role, min_cut_s",
    [("follower", 0.0), ("leader", 0.0), ("follower", LONG_CUT_S)],
    ids=["follower", "leader", f"follower-cut-{LONG_CUT_S}s"],
)
def test_healed_node_rejoins_and_serves(pcluster, locks, key, cut_role, min_cut_s):
    cl = pcluster
    leader = cl.wait_leader()
    k = leader if cut_role == "leader" else others(cl.ids, leader)[0]
    majority = others(cl.ids, k)
    K = cl.node(k)
    before = cl.wait_converged()[k]["cluster"]
    fences = []

    on_k = locks(f"{key}.k", acquire_timeout_s=5, lease_ttl_s=LONG_LEASE_S, servers=K.servers)
    assert on_k.acquire() is True
    fences.append(fence(on_k.token))
    cl.wait_converged()

    sampler = StatsSampler(cl, f"{key}.k")
    sampler.start()
    t_cut = cl.topo.cut(k)
    try:
        new_leader = cl.wait_leader(ids=majority, exclude=(k,), timeout=4 * ET + 2)
        # The majority keeps working: grants, releases, and a lock it keeps.
        for i in range(4):
            lk = locks(f"{key}.cyc", acquire_timeout_s=5, servers=cl.node(majority[i % 2]).servers)
            assert lk.acquire() is True, f"lock cycle {i} on the majority side"
            fences.append(fence(lk.token))
            assert lk.release() is True
        during = locks(f"{key}.during", acquire_timeout_s=5, lease_ttl_s=LONG_LEASE_S,
                       servers=cl.node(majority[0]).servers)
        assert during.acquire() is True
        fences.append(fence(during.token))
        # Stay cut until the majority has declared the node lost (its
        # holding released), so the node misses that too.
        cl.wait_converged(ids=majority, timeout=GRANT_MAX_S + 2,
                          until=lambda st: held(st, f"{key}.k") is None)
        t_lost = time.monotonic() - t_cut
        mid = {i: cl.stats(i)["cluster"] for i in cl.ids}
        time.sleep(max(0.0, t_cut + min_cut_s - time.monotonic()))
    finally:
        t_heal = cl.topo.heal(k)
    cut_for = t_heal - t_cut
    assert mid[k]["applied_index"] < mid[majority[0]]["applied_index"], (
        f"test precondition: the cut node did not fall behind: {mid}"
    )

    # Rejoin: same leader, term and applied index everywhere, same state.
    def rejoined_state(st):
        return held(st, f"{key}.during") is not None and held(st, f"{key}.k") is None

    try:
        sts = cl.wait_converged(timeout=REJOIN_MAX_S, until=rejoined_state)
    except AssertionError as e:
        sockets = {i: peer_sockets(cl, i) for i in (new_leader, k)}
        try:  # when does it rejoin, then?
            cl.wait_converged(timeout=20, until=rejoined_state)
            late = f"all three converged only {time.monotonic() - t_heal:.3f}s after the heal"
        except AssertionError:
            late = f"not converged {time.monotonic() - t_heal:.3f}s after the heal"
        sampler.stop()
        raise AssertionError(
            f"node {k} ({cut_role}, cut {cut_for:.3f}s) did not rejoin within "
            f"{REJOIN_MAX_S}s of the heal; {late}\n{e}\n"
            f"node {k} timeline (relative to the heal):\n    {sampler.timeline(k, t_heal)}\n"
            + "".join(
                f"peer sockets of node {i} {REJOIN_MAX_S}s after the heal:\n    {txt}\n"
                for i, txt in sockets.items()
            )
            + f"server log excerpts:\n{log_excerpt(cl)}"
        ) from None
    rejoined = time.monotonic() - t_heal
    time.sleep(1.0)  # watch the healed node for a while
    sampler.stop()
    # Did the healed node find a leader, lose it again, then find it again?
    t_back = sampler.first(k, lambda c, *_: c["leader_id"] != 0, t_heal)
    t_relapse = t_back and sampler.first(k, lambda c, *_: c["leader_id"] == 0, t_back)
    t_final = t_relapse and sampler.first(k, lambda c, *_: c["leader_id"] != 0, t_relapse)
    relapse = (
        "no relapse" if not t_relapse else
        f"lost it again at +{t_relapse - t_heal:.3f}s, back for good at "
        + (f"+{t_final - t_heal:.3f}s" if t_final else "never")
    )
    cls = {i: s["cluster"] for i, s in sts.items()}
    print(
        f"\n[heal {cut_role}] node {k} cut {cut_for:.3f}s (majority leader {new_leader}, "
        f"node lost after {t_lost:.3f}s); converged {rejoined:.3f}s after the heal\n"
        f"[heal {cut_role}] node {k} first reported a leader "
        + (f"+{t_back - t_heal:.3f}s" if t_back else "never")
        + f" after the heal; {relapse}; stats connections closed unanswered: "
        f"{cl.stats_retries or 'none'}\n"
        f"[heal {cut_role}] cluster objects before the cut: node {k} {before}\n"
        f"[heal {cut_role}] during the cut: {json.dumps(mid)}\n"
        f"[heal {cut_role}] after the heal: {json.dumps(cls)}\n"
        f"[heal {cut_role}] node {k} timeline (relative to the heal):\n    "
        f"{sampler.timeline(k, t_heal)}\n"
        f"[heal {cut_role}] server log excerpts:\n{log_excerpt(cl)}"
    )
    assert len({c["leader_id"] for c in cls.values()}) == 1, cls
    assert len({c["term"] for c in cls.values()}) == 1, cls
    assert len({c["applied_index"] for c in cls.values()}) == 1, cls
    assert cls[k]["leader_id"] in cl.ids and cls[k]["role"] == (
        "leader" if cls[k]["leader_id"] == k else "follower"
    ), cls
    assert cls[k]["applied_index"] >= mid[majority[0]]["applied_index"], (cls, mid)
    assert cluster_view(sts[k]) == cluster_view(sts[majority[0]]), (
        f"node {k}'s state differs after the heal:\n{sts[k]}\n{sts[majority[0]]}"
    )
    e = held(sts[k], f"{key}.during")
    assert node_of(e["owner_conn_id"]) == majority[0], e
    assert on_k.release() is False, "release through the connection the cut node closed"

    # A lock taken through the healed node works and is seen everywhere.
    through = locks(f"{key}.through", acquire_timeout_s=5, lease_ttl_s=LONG_LEASE_S,
                    servers=K.servers)
    t0 = time.monotonic()
    assert through.acquire() is True, f"lock through healed node {k}"
    t_through = time.monotonic() - t0
    f = fence(through.token)
    assert f > max(fences), f"fence {f:#x} through the healed node not above {max(fences):#x}"
    sts = cl.wait_converged(timeout=REJOIN_MAX_S)
    for i, st in sts.items():
        e = held(st, f"{key}.through")
        assert e is not None and node_of(e["owner_conn_id"]) == k, (i, st)
    assert cluster_view(sts[k]) == cluster_view(sts[majority[0]])
    assert through.release() is True
    assert during.release() is True
    sts = cl.wait_converged(timeout=REJOIN_MAX_S)
    assert all(held(st, f"{key}.through") is None for st in sts.values())
    assert len({s["cluster"]["applied_index"] for s in sts.values()}) == 1, sts
    print(f"[heal {cut_role}] lock through node {k} granted in {t_through * 1000:.1f} ms "
          f"(fence {f:#x}); final applied index {sts[k]['cluster']['applied_index']}")
