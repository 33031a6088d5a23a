//! Cluster mode through the real binary: peer links over TLS with the auth
//! token, strangers on the peer port, data-dir errors, and a durable node
//! killed with SIGKILL again and again under load.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::{Pki, TlsClient, client_config};
use common::{Client, Server, token_of};

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("dflockd-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn sub(&self, s: &str) -> String {
        self.0.join(s).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts node `id` of a cluster whose peer ports are `ports`.
fn node(id: usize, ports: &[u16], dir: &TempDir, extra: &[&str]) -> Server {
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let peers = peers.join(",");
    let data = dir.sub(&format!("n{id}"));
    let id = id.to_string();
    let mut args = vec![
        "--node-id",
        &id,
        "--peers",
        &peers,
        "--data-dir",
        &data,
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The value of `"name":<number>` in a stats body.
fn field(stats: &str, name: &str) -> u64 {
    let at = stats
        .find(&format!("\"{name}\":"))
        .unwrap_or_else(|| panic!("no {name} in {stats}"));
    stats[at + name.len() + 3..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

fn tls_stats(port: u16, ca: &Path) -> String {
    let mut c = TlsClient::connect_with(port, client_config(ca, false)).unwrap();
    assert_eq!(c.cmd("auth", "_", "s3cret"), "ok");
    c.cmd("stats", "_", "_")
}

#[test]
fn tls_peer_links_with_the_token_form_a_cluster_and_strangers_are_turned_away() {
    let pki = Pki::new("cluster");
    // One certificate for every node, naming the peer addresses, in a chain
    // file with the CA that signed it (peer links trust that chain).
    pki.issue_for("c", &["127.0.0.1", "localhost"]);
    let chain = [pki.path("c-cert.pem"), pki.path("c-ca.pem")]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    std::fs::write(pki.path("c-chain.pem"), chain).unwrap();
    let dir = TempDir::new("tls");
    let ports = free_ports(3);
    let (cert, key) = (pki.s("c-chain.pem"), pki.s("c-key.pem"));
    let extra = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--auth-token",
        "s3cret",
    ];
    let nodes: Vec<Server> = (1..=3).map(|i| node(i, &ports, &dir, &extra)).collect();
    let ca = pki.path("c-ca.pem");
    wait_until("a leader known to all", Duration::from_secs(15), || {
        nodes
            .iter()
            .all(|n| field(&tls_stats(n.port, &ca), "leader_id") != 0)
    });
    let mut a = TlsClient::connect(nodes[1].port, &ca).unwrap();
    let mut b = TlsClient::connect(nodes[2].port, &ca).unwrap();
    assert_eq!(a.cmd("auth", "_", "s3cret"), "ok");
    assert_eq!(b.cmd("auth", "_", "s3cret"), "ok");
    let t = token_of(&a.cmd("l", "k", "0"));
    assert_eq!(b.cmd("l", "k", "0"), "timeout", "held through another node");

    // Strangers on the peer ports: plain text to a TLS port, garbage, a
    // connection that says nothing. None disturbs the cluster.
    for &p in &ports {
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 256];
        // The TLS server answers with an alert at most, then closes.
        let mut closed = false;
        for _ in 0..4 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        assert!(closed, "a stranger's connection to peer port {p} is closed");
    }
    assert_eq!(a.cmd("r", "k", &t), "ok");
    assert!(b.cmd("l", "k", "5").starts_with("ok "));
    for n in &nodes {
        let log = n.drain_log().join("\n");
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// A hello frame as a peer sends it (see `cluster::wire`).
fn hello(cluster_id: u64, node: u64, settings: u64, proof: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    dflockd::cluster::wire::encode_hello(
        &mut out,
        &dflockd::cluster::wire::Hello {
            cluster_id,
            node,
            settings,
            has_state: false,
            proof,
        },
    );
    out
}

fn closed_soon(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(7))).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

#[test]
fn bad_hellos_and_garbage_on_the_peer_port_are_closed_and_logged() {
    let dir = TempDir::new("hello");
    let ports = free_ports(3);
    let extra = ["--auth-token", "tok"];
    let nodes: Vec<Server> = (1..=3).map(|i| node(i, &ports, &dir, &extra)).collect();
    let mut c = Client::connect(nodes[0].port);
    assert_eq!(c.cmd("auth", "_", "tok"), "ok");
    wait_until("a leader", Duration::from_secs(15), || {
        field(&c.cmd("stats", "_", "_"), "leader_id") != 0
    });
    let cluster_id = {
        let peers: Vec<dflockd::config::Peer> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| dflockd::config::Peer {
                id: i as u64 + 1,
                addr: format!("127.0.0.1:{p}").parse().unwrap(),
            })
            .collect();
        dflockd::config::ClusterSettings {
            node_id: 1,
            peers,
            data_dir: PathBuf::new(),
            heartbeat_interval_ms: 50,
            election_timeout_ms: 500,
            snapshot_entries: 10_000,
        }
        .cluster_id()
    };
    let token = dflockd::net::security::AuthToken::new("tok").unwrap();
    let good_proof = token.peer_proof(cluster_id);
    let set = dflockd::net::cluster::settings_digest(&dflockd::core::Config::default());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "another cluster",
            hello(cluster_id ^ 1, 2, set, &good_proof),
        ),
        ("wrong token", hello(cluster_id, 2, set, &[0u8; 32])),
        ("unknown node", hello(cluster_id, 9, set, &good_proof)),
        ("itself", hello(cluster_id, 1, set, &good_proof)),
        ("other settings", hello(cluster_id, 2, set ^ 1, &good_proof)),
        ("garbage", b"\xff\xff\xff\xff garbage".to_vec()),
        ("huge frame", (u32::MAX).to_le_bytes().to_vec()),
    ];
    for (what, bytes) in &cases {
        let mut s = TcpStream::connect(("127.0.0.1", ports[0])).unwrap();
        s.write_all(bytes).unwrap();
        assert!(closed_soon(&mut s), "{what}: connection not closed");
    }
    // A good hello followed by a frame of an unknown kind is closed too.
    let mut s = TcpStream::connect(("127.0.0.1", ports[0])).unwrap();
    let mut bytes = hello(cluster_id, 2, set, &good_proof);
    bytes.extend_from_slice(&[1, 0, 0, 0, 99]);
    s.write_all(&bytes).unwrap();
    assert!(closed_soon(&mut s), "unknown frame kind");
    // The cluster still works.
    let t = token_of(&c.cmd("l", "k", "0"));
    assert_eq!(c.cmd("r", "k", &t), "ok");
    let log = nodes[0].drain_log().join("\n");
    for needle in [
        "another cluster",
        "did not prove the auth token",
        "unknown node 9",
        "unknown node 1",
        "runs with other lock settings",
        "bad frame",
        "unknown frame kind 99",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
}

/// The `locks` part of a stats body (what every node must agree on).
fn locks_of(stats: &str) -> String {
    let from = stats.find("\"locks\"").unwrap();
    let to = stats.find("\"cluster\"").unwrap();
    // Lease times differ by when each node was asked: keep keys and owners.
    stats[from..to]
        .split(',')
        .filter(|f| !f.contains("lease_expires_in_s") && !f.contains("idle_s"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn snapshots_bound_the_log_and_a_wiped_node_catches_up_from_one() {
    let dir = TempDir::new("snap");
    let ports = free_ports(3);
    let extra = ["--snapshot-entries", "20"];
    let mut nodes: Vec<Server> = (1..=3).map(|i| node(i, &ports, &dir, &extra)).collect();
    let mut c = Client::connect(nodes[0].port);
    wait_until("a leader", Duration::from_secs(15), || {
        field(&c.cmd("stats", "_", "_"), "leader_id") != 0
    });
    // History: many entries; state: a few held locks.
    for i in 0..150 {
        let t = c.lock(&format!("k{}", i % 5), "0");
        assert_eq!(c.cmd("r", &format!("k{}", i % 5), &t), "ok");
    }
    let mut holder = Client::connect(nodes[1].port);
    let held = holder.lock("held", "0 600");
    let s = c.cmd("stats", "_", "_");
    assert!(field(&s, "snapshot_index") > 100, "{s}");
    assert!(
        field(&s, "log_bytes") < 64 * 1024,
        "the log is bounded by the state: {s}"
    );
    // Node 3 loses its data dir.
    nodes[2].child.kill().unwrap();
    nodes[2].child.wait().unwrap();
    std::fs::remove_dir_all(dir.sub("n3")).unwrap();
    nodes[2] = node(3, &ports, &dir, &extra);
    let mut c3 = Client::connect(nodes[2].port);
    wait_until("node 3 caught up", Duration::from_secs(15), || {
        let a = c.cmd("stats", "_", "_");
        let b = c3.cmd("stats", "_", "_");
        field(&b, "applied_index") >= field(&a, "applied_index") && locks_of(&a) == locks_of(&b)
    });
    let log = nodes[2].drain_log().join("\n");
    assert!(
        log.contains("installed a snapshot from the leader"),
        "{log}"
    );
    // Node 3 serves: the held lock is held there too, and it can be released
    // through it... by its holder only (token checked cluster-wide).
    assert_eq!(c3.cmd("l", "held", "0"), "timeout");
    assert_eq!(holder.cmd("r", "held", &held), "ok");
    assert!(c3.cmd("l", "held", "0").starts_with("ok "));
}

fn dflockd(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(common::server_bin())
        .args(["--port", "0"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A durable one-node cluster (`--data-dir` alone) with a few entries.
fn solo_with_history(dir: &str) {
    let mut s = Server::start(&["--data-dir", dir]);
    let mut c = s.connect();
    for i in 0..20 {
        let t = c.lock(&format!("k{i}"), "0");
        assert_eq!(c.cmd("r", &format!("k{i}"), &t), "ok");
    }
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Where the records of a log file end: each is `len: u32 LE`, two
/// checksums and `len` bytes; the zero-filled tail has length 0.
fn log_end(bytes: &[u8]) -> usize {
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 || at + 12 + len > bytes.len() {
            break;
        }
        at += 12 + len;
    }
    at
}

#[test]
fn data_dir_of_another_node_or_corrupted_is_refused_and_a_torn_tail_repaired() {
    let dir = TempDir::new("datadir");
    let d = dir.sub("solo");
    solo_with_history(&d);
    // Another node id.
    let (code, err) = dflockd(&["--data-dir", &d, "--node-id", "2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("node"), "{err}");

    // A torn tail: bytes of a record that never finished, where the next
    // record would have gone (the zero-filled tail after them).
    let wal = Path::new(&d).join("wal");
    let clean = std::fs::read(&wal).unwrap();
    let end = log_end(&clean);
    assert!(clean.len() > end, "the log is zero-filled ahead");
    let mut torn = clean.clone();
    torn[end..end + 7].copy_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&wal, &torn).unwrap();
    let mut s = Server::start(&["--data-dir", &d]);
    let mut c = s.connect();
    assert!(c.cmd("l", "again", "0").starts_with("ok "));
    drop(c);
    let log = s.startup_log.join("\n");
    assert!(log.contains("torn record of 7 bytes"), "{log}");
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));

    // Corruption before the end: refused, naming the file and offset.
    let mut bad = std::fs::read(&wal).unwrap();
    let mid = log_end(&bad) / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&wal, &bad).unwrap();
    let (code, err) = dflockd(&["--data-dir", &d]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("wal is corrupt at byte"), "{err}");

    // A data dir that is a file.
    let file = dir.sub("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let (code, err) = dflockd(&["--data-dir", &file]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--data-dir"), "{err}");
}

#[test]
fn a_durable_node_killed_again_and_again_under_load_loses_nothing_acknowledged() {
    let dir = TempDir::new("kill9");
    let d = dir.sub("solo");
    let mut highest_acked = 0u64;
    let mut kept: Option<(String, u64)> = None;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..15 {
        // Small snapshots: restarts recover from a snapshot plus a log.
        let mut s = Server::start(&[
            "--data-dir",
            &d,
            "--no-auto-release-on-disconnect",
            "--snapshot-entries",
            "50",
        ]);
        let mut c = s.connect();
        // What was acknowledged before the last kill is still there.
        if let Some((token, fence)) = &kept {
            assert!(*fence <= highest_acked);
            assert_eq!(
                c.cmd("n", "kept", &format!("{token} 600")),
                "ok 600",
                "round {round}: the lease-only holding survived"
            );
        } else {
            let t = c.lock("kept", "0 600");
            let f = u64::from_str_radix(&t[..16], 16).unwrap();
            highest_acked = highest_acked.max(f);
            kept = Some((t, f));
        }
        // Load, then SIGKILL at a random moment of it.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_for = Duration::from_millis(30 + rng % 200);
        let start = Instant::now();
        let mut i = 0u64;
        let mut first = true;
        while start.elapsed() < run_for {
            let key = format!("k{}", i % 7);
            let t = c.lock(&key, "0");
            let f = u64::from_str_radix(&t[..16], 16).unwrap();
            if first {
                assert!(
                    f > highest_acked,
                    "round {round}: fence {f:x} not above every acknowledged one ({highest_acked:x})"
                );
                first = false;
            }
            highest_acked = highest_acked.max(f);
            assert_eq!(c.cmd("r", &key, &t), "ok");
            i += 1;
        }
        s.child.kill().unwrap();
        s.child.wait().unwrap();
    }
}

/// A durable one-node cluster whose data dir is on a small tmpfs of its own
/// (in a private mount namespace); `None` where namespaces are not allowed.
fn on_small_tmpfs(name: &str, size: &str) -> Option<(Server, TempDir)> {
    let probe = Command::new("unshare").args(["-m", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIP: no mount namespaces here (unshare -m failed)");
        return None;
    }
    let dir = TempDir::new(name);
    let m = dir.sub("mnt");
    std::fs::create_dir_all(&m).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={size} none {m} && exec {bin} --port 0 --data-dir {m}/d \
         --snapshot-entries 1000000 --heartbeat-interval 50 --election-timeout 200",
        bin = common::server_bin().display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    Some((Server::from_command(cmd), dir))
}

/// Lock cycles until one is not acknowledged; returns (cycles acknowledged,
/// what the unacknowledged one got: a line, or None for a close).
fn cycle_until_refused(c: &mut Client) -> (u64, Option<String>) {
    for i in 0u64.. {
        c.send_cmd("l", "k", "0");
        match c.line_within(Duration::from_secs(10)).unwrap() {
            Some(r) if r.starts_with("ok ") => {
                let t = token_of(&r);
                c.send_cmd("r", "k", &t);
                match c.line_within(Duration::from_secs(10)).unwrap() {
                    Some(r) if r == "ok" => {}
                    other => return (i, other),
                }
            }
            other => return (i, other),
        }
        assert!(i < 200_000, "the disk never filled");
    }
    unreachable!()
}

#[test]
fn a_full_data_disk_stops_the_node_acknowledging_with_a_clear_error() {
    let Some((mut s, _dir)) = on_small_tmpfs("full", "192k") else {
        return;
    };
    let mut c = s.connect();
    let (acked, last) = cycle_until_refused(&mut c);
    assert!(acked > 100, "only {acked} cycles before the disk filled");
    // The refused request is answered error_unavailable (or its connection
    // closed) once the node has gone 3 election timeouts without
    // acknowledging, never `ok`.
    assert!(
        last.is_none() || last.as_deref() == Some("error_unavailable"),
        "{last:?}"
    );
    // A new connection is refused too; the process stays up.
    let mut d = s.connect();
    d.send_cmd("l", "other", "0");
    let r = d.line_within(Duration::from_secs(10)).unwrap();
    assert!(
        r.is_none() || r.as_deref() == Some("error_unavailable"),
        "{r:?}"
    );
    assert!(s.is_running());
    let log = s.drain_log().join("\n");
    assert!(
        log.contains("stops acknowledging") && log.contains("No space left on device"),
        "{log}"
    );
    // The 1 MiB zero-filled tail never fitted (from the first sync, at
    // start): the log went on without it (the cycles above were
    // acknowledged), saying so once.
    let all = format!("{}\n{log}", s.startup_log.join("\n"));
    assert_eq!(
        all.matches("cannot zero-fill ahead of the log").count(),
        1,
        "{all}"
    );
}

#[test]
fn a_read_only_data_dir_is_a_clear_startup_error() {
    if !Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIP: no mount namespaces here (unshare -m failed)");
        return;
    }
    let dir = TempDir::new("ro");
    let m = dir.sub("mnt");
    std::fs::create_dir_all(&m).unwrap();
    let script = format!(
        "mount -t tmpfs -o ro,size=64k none {m} && exec {bin} --port 0 --data-dir {m}/d",
        bin = common::server_bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--data-dir") && err.contains("Read-only file system"),
        "{err}"
    );
}

/// Waits until every node has applied the same index.
fn settle(nodes: &[Server]) {
    let mut cs: Vec<Client> = nodes.iter().map(|n| Client::connect(n.port)).collect();
    wait_until("all nodes applied alike", Duration::from_secs(10), || {
        let idx: Vec<u64> = cs
            .iter_mut()
            .map(|c| field(&c.cmd("stats", "_", "_"), "applied_index"))
            .collect();
        idx.iter().all(|&i| i == idx[0])
    });
}

#[test]
fn every_command_works_through_a_follower_as_on_the_leader() {
    let dir = TempDir::new("follower");
    let ports = free_ports(3);
    let nodes: Vec<Server> = (1..=3).map(|i| node(i, &ports, &dir, &[])).collect();
    let mut probe = Client::connect(nodes[0].port);
    let mut leader = 0;
    wait_until("a leader", Duration::from_secs(15), || {
        leader = field(&probe.cmd("stats", "_", "_"), "leader_id") as usize;
        leader != 0
    });
    let follower = (1..=3).find(|&i| i != leader).unwrap() - 1;
    let other = (1..=3).find(|&i| i != leader && i - 1 != follower).unwrap() - 1;
    let mut a = Client::connect(nodes[follower].port);
    let mut b = Client::connect(nodes[other].port);
    let mut l = Client::connect(nodes[leader - 1].port);
    assert_eq!(a.cmd("ping", "_", "_"), "ok");
    // Locks: blocking acquire granted by a release on another node.
    let t = l.lock("k", "0");
    a.send_cmd("l", "k", "10");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(l.cmd("r", "k", &t), "ok");
    let ta = token_of(&a.line());
    assert_eq!(a.cmd("n", "k", &format!("{ta} 7")), "ok 7");
    assert_eq!(a.cmd("r", "k", &ta), "ok");
    // Semaphores.
    let s1 = token_of(&a.cmd("sl", "s", "0 2"));
    let _s2 = token_of(&b.cmd("sl", "s", "0 2"));
    assert_eq!(l.cmd("sl", "s", "0 2"), "timeout");
    assert_eq!(l.cmd("sl", "s", "0 3"), "error_limit_mismatch");
    assert_eq!(a.cmd("sr", "s", &s1), "ok");
    // Two-phase: enqueue on a follower, wait, granted when the holder leaves.
    let h = l.lock("tp", "0");
    assert_eq!(a.cmd("e", "tp", ""), "queued");
    a.send_cmd("w", "tp", "10");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(l.cmd("r", "tp", &h), "ok");
    assert!(a.line().starts_with("ok "));
    assert_eq!(b.cmd("w", "nothing", "1"), "error_not_enqueued");
    // Signals: listeners on two followers and the leader, a queue group
    // across nodes, published from a follower.
    assert_eq!(a.cmd("listen", "ev.*", ""), "ok");
    assert_eq!(l.cmd("listen", "ev.*", "g"), "ok");
    assert_eq!(b.cmd("listen", "ev.*", "g"), "ok");
    let mut p = Client::connect(nodes[other].port);
    // A subscription reaches another node when that node applies it.
    settle(&nodes);
    assert_eq!(p.cmd("signal", "ev.x", "hello"), "ok 2");
    assert_eq!(a.line(), "sig ev.x hello");
    let l_got = l.line_within(Duration::from_millis(300)).ok().flatten();
    let b_got = b.line_within(Duration::from_millis(300)).ok().flatten();
    assert_eq!(
        l_got.iter().chain(b_got.iter()).count(),
        1,
        "one member of the group: {l_got:?} {b_got:?}"
    );
    assert_eq!(a.cmd("unlisten", "ev.*", ""), "ok");
    settle(&nodes);
    assert_eq!(p.cmd("signal", "ev.y", "again"), "ok 1");
    // Every node shows the same state.
    std::thread::sleep(Duration::from_millis(200));
    let views: Vec<String> = nodes
        .iter()
        .map(|n| locks_of(&Client::connect(n.port).cmd("stats", "_", "_")))
        .collect();
    assert!(views.iter().all(|v| v == &views[0]), "{views:?}");
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn ready_waits_for_a_leader_and_metrics_carry_the_raft_figures() {
    let dir = TempDir::new("ready");
    let ports = free_ports(4);
    let (peer_ports, metrics) = (&ports[..3], ports[3]);
    let m = format!("127.0.0.1:{metrics}");
    let first = node(1, peer_ports, &dir, &["--metrics-addr", &m]);
    // Alone, node 1 has no leader: not ready.
    std::thread::sleep(Duration::from_millis(700));
    let r = http_get(metrics, "/ready");
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("no leader"),
        "{r}"
    );
    let others: Vec<Server> = (2..=3).map(|i| node(i, peer_ports, &dir, &[])).collect();
    wait_until("node 1 ready", Duration::from_secs(15), || {
        http_get(metrics, "/ready").starts_with("HTTP/1.1 200")
    });
    let mut c = Client::connect(first.port);
    let t = c.lock("k", "0");
    assert_eq!(c.cmd("r", "k", &t), "ok");
    let text = http_get(metrics, "/metrics");
    for needle in [
        "dflockd_cluster_node_id 1\n",
        "dflockd_cluster_term ",
        "dflockd_cluster_leader_id ",
        "dflockd_cluster_leader_changes_total ",
        "dflockd_cluster_fsyncs_total ",
        "dflockd_cluster_commit_latency_micros_sum ",
        "dflockd_cluster_log_bytes ",
        "dflockd_cluster_snapshot_index ",
    ] {
        assert!(text.contains(needle), "no {needle:?} in\n{text}");
    }
    let commits: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("dflockd_cluster_commits_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(commits >= 2, "this node's lock and release were committed");
    drop(others);
}
