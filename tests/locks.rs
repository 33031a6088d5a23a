//! The real binary on a real socket: lock commands, queues, leases,
//! two-phase acquire, disconnects, pipelining and bad input.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Server, stats, token_of, wait_for_stats};

#[test]
fn every_lock_command_and_status() {
    let s = Server::start(&["--max-locks", "3", "--max-waiters", "1"]);
    let mut a = s.connect();
    let mut b = s.connect();
    assert_eq!(a.cmd("ping", "_", ""), "ok");
    let t = a.lock("k", "0 5");
    assert!(a.cmd("l", "k2", "0").starts_with("ok "));
    assert_eq!(b.cmd("l", "k", "0"), "timeout");
    assert_eq!(a.cmd("n", "k", &t), "ok 33");
    assert_eq!(a.cmd("n", "k", &format!("{t} 7")), "ok 7");
    assert_eq!(b.cmd("n", "k", "00000000000000000000000000000000"), "error");
    assert_eq!(b.cmd("r", "k", "00000000000000000000000000000000"), "error");
    assert_eq!(b.cmd("r", "k", "not-a-token"), "error");
    // The waiter cap: one waiter may queue, the next is refused.
    b.send_cmd("l", "k", "10");
    let mut c = s.connect();
    assert_eq!(c.cmd("l", "k", "10"), "error_max_waiters");
    assert_eq!(c.cmd("e", "k", ""), "error_max_waiters");
    assert_eq!(a.cmd("r", "k", &t), "ok");
    let tb = token_of(&b.line());
    assert_eq!(a.cmd("r", "k", &t), "error");
    // The key cap.
    assert!(c.cmd("l", "k3", "0").starts_with("ok "));
    assert_eq!(c.cmd("l", "k4", "0"), "error_max_locks");
    // Two-phase.
    assert_eq!(c.cmd("e", "k", "4"), "queued");
    assert_eq!(c.cmd("e", "k", "4"), "error_already_enqueued");
    assert_eq!(c.cmd("w", "k", "0"), "timeout");
    assert_eq!(c.cmd("w", "k", "1"), "error_not_enqueued");
    assert_eq!(b.cmd("r", "k", &tb), "ok");
    let r = c.cmd("e", "k", "4");
    assert!(r.starts_with("acquired ") && r.ends_with(" 4"), "{r}");
    let r2 = c.cmd("w", "k", "1");
    assert_eq!(r2, format!("ok {} 4", token_of(&r)));
    let json = stats(&mut a);
    assert!(json.starts_with("{\"connections\":3,"), "{json}");
    assert!(json.contains("\"key\":\"k\""), "{json}");
    assert!(json.contains("\"semaphores\":[]"), "{json}");
    assert!(json.contains("\"signal_channels\":[]"), "{json}");
}

#[test]
fn waiters_are_granted_in_arrival_order() {
    // Each waiter is queued (confirmed through stats) before the next one
    // sends, so arrival order is known; then releases hand the lock down.
    let s = Server::start(&[]);
    let mut admin = s.connect();
    let mut holder = s.connect();
    let first = holder.lock("q", "0");
    let mut clients: Vec<Client> = Vec::new();
    for i in 0..6 {
        let mut c = s.connect();
        c.send_cmd("l", "q", "30");
        let want = format!("\"waiters\":{}", i + 1);
        wait_for_stats(&mut admin, &want, Duration::from_secs(5));
        clients.push(c);
    }
    assert_eq!(holder.cmd("r", "q", &first), "ok");
    for i in 0..clients.len() {
        let tok = token_of(&clients[i].line());
        // Nobody behind has been granted.
        for later in clients.iter_mut().skip(i + 1) {
            assert!(later.line_within(Duration::from_millis(20)).is_err());
        }
        assert_eq!(clients[i].cmd("r", "q", &tok), "ok");
    }
}

#[test]
fn acquire_timeout_fires_on_time() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut b = s.connect();
    a.lock("t", "0");
    let t0 = Instant::now();
    assert_eq!(b.cmd("l", "t", "1"), "timeout");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    assert!(took < Duration::from_millis(2000), "{took:?}");
}

#[test]
fn lease_expiry_hands_the_lock_to_the_next_waiter() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut b = s.connect();
    let t = a.lock("x", "0 1");
    let t0 = Instant::now();
    let r = b.cmd("l", "x", "10");
    let took = t0.elapsed();
    assert!(r.starts_with("ok "), "{r}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // The expired holder's token no longer works.
    assert_eq!(a.cmd("r", "x", &t), "error");
    assert_eq!(a.cmd("n", "x", &t), "error");
    let log = s.drain_log().join("\n");
    assert!(log.contains("lease expired"), "{log}");
}

#[test]
fn holder_disconnect_hands_off_at_once() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut b = s.connect();
    a.lock("d", "0");
    b.send_cmd("l", "d", "10");
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    a.shutdown();
    drop(a);
    assert!(b.line().starts_with("ok "));
    assert!(t0.elapsed() < Duration::from_millis(500));
}

#[test]
fn no_auto_release_keeps_the_lock_until_its_lease_ends() {
    let s = Server::start(&["--no-auto-release-on-disconnect"]);
    let mut a = s.connect();
    let mut b = s.connect();
    a.lock("d", "0 1");
    a.shutdown();
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(b.cmd("l", "d", "0"), "timeout");
    assert!(b.cmd("l", "d", "5").starts_with("ok "));
}

#[test]
fn a_waiter_that_disconnects_leaves_the_queue() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let t = a.lock("w", "0");
    let mut gone = s.connect();
    gone.send_cmd("l", "w", "30");
    let mut b = s.connect();
    b.send_cmd("l", "w", "30");
    std::thread::sleep(Duration::from_millis(50));
    assert!(stats(&mut a).contains("\"waiters\":2"));
    gone.shutdown();
    drop(gone);
    // The closed waiter leaves the queue.
    wait_for_stats(&mut a, "\"waiters\":1", Duration::from_secs(5));
    assert_eq!(a.cmd("r", "w", &t), "ok");
    assert!(b.line().starts_with("ok "));
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend_from_slice(format!("l\np{i}\n0\nping\n_\n\n").as_bytes());
    }
    batch.extend_from_slice(b"bogus\nk\n1\nstats\n_\n_\n");
    a.send(&batch);
    for _ in 0..50 {
        assert!(a.line().starts_with("ok "));
        assert_eq!(a.line(), "ok");
    }
    assert_eq!(a.line(), "error");
    assert!(a.line().starts_with("ok {"));
}

#[test]
fn requests_behind_a_blocked_one_wait_then_run() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let t = a.lock("b", "0");
    let mut b = s.connect();
    b.send(b"l\nb\n10\nping\n_\n\nl\nother\n0\n");
    assert!(
        b.line_within(Duration::from_millis(100)).is_err(),
        "answered while blocked"
    );
    assert_eq!(a.cmd("r", "b", &t), "ok");
    assert!(b.line().starts_with("ok "));
    assert_eq!(b.line(), "ok");
    assert!(b.line().starts_with("ok "));
}

#[test]
fn a_blocked_connection_whose_peer_closes_cancels_its_waiter() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let t = a.lock("c", "0");
    let mut b = s.connect();
    b.send_cmd("l", "c", "30");
    std::thread::sleep(Duration::from_millis(50));
    b.stream.shutdown(std::net::Shutdown::Write).unwrap();
    wait_for_stats(&mut a, "\"waiters\":0", Duration::from_secs(5));
    assert!(stats(&mut a).contains("\"connections\":1"));
    assert_eq!(a.cmd("r", "c", &t), "ok");
}

fn assert_fresh_connection_works(s: &Server) {
    let mut f = s.connect();
    assert_eq!(f.cmd("ping", "_", ""), "ok");
    assert!(f.cmd("l", "fresh", "0").starts_with("ok "));
}

#[test]
fn a_300_byte_line_gets_error_and_close() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    a.send(format!("l\n{}\n0\n", "k".repeat(300)).as_bytes());
    assert_eq!(a.line(), "error");
    assert!(a.closed_within(Duration::from_secs(3)));
    assert_fresh_connection_works(&s);
}

#[test]
fn a_256_byte_key_is_fine() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    assert!(a.cmd("l", &"k".repeat(256), "0").starts_with("ok "));
    assert!(
        a.cmd("l", &format!("{}\r", "j".repeat(255)), "0")
            .starts_with("ok ")
    );
}

#[test]
fn a_megabyte_without_newline_gets_error_and_close() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let blob = vec![b'a'; 1 << 20];
    // The server closes early; the rest of the write may fail.
    let _ = std::io::Write::write_all(&mut a.stream, &blob);
    match a.line_within(Duration::from_secs(5)) {
        Ok(Some(l)) => assert_eq!(l, "error"),
        // A reset can overtake the reply when the peer is still writing.
        other => panic!("expected error reply, got {other:?}"),
    }
    assert!(a.closed_within(Duration::from_secs(3)));
    assert_fresh_connection_works(&s);
}

#[test]
fn invalid_utf8_and_nul_bytes_get_error_and_keep_the_connection() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    a.send(b"l\n\xff\xfe\n0\n");
    assert_eq!(a.line(), "error");
    a.send(b"l\0\nk\n0\n");
    assert_eq!(a.line(), "error");
    a.send(b"l\nk\n\x001\n");
    assert_eq!(a.line(), "error");
    a.send(b"l\nk\n-1\n");
    assert_eq!(a.line(), "error");
    a.send(b"l\nk\n9223372037\n");
    assert_eq!(a.line(), "error");
    a.send(b"l\nk\n1 0\n");
    assert_eq!(a.line(), "error");
    a.send(b"l\na b\n1\n");
    assert_eq!(a.line(), "error");
    a.send(b"l\n\n1\n");
    assert_eq!(a.line(), "error");
    assert_eq!(a.cmd("ping", "_", ""), "ok");
    assert_fresh_connection_works(&s);
}

#[test]
fn half_a_request_then_silence_times_out() {
    let s = Server::start(&["--read-timeout", "1"]);
    let mut a = s.connect();
    let mut idle = s.connect();
    a.send(b"l\nkey\n");
    let t0 = Instant::now();
    assert_eq!(a.line(), "error");
    assert!(a.closed_within(Duration::from_secs(3)));
    assert!(t0.elapsed() >= Duration::from_millis(900));
    // An idle connection goes the same way.
    assert_eq!(idle.line(), "error");
    assert!(idle.closed_within(Duration::from_secs(3)));
    assert_fresh_connection_works(&s);
}

#[test]
fn ping_keeps_an_idle_connection_alive_and_waiting_is_not_idle() {
    let s = Server::start(&["--read-timeout", "1"]);
    let mut a = s.connect();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(a.cmd("ping", "_", ""), "ok");
    }
    let mut h = s.connect();
    h.lock("long", "0");
    let mut w = s.connect();
    // Waits 2.5 s, longer than the read timeout, and still gets its answer.
    let t0 = Instant::now();
    let mut pinger = s.connect();
    w.send_cmd("l", "long", "2");
    while t0.elapsed() < Duration::from_millis(1800) {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(h.cmd("ping", "_", ""), "ok");
        assert_eq!(pinger.cmd("ping", "_", ""), "ok");
    }
    assert_eq!(w.line(), "timeout");
}

#[test]
fn a_thousand_simultaneous_connections_are_served() {
    let s = Server::start(&["--max-locks", "0"]);
    let mut clients: Vec<Client> = (0..1000).map(|_| s.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_cmd("l", &format!("k{i}"), "0");
    }
    for c in clients.iter_mut() {
        assert!(c.line().starts_with("ok "));
    }
    let mut admin = s.connect();
    assert!(stats(&mut admin).starts_with("{\"connections\":1001,"));
}

#[test]
fn max_connections_closes_extra_connections_at_once() {
    let s = Server::start(&["--max-connections", "2"]);
    let mut a = s.connect();
    let mut b = s.connect();
    assert_eq!(a.cmd("ping", "_", ""), "ok");
    assert_eq!(b.cmd("ping", "_", ""), "ok");
    let mut c = s.connect();
    assert!(c.closed_within(Duration::from_secs(3)));
    drop(b);
    std::thread::sleep(Duration::from_millis(100));
    let mut d = s.connect();
    assert_eq!(d.cmd("ping", "_", ""), "ok");
    assert_eq!(a.cmd("ping", "_", ""), "ok");
}

#[test]
fn tokens_carry_increasing_fences() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut last = 0u64;
    for i in 0..20 {
        let t = a.lock(&format!("f{i}"), "0");
        let fence = u64::from_str_radix(&t[..16], 16).unwrap();
        assert!(fence > last);
        last = fence;
    }
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (args, env, name) in [
        (vec!["--port", "abc"], vec![], "--port"),
        (vec!["--max-locks", "-3"], vec![], "--max-locks"),
        (vec!["--frobnicate"], vec![], "--frobnicate"),
        (
            vec!["--auto-release-on-disconnect=maybe"],
            vec![],
            "--auto-release-on-disconnect",
        ),
        (
            vec![],
            vec![("DFLOCKD_READ_TIMEOUT_S", "soon")],
            "DFLOCKD_READ_TIMEOUT_S",
        ),
        (vec!["--host", "not a host"], vec![], "--host"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dflockd"))
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{args:?}: {err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dflockd"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--max-waiters"));
}

#[test]
fn idle_keys_are_collected() {
    let s = Server::start(&["--gc-interval", "1", "--gc-max-idle", "1"]);
    let mut a = s.connect();
    let t = a.lock("gc", "0");
    assert_eq!(a.cmd("r", "gc", &t), "ok");
    assert!(stats(&mut a).contains("\"idle_locks\":[{\"key\":\"gc\""));
    std::thread::sleep(Duration::from_millis(2300));
    assert!(stats(&mut a).contains("\"idle_locks\":[]"));
}

#[test]
fn readme_and_help_document_the_same_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dflockd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let flags: Vec<&str> = help
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("--"))
        .map(|l| l.split([' ', '[']).next().unwrap())
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    for flag in flags {
        assert!(
            readme.contains(&format!("`{flag}")),
            "README does not document {flag}"
        );
    }
    for var in help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("DFLOCKD_"))
    {
        assert!(readme.contains(var), "README does not mention {var}");
    }
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_dflockd"))
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8(version.stdout).unwrap();
    assert!(
        v.starts_with(&format!("dflockd {}", env!("CARGO_PKG_VERSION"))) && v.contains("features:"),
        "{v}"
    );
}
