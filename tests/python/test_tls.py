"""TLS with the published clients' ``ssl_context=`` parameter (seed 000 "TLS
connection"), against a certificate made for the test by a private CA."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from dflockd_client import (
    AsyncDistributedLock,
    AsyncDistributedSemaphore,
    SyncDistributedLock,
    SyncDistributedSemaphore,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-days", "2", "-keyout", "ca.key", "-out", "ca.pem",
        "-subj", "/CN=dflockd test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    return d


def tls_server(dflockd_factory, pki: Path, *extra: str):
    return dflockd_factory(
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), *extra
    )


def ctx(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def test_sync_and_async_lock_over_tls(dflockd_factory, pki, key):
    srv = tls_server(dflockd_factory, pki)
    with SyncDistributedLock(key, ssl_context=ctx(pki), servers=srv.servers) as lock:
        assert len(lock.token) == 32 and lock.lease == 33

    async def main():
        async with AsyncDistributedLock(key, ssl_context=ctx(pki), servers=srv.servers) as lock:
            assert len(lock.token) == 32

    asyncio.run(main())


@pytest.mark.sem
def test_semaphore_over_tls(dflockd_factory, pki, key):
    srv = tls_server(dflockd_factory, pki)
    with SyncDistributedSemaphore(key, limit=2, ssl_context=ctx(pki), servers=srv.servers) as s:
        assert len(s.token) == 32

    async def main():
        async with AsyncDistributedSemaphore(
            key, limit=2, ssl_context=ctx(pki), servers=srv.servers
        ) as s:
            assert len(s.token) == 32

    asyncio.run(main())


def test_two_phase_and_renewal_over_tls(dflockd_factory, pki, key):
    srv = tls_server(dflockd_factory, pki)
    holder = SyncDistributedLock(key, ssl_context=ctx(pki), lease_ttl_s=2, servers=srv.servers)
    assert holder.acquire()
    waiter = SyncDistributedLock(key, ssl_context=ctx(pki), servers=srv.servers)
    assert waiter.enqueue() == "queued"
    # The holder's renewals (every second) keep it across two lease periods.
    import time

    time.sleep(4.5)
    assert holder.release()
    assert waiter.wait(timeout_s=5)
    assert waiter.release()


@pytest.mark.auth
def test_tls_with_auth_token(dflockd_factory, pki, key):
    srv = tls_server(dflockd_factory, pki, "--auth-token", "tls-and-token")
    with SyncDistributedLock(
        key, ssl_context=ctx(pki), auth_token="tls-and-token", servers=srv.servers
    ) as lock:
        assert len(lock.token) == 32
    with pytest.raises(PermissionError):
        SyncDistributedLock(
            key, ssl_context=ctx(pki), auth_token="wrong", servers=srv.servers
        ).acquire()


def test_wrong_ca_is_refused(dflockd_factory, pki, key, tmp_path):
    srv = tls_server(dflockd_factory, pki)
    other = ssl.create_default_context()  # system CAs only: our private CA is unknown
    with pytest.raises(ssl.SSLError):
        SyncDistributedLock(key, ssl_context=other, servers=srv.servers).acquire()
