//! Semaphores through the real binary: `sl`, `sr`, `sn`, `se`, `sw`, the shared
//! namespace with locks, FIFO across slots, expiry and disconnect hand-off.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Server, stats, token_of, wait_for_stats};

#[test]
fn every_semaphore_command_and_status() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut b = s.connect();
    let t1 = token_of(&a.cmd("sl", "s", "0 2"));
    let t2 = token_of(&a.cmd("sl", "s", "0 2 9"));
    assert_eq!(b.cmd("sl", "s", "0 2"), "timeout");
    assert_eq!(b.cmd("sl", "s", "0 3"), "error_limit_mismatch");
    assert_eq!(b.cmd("se", "s", "3"), "error_limit_mismatch");
    assert_eq!(a.cmd("sn", "s", &t1), "ok 33");
    assert_eq!(a.cmd("sn", "s", &format!("{t2} 4")), "ok 4");
    assert_eq!(
        a.cmd("sn", "s", "ffffffffffffffffffffffffffffffff"),
        "error"
    );
    assert_eq!(b.cmd("se", "s", "2 5"), "queued");
    assert_eq!(b.cmd("se", "s", "2"), "error_already_enqueued");
    assert_eq!(b.cmd("sw", "s", "0"), "timeout");
    assert_eq!(b.cmd("sw", "s", "0"), "error_not_enqueued");
    assert_eq!(b.cmd("se", "s", "2 5"), "queued");
    b.send_cmd("sw", "s", "10");
    assert_eq!(a.cmd("sr", "s", &t1), "ok");
    let r = b.line();
    assert!(r.starts_with("ok ") && r.ends_with(" 5"), "{r}");
    assert_eq!(a.cmd("sr", "s", &t1), "error");
    assert_eq!(a.cmd("sr", "s", "garbage"), "error");
    // A granted-before-wait lease that ran out: error_lease_expired.
    let mut c = s.connect();
    assert_eq!(c.cmd("se", "s", "2 1"), "queued");
    assert_eq!(a.cmd("sr", "s", &t2), "ok");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(c.cmd("sw", "s", "5"), "error_lease_expired");
    let json = stats(&mut a);
    assert!(
        json.contains("\"semaphores\":[{\"key\":\"s\",\"limit\":2,\"holders\":1,\"waiters\":0}]"),
        "{json}"
    );
}

#[test]
fn nine_clients_on_limit_three_see_at_most_three_and_fifo() {
    let s = Server::start(&[]);
    let mut admin = s.connect();
    let mut clients: Vec<Client> = (0..9).map(|_| s.connect()).collect();
    let mut tokens: Vec<Option<String>> = vec![None; 9];
    // The first three are granted at once; the other six queue in order.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_cmd("sl", "pool", "30 3");
        if i < 3 {
            tokens[i] = Some(token_of(&c.line()));
        } else {
            wait_for_stats(
                &mut admin,
                &format!("\"holders\":3,\"waiters\":{}", i - 2),
                Duration::from_secs(5),
            );
        }
    }
    // Release one at a time, oldest holder first; each release admits
    // exactly the next waiter in arrival order and nobody else.
    for i in 0..9 {
        let t = tokens[i].take().unwrap();
        assert_eq!(clients[i].cmd("sr", "pool", &t), "ok");
        if i + 3 < 9 {
            tokens[i + 3] = Some(token_of(&clients[i + 3].line()));
            for later in clients.iter_mut().skip(i + 4) {
                assert!(later.line_within(Duration::from_millis(10)).is_err());
            }
            let j = stats(&mut admin);
            assert!(j.contains("\"holders\":3"), "{j}");
        }
    }
    wait_for_stats(
        &mut admin,
        "\"idle_semaphores\":[{\"key\":\"pool\"",
        Duration::from_secs(5),
    );
}

#[test]
fn expiry_and_disconnect_hand_off_slots() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut b = s.connect();
    let mut c = s.connect();
    token_of(&a.cmd("sl", "h", "0 2 1"));
    token_of(&b.cmd("sl", "h", "0 2"));
    c.send_cmd("sl", "h", "10 2");
    let t0 = Instant::now();
    assert!(c.line().starts_with("ok "));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(1600),
        "{took:?}"
    );
    let mut d = s.connect();
    d.send_cmd("sl", "h", "10 2");
    std::thread::sleep(Duration::from_millis(50));
    b.shutdown();
    drop(b);
    assert!(d.line().starts_with("ok "));
}

#[test]
fn locks_and_semaphores_share_one_namespace() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut b = s.connect();
    let t = a.lock("shared", "0");
    assert_eq!(b.cmd("sl", "shared", "0 2"), "error_limit_mismatch");
    // Limit 1 is the lock itself: it queues behind the holder.
    b.send_cmd("sl", "shared", "10 1");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(a.cmd("r", "shared", &t), "ok");
    assert!(b.line().starts_with("ok "));
    token_of(&a.cmd("sl", "sem", "0 3"));
    assert_eq!(b.cmd("l", "sem", "0"), "error_limit_mismatch");
    assert_eq!(b.cmd("e", "sem", ""), "error_limit_mismatch");
}

#[test]
fn one_connection_may_hold_several_slots() {
    let s = Server::start(&[]);
    let mut a = s.connect();
    let mut b = s.connect();
    for _ in 0..3 {
        token_of(&a.cmd("sl", "multi", "0 3"));
    }
    assert_eq!(b.cmd("sl", "multi", "0 3"), "timeout");
    b.send_cmd("sl", "multi", "10 3");
    std::thread::sleep(Duration::from_millis(50));
    // Closing the connection frees all three slots; the waiter gets one.
    a.shutdown();
    drop(a);
    assert!(b.line().starts_with("ok "));
    let mut c = s.connect();
    assert!(c.cmd("sl", "multi", "0 3").starts_with("ok "));
    assert!(c.cmd("sl", "multi", "0 3").starts_with("ok "));
    assert_eq!(c.cmd("sl", "multi", "0 3"), "timeout");
}

#[test]
fn holds_per_connection_are_capped() {
    let s = Server::start(&["--max-holds-per-connection", "3"]);
    let mut a = s.connect();
    for _ in 0..3 {
        token_of(&a.cmd("sl", "big", "0 1000000"));
    }
    assert_eq!(a.cmd("sl", "big", "0 1000000"), "error_max_locks");
    assert_eq!(a.cmd("l", "x", "0"), "error_max_locks");
    let mut b = s.connect();
    token_of(&b.cmd("sl", "big", "0 1000000"));
}
