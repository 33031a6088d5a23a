#!/usr/bin/env python3
"""Server memory per key and per waiter, measured from the server's RSS.

usage: measure_state.py BINARY

Starts the server twice on an ephemeral port:
- keys: one connection takes and releases 100,000 distinct locks, leaving
  100,000 idle keys (GC is pushed out of the way); RSS delta / keys.
- waiters: 5,000 connections each queue an `l` on one held key; the RSS
  delta minus the same number of connections that only `ping` gives the
  cost of the waiters themselves.
"""

import re
import socket
import subprocess
import sys
import time


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(binary: str):
    p = subprocess.Popen(
        [binary, "--port", "0", "--max-locks", "0", "--gc-max-idle", "100000",
         "--read-timeout", "0"],
        stderr=subprocess.PIPE, text=True)
    while True:
        line = p.stderr.readline()
        m = re.search(r"listening on [^\s]+:(\d+)", line)
        if m:
            return p, int(m.group(1))


def cmd(f, s, text: str) -> str:
    s.sendall(text.encode())
    return f.readline().strip()


def settle() -> None:
    time.sleep(0.5)


def keys(binary: str, n: int = 100_000) -> float:
    p, port = start(binary)
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("r")
    settle()
    base = rss_kib(p.pid)
    batch = 1000
    for start_i in range(0, n, batch):
        s.sendall("".join(f"l\nmem-key-{i}\n0\n" for i in range(start_i, start_i + batch)).encode())
        toks = [f.readline().split()[1] for _ in range(batch)]
        s.sendall("".join(f"r\nmem-key-{start_i + j}\n{t}\n" for j, t in enumerate(toks)).encode())
        for _ in range(batch):
            f.readline()
    settle()
    after = rss_kib(p.pid)
    p.terminate()
    p.wait()
    return (after - base) * 1024 / n


def waiters(binary: str, n: int = 5_000) -> tuple[float, float]:
    p, port = start(binary)
    holder = socket.create_connection(("127.0.0.1", port))
    hf = holder.makefile("r")
    assert cmd(hf, holder, "l\nheld\n0\n").startswith("ok ")
    settle()
    base = rss_kib(p.pid)
    pingers = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        cf = c.makefile("r")
        assert cmd(cf, c, "ping\n_\n\n") == "ok"
        pingers.append((c, cf))
    settle()
    with_conns = rss_kib(p.pid)
    for c, _ in pingers:
        c.sendall(b"l\nheld\n600\n")
    deadline = time.time() + 30
    while True:
        st = cmd(hf, holder, "stats\n_\n_\n")
        if f'"waiters":{n}' in st or time.time() > deadline:
            break
        time.sleep(0.1)
    settle()
    with_waiters = rss_kib(p.pid)
    p.terminate()
    p.wait()
    return (with_conns - base) * 1024 / n, (with_waiters - with_conns) * 1024 / n


if __name__ == "__main__":
    binary = sys.argv[1]
    per_key = keys(binary)
    per_conn, per_waiter = waiters(binary)
    print(f"per idle key (100,000 keys):              {per_key:.0f} bytes")
    print(f"per connection after one request (5,000): {per_conn:.0f} bytes")
    print(f"per waiter (5,000 queued on one key):     {per_waiter:.0f} bytes")
