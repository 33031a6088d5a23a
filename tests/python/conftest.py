"""Fixtures for the real-client acceptance suite.

The server under test is the binary named by ``DFLOCKD_BIN`` (default
``$REPO/target/debug/dflockd``). Each test gets its own server(s), started as
``[bin, "--port", "0", *extra_args]``; the bound port is read from the
``listening on 127.0.0.1:PORT`` line the server logs to stderr.

The installed ``dflockd-client`` release decides which version-specific file
is collected: ``test_client_v1.py`` (1.x) or ``test_client_v2.py`` (2.x).
``test_client_common.py`` runs against both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / "target" / "debug" / "dflockd"

CLIENT_VERSION = version("dflockd-client")
CLIENT_MAJOR = int(CLIENT_VERSION.split(".")[0])

_LISTEN_RE = re.compile(r"listening on (\[[^\]]+\]|[0-9.]+|[A-Za-z0-9.-]+):(\d+)")
_STARTUP_TIMEOUT_S = 10.0
_TERM_GRACE_S = 3.0

# Only the file written for the installed client release is collected.
collect_ignore = []
if CLIENT_MAJOR != 1:
    collect_ignore.append("test_client_v1.py")
if CLIENT_MAJOR != 2:
    collect_ignore.append("test_client_v2.py")


def pytest_report_header(config):
    return [
        f"dflockd-client {CLIENT_VERSION}",
        f"dflockd binary: {server_binary()}",
    ]


def server_binary() -> Path:
    return Path(os.environ.get("DFLOCKD_BIN") or DEFAULT_BIN)


# ---------------------------------------------------------------------------
# Server process
# ---------------------------------------------------------------------------


class ServerProcess:
    """One running dflockd. ``addr`` is ``(host, port)``; ``servers`` is the
    ``[(host, port)]`` list the clients' ``servers=`` parameter takes."""

    def __init__(self, args: list[str]):
        self.args = args
        self.host: str = ""
        self.port: int = 0
        self._lines: list[str] = []
        self._lines_lock = threading.Lock()
        self._ready = threading.Event()
        self.expect_exit = False  # set once the test itself signals the server
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        # Keep the server hermetic: no DFLOCKD_* settings leak in from the
        # caller's environment (flags given by the test are the only config).
        env = {k: v for k, v in env.items() if not k.startswith("DFLOCKD_")}
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        # Drain stderr for the whole life of the process so the server can
        # never block on a full pipe, and keep the text for failure reports.
        self._reader = threading.Thread(
            target=self._read_stderr, name="dflockd-stderr", daemon=True
        )
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._lines_lock:
                self._lines.append(line)
            if not self._ready.is_set():
                m = _LISTEN_RE.search(line)
                if m:
                    self.host = m.group(1).strip("[]")
                    self.port = int(m.group(2))
                    self._ready.set()
        self._ready.set()  # EOF: unblock wait_ready (it then sees no port)

    def wait_ready(self, timeout: float = _STARTUP_TIMEOUT_S) -> None:
        if not self._ready.wait(timeout) or not self.port:
            try:
                rc = self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                rc = None
            self.expect_exit = True  # reported here, not again at teardown
            self.stop()
            raise RuntimeError(
                f"dflockd did not log 'listening on HOST:PORT' within {timeout}s "
                f"(exit code {rc}); args={self.args}\n--- stderr ---\n{self.log()}"
            )

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def servers(self) -> list[tuple[str, int]]:
        return [(self.host, self.port)]

    def log(self) -> str:
        with self._lines_lock:
            return "\n".join(self._lines)

    def sigterm(self) -> None:
        """Ask for a graceful shutdown from within a test."""
        self.expect_exit = True
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> dict:
        """SIGTERM, then SIGKILL after 3 s. Returns what happened."""
        info = {"crashed_before_stop": None, "needed_kill": False}
        rc = self.proc.poll()
        if rc is not None:
            if not self.expect_exit:
                info["crashed_before_stop"] = rc
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=_TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                info["needed_kill"] = True
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=2)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return info


@pytest.fixture
def dflockd_factory(request):
    """Factory: ``start(*extra_args) -> ServerProcess``. Every server started
    is stopped at teardown. A server that died on its own during the test or
    that logged a Rust panic makes the test error out."""
    binary = server_binary()
    if not binary.exists():
        pytest.fail(f"dflockd binary not found: {binary} (set DFLOCKD_BIN)")
    started: list[ServerProcess] = []

    def start(*extra_args: str) -> ServerProcess:
        srv = ServerProcess([str(binary), "--port", "0", *map(str, extra_args)])
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start

    problems = []
    for srv in started:
        info = srv.stop()
        if info["crashed_before_stop"] is not None:
            problems.append(
                f"server {srv.args} exited by itself with code "
                f"{info['crashed_before_stop']} during the test"
            )
        if "panicked" in srv.log():
            problems.append(f"server {srv.args} panicked")
        if info["needed_kill"]:
            warnings.warn(
                f"dflockd {srv.args[1:]} did not exit within {_TERM_GRACE_S}s "
                "of SIGTERM (killed)",
                stacklevel=1,
            )
        failed = getattr(request.node, "rep_call", None)
        if problems or (failed is not None and failed.failed):
            print(f"--- dflockd stderr ({srv.args[1:]}) ---\n{srv.log()}")
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def server(dflockd_factory) -> ServerProcess:
    """A server with default settings."""
    return dflockd_factory()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


# ---------------------------------------------------------------------------
# Raw protocol connection (independent of the client under test)
# ---------------------------------------------------------------------------


class RawConn:
    """A plain socket speaking the wire protocol, used to set up and to
    observe server state without going through the client under test."""

    def __init__(self, addr: tuple[str, int], timeout: float = 15.0):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def cmd(self, command: str, key: str, arg: str) -> str:
        self.sock.sendall(f"{command}\n{key}\n{arg}\n".encode())
        line = self.rfile.readline()
        if not line:
            raise ConnectionError(f"server closed connection after {command!r}")
        return line.decode().rstrip("\r\n")

    def stats(self) -> dict:
        resp = self.cmd("stats", "_", "_")
        assert resp.startswith("ok "), f"stats -> {resp!r}"
        return json.loads(resp[3:])

    def lock(self, key: str, timeout_s: int = 0, lease_s: int | None = None) -> str:
        """``l`` and return the token; asserts the grant."""
        arg = str(timeout_s) if lease_s is None else f"{timeout_s} {lease_s}"
        resp = self.cmd("l", key, arg)
        parts = resp.split()
        assert len(parts) == 3 and parts[0] == "ok", f"l {key} {arg!r} -> {resp!r}"
        return parts[1]

    def sem_lock(
        self, key: str, limit: int, timeout_s: int = 0, lease_s: int | None = None
    ) -> str:
        arg = f"{timeout_s} {limit}" + ("" if lease_s is None else f" {lease_s}")
        resp = self.cmd("sl", key, arg)
        parts = resp.split()
        assert len(parts) == 3 and parts[0] == "ok", f"sl {key} {arg!r} -> {resp!r}"
        return parts[1]

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


@pytest.fixture
def raw_factory():
    conns: list[RawConn] = []

    def make(srv: ServerProcess) -> RawConn:
        c = RawConn(srv.addr)
        conns.append(c)
        return c

    yield make
    for c in conns:
        try:
            c.close()
        except OSError:
            pass


def find_entry(entries: list[dict], key: str) -> dict | None:
    for e in entries:
        if e.get("key") == key:
            return e
    return None


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02, what: str = ""):
    """Poll ``pred`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")


class HoldMonitor(threading.Thread):
    """While a client holds ``key``, poll the server every ``interval`` s on
    its own connections and record any moment the hold was not visible:

    * ``stats`` must list the key (locks: same ``owner_conn_id`` throughout;
      semaphores: ``holders`` == ``expect_holders``), and
    * a try-once acquire (``l key 0`` / ``sl key "0 limit"``) from another
      connection must answer ``timeout``.
    """

    def __init__(
        self,
        srv: ServerProcess,
        key: str,
        *,
        kind: str = "lock",
        limit: int = 1,
        expect_holders: int = 1,
        interval: float = 0.1,
    ):
        super().__init__(name=f"hold-monitor[{key}]", daemon=True)
        self.srv, self.key, self.kind = srv, key, kind
        self.limit, self.expect_holders, self.interval = limit, expect_holders, interval
        self.violations: list[str] = []
        self.polls = 0
        self.owner_ids: set = set()
        self._stop_evt = threading.Event()

    def run(self) -> None:
        observer = RawConn(self.srv.addr)
        prober = RawConn(self.srv.addr)
        try:
            while not self._stop_evt.is_set():
                self._poll(observer, prober)
                self._stop_evt.wait(self.interval)
        except Exception as e:  # report, don't swallow
            self.violations.append(f"monitor error: {e!r}")
        finally:
            observer.close()
            prober.close()

    def _poll(self, observer: RawConn, prober: RawConn) -> None:
        t = time.monotonic()
        st = observer.stats()
        self.polls += 1
        if self.kind == "lock":
            e = find_entry(st["locks"], self.key)
            if e is None:
                self.violations.append(f"t={t:.2f}: stats.locks lacks {self.key!r}: {st}")
            else:
                self.owner_ids.add(e.get("owner_conn_id"))
            resp = prober.cmd("l", self.key, "0")
        else:
            e = find_entry(st["semaphores"], self.key)
            if e is None or e.get("holders") != self.expect_holders:
                self.violations.append(
                    f"t={t:.2f}: stats.semaphores entry for {self.key!r} is {e} "
                    f"(want holders={self.expect_holders})"
                )
            resp = prober.cmd("sl", self.key, f"0 {self.limit}")
        if resp != "timeout":
            self.violations.append(
                f"t={t:.2f}: try-acquire of held {self.key!r} answered {resp!r}"
            )
            parts = resp.split()
            if len(parts) == 3 and parts[0] == "ok":  # give it back at once
                prober.cmd("r" if self.kind == "lock" else "sr", self.key, parts[1])

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=10)

    def check(self, min_polls: int = 10) -> None:
        shown = self.violations[:8]
        more = len(self.violations) - len(shown)
        assert not self.violations, (
            f"hold not continuous ({len(self.violations)} bad polls of {self.polls}):\n"
            + "\n".join(shown)
            + (f"\n... and {more} more" if more else "")
        )
        assert self.polls >= min_polls, f"monitor polled only {self.polls} times"
        if self.kind == "lock":
            assert len(self.owner_ids) == 1, (
                f"owner_conn_id changed during the hold: {self.owner_ids}"
            )


@pytest.fixture
def key(request) -> str:
    """A key unique to the test (and to its parametrisation)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    return f"k.{name}.{os.getpid()}"


# ---------------------------------------------------------------------------
# Cluster mode: several dflockd processes forming one Raft cluster
# ---------------------------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound to port 0
    together, read, closed)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_view(st: dict) -> dict:
    """The replicated part of a ``stats`` reply: everything but the node's
    own connection count and its ``cluster`` object. Two nodes that have
    applied the same log index must report identical views (stats are
    computed at the cluster time of the last applied entry)."""
    return {k: v for k, v in st.items() if k not in ("connections", "cluster")}


class DflockdCluster:
    """``size`` dflockd nodes on loopback, node ids 1..size, each with its
    own data dir under ``root`` and a peer port picked at construction (kept
    across restarts). Client ports are ``--port 0`` (a restarted node gets a
    new one: use ``node(i).servers`` after a restart).

    ``start``/``kill``/``sigstop``/``sigcont``/``wipe`` drive the processes;
    ``stats``, ``wait_leader`` and ``wait_converged`` observe them. Every
    process ever started is kept in ``history`` for the failure report."""

    def __init__(
        self,
        binary: Path,
        root: Path,
        size: int = 3,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        extra_args: tuple = (),
    ):
        self.binary, self.root = binary, root
        self.ids = list(range(1, size + 1))
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        self.extra_args = [str(a) for a in extra_args]
        self.peer_ports = dict(zip(self.ids, free_ports(size)))
        self.peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in self.peer_ports.items())
        self.procs: dict[int, ServerProcess | None] = {i: None for i in self.ids}
        self.history: list[tuple[int, ServerProcess]] = []
        self.stopped: set[int] = set()

    # --- processes -----------------------------------------------------------

    def data_dir(self, i: int) -> Path:
        return self.root / f"node{i}"

    def args(self, i: int) -> list[str]:
        return [
            str(self.binary),
            "--port", "0",
            "--node-id", str(i),
            "--peers", self.peers,
            "--data-dir", str(self.data_dir(i)),
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            *self.extra_args,
        ]

    def start(self, *ids: int) -> None:
        """Starts the given nodes (default: all) at once, then waits for each
        to log its client address."""
        ids = ids or tuple(self.ids)
        for i in ids:
            cur = self.procs[i]
            assert cur is None or cur.proc.poll() is not None, f"node {i} is running"
            srv = ServerProcess(self.args(i))
            self.procs[i] = srv
            self.history.append((i, srv))
        for i in ids:
            self.procs[i].wait_ready()

    def node(self, i: int) -> ServerProcess:
        srv = self.procs[i]
        assert srv is not None, f"node {i} was never started"
        return srv

    def running(self) -> list[int]:
        return [
            i for i, s in self.procs.items() if s is not None and s.proc.poll() is None
        ]

    def kill(self, *ids: int) -> None:
        """``kill -9`` the given nodes, as close together as possible."""
        for i in ids:
            srv = self.node(i)
            srv.expect_exit = True
            srv.proc.send_signal(signal.SIGKILL)
        for i in ids:
            self.node(i).proc.wait(timeout=5)
            self.stopped.discard(i)

    def sigstop(self, i: int) -> None:
        self.node(i).proc.send_signal(signal.SIGSTOP)
        self.stopped.add(i)

    def sigcont(self, i: int) -> None:
        self.node(i).proc.send_signal(signal.SIGCONT)
        self.stopped.discard(i)

    def wipe(self, i: int) -> None:
        """Replaces node ``i``'s data dir by a new, empty one (node stopped)."""
        assert i not in self.running(), f"node {i} is running"
        shutil.rmtree(self.data_dir(i), ignore_errors=True)
        self.data_dir(i).mkdir(parents=True)

    # --- observation ---------------------------------------------------------

    def stats(self, i: int, timeout: float = 5.0) -> dict:
        c = RawConn(self.node(i).addr, timeout=timeout)
        try:
            return c.stats()
        finally:
            c.close()

    def all_stats(self, ids=None) -> dict[int, dict]:
        return {i: self.stats(i) for i in (ids or self.running())}

    def wait_leader(self, ids=None, timeout: float = 10.0, exclude=()) -> int:
        """Waits until every node in ``ids`` (default: the running ones)
        reports the same non-zero ``leader_id`` of a running node (not in
        ``exclude``) and the same term, and that leader, if among them, says
        it is the leader and nobody else does. Returns the leader's id."""
        ids = list(ids or self.running())
        last: dict = {}

        def agreed():
            nonlocal last
            last = {i: self.stats(i)["cluster"] for i in ids}
            leaders = {c["leader_id"] for c in last.values()}
            terms = {c["term"] for c in last.values()}
            if len(leaders) != 1 or len(terms) != 1:
                return None
            leader = leaders.pop()
            # a dead leader's id lingers in its followers' view for a while
            if leader == 0 or leader in exclude or leader not in self.running():
                return None
            roles = {i: c["role"] for i, c in last.items()}
            want = {i: ("leader" if i == leader else "follower") for i in ids}
            return leader if roles == want else None

        try:
            return wait_until(agreed, timeout=timeout, interval=0.05, what="a leader")
        except AssertionError:
            raise AssertionError(
                f"nodes {ids} did not agree on a leader within {timeout}s; last "
                f"cluster objects: {json.dumps(last, indent=1)}"
            ) from None

    def wait_converged(self, ids=None, timeout: float = 10.0, until=None) -> dict[int, dict]:
        """Waits until the nodes in ``ids`` (default: running) know the same
        leader, have applied the same index (== their commit index) and
        report the same replicated state; with ``until``, also until
        ``until(stats)`` holds for that state. Returns each node's stats."""
        ids = list(ids or self.running())
        last: dict = {}

        def converged():
            nonlocal last
            last = self.all_stats(ids)
            cl = [s["cluster"] for s in last.values()]
            if len({c["leader_id"] for c in cl}) != 1:
                return None
            if cl[0]["leader_id"] == 0 or cl[0]["leader_id"] not in self.running():
                return None
            if len({c["applied_index"] for c in cl}) != 1:
                return None
            if any(c["applied_index"] != c["commit_index"] for c in cl):
                return None
            views = [cluster_view(s) for s in last.values()]
            if any(v != views[0] for v in views[1:]):
                return None
            if until is not None and not until(last[ids[0]]):
                return None
            return dict(last)

        try:
            return wait_until(converged, timeout=timeout, interval=0.05, what="convergence")
        except AssertionError:
            raise AssertionError(
                f"nodes {ids} did not converge within {timeout}s; last stats:\n"
                + "\n".join(f"node {i}: {json.dumps(s)}" for i, s in last.items())
            ) from None

    # --- teardown ------------------------------------------------------------

    def close(self) -> list[str]:
        """SIGCONTs and SIGKILLs every process still running; returns the
        problems seen (a node that exited by itself, a panic)."""
        problems = []
        for i, srv in self.history:
            if srv.proc.poll() is None:
                try:
                    srv.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            elif not srv.expect_exit:
                problems.append(
                    f"node {i} ({srv.args[1:]}) exited by itself with code "
                    f"{srv.proc.returncode} during the test"
                )
        for i, srv in self.history:
            if srv.proc.poll() is None:
                srv.expect_exit = True
                srv.proc.kill()
            try:
                srv.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                problems.append(f"node {i} did not die on SIGKILL")
            srv._reader.join(timeout=2)
            if srv.proc.stderr is not None:
                srv.proc.stderr.close()
            if "panicked" in srv.log():
                problems.append(f"node {i} panicked")
        self.stopped.clear()
        return problems

    def logs(self) -> str:
        out = []
        for n, (i, srv) in enumerate(self.history):
            out.append(f"--- dflockd node {i} (process #{n}, pid {srv.proc.pid}) stderr ---")
            out.append(srv.log())
        return "\n".join(out)


@pytest.fixture
def cluster_factory(request):
    """Factory: ``make(size=3, heartbeat_ms=50, election_ms=500,
    extra_args=(), start=True) -> DflockdCluster``. At teardown every node
    process is SIGCONTed and SIGKILLed and the data dirs are removed; a node
    that died by itself or panicked makes the test error out, and every
    node's stderr is printed when the test failed."""
    binary = server_binary()
    if not binary.exists():
        pytest.fail(f"dflockd binary not found: {binary} (set DFLOCKD_BIN)")
    made: list[DflockdCluster] = []

    def make(
        size: int = 3,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        extra_args: tuple = (),
        start: bool = True,
    ) -> DflockdCluster:
        root = Path(tempfile.mkdtemp(prefix="dflockd-cluster-"))
        cl = DflockdCluster(binary, root, size, heartbeat_ms, election_ms, extra_args)
        made.append(cl)
        if start:
            cl.start()
        return cl

    yield make

    problems: list[str] = []
    for cl in made:
        mine = cl.close()
        problems += mine
        failed = any(
            getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
            for when in ("setup", "call")
        )
        if mine or failed:
            print(cl.logs())
        shutil.rmtree(cl.root, ignore_errors=True)
    if problems:
        pytest.fail("; ".join(problems))
