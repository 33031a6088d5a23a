//! Signals through the real binary: listen/unlisten/signal, wildcards, queue
//! groups, pushes interleaved with replies, and slow consumers.

mod common;

use std::time::Duration;

use common::{Client, Server, stats, wait_for_stats};

fn listen(c: &mut Client, pattern: &str, group: &str) {
    assert_eq!(c.cmd("listen", pattern, group), "ok");
}

/// Reads the next pushed line and returns (channel, payload).
fn next_sig(c: &mut Client) -> (String, String) {
    let l = c.line();
    let rest = l
        .strip_prefix("sig ")
        .unwrap_or_else(|| panic!("not a push: {l:?}"));
    let (ch, payload) = rest.split_once(' ').unwrap();
    (ch.to_string(), payload.to_string())
}

fn no_more(c: &mut Client) {
    assert!(
        c.line_within(Duration::from_millis(50)).is_err(),
        "unexpected line"
    );
}

#[test]
fn exact_star_and_gt_patterns() {
    let s = Server::start(&[]);
    let mut exact = s.connect();
    let mut star = s.connect();
    let mut gt = s.connect();
    let mut publisher = s.connect();
    listen(&mut exact, "orders.eu", "");
    listen(&mut star, "orders.*", "");
    listen(&mut gt, "orders.>", "");
    assert_eq!(publisher.cmd("signal", "orders.eu", "hello world"), "ok 3");
    for c in [&mut exact, &mut star, &mut gt] {
        assert_eq!(next_sig(c), ("orders.eu".into(), "hello world".into()));
    }
    assert_eq!(publisher.cmd("signal", "orders.eu.paris", "x"), "ok 1");
    assert_eq!(next_sig(&mut gt).0, "orders.eu.paris");
    // `>` needs at least one token after the prefix.
    assert_eq!(publisher.cmd("signal", "orders", "x"), "ok 0");
    assert_eq!(publisher.cmd("signal", "other", "x"), "ok 0");
    no_more(&mut exact);
    no_more(&mut star);
    no_more(&mut gt);
}

#[test]
fn invalid_patterns_and_channels_get_error() {
    let s = Server::start(&[]);
    let mut c = s.connect();
    for bad in ["a.>.b", "a*", "a..b", ".a", "a.", ">.a"] {
        assert_eq!(c.cmd("listen", bad, ""), "error", "{bad}");
    }
    assert_eq!(c.cmd("signal", "a.*", "x"), "error");
    assert_eq!(c.cmd("signal", "a.>", "x"), "error");
    assert_eq!(c.cmd("signal", "a.b", "   "), "error");
    assert_eq!(c.cmd("signal", "a.b", ""), "error");
    assert_eq!(c.cmd("ping", "_", ""), "ok");
}

#[test]
fn a_connection_gets_each_signal_once_and_counts_are_deliveries() {
    let s = Server::start(&[]);
    let mut l = s.connect();
    let mut p = s.connect();
    listen(&mut l, "a.*", "");
    listen(&mut l, "a.>", "");
    listen(&mut l, "a.b", "");
    listen(&mut l, "a.b", ""); // no-op
    assert_eq!(p.cmd("signal", "a.b", "once"), "ok 1");
    assert_eq!(next_sig(&mut l).1, "once");
    no_more(&mut l);
    let j = stats(&mut p);
    assert!(
        j.contains("{\"pattern\":\"a.b\",\"group\":\"\",\"listeners\":1}"),
        "{j}"
    );
}

#[test]
fn queue_group_members_share_signals_round_robin() {
    let s = Server::start(&[]);
    let mut members: Vec<Client> = (0..3).map(|_| s.connect()).collect();
    for m in members.iter_mut() {
        listen(m, "jobs.*", "workers");
    }
    let mut p = s.connect();
    for i in 0..30 {
        assert_eq!(p.cmd("signal", "jobs.new", &format!("job-{i}")), "ok 1");
    }
    for m in members.iter_mut() {
        let got: Vec<String> = (0..10).map(|_| next_sig(m).1).collect();
        assert_eq!(got.len(), 10);
        no_more(m);
    }
}

#[test]
fn two_groups_on_one_pattern_each_get_every_signal() {
    let s = Server::start(&[]);
    let mut g1 = s.connect();
    let mut g2 = s.connect();
    let mut plain = s.connect();
    listen(&mut g1, "ev.>", "one");
    listen(&mut g2, "ev.>", "two");
    listen(&mut plain, "ev.>", "");
    let mut p = s.connect();
    for i in 0..5 {
        assert_eq!(p.cmd("signal", "ev.x", &i.to_string()), "ok 3");
    }
    for c in [&mut g1, &mut g2, &mut plain] {
        for i in 0..5 {
            assert_eq!(next_sig(c).1, i.to_string());
        }
    }
}

#[test]
fn unlisten_and_disconnect_remove_subscriptions() {
    let s = Server::start(&["--max-subscriptions", "2"]);
    let mut l = s.connect();
    let mut p = s.connect();
    listen(&mut l, "a", "");
    listen(&mut l, "b", "g");
    assert_eq!(
        l.cmd("listen", "c", ""),
        "error",
        "over --max-subscriptions"
    );
    listen(&mut l, "a", ""); // already a member: still fine
    assert_eq!(l.cmd("unlisten", "a", ""), "ok");
    assert_eq!(p.cmd("signal", "a", "x"), "ok 0");
    assert_eq!(p.cmd("signal", "b", "x"), "ok 1");
    assert_eq!(next_sig(&mut l).0, "b");
    l.shutdown();
    drop(l);
    // Subscriptions do not outlive the connection.
    wait_for_stats(&mut p, "\"signal_channels\":[]", Duration::from_secs(5));
    assert_eq!(p.cmd("signal", "b", "x"), "ok 0");
}

#[test]
fn pushes_reach_a_connection_blocked_in_l() {
    let s = Server::start(&[]);
    let mut holder = s.connect();
    let t = holder.lock("k", "0");
    let mut w = s.connect();
    listen(&mut w, "news", "");
    w.send_cmd("l", "k", "10");
    std::thread::sleep(Duration::from_millis(50));
    let mut p = s.connect();
    assert_eq!(p.cmd("signal", "news", "while you wait"), "ok 1");
    assert_eq!(next_sig(&mut w).1, "while you wait");
    assert_eq!(holder.cmd("r", "k", &t), "ok");
    assert!(w.line().starts_with("ok "));
}

#[test]
fn a_64_kib_payload_is_delivered_whole() {
    let s = Server::start(&[]);
    let mut l = s.connect();
    listen(&mut l, "big", "");
    let mut p = s.connect();
    let payload = "x".repeat(64 * 1024);
    assert_eq!(p.cmd("signal", "big", &payload), "ok 1");
    assert_eq!(next_sig(&mut l).1.len(), payload.len());
    // One byte more is a read-level error.
    p.send_cmd("signal", "big", &format!("{payload}y"));
    assert_eq!(p.line(), "error");
    assert!(p.closed_within(Duration::from_secs(3)));
}

#[test]
fn a_listener_that_never_reads_is_disconnected() {
    let s = Server::start(&["--max-output-buffer", "262144"]);
    let mut sleeper = s.connect();
    listen(&mut sleeper, "flood", "");
    let mut reader = s.connect();
    listen(&mut reader, "flood", "");
    let mut p = s.connect();
    let mut locker = s.connect();
    let payload = "z".repeat(60 * 1024);
    let mut dropped = false;
    for i in 0..400 {
        let r = p.cmd("signal", "flood", &payload);
        assert!(r == "ok 2" || r == "ok 1", "{r}");
        assert_eq!(next_sig(&mut reader).1.len(), payload.len());
        if i % 20 == 0 {
            // Lock clients are served throughout.
            let t = locker.lock("busy", "0");
            assert_eq!(locker.cmd("r", "busy", &t), "ok");
        }
        if r == "ok 1" {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the non-reading listener was never disconnected");
    let log = s.drain_log().join("\n");
    assert!(log.contains("slow consumer"), "{log}");
    assert!(stats(&mut p).contains("\"connections\":3"));
}

#[test]
fn a_connection_publishing_to_itself_past_its_cap_is_dropped_cleanly() {
    let s = Server::start(&["--max-output-buffer", "4096"]);
    let mut c = s.connect();
    listen(&mut c, "ch", "");
    let payload = "x".repeat(3000);
    let one = format!("signal\nch\n{payload}\n");
    c.send(one.repeat(3).as_bytes());
    assert!(c.closed_within(Duration::from_secs(5)));
    let mut fresh = s.connect();
    assert_eq!(fresh.cmd("ping", "_", ""), "ok");
    assert!(stats(&mut fresh).starts_with("{\"connections\":1,"));
}
