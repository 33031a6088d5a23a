#!/usr/bin/env python3
"""`make bench-cluster`: a 3-node dflockd cluster against a 3-node etcd
cluster on this machine, plus a durable single node (--data-dir alone) and
the in-memory single node, driven by the in-repo load generator
(dflockd-bench, built with --features etcd). Standard library only.

    scripts/bench_cluster.py [--secs 5] [--warmup 1] [--repeats 3] [--kills 5]
        [--out bench/results] [--only dflockd3,etcd3,durable,memory]

Rows: lock + release cycles at 1, 10 and 100 connections, keys disjoint
(one per connection) and one shared key. dflockd: `l`/`r` (modes lock and
contended); etcd: lease grant once per connection, then Lock/Unlock of its
v3 lock API (modes etcd-lock and etcd-contended). Cluster clients are
spread over the three members on both sides (dflockd: connection i on node
i mod 3; etcd: every client gets the three endpoints and its client library
balances). Per row: cycles/s, p50/p99/p99.9, server CPU per cycle summed
over the members (utime+stime from /proc/PID/stat), fsyncs per cycle
(dflockd: `stats` cluster.fsyncs; etcd: WAL fsyncs plus backend commits
from /metrics), the generator's own CPU. Every row runs --repeats times,
interleaved across systems; the table gives the median and the spread, and
a target is met only when it holds in every repeat.

Failover: 100 connections on 50 keys (two clients per key, so the fence and
overlap checks have something to catch), kill -9 of the leader --kills
times (and once a follower), on both systems. The clients run on the two
members that survive (the killed one's clients would lose their session
whatever the server does); the pause per client is the longest gap between
two of its grants from its last grant before the kill (stall, so a grant
committed just before the kill and received after it does not hide the
wait). Double grants (overlapping holds of one key by two clients), fence
regressions and locks still held after every client released (a lost
acknowledged release) are counted by the driver.

Writes OUT/cluster.json, OUT/cluster.txt and OUT/cluster.svg.

DFLOCKD_BIN=PATH runs another build of the server (an A/B of two commits
with the same generator).

Three members and the generator share the machine's cores, unpinned, on
both sides; the single-node rows pin the server to CPU 0 and the generator
to CPU 1 (as `make bench` does) when taskset and 2 CPUs are there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

DFLOCKD = os.environ.get("DFLOCKD_BIN", "target/release/dflockd")
BENCH = "target/release/dflockd-bench"
CONNS = (1, 10, 100)


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def proc_cpu_us(pids):
    """utime + stime of the processes, in microseconds."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total * 1e6 / tck


def wait_port(port, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Group:
    """Server processes of one system, started and killed by member number."""

    def __init__(self, root, name):
        self.root = os.path.join(root, name)
        os.makedirs(self.root)
        self.procs = {}

    def spawn(self, i, args, pin=()):
        out = open(os.path.join(self.root, f"m{i}.log"), "ab")
        self.procs[i] = subprocess.Popen(
            list(pin) + args, stdout=out, stderr=subprocess.STDOUT
        )

    def pids(self):
        return [p.pid for p in self.procs.values()]

    def endpoints(self, members=None):
        members = members or sorted(self.procs)
        return [f"127.0.0.1:{self.ports[i - 1]}" for i in members]

    def leader(self, timeout=30.0):
        """The member that says it leads (subclasses: is_leader)."""
        end = time.time() + timeout
        while time.time() < end:
            for i in sorted(self.procs):
                if self.is_leader(i):
                    return i
            time.sleep(0.05)
        raise RuntimeError(f"{self.root}: no leader")

    def converged(self, timeout=30.0):
        """Waits until every member reports the same index (subclasses: applied)."""
        end = time.time() + timeout
        while time.time() < end:
            views = [self.applied(i) for i in self.procs]
            if all(v is not None for v in views) and len(set(views)) == 1:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.root}: members did not converge")

    def kill(self, i):
        p = self.procs.pop(i)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop(self):
        for p in self.procs.values():
            p.kill()
            p.wait()
        self.procs = {}


class Dflockd(Group):
    def __init__(self, root, name, nodes, durable, pin=()):
        super().__init__(root, name)
        self.nodes = nodes
        self.durable = durable
        self.pin = pin
        self.ports = free_ports(nodes)
        self.peer_ports = free_ports(nodes)

    def start(self, i):
        args = [DFLOCKD, "--host", "127.0.0.1", "--port", str(self.ports[i - 1]),
                "--max-locks", "0"]
        if self.nodes > 1:
            peers = ",".join(
                f"{n + 1}=127.0.0.1:{p}" for n, p in enumerate(self.peer_ports)
            )
            args += ["--node-id", str(i), "--peers", peers]
        if self.durable:
            args += ["--data-dir", os.path.join(self.root, f"n{i}")]
        self.spawn(i, args, self.pin)

    def start_all(self):
        for i in range(1, self.nodes + 1):
            self.start(i)
        for p in self.ports:
            wait_port(p)
        if self.durable:
            self.leader()

    def stats(self, i):
        try:
            with socket.create_connection(
                ("127.0.0.1", self.ports[i - 1]), timeout=2
            ) as s:
                s.sendall(b"stats\n_\n_\n")
                line = s.makefile().readline()
            return json.loads(line[3:])
        except (OSError, ValueError):
            return None

    def is_leader(self, i):
        st = self.stats(i)
        return bool(st) and st.get("cluster", {}).get("role") == "leader"

    def applied(self, i):
        st = self.stats(i)
        return st["cluster"]["applied_index"] if st else None

    def fsyncs(self):
        if not self.durable:
            return 0
        return sum(self.stats(i)["cluster"]["fsyncs"] for i in self.procs)


class Etcd(Group):
    def __init__(self, root, name="etcd3"):
        super().__init__(root, name)
        self.ports = free_ports(3)
        self.peer_ports = free_ports(3)
        self.cluster = ",".join(
            f"e{i + 1}=http://127.0.0.1:{p}" for i, p in enumerate(self.peer_ports)
        )

    def start(self, i):
        c = f"http://127.0.0.1:{self.ports[i - 1]}"
        p = f"http://127.0.0.1:{self.peer_ports[i - 1]}"
        self.spawn(i, [
            "etcd", "--name", f"e{i}", "--data-dir", os.path.join(self.root, f"e{i}"),
            "--listen-client-urls", c, "--advertise-client-urls", c,
            "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
            "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "dflockd-bench",
        ])

    def start_all(self):
        for i in (1, 2, 3):
            self.start(i)
        self.leader()

    def status(self, i):
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.ports[i - 1]}/v3/maintenance/status",
                data=b"{}", method="POST",
            )
            with urllib.request.urlopen(req, timeout=2) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def is_leader(self, i):
        st = self.status(i)
        return bool(st) and bool(st.get("leader")) and st["leader"] == st["header"]["member_id"]

    def applied(self, i):
        st = self.status(i)
        return st.get("raftIndex") if st else None

    def fsyncs(self):
        total = 0
        for i in self.procs:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports[i - 1]}/metrics", timeout=2
            ) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith((
                        "etcd_disk_wal_fsync_duration_seconds_count",
                        "etcd_disk_backend_commit_duration_seconds_count",
                    )):
                        total += float(line.split()[-1])
        return total


def run_row(system, group, mode, conns, a, gen_pin, prefix):
    """One measured row: a short warm-up run, then the measured run with
    the servers' CPU and fsyncs read around it."""
    etcd = isinstance(group, Etcd)
    keys = 1 if mode == "shared" else conns
    gmode = {
        (False, "disjoint"): "lock", (False, "shared"): "contended",
        (True, "disjoint"): "etcd-lock", (True, "shared"): "etcd-contended",
    }[(etcd, mode)]
    base = list(gen_pin) + [
        BENCH, "run", "--mode", gmode, "--connections", str(conns),
        "--keys", str(keys), "--addr", ",".join(group.endpoints()),
        "--key-prefix", prefix, "--json", "--quiet", "--label", system,
    ]
    subprocess.run(base + ["--duration", str(a.warmup), "--warmup", "0"],
                   capture_output=True, check=True)
    cpu0, fs0 = proc_cpu_us(group.pids()), group.fsyncs()
    out = subprocess.run(base + ["--duration", str(a.secs), "--warmup", "0"],
                         capture_output=True, text=True, check=True)
    cpu1, fs1 = proc_cpu_us(group.pids()), group.fsyncs()
    r = json.loads(out.stdout.strip().splitlines()[-1])
    cycles = r["cycles"] or 1
    return {
        "system": system, "keys": mode, "connections": conns,
        "cycles_per_s": r["cycles_per_s"],
        "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"],
        "p999_us": r["latency_us"]["p999"],
        # The whole invocation (connection set-up included) over its cycles.
        "server_cpu_us_per_cycle": (cpu1 - cpu0) / cycles,
        "fsyncs_per_cycle": (fs1 - fs0) / cycles,
        "client_cpu_us_per_cycle": r["client_cpu_us_per_cycle"],
        "client_cpu_util": r["client_cpu_util"],
        "errors": r["errors"],
        "fifo_violations": r.get("fifo_violations"),
    }


def failover(system, group, what, kills, a, root):
    """kill -9 of the leader (or a follower) under 100 connections; one
    driver run per kill, the killed member restarted and caught up after."""
    runs = []
    for k in range(kills):
        leader = group.leader()
        victim = leader if what == "leader" else next(i for i in sorted(group.procs) if i != leader)
        skip = group.endpoints([victim])[0]
        marks = os.path.join(root, f"{system}-{what}-{k}.marks")
        out = os.path.join(root, f"{system}-{what}-{k}.json")
        open(marks, "w").close()
        drv = subprocess.Popen([
            BENCH, "failover", "--system", "etcd" if isinstance(group, Etcd) else "dflockd",
            "--endpoints", ",".join(group.endpoints()), "--connections", "100",
            "--keys", "50", "--duration", str(a.failover_secs),
            "--marks", marks, "--output", out, "--placement", f"skip={skip}",
            "--key-prefix", f"fo{k}{what[0]}-",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(a.failover_secs / 3)
        with open(marks, "a") as f:
            f.write(f"{time.monotonic():.6f} kill-{what}-{victim}\n")
        group.kill(victim)
        _, err = drv.communicate()
        if drv.returncode != 0:
            raise RuntimeError(f"failover driver: {err.strip()}")
        with open(out) as f:
            res = json.load(f)
        group.start(victim)
        group.converged()
        runs.append(res)
        m = res["marks"][0] if res["marks"] else {}
        log(f"{system} {what} kill {k + 1}/{kills}: stall median "
            f"{m.get('stall_median_s')} s, max {m.get('stall_max_s')} s, errors "
            f"{res['errors']['total']}, double grants {res['double_grants']}, "
            f"held at end {res['held_at_end']}")
    stalls = [s for r in runs for m in r["marks"] for s in m["stalls_s"] if s is not None]
    return {
        "system": system, "killed": what, "kills": kills,
        "pause_median_s": statistics.median(stalls) if stalls else None,
        "pause_p90_s": sorted(stalls)[int(len(stalls) * 0.9)] if stalls else None,
        "pause_max_s": max(stalls) if stalls else None,
        "pause_per_kill_median_s": [m.get("stall_median_s") for r in runs for m in r["marks"]],
        "samples": len(stalls),
        "clients_without_grant_after": sum(
            m["clients_without_grant_after"] for r in runs for m in r["marks"]),
        "errors": sum(r["errors"]["total"] for r in runs),
        "errors_by_kind": merge_counts(r["errors"]["by_kind"] for r in runs),
        "double_grants": sum(r["double_grants"] for r in runs),
        "fence_regressions": sum(r["fence_regressions"] for r in runs),
        "grants_checked": sum(r["grants_checked"] for r in runs),
        "held_at_end": sum(r["held_at_end"] for r in runs),
        "cycles_per_s": statistics.median(r["cycles_per_s"] for r in runs),
    }


def merge_counts(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def summarize(rows):
    """Median and spread per (system, keys, connections) over the repeats."""
    groups = {}
    for r in rows:
        groups.setdefault((r["system"], r["keys"], r["connections"]), []).append(r)
    out = []
    for (system, keys, conns), rs in groups.items():
        s = {"system": system, "keys": keys, "connections": conns, "repeats": len(rs)}
        for f in ("cycles_per_s", "p50_us", "p99_us", "p999_us", "server_cpu_us_per_cycle",
                  "fsyncs_per_cycle", "client_cpu_us_per_cycle", "client_cpu_util"):
            vals = [r[f] for r in rs if r[f] is not None]
            s[f] = statistics.median(vals) if vals else None
            s[f + "_range"] = [min(vals), max(vals)] if vals else None
        s["errors"] = sum(r["errors"] for r in rs)
        out.append(s)
    return out


def targets(rows, fo):
    """The issue's targets, each checked in every repeat."""
    def reps(system, keys, conns):
        return [r for r in rows if (r["system"], r["keys"], r["connections"]) == (system, keys, conns)]
    checks = []

    def check(name, values, ok, note):
        # None: the runs it needs were not made (--only, --kills 0).
        met = all(ok(v) for v in values) if values else None
        checks.append({"target": name, "values": values, "met": met, "note": note})

    d, e = reps("dflockd-3", "disjoint", 100), reps("etcd-3", "disjoint", 100)
    pairs = list(zip(d, e))
    check("100 conns, disjoint: dflockd-3 cycles/s / etcd-3 cycles/s >= 10",
          [x["cycles_per_s"] / y["cycles_per_s"] for x, y in pairs], lambda v: v >= 10, "per repeat")
    check("100 conns, disjoint: dflockd-3 server CPU/cycle / etcd-3's <= 0.1",
          [x["server_cpu_us_per_cycle"] / y["server_cpu_us_per_cycle"] for x, y in pairs],
          lambda v: v <= 0.1, "summed over the three members")
    d1, e1 = reps("dflockd-3", "disjoint", 1), reps("etcd-3", "disjoint", 1)
    check("1 conn: dflockd-3 median cycle / etcd-3's <= 0.5",
          [x["p50_us"] / y["p50_us"] for x, y in zip(d1, e1)], lambda v: v <= 0.5, "per repeat")
    du, me = reps("durable-1", "disjoint", 100), reps("memory-1", "disjoint", 100)
    bound = sum(1 for y in me if generator_bound(y))
    check("100 conns: durable single node cycles/s / in-memory's >= 1/3",
          [x["cycles_per_s"] / y["cycles_per_s"] for x, y in zip(du, me)],
          lambda v: v >= 1 / 3, "per repeat, both pinned"
          + (f"; in-memory generator-bound in {bound} of {len(me)}" if bound else ""))
    for f in fo:
        if f["system"] != "dflockd-3":
            continue
        if f["killed"] == "leader":
            check("leader kill -9: median pause (s) <= 1.5", [f["pause_median_s"]],
                  lambda v: v is not None and v <= 1.5, f"{f['kills']} kills, {f['samples']} client samples")
        else:
            check("follower kill -9: client errors == 0", [f["errors"]], lambda v: v == 0,
                  f"pause max {f['pause_max_s']} s")
        check(f"{f['killed']} kill -9: double grants + fence regressions == 0",
              [f["double_grants"] + f["fence_regressions"]], lambda v: v == 0,
              f"{f['grants_checked']} grants checked")
        check(f"{f['killed']} kill -9: lost acknowledged releases == 0", [f["held_at_end"]],
              lambda v: v == 0, "locks still held after every client released")
    return checks


GEN_BOUND = 0.85


def generator_bound(s):
    return (s.get("client_cpu_util") or 0) >= GEN_BOUND


def fmt_range(r, nd=0):
    return f"{r[0]:.{nd}f}-{r[1]:.{nd}f}" if r else "-"


def table(summary, fo, checks, meta):
    lines = [f"{'system':10} {'keys':8} {'conns':>5} {'cycles/s':>9} {'(range)':>13} "
             f"{'p50 us':>8} {'p99 us':>9} {'p999 us':>9} {'srv us/cyc':>10} "
             f"{'fsync/cyc':>9} {'gen us/cyc':>10} {'gen util':>8}"]
    order = {"dflockd-3": 0, "etcd-3": 1, "durable-1": 2, "memory-1": 3}
    for s in sorted(summary, key=lambda s: (s["keys"], order.get(s["system"], 9), s["connections"])):
        bound = " *" if generator_bound(s) else ""
        lines.append(
            f"{s['system']:10} {s['keys']:8} {s['connections']:>5} {s['cycles_per_s']:>9.0f} "
            f"{fmt_range(s['cycles_per_s_range']):>13} {s['p50_us']:>8.0f} {s['p99_us']:>9.0f} "
            f"{s['p999_us']:>9.0f} {s['server_cpu_us_per_cycle']:>10.1f} "
            f"{s['fsyncs_per_cycle']:>9.3f} {s['client_cpu_us_per_cycle']:>10.1f} "
            f"{s['client_cpu_util']:>8.2f}{bound}")
    if any(generator_bound(s) for s in summary):
        lines.append(f"* the generator used {GEN_BOUND:.0%} or more of its core: the row shows what one "
                     "generator thread drives, a lower bound of the server's rate")
    lines.append("")
    lines.append(f"{'failover':24} {'pause p50':>9} {'p90':>6} {'max':>6} {'errors':>7} "
                 f"{'dbl grant':>9} {'fence reg':>9} {'held end':>8} {'grants':>8}")
    for f in fo:
        def s(v):
            return f"{v:.2f}" if v is not None else "-"
        lines.append(
            f"{f['system'] + ' ' + f['killed'] + ' x' + str(f['kills']):24} {s(f['pause_median_s']):>9} "
            f"{s(f['pause_p90_s']):>6} {s(f['pause_max_s']):>6} {f['errors']:>7} "
            f"{f['double_grants']:>9} {f['fence_regressions']:>9} {f['held_at_end']:>8} "
            f"{f['grants_checked']:>8}")
    lines.append("")
    lines.append(f"{'target':68} {'values (every repeat)':28} result")
    for c in checks:
        vals = ", ".join(f"{v:.3g}" for v in c["values"] if v is not None)
        lines.append(f"{c['target']:68} {vals:28} { {True: 'PASS', False: 'MISS', None: 'n/a '}[c['met']] }  {c['note']}")
    lines.append("")
    lines.append(f"machine: {meta['machine']}")
    lines.append(f"command: {meta['command']}; {meta['versions']}")
    return "\n".join(lines) + "\n"


def svg(summary, path):
    """Grouped bars: cycles/s per system at each connection count, disjoint
    keys, log scale."""
    import math
    systems = ["dflockd-3", "etcd-3", "durable-1", "memory-1"]
    colors = {"dflockd-3": "#1f77b4", "etcd-3": "#d62728", "durable-1": "#2ca02c", "memory-1": "#9467bd"}
    data = {(s["system"], s["connections"]): s["cycles_per_s"]
            for s in summary if s["keys"] == "disjoint"}
    w, h, left, bottom, top = 720, 380, 70, 50, 40
    pw, ph = w - left - 20, h - top - bottom
    lo, hi = 1, 6  # 10 .. 1,000,000 cycles/s

    def y(v):
        v = max(v, 10)
        return top + ph - (math.log10(v) - lo) / (hi - lo) * ph
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">lock + release cycles/s, keys disjoint (log scale)</text>']
    for e in range(lo, hi + 1):
        yy = y(10 ** e)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{w - 20}" y2="{yy:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{10 ** e:,}</text>')
    gw = pw / len(CONNS)
    bw = gw / (len(systems) + 1)
    for gi, c in enumerate(CONNS):
        x0 = left + gi * gw + bw / 2
        out.append(f'<text x="{x0 + bw * len(systems) / 2:.1f}" y="{h - bottom + 18}" text-anchor="middle">{c} connection{"s" if c > 1 else ""}</text>')
        for si, s in enumerate(systems):
            v = data.get((s, c))
            if v is None:
                continue
            x = x0 + si * bw
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw - 2:.1f}" height="{top + ph - y(v):.1f}" fill="{colors[s]}"/>')
            out.append(f'<text x="{x + bw / 2 - 1:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" font-size="9">{v:,.0f}</text>')
    for si, s in enumerate(systems):
        lx = left + 10 + si * 160
        out.append(f'<rect x="{lx}" y="{h - 18}" width="10" height="10" fill="{colors[s]}"/>')
        out.append(f'<text x="{lx + 14}" y="{h - 9}">{s}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secs", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--failover-secs", type=float, default=9)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="dflockd3,etcd3,durable,memory")
    ap.add_argument("--render", metavar="JSON",
                    help="only rewrite the table and chart from a cluster.json")
    a = ap.parse_args()
    if a.render:
        return render(a.render, a.out)
    # A SIGTERM (make interrupted, a timeout) still stops every member.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = set(a.only.split(","))
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    pin_srv, pin_gen = (), ()
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        pin_srv, pin_gen = ("taskset", "-c", "0"), ("taskset", "-c", "1")
    root = tempfile.mkdtemp(prefix="dflockd-bench-cluster-")
    groups = {}
    if "dflockd3" in only:
        groups["dflockd-3"] = (Dflockd(root, "dflockd3", 3, True), ())
    if "etcd3" in only:
        groups["etcd-3"] = (Etcd(root), ())
    if "durable" in only:
        groups["durable-1"] = (Dflockd(root, "durable1", 1, True, pin_srv), pin_gen)
    if "memory" in only:
        groups["memory-1"] = (Dflockd(root, "memory1", 1, False, pin_srv), pin_gen)
    rows, fo = [], []
    try:
        for name, (g, _) in groups.items():
            log(f"starting {name}")
            g.start_all()
        for rep in range(a.repeats):
            for mode in ("disjoint", "shared"):
                for conns in CONNS:
                    for name, (g, gpin) in groups.items():
                        prefix = f"r{rep}{mode[0]}{conns}-"
                        r = run_row(name, g, mode, conns, a, gpin, prefix)
                        r["repeat"] = rep
                        rows.append(r)
                        log(f"repeat {rep + 1}/{a.repeats} {name:9} {mode:8} {conns:>3} conns: "
                            f"{r['cycles_per_s']:9.0f} cycles/s p50 {r['p50_us']:8.0f} us, "
                            f"server {r['server_cpu_us_per_cycle']:7.1f} us/cycle, "
                            f"{r['fsyncs_per_cycle']:.3f} fsyncs/cycle")
        for name in ("dflockd-3", "etcd-3"):
            if name not in groups or a.kills == 0:
                continue
            g = groups[name][0]
            fo.append(failover(name, g, "leader", a.kills, a, root))
            fo.append(failover(name, g, "follower", 1, a, root))
    finally:
        for g, _ in groups.values():
            g.stop()
    summary = summarize(rows)
    checks = targets(rows, fo)
    etcd_v = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("etcd") else "etcd: none"
    meta = {
        "machine": f"{os.cpu_count()} cores, {cpu_model()}, Linux {platform.release()}",
        "command": "make bench-cluster (" + " ".join(["scripts/bench_cluster.py"] + sys.argv[1:]) + ")",
        "versions": etcd_v + "; dflockd " + git_rev(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "secs": a.secs, "repeats": a.repeats,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cluster.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "failover": fo, "targets": checks,
                   "runs": rows}, f, indent=1)
    text = table(summary, fo, checks, meta)
    with open(os.path.join(a.out, "cluster.txt"), "w") as f:
        f.write(text)
    svg(summary, os.path.join(a.out, "cluster.svg"))
    print(text, end="")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if all(c["met"] is not False for c in checks) else 1


def render(path, out):
    with open(path) as f:
        d = json.load(f)
    checks = targets(d["runs"], d["failover"])
    d["targets"] = checks
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
    text = table(d["summary"], d["failover"], checks, d["meta"])
    with open(os.path.join(out, "cluster.txt"), "w") as f:
        f.write(text)
    svg(d["summary"], os.path.join(out, "cluster.svg"))
    print(text, end="")
    return 0 if all(c["met"] is not False for c in checks) else 1


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def git_rev():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
