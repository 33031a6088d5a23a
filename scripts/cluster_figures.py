#!/usr/bin/env python3
"""Figures of a 3-node dflockd cluster on this machine: commit latency,
throughput and fsyncs through the leader and a follower (driven by
dflockd-bench), and the pause clients see when the leader is killed with
SIGKILL (default timeouts). Standard library only.

    scripts/cluster_figures.py [--bin target/release/dflockd]
        [--bench target/release/dflockd-bench] [--kills 5] [--out DIR]

Prints a table and writes DIR/figures.json (default
bench/results/cluster-<date>/). Nodes run with their default settings
(--heartbeat-interval 100, --election-timeout 1000), data dirs in a
temporary directory on the same disk as /tmp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, binary, root):
        self.binary = binary
        self.root = root
        self.client_ports = free_ports(3)
        self.peer_ports = free_ports(3)
        self.peers = ",".join(
            f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(self.peer_ports)
        )
        self.procs = {}

    def start(self, i):
        args = [
            self.binary,
            "--port", str(self.client_ports[i - 1]),
            "--node-id", str(i),
            "--peers", self.peers,
            "--data-dir", os.path.join(self.root, f"n{i}"),
        ]
        log = open(os.path.join(self.root, f"n{i}.log"), "ab")
        self.procs[i] = subprocess.Popen(args, stdout=log, stderr=log)

    def kill(self, i):
        p = self.procs.pop(i)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop(self):
        for p in self.procs.values():
            p.kill()
            p.wait()
        self.procs = {}

    def stats(self, i):
        try:
            with socket.create_connection(
                ("127.0.0.1", self.client_ports[i - 1]), timeout=2
            ) as s:
                s.sendall(b"stats\n_\n_\n")
                line = s.makefile().readline()
            return json.loads(line[3:])
        except (OSError, ValueError):
            return None

    def leader(self, timeout=15.0):
        end = time.time() + timeout
        while time.time() < end:
            for i in list(self.procs):
                st = self.stats(i)
                if st and st["cluster"]["role"] == "leader":
                    return i
            time.sleep(0.05)
        raise RuntimeError("no leader")

    def converged(self, timeout=20.0):
        end = time.time() + timeout
        while time.time() < end:
            views = [self.stats(i) for i in self.procs]
            if all(views) and len({v["cluster"]["applied_index"] for v in views}) == 1:
                return
            time.sleep(0.05)
        raise RuntimeError("nodes did not converge")


def bench(bench_bin, port, conns, secs):
    out = subprocess.run(
        [
            bench_bin, "--addr", f"127.0.0.1:{port}", "--mode", "lock",
            "--connections", str(conns), "--duration", str(secs), "--warmup", "0",
            "--json", "--quiet",
        ],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def failover(cluster, kills, clients=10):
    """Pause per client around each leader kill: last grant before the kill
    to first grant after it, clients on the two followers."""
    pauses, errors = [], 0
    for k in range(kills):
        leader = cluster.leader()
        followers = [i for i in cluster.procs if i != leader]
        stop = threading.Event()
        grants = [[] for _ in range(clients)]
        errs = [0] * clients

        def run(n):
            node = followers[n % len(followers)]
            port = cluster.client_ports[node - 1]
            key = f"failover-{k}-{n}"
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                        f = s.makefile()
                        while not stop.is_set():
                            s.sendall(f"l\n{key}\n10\n".encode())
                            r = f.readline().split()
                            if not r or r[0] != "ok":
                                errs[n] += 1
                                break
                            grants[n].append(time.time())
                            s.sendall(f"r\n{key}\n{r[1]}\n".encode())
                            if f.readline().strip() != "ok":
                                errs[n] += 1
                                break
                except OSError:
                    errs[n] += 1
                    time.sleep(0.05)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.time()
        cluster.kill(leader)
        time.sleep(4.0)
        stop.set()
        for t in threads:
            t.join()
        for g in grants:
            before = [x for x in g if x < t0]
            after = [x for x in g if x >= t0]
            if before and after:
                pauses.append(after[0] - before[-1])
        errors += sum(errs)
        cluster.start(leader)
        cluster.converged()
    return pauses, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/dflockd")
    ap.add_argument("--bench", default="target/release/dflockd-bench")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out_dir = a.out or os.path.join(
        "bench", "results", "cluster-" + time.strftime("%Y-%m-%d")
    )
    root = tempfile.mkdtemp(prefix="dflockd-figures-")
    cluster = Cluster(os.path.abspath(a.bin), root)
    rows = []
    try:
        for i in (1, 2, 3):
            cluster.start(i)
        leader = cluster.leader()
        follower = next(i for i in (1, 2, 3) if i != leader)
        for where, node in (("leader", leader), ("follower", follower)):
            for conns in (1, 10, 100):
                before = [cluster.stats(i)["cluster"]["fsyncs"] for i in (1, 2, 3)]
                r = bench(a.bench, cluster.client_ports[node - 1], conns, a.secs)
                after = [cluster.stats(i)["cluster"]["fsyncs"] for i in (1, 2, 3)]
                cycles = r["cycles"]
                fsyncs = sum(after) - sum(before)
                rows.append({
                    "through": where,
                    "connections": conns,
                    "cycles_per_sec": r["cycles_per_s"],
                    "p50_us": r["latency_us"]["p50"],
                    "p99_us": r["latency_us"]["p99"],
                    "fsyncs_all_nodes": fsyncs,
                    "fsyncs_per_sec": fsyncs / r["duration_s"],
                    "fsyncs_per_cycle": (fsyncs / cycles) if cycles else None,
                    "raw": r,
                })
        pauses, errors = failover(cluster, a.kills)
    finally:
        cluster.stop()
    result = {
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}, {os.uname().release}",
        "command": " ".join(sys.argv),
        "bench": rows,
        "failover": {
            "kills": a.kills,
            "pauses_s": pauses,
            "median_s": statistics.median(pauses) if pauses else None,
            "max_s": max(pauses) if pauses else None,
            "client_errors": errors,
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "figures.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'through':9} {'conns':>5} {'cycles/s':>9} {'p50 us':>8} {'p99 us':>8} {'fsyncs/s':>9} {'fsyncs/cycle':>12}")
    for r in rows:
        fpc = r["fsyncs_per_cycle"]
        print(
            f"{r['through']:9} {r['connections']:>5} {r['cycles_per_sec']:>9.0f} "
            f"{r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['fsyncs_per_sec']:>9.0f} "
            f"{(f'{fpc:.3f}' if fpc is not None else '-'):>12}"
        )
    fo = result["failover"]
    if fo["median_s"] is not None:
        print(
            f"leader SIGKILL x{a.kills}: pause median {fo['median_s']:.2f} s, "
            f"max {fo['max_s']:.2f} s over {len(pauses)} client samples; "
            f"client errors {fo['client_errors']}"
        )
    print(f"written {out_dir}/figures.json")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
