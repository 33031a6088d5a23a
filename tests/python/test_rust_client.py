"""The Rust client (through the `dflock` command) and the published Python
client agree on where every key lives, and meet on the same locks.

``DFLOCK_CLI_BIN`` names the command (default ``$REPO/target/debug/dflock``;
``make test-clients`` builds it).
"""

from __future__ import annotations

import os
import random
import string
import subprocess
from pathlib import Path

from dflockd_client import SyncDistributedLock, stable_hash_shard

REPO = Path(__file__).resolve().parents[2]
DFLOCK = Path(os.environ.get("DFLOCK_CLI_BIN") or REPO / "target" / "debug" / "dflock")


def dflock(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFLOCK_")}
    return subprocess.run(
        [str(DFLOCK), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def random_keys(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "-_.:/" + "äßжλ漢字🔒"
    keys = {f"key-{i}" for i in range(200)}
    while len(keys) < n:
        keys.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return sorted(keys)


def test_shard_index_matches_stable_hash_shard_for_many_keys():
    assert DFLOCK.exists(), f"build the dflock command first: {DFLOCK}"
    keys = random_keys(5000, seed=20261202)
    for shards in (1, 2, 3, 5, 7, 16):
        servers = ",".join(f"127.0.0.{i + 1}:{6000 + i}" for i in range(shards))
        out = dflock("-s", servers, "shard", "--", *keys)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == len(keys)
        for key, line in zip(keys, lines):
            got_key, index, addr = line.split(" ")
            assert got_key == key
            want = stable_hash_shard(key, shards)
            assert int(index) == want, (key, shards)
            assert addr == f"127.0.0.{want + 1}:{6000 + want}"


def test_python_and_rust_contend_for_the_same_sharded_lock(dflockd_factory):
    servers = [dflockd_factory() for _ in range(3)]
    addrs = [s.servers[0] for s in servers]
    server_list = ",".join(f"{h}:{p}" for h, p in addrs)
    keys = [k for k in random_keys(400, seed=7) if not k.startswith("-")]
    for key in random.Random(1).sample(keys, 12):
        with SyncDistributedLock(key, acquire_timeout_s=5, servers=addrs):
            # Held by Python on the shard both compute: Rust cannot get it.
            held = dflock("-s", server_list, "lock", key, "--timeout", "0", "--", "true")
            assert held.returncode == 75, (key, held.stderr)
        free = dflock("-s", server_list, "lock", key, "--timeout", "5", "--", "true")
        assert free.returncode == 0, (key, free.stderr)
