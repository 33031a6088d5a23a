"""The monitoring endpoint, scraped with a plain HTTP client while lock traffic
runs, and parsed with the official Prometheus text parser."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dflockd_client import SyncDistributedLock


def metrics_port(srv) -> int:
    deadline = time.time() + 10
    while time.time() < deadline:
        m = re.search(r"metrics listening on [^\s]+:(\d+)", srv.log())
        if m:
            return int(m.group(1))
        time.sleep(0.02)
    raise AssertionError(f"no metrics address in log:\n{srv.log()}")


def get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_follow_the_traffic(dflockd_factory):
    srv = dflockd_factory("--metrics-addr", "127.0.0.1:0")
    port = metrics_port(srv)
    status, before_text = get(port, "/metrics")
    assert status == 200
    before = samples(before_text)
    for i in range(100):
        with SyncDistributedLock(f"m{i}", acquire_timeout_s=5, servers=srv.servers):
            pass
    status, after_text = get(port, "/metrics")
    after = samples(after_text)
    grants = ("dflockd_grants_total", ())
    assert after[grants] - before[grants] == 100
    releases = ("dflockd_releases_total", ())
    assert after[releases] - before[releases] == 100
    locks = ("dflockd_commands_total", (("command", "l"),))
    assert after[locks] - before[locks] == 100
    assert after[("dflockd_keys", (("kind", "lock"),))] == 100
    assert after[("dflockd_holders", ())] == 0
    assert after[("dflockd_connections_accepted_total", ())] >= 100
    assert after[("dflockd_loop_turn_seconds_count", ())] > 0
    assert after[("dflockd_bytes_read_total", ())] > before[("dflockd_bytes_read_total", ())]


def test_health_and_ready_flip_on_drain(dflockd_factory):
    srv = dflockd_factory("--metrics-addr", "127.0.0.1:0")
    port = metrics_port(srv)
    assert get(port, "/health") == (200, "ok\n")
    assert get(port, "/ready") == (200, "ready\n")
    holder = SyncDistributedLock("held", acquire_timeout_s=5, servers=srv.servers)
    assert holder.acquire()
    srv.sigterm()
    deadline = time.time() + 5
    while get(port, "/ready")[0] != 503:
        assert time.time() < deadline, "/ready never reported draining"
        time.sleep(0.02)
    assert get(port, "/health")[0] == 200
    assert samples(get(port, "/metrics")[1])[("dflockd_draining", ())] == 1
    holder.release()


def test_bearer_token_guards_metrics_only(dflockd_factory):
    srv = dflockd_factory("--metrics-addr", "127.0.0.1:0", "--auth-token", "scrape-secret")
    port = metrics_port(srv)
    assert get(port, "/metrics")[0] == 401
    assert get(port, "/metrics", token="wrong")[0] == 401
    status, text = get(port, "/metrics", token="scrape-secret")
    assert status == 200 and "dflockd_grants_total" in text
    assert get(port, "/health")[0] == 200
    assert get(port, "/ready")[0] == 200
    assert "scrape-secret" not in srv.log()


def test_garbage_and_silent_http_clients_do_not_disturb_locks(dflockd_factory):
    srv = dflockd_factory("--metrics-addr", "127.0.0.1:0")
    port = metrics_port(srv)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    garbage = socket.create_connection(("127.0.0.1", port))
    garbage.sendall(b"\x00\x01\x02 not http\r\n\r\n")
    garbage.settimeout(5)
    assert garbage.recv(100).startswith(b"HTTP/1.1 400")
    huge = socket.create_connection(("127.0.0.1", port))
    huge.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n")
    huge.settimeout(5)
    assert huge.recv(100).startswith(b"HTTP/1.1 431")
    t0 = time.time()
    for i in range(50):
        with SyncDistributedLock(f"g{i}", acquire_timeout_s=5, servers=srv.servers):
            pass
    assert time.time() - t0 < 10
    for s in silent:
        s.close()


def test_a_request_followed_by_a_half_close_is_answered(dflockd_factory):
    srv = dflockd_factory("--metrics-addr", "127.0.0.1:0")
    port = metrics_port(srv)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(5)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok\n")
