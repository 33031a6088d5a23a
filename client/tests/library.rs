//! The client library against the real `dflockd` binary, on real sockets:
//! every `Client` call, signals, validation, auth, TLS, draining, failover,
//! peers that do not speak the protocol, the renewing guards and sharding.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki::{Pki, tls_server};
use common::{Server, fake_server, wait_for_stats};
use dflockd_client::{
    Client, Config, Enqueued, Error, GuardOptions, Lock, LostReason, Semaphore, Servers, Tls,
    crc32, shard_index,
};

const ZERO: Duration = Duration::ZERO;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// A configuration for `addrs` with short timeouts, so a broken case fails
/// fast instead of hanging.
fn cfg_for(addrs: &str) -> Config {
    Config::new(addrs)
        .unwrap()
        .connect_timeout(secs(2))
        .io_timeout(secs(5))
}

fn cfg(s: &Server) -> Config {
    cfg_for(&s.addr())
}

fn client(s: &Server) -> Client {
    Client::connect(&cfg(s)).expect("connect")
}

/// Calls `f` until it returns true, failing after `within`.
fn poll_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(ms(10));
    }
}

/// An address nothing listens on, while it lives.
///
/// A port bound and then closed again (`127.0.0.1:0`, drop) may be handed
/// to the next `bind(0)` of a test running in parallel, and then accepts
/// connections (seen once in about twenty runs with 30 test threads).
/// This holds the port instead as the local end of a connected socket:
/// nothing listens there, so connecting is refused, and no listener can be
/// bound to it (`EADDRINUSE`) until the socket is dropped.
struct DeadAddr {
    addr: String,
    _hold: [TcpStream; 2],
}

fn dead_addr() -> DeadAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (peer, _) = l.accept().unwrap();
    let addr = s.local_addr().unwrap().to_string();
    DeadAddr {
        addr,
        _hold: [s, peer],
    }
}

fn assert_timeout<T: std::fmt::Debug>(r: dflockd_client::Result<T>) {
    match r {
        Err(Error::Timeout) => {}
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Every Client call
// ---------------------------------------------------------------------------

#[test]
fn lock_renew_release() {
    let s = Server::start(&["--default-lease-ttl", "5"]);
    let mut a = client(&s);
    let g = a.lock("k", secs(1), None).unwrap();
    assert_eq!(g.key, "k");
    assert_eq!(g.token.len(), 32);
    assert_eq!(g.lease, secs(5), "the server default lease");
    assert!(g.fence().is_some());
    // Renew returns the new lease: the one asked for, or the default.
    assert_eq!(a.renew("k", &g.token, Some(secs(7))).unwrap(), secs(7));
    assert_eq!(a.renew("k", &g.token, None).unwrap(), secs(5));
    // A fraction of a second is rounded up to whole seconds.
    assert_eq!(a.renew("k", &g.token, Some(ms(1500))).unwrap(), secs(2));
    // Tokens work from any connection.
    let mut b = client(&s);
    assert_eq!(b.renew("k", &g.token, Some(secs(3))).unwrap(), secs(3));
    a.release("k", &g.token).unwrap();
    // Released: it cannot be released or renewed again.
    assert!(matches!(a.release("k", &g.token), Err(Error::Refused)));
    assert!(matches!(a.renew("k", &g.token, None), Err(Error::Refused)));
    // And is free for someone else at once.
    let g2 = b.lock("k", ZERO, None).unwrap();
    assert_ne!(g2.token, g.token);
    b.release("k", &g2.token).unwrap();
    assert!(a.is_connected() && b.is_connected());
    assert_eq!(a.peer(), Some(s.addr().as_str()));
}

#[test]
fn try_once_times_out_while_held_and_a_blocking_lock_gets_the_release() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let g = a.lock("k", ZERO, None).unwrap();
    let t0 = Instant::now();
    assert_timeout(b.lock("k", ZERO, None));
    assert!(t0.elapsed() < secs(1), "try-once must not wait");
    // A waiting `l` with a timeout gets the lock when the holder releases.
    let (mut b, got) = std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            let r = b.lock("k", secs(4), None);
            (b, Instant::now(), r)
        });
        std::thread::sleep(ms(200));
        let released = Instant::now();
        a.release("k", &g.token).unwrap();
        let (b, got_at, r) = h.join().unwrap();
        assert!(got_at >= released, "granted before the release");
        (b, r.unwrap())
    });
    assert_eq!(got.key, "k");
    b.release("k", &got.token).unwrap();
    // A waiting `l` that runs out gets Timeout after its timeout.
    let g = a.lock("k", ZERO, None).unwrap();
    let t0 = Instant::now();
    assert_timeout(b.lock("k", secs(1), None));
    let waited = t0.elapsed();
    assert!(
        waited >= ms(900) && waited < secs(3),
        "waited {waited:?} for a 1 s timeout"
    );
    assert!(b.is_connected());
    a.release("k", &g.token).unwrap();
}

#[test]
fn lock_with_a_lease_expires_unless_renewed() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let g = a.lock("k", ZERO, Some(secs(1))).unwrap();
    assert_eq!(g.lease, secs(1));
    let st = b.stats().unwrap();
    let l = st.locks.iter().find(|l| l.key == "k").expect("k held");
    assert!(
        l.lease_expires_in_s > 0.0 && l.lease_expires_in_s <= 1.0,
        "{l:?}"
    );
    // Nobody renews: the lease runs out after about a second and the
    // waiter gets the lock.
    let t0 = Instant::now();
    let g2 = b.lock("k", secs(3), None).unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= ms(700) && waited < ms(2500),
        "lease of 1 s ran out after {waited:?}"
    );
    // The expired token is refused.
    assert!(matches!(a.renew("k", &g.token, None), Err(Error::Refused)));
    assert!(matches!(a.release("k", &g.token), Err(Error::Refused)));
    b.release("k", &g2.token).unwrap();
}

#[test]
fn enqueue_acquires_a_free_key_at_once() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let Enqueued::Acquired(g) = a.enqueue("k", Some(secs(9))).unwrap() else {
        panic!("a free key must be acquired at enqueue");
    };
    assert_eq!((g.key.as_str(), g.lease), ("k", secs(9)));
    // Held like any other grant.
    assert_timeout(b.lock("k", ZERO, None));
    a.release("k", &g.token).unwrap();
    b.lock("k", ZERO, None).unwrap();
}

#[test]
fn enqueue_queues_and_wait_collects_the_grant() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let mut c = client(&s);
    let ga = a.lock("k", ZERO, None).unwrap();
    assert_eq!(b.enqueue("k", Some(secs(5))).unwrap(), Enqueued::Queued);
    // `wait` blocks until the holder releases.
    let (mut b, gb) = std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            let r = b.wait("k", secs(4));
            (b, Instant::now(), r)
        });
        std::thread::sleep(ms(200));
        let released = Instant::now();
        a.release("k", &ga.token).unwrap();
        let (b, got_at, r) = h.join().unwrap();
        assert!(got_at >= released, "wait returned before the release");
        (b, r.unwrap())
    });
    assert_eq!((gb.key.as_str(), gb.lease), ("k", secs(5)));
    assert!(gb.fence().unwrap() > ga.fence().unwrap());
    // The grant was settled: another wait is not enqueued.
    assert!(matches!(b.wait("k", ZERO), Err(Error::NotEnqueued)));

    // A grant made before `wait` is collected at once.
    assert_eq!(c.enqueue("k", None).unwrap(), Enqueued::Queued);
    b.release("k", &gb.token).unwrap();
    let t0 = Instant::now();
    let gc = c.wait("k", secs(4)).unwrap();
    assert!(t0.elapsed() < secs(1));
    // `wait` that runs out is a Timeout and leaves the queue.
    assert_eq!(b.enqueue("k", None).unwrap(), Enqueued::Queued);
    assert_timeout(b.wait("k", secs(1)));
    assert!(matches!(b.wait("k", ZERO), Err(Error::NotEnqueued)));
    c.release("k", &gc.token).unwrap();
    assert!(b.is_connected() && c.is_connected());
}

#[test]
fn wait_without_enqueue_and_double_enqueue_are_refused() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    assert!(matches!(b.wait("k", ZERO), Err(Error::NotEnqueued)));
    assert!(matches!(b.wait("k", secs(1)), Err(Error::NotEnqueued)));
    let g = a.lock("k", ZERO, None).unwrap();
    assert_eq!(b.enqueue("k", None).unwrap(), Enqueued::Queued);
    assert!(matches!(b.enqueue("k", None), Err(Error::AlreadyEnqueued)));
    // The first entry is still there and settles normally.
    a.release("k", &g.token).unwrap();
    let gb = b.wait("k", secs(2)).unwrap();
    b.release("k", &gb.token).unwrap();
    // After settling, enqueue may be sent again.
    assert!(matches!(b.enqueue("k", None), Ok(Enqueued::Acquired(_))));
    assert!(b.is_connected());
}

#[test]
fn semaphore_calls_with_limit_two() {
    let s = Server::start(&["--default-lease-ttl", "6"]);
    let mut a = client(&s);
    let mut b = client(&s);
    let mut c = client(&s);
    let ga = a.sem_acquire("pool", 2, ZERO, None).unwrap();
    let gb = b.sem_acquire("pool", 2, secs(1), Some(secs(4))).unwrap();
    assert_eq!((ga.lease, gb.lease), (secs(6), secs(4)));
    assert_ne!(ga.token, gb.token);
    // Both slots taken: a third holder times out.
    assert_timeout(c.sem_acquire("pool", 2, ZERO, None));
    assert_timeout(c.sem_acquire("pool", 2, secs(1), None));
    assert_eq!(
        a.sem_renew("pool", &ga.token, Some(secs(3))).unwrap(),
        secs(3)
    );
    assert_eq!(a.sem_renew("pool", &ga.token, None).unwrap(), secs(6));
    let st = c.stats().unwrap();
    let sem = st.semaphores.iter().find(|x| x.key == "pool").unwrap();
    assert_eq!((sem.limit, sem.holders, sem.waiters), (2, 2, 0));

    // Two-phase: queued while full, granted after a release.
    assert_eq!(c.sem_enqueue("pool", 2, None).unwrap(), Enqueued::Queued);
    a.sem_release("pool", &ga.token).unwrap();
    let gc = c.sem_wait("pool", secs(2)).unwrap();
    assert_eq!(gc.key, "pool");
    assert!(gc.fence().unwrap() > gb.fence().unwrap());
    assert!(matches!(c.sem_wait("pool", ZERO), Err(Error::NotEnqueued)));
    // A free slot is acquired at enqueue.
    b.sem_release("pool", &gb.token).unwrap();
    let Enqueued::Acquired(ga2) = a.sem_enqueue("pool", 2, Some(secs(2))).unwrap() else {
        panic!("a free slot must be acquired at enqueue");
    };
    assert_eq!(ga2.lease, secs(2));
    // Wrong tokens are refused.
    assert!(matches!(
        a.sem_release("pool", &gb.token),
        Err(Error::Refused)
    ));
    assert!(matches!(
        a.sem_renew("pool", &gb.token, None),
        Err(Error::Refused)
    ));
    a.sem_release("pool", &ga2.token).unwrap();
    c.sem_release("pool", &gc.token).unwrap();
}

#[test]
fn limit_mismatch() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let g = a.sem_acquire("pool", 3, ZERO, None).unwrap();
    assert!(matches!(
        b.lock("pool", ZERO, None),
        Err(Error::LimitMismatch)
    ));
    assert!(matches!(b.enqueue("pool", None), Err(Error::LimitMismatch)));
    assert!(matches!(
        b.sem_acquire("pool", 2, ZERO, None),
        Err(Error::LimitMismatch)
    ));
    assert!(matches!(
        b.sem_enqueue("pool", 4, None),
        Err(Error::LimitMismatch)
    ));
    // A lock is a semaphore of limit 1.
    let l = a.lock("lock", ZERO, None).unwrap();
    assert!(matches!(
        b.sem_acquire("lock", 2, ZERO, None),
        Err(Error::LimitMismatch)
    ));
    assert_timeout(b.sem_acquire("lock", 1, ZERO, None));
    // The same limit still works, and the connection is fine.
    b.sem_acquire("pool", 3, ZERO, None).unwrap();
    a.sem_release("pool", &g.token).unwrap();
    a.release("lock", &l.token).unwrap();
}

#[test]
fn max_waiters() {
    let s = Server::start(&["--max-waiters", "1"]);
    let mut a = client(&s);
    let mut b = client(&s);
    let mut c = client(&s);
    let g = a.lock("k", ZERO, None).unwrap();
    assert_eq!(b.enqueue("k", None).unwrap(), Enqueued::Queued);
    assert!(matches!(c.enqueue("k", None), Err(Error::MaxWaiters)));
    let t0 = Instant::now();
    assert!(matches!(c.lock("k", secs(3), None), Err(Error::MaxWaiters)));
    assert!(
        t0.elapsed() < secs(1),
        "MaxWaiters must be answered at once"
    );
    // Once the waiter is granted, the queue has room again.
    a.release("k", &g.token).unwrap();
    let gb = b.wait("k", secs(2)).unwrap();
    assert_eq!(c.enqueue("k", None).unwrap(), Enqueued::Queued);
    b.release("k", &gb.token).unwrap();
    c.wait("k", secs(2)).unwrap();
}

#[test]
fn max_locks() {
    let s = Server::start(&["--max-locks", "1"]);
    let mut a = client(&s);
    let mut b = client(&s);
    let g = a.lock("k1", ZERO, None).unwrap();
    assert!(matches!(b.lock("k2", ZERO, None), Err(Error::MaxLocks)));
    assert!(matches!(b.lock("k2", secs(1), None), Err(Error::MaxLocks)));
    assert!(matches!(b.enqueue("k2", None), Err(Error::MaxLocks)));
    assert!(matches!(
        b.sem_acquire("k3", 2, ZERO, None),
        Err(Error::MaxLocks)
    ));
    // An idle key does not count against the cap.
    a.release("k1", &g.token).unwrap();
    let g2 = b.lock("k2", ZERO, None).unwrap();
    b.release("k2", &g2.token).unwrap();
}

#[test]
fn release_with_a_wrong_token_is_refused() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let g = a.lock("k", ZERO, None).unwrap();
    let other = a.lock("other", ZERO, None).unwrap();
    let bogus = "0".repeat(32);
    assert!(matches!(b.release("k", &bogus), Err(Error::Refused)));
    assert!(matches!(b.release("k", "nope"), Err(Error::Refused)));
    // A token of another key does not release this one.
    assert!(matches!(b.release("k", &other.token), Err(Error::Refused)));
    assert!(matches!(b.renew("k", &bogus, None), Err(Error::Refused)));
    assert!(matches!(
        b.release("never-seen", &bogus),
        Err(Error::Refused)
    ));
    // Still held.
    assert_timeout(b.lock("k", ZERO, None));
    assert!(b.is_connected());
    a.release("k", &g.token).unwrap();
    a.release("other", &other.token).unwrap();
}

#[test]
fn fences_strictly_increase_across_grants() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let mut last = 0u64;
    let mut check = |f: Option<u64>| {
        let f = f.expect("a fence");
        assert!(f > last, "fence {f:#x} not above {last:#x}");
        last = f;
    };
    for i in 0..5 {
        let g = a.lock("k", ZERO, None).unwrap();
        check(g.fence());
        a.release("k", &g.token).unwrap();
        let g = b.lock(&format!("k{i}"), ZERO, None).unwrap();
        check(g.fence());
        let s = a.sem_acquire("pool", 3, ZERO, None).unwrap();
        check(s.fence());
        let Enqueued::Acquired(e) = a.enqueue(&format!("e{i}"), None).unwrap() else {
            panic!("free key");
        };
        check(e.fence());
        b.release(&format!("k{i}"), &g.token).unwrap();
        a.sem_release("pool", &s.token).unwrap();
        a.release(&format!("e{i}"), &e.token).unwrap();
    }
    // The fence is the first 16 hex digits of the token.
    let g = a.lock("k", ZERO, None).unwrap();
    assert_eq!(
        g.fence(),
        Some(u64::from_str_radix(&g.token[..16], 16).unwrap())
    );
    assert_eq!(dflockd_client::fence_of(&g.token), g.fence());
}

#[test]
fn ping_stats_and_stats_json() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut b = client(&s);
    let mut l = client(&s);
    a.ping().unwrap();
    let g = a.lock("held-key", ZERO, Some(secs(20))).unwrap();
    assert_eq!(b.enqueue("held-key", None).unwrap(), Enqueued::Queued);
    let sem = a.sem_acquire("pool", 3, ZERO, None).unwrap();
    l.listen("jobs.*", Some("workers")).unwrap();
    l.listen("news.>", None).unwrap();

    let st = a.stats().unwrap();
    assert_eq!(st.connections, 3);
    assert_eq!(st.locks.len(), 1, "{st:?}");
    let lk = &st.locks[0];
    assert_eq!((lk.key.as_str(), lk.waiters), ("held-key", 1));
    assert!(lk.lease_expires_in_s > 15.0 && lk.lease_expires_in_s <= 20.0);
    assert!(lk.owner_conn_id != 0);
    assert_eq!(st.semaphores.len(), 1, "{st:?}");
    let sm = &st.semaphores[0];
    assert_eq!(
        (sm.key.as_str(), sm.limit, sm.holders, sm.waiters),
        ("pool", 3, 1, 0)
    );
    let mut chans: Vec<(String, String, u64)> = st
        .signal_channels
        .iter()
        .map(|c| (c.pattern.clone(), c.group.clone(), c.listeners))
        .collect();
    chans.sort();
    assert_eq!(
        chans,
        vec![
            ("jobs.*".to_string(), "workers".to_string(), 1),
            ("news.>".to_string(), String::new(), 1),
        ]
    );
    assert!(st.cluster.is_none());

    // Released keys become idle.
    a.sem_release("pool", &sem.token).unwrap();
    let st = a.stats().unwrap();
    assert!(st.semaphores.is_empty(), "{st:?}");
    assert!(st.idle_semaphores.iter().any(|i| i.key == "pool"), "{st:?}");

    // The raw JSON, as the server sent it.
    let raw = a.stats_json().unwrap();
    assert!(raw.starts_with("{\"connections\":3,"), "{raw}");
    assert!(raw.ends_with('}'), "{raw}");
    assert!(raw.contains("\"key\":\"held-key\""), "{raw}");
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["locks"][0]["waiters"], 1);
    a.release("held-key", &g.token).unwrap();
    b.wait("held-key", secs(1)).unwrap();
}

// ---------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------

#[test]
fn signals_are_delivered_apart_from_replies() {
    let s = Server::start(&[]);
    let mut l = client(&s);
    let mut p = client(&s);
    l.listen("jobs.*", None).unwrap();
    // Listening twice is a no-op: still one delivery.
    l.listen("jobs.*", None).unwrap();
    assert_eq!(p.signal("jobs.build", "hello  big world ").unwrap(), 1);
    assert_eq!(p.signal("jobs.test", "second").unwrap(), 1);
    assert_eq!(p.signal("other.x", "nobody").unwrap(), 0);
    // The pushed lines arrive before these replies; the calls still get
    // their own replies.
    l.ping().unwrap();
    let st = l.stats().unwrap();
    assert_eq!(st.signal_channels.len(), 1);
    assert_eq!(p.signal("jobs.deploy", "third").unwrap(), 1);
    l.ping().unwrap();
    let g = l.lock("k", ZERO, None).unwrap();
    l.release("k", &g.token).unwrap();
    // Then the signals, in publish order, payload spaces preserved.
    let got: Vec<(String, String)> = (0..3)
        .map(|_| {
            let sig = l.next_signal(Some(secs(2))).unwrap().expect("a signal");
            (sig.channel, sig.payload)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("jobs.build".to_string(), "hello  big world ".to_string()),
            ("jobs.test".to_string(), "second".to_string()),
            ("jobs.deploy".to_string(), "third".to_string()),
        ]
    );
    // Nothing more: next_signal times out with Ok(None).
    let t0 = Instant::now();
    assert_eq!(l.next_signal(Some(ms(150))).unwrap(), None);
    assert!(t0.elapsed() >= ms(140));
    assert!(l.is_connected());
    // A signal published while the listener waits in next_signal.
    std::thread::scope(|sc| {
        let h = sc.spawn(|| l.next_signal(Some(secs(3))));
        std::thread::sleep(ms(100));
        assert_eq!(p.signal("jobs.late", "x").unwrap(), 1);
        let sig = h.join().unwrap().unwrap().expect("the late signal");
        assert_eq!(
            (sig.channel.as_str(), sig.payload.as_str()),
            ("jobs.late", "x")
        );
    });
    // Unlisten stops delivery.
    l.unlisten("jobs.*", None).unwrap();
    assert_eq!(p.signal("jobs.build", "after").unwrap(), 0);
    assert_eq!(l.next_signal(Some(ms(150))).unwrap(), None);
    // Unlisten of what is not listened to is a no-op.
    l.unlisten("never.*", Some("g")).unwrap();
    assert_eq!(l.dropped_signals(), 0);
    l.ping().unwrap();
}

#[test]
fn signals_reach_a_listener_waiting_for_a_lock() {
    let s = Server::start(&[]);
    let mut a = client(&s);
    let mut l = client(&s);
    let mut p = client(&s);
    l.listen("a.>", None).unwrap();
    let g = a.lock("k", ZERO, None).unwrap();
    let (mut l, gl) = std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            let r = l.lock("k", secs(4), None);
            (l, r)
        });
        // The listener is queued for the lock before the signal goes out.
        let mut watcher = s.connect();
        wait_for_stats(&mut watcher, "\"waiters\":1", secs(5));
        assert_eq!(p.signal("a.b.c", "during the wait").unwrap(), 1);
        a.release("k", &g.token).unwrap();
        let (l, r) = h.join().unwrap();
        (l, r.unwrap())
    });
    assert_eq!(gl.key, "k");
    let sig = l.next_signal(Some(ZERO)).unwrap().expect("queued signal");
    assert_eq!(
        (sig.channel.as_str(), sig.payload.as_str()),
        ("a.b.c", "during the wait")
    );
    // `a.>` does not match `a`.
    assert_eq!(p.signal("a", "x").unwrap(), 0);
}

#[test]
fn signal_groups_deliver_to_one_member() {
    let s = Server::start(&[]);
    let mut plain = client(&s);
    let mut g1 = client(&s);
    let mut g2 = client(&s);
    let mut p = client(&s);
    plain.listen("jobs.*", None).unwrap();
    g1.listen("jobs.*", Some("workers")).unwrap();
    g2.listen("jobs.*", Some("workers")).unwrap();
    let st = p.stats().unwrap();
    let grp = st
        .signal_channels
        .iter()
        .find(|c| c.group == "workers")
        .expect("group listed");
    assert_eq!((grp.pattern.as_str(), grp.listeners), ("jobs.*", 2));
    // One delivery to the plain subscriber, one to a member of the group.
    assert_eq!(p.signal("jobs.a", "one").unwrap(), 2);
    assert_eq!(p.signal("jobs.b", "two").unwrap(), 2);
    for want in ["one", "two"] {
        let sig = plain.next_signal(Some(secs(2))).unwrap().unwrap();
        assert_eq!(sig.payload, want);
    }
    // Round-robin: each member got exactly one of the two.
    let a = g1.next_signal(Some(secs(2))).unwrap().expect("g1 gets one");
    let b = g2.next_signal(Some(secs(2))).unwrap().expect("g2 gets one");
    let mut both = vec![a.payload, b.payload];
    both.sort();
    assert_eq!(both, ["one", "two"]);
    assert_eq!(g1.next_signal(Some(ms(100))).unwrap(), None);
    assert_eq!(g2.next_signal(Some(ms(100))).unwrap(), None);
    // A member leaving the group: the other gets everything.
    g1.unlisten("jobs.*", Some("workers")).unwrap();
    assert_eq!(p.signal("jobs.c", "three").unwrap(), 2);
    assert_eq!(
        g2.next_signal(Some(secs(2))).unwrap().unwrap().payload,
        "three"
    );
    assert_eq!(g1.next_signal(Some(ms(100))).unwrap(), None);
}

// ---------------------------------------------------------------------------
// Client-side validation
// ---------------------------------------------------------------------------

#[test]
fn invalid_input_is_refused_before_sending() {
    let s = Server::start(&[]);
    let mut c = client(&s);
    let invalid = |r: dflockd_client::Result<()>, what: &str| match r {
        Err(Error::InvalidInput(_)) => {}
        other => panic!("{what}: expected InvalidInput, got {other:?}"),
    };
    invalid(c.lock("a b", ZERO, None).map(drop), "space in key");
    invalid(c.lock("a\tb", ZERO, None).map(drop), "tab in key");
    invalid(c.lock("a\nb", ZERO, None).map(drop), "newline in key");
    invalid(c.lock("", ZERO, None).map(drop), "empty key");
    invalid(c.lock(&"k".repeat(257), ZERO, None).map(drop), "long key");
    invalid(c.enqueue("", None).map(drop), "empty enqueue key");
    invalid(c.wait("a b", ZERO).map(drop), "wait key");
    invalid(c.release("k", "a b"), "space in token");
    invalid(c.release("k", ""), "empty token");
    invalid(c.renew("k", "", None).map(drop), "empty renew token");
    invalid(c.sem_acquire("s", 0, ZERO, None).map(drop), "limit 0");
    invalid(c.sem_enqueue("s", 0, None).map(drop), "enqueue limit 0");
    invalid(c.signal("ch", "a\nb").map(drop), "newline in payload");
    invalid(c.signal("ch", "a\rb").map(drop), "CR in payload");
    invalid(c.signal("ch", "").map(drop), "empty payload");
    invalid(c.signal("ch", "   ").map(drop), "blank payload");
    invalid(c.signal("a b", "x").map(drop), "space in channel");
    invalid(c.signal("a.*", "x").map(drop), "wildcard in channel");
    invalid(c.signal("a.>", "x").map(drop), "wildcard in channel");
    invalid(
        c.signal("ch", &"p".repeat(64 * 1024 + 1)).map(drop),
        "payload over 64 KiB",
    );
    invalid(c.listen("", None), "empty pattern");
    invalid(c.listen("a.*", Some("g h")), "space in group");
    // Nothing was sent: the connection is intact and in step.
    assert!(c.is_connected());
    c.ping().unwrap();
    let g = c.lock("k", ZERO, None).unwrap();
    c.release("k", &g.token).unwrap();
    // A payload of exactly 64 KiB is accepted.
    assert_eq!(c.signal("ch", &"p".repeat(64 * 1024)).unwrap(), 0);
    // What the server refuses (an empty token in a pattern) is Refused,
    // and the connection stays in step.
    assert!(matches!(c.listen("a..b", None), Err(Error::Refused)));
    c.ping().unwrap();
    assert!(c.is_connected());
}

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

#[test]
fn auth_token() {
    let s = Server::start(&["--auth-token", "s3cret"]);
    // The right token.
    let good = cfg(&s).auth_token("s3cret");
    let mut c = Client::connect(&good).unwrap();
    c.ping().unwrap();
    let g = c.lock("k", ZERO, None).unwrap();
    c.release("k", &g.token).unwrap();
    let lock = Lock::acquire(&good, "guarded", &GuardOptions::new()).unwrap();
    lock.release().unwrap();

    // A wrong token fails at connect, as Auth (not "unreachable").
    let bad = cfg(&s).auth_token("wrong");
    match Client::connect(&bad) {
        Err(Error::Auth) => {}
        other => panic!("expected Auth, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        Lock::acquire(&bad, "guarded", &GuardOptions::new()),
        Err(Error::Auth)
    ));

    // No token: connecting sends nothing, so it succeeds; the first call
    // gets `error_auth`, which also closes the client's connection (the
    // server closes its end about 100 ms later).
    let mut none = Client::connect(&cfg(&s)).unwrap();
    match none.ping() {
        Err(Error::Auth) => {}
        other => panic!("expected Auth, got {other:?}"),
    }
    assert!(!none.is_connected());
    assert!(matches!(none.ping(), Err(Error::NotConnected)));
    // Reconnecting without a token meets the same refusal.
    none.reconnect().unwrap();
    assert!(matches!(none.ping(), Err(Error::Auth)));

    // A token for a server that has none configured.
    let open = Server::start(&[]);
    match Client::connect(&cfg(&open).auth_token("s3cret")) {
        Err(Error::Unreachable { last, .. }) => {
            assert!(matches!(*last, Error::Protocol(_)), "{last:?}")
        }
        other => panic!("expected Unreachable, got {:?}", other.map(|_| ())),
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

fn expect_unreachable_because(r: dflockd_client::Result<Client>, what: &str) -> Error {
    match r {
        Err(Error::Unreachable { last, .. }) => *last,
        Err(e) => panic!("{what}: expected Unreachable, got {e:?}"),
        Ok(_) => panic!("{what}: connected"),
    }
}

#[test]
fn tls() {
    let pki = Pki::new("client-lib");
    pki.issue("b");
    let s = tls_server(&pki, &[]);
    let ca = pki.path("a-ca.pem");

    // The right CA, dialling 127.0.0.1 and checking the name `localhost`.
    let tls = Tls::with_ca_file(&ca)
        .unwrap()
        .server_name("localhost")
        .unwrap();
    let mut c = Client::connect(&cfg(&s).tls(tls)).unwrap();
    c.ping().unwrap();
    let g = c.lock("k", ZERO, None).unwrap();
    c.release("k", &g.token).unwrap();
    c.listen("t.*", None).unwrap();
    let big = "p".repeat(64 * 1024);
    assert_eq!(c.signal("t.big", &big).unwrap(), 1);
    assert_eq!(c.next_signal(Some(secs(2))).unwrap().unwrap().payload, big);

    // Dialling `localhost:PORT` checks that name without being told.
    let by_name = cfg_for(&format!("localhost:{}", s.port)).tls(Tls::with_ca_file(&ca).unwrap());
    Client::connect(&by_name).unwrap().ping().unwrap();

    // 127.0.0.1 without a server name: the certificate is for localhost.
    let last = expect_unreachable_because(
        Client::connect(&cfg(&s).tls(Tls::with_ca_file(&ca).unwrap())),
        "name mismatch",
    );
    match &last {
        Error::Tls(why) => assert!(why.contains("not valid for name"), "{why}"),
        e => panic!("name mismatch: expected Tls, got {e:?}"),
    }

    // Another CA.
    let other = Tls::with_ca_file(pki.path("b-ca.pem"))
        .unwrap()
        .server_name("localhost")
        .unwrap();
    let last = expect_unreachable_because(Client::connect(&cfg(&s).tls(other)), "wrong CA");
    match &last {
        Error::Tls(why) => assert!(why.contains("UnknownIssuer"), "{why}"),
        e => panic!("wrong CA: expected Tls, got {e:?}"),
    }

    // A CA file that is not there, or holds no certificate.
    assert!(matches!(
        Tls::with_ca_file(pki.path("missing.pem")),
        Err(Error::Tls(_))
    ));
    assert!(matches!(
        Tls::with_ca_file(pki.path("a-key.pem")),
        Err(Error::Tls(_))
    ));

    // Insecure: any certificate, any name.
    let mut c = Client::connect(&cfg(&s).tls(Tls::insecure())).unwrap();
    c.ping().unwrap();
    let g = c.lock("k", ZERO, None).unwrap();
    c.release("k", &g.token).unwrap();

    // A plain client on the TLS port: connecting sends nothing, so it
    // succeeds; the server drops the connection at the first request (no
    // TLS alert ends in a newline), so the call sees the close at once
    // rather than waiting for its timeout.
    let plain = cfg(&s).connect_timeout(secs(1)).io_timeout(secs(1));
    let mut c = Client::connect(&plain).unwrap();
    let t0 = Instant::now();
    match c.ping() {
        Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e:?}"),
        other => panic!("plain to TLS: expected a closed connection, got {other:?}"),
    }
    assert!(t0.elapsed() < secs(1), "took {:?}", t0.elapsed());
    assert!(!c.is_connected());
    assert!(matches!(c.ping(), Err(Error::NotConnected)));

    // A TLS client on a plain port: the server takes the ClientHello for
    // the start of a request and waits for the rest, so the handshake runs
    // into the connect timeout (or, should the hello's random bytes hold
    // enough newlines to form a request, fails on the `error` reply).
    // Either way a Tls error, bounded by the connect timeout.
    let p = Server::start(&[]);
    let t0 = Instant::now();
    let last = expect_unreachable_because(
        Client::connect(&cfg(&p).connect_timeout(secs(1)).tls(Tls::insecure())),
        "TLS to a plain server",
    );
    assert!(t0.elapsed() < ms(2500), "took {:?}", t0.elapsed());
    assert!(matches!(last, Error::Tls(_)), "{last:?}");
}

// ---------------------------------------------------------------------------
// Draining
// ---------------------------------------------------------------------------

#[test]
fn draining_refuses_new_work() {
    let mut s = Server::start(&[]);
    let mut holder = client(&s);
    let mut c = client(&s);
    let g = holder.lock("held", ZERO, None).unwrap();
    s.signal("TERM");
    // The signal is handled asynchronously: poll with fresh keys until
    // the server answers `error_draining`.
    let mut i = 0;
    poll_until(secs(3), "error_draining", || {
        i += 1;
        match c.lock(&format!("new-{i}"), ZERO, None) {
            Err(Error::Draining) => true,
            Ok(g) => {
                c.release(&g.key, &g.token).unwrap();
                false
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    });
    assert!(matches!(c.enqueue("x", None), Err(Error::Draining)));
    assert!(matches!(
        c.sem_acquire("x", 2, ZERO, None),
        Err(Error::Draining)
    ));
    assert!(matches!(c.listen("x.*", None), Err(Error::Draining)));
    // What winds down keeps working.
    c.ping().unwrap();
    assert_eq!(c.stats().unwrap().locks.len(), 1);
    assert_eq!(holder.renew("held", &g.token, None).unwrap(), secs(33));
    // New connections are refused (the listener is closed).
    match expect_unreachable_because(Client::connect(&cfg(&s)), "connect while draining") {
        Error::Io(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
        e => panic!("expected a refused connection, got {e:?}"),
    }
    // The server exits once nothing is held.
    holder.release("held", &g.token).unwrap();
    assert_eq!(s.wait_exit(secs(3)), Some(0));
}

// ---------------------------------------------------------------------------
// Unreachable servers and failover
// ---------------------------------------------------------------------------

#[test]
fn unreachable_and_failover() {
    let hold = dead_addr();
    let dead = hold.addr.clone();
    match Client::connect(&cfg_for(&dead)) {
        Err(Error::Unreachable { addrs, last }) => {
            assert_eq!(addrs, vec![dead.clone()]);
            match *last {
                Error::Io(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
                e => panic!("expected a refused connection, got {e:?}"),
            }
        }
        other => panic!("expected Unreachable, got {:?}", other.map(|_| ())),
    }
    let s = Server::start(&[]);
    let live = s.addr();
    let cluster =
        cfg_for(&dead).with_servers(Servers::single([dead.clone(), live.clone()]).unwrap());
    let mut c = Client::connect(&cluster).unwrap();
    assert_eq!(c.peer(), Some(live.as_str()));
    c.ping().unwrap();
    // Reconnecting skips the dead address again.
    c.reconnect().unwrap();
    assert_eq!(c.peer(), Some(live.as_str()));
    // The text form of the same cluster.
    let mut c = Client::connect(&cfg_for(&format!("{dead}|{live}"))).unwrap();
    assert_eq!(c.peer(), Some(live.as_str()));
    c.ping().unwrap();
    // Every address dead: all are reported.
    let hold2 = dead_addr();
    let dead2 = hold2.addr.clone();
    let all_dead = cfg_for(&format!("{dead}|{dead2}"));
    match Client::connect(&all_dead) {
        Err(Error::Unreachable { addrs, .. }) => assert_eq!(addrs, vec![dead, dead2]),
        other => panic!("expected Unreachable, got {:?}", other.map(|_| ())),
    }
}

// ---------------------------------------------------------------------------
// Peers that do not speak the protocol
// ---------------------------------------------------------------------------

#[test]
fn a_peer_speaking_http_is_a_protocol_error() {
    let addr = fake_server(Some("HTTP/1.1 400 Bad Request\r\n"));
    let mut c = Client::connect(&cfg_for(&addr)).unwrap();
    let e = c.ping().unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    assert!(e.is_connection());
    // The connection is closed: calls fail until reconnect.
    assert!(!c.is_connected());
    assert!(matches!(c.ping(), Err(Error::NotConnected)));
    assert!(matches!(c.lock("k", ZERO, None), Err(Error::NotConnected)));
    assert!(matches!(
        c.next_signal(Some(ZERO)),
        Err(Error::NotConnected)
    ));
    c.reconnect().unwrap();
    assert!(c.is_connected());
    let e = c.lock("k", ZERO, None).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    assert!(matches!(c.stats(), Err(Error::NotConnected)));
    c.reconnect().unwrap();
    assert!(matches!(c.stats(), Err(Error::Protocol(_))));
    assert!(matches!(c.release("k", "t"), Err(Error::NotConnected)));
}

#[test]
fn a_peer_that_hangs_up_is_a_connection_error() {
    // The peer closes before or after the request arrives: the client
    // sees an EOF or a reset (or a broken pipe when writing after the
    // reset came back).
    let closed = |e: &Error| match e {
        Error::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
        ),
        _ => false,
    };
    let addr = fake_server(None);
    let mut c = Client::connect(&cfg_for(&addr)).unwrap();
    let e = c.ping().unwrap_err();
    assert!(e.is_connection(), "{e:?}");
    assert!(closed(&e), "{e:?}");
    assert!(!c.is_connected());
    assert!(matches!(c.ping(), Err(Error::NotConnected)));
    assert!(matches!(c.lock("k", ZERO, None), Err(Error::NotConnected)));
    c.reconnect().unwrap();
    let e = c.lock("k", ZERO, None).unwrap_err();
    assert!(closed(&e), "{e:?}");
    assert!(matches!(c.ping(), Err(Error::NotConnected)));
}

// ---------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------

/// Holds `key` with a guard of `lease` for more than 2.5 leases, checking
/// all along that nobody else gets it; then drops it and checks the key is
/// free at once.
fn hold_across_renewals(cfg: &Config, key: &str, lease: Duration) {
    let opts = GuardOptions::new().lease(lease).timeout(secs(2));
    let lock = Lock::acquire(cfg, key, &opts).unwrap();
    assert_eq!((lock.key(), lock.lease()), (key, lease));
    assert!(lock.fence().is_some());
    let mut other = Client::connect(cfg).unwrap();
    let until = Instant::now() + lease.mul_f64(2.55);
    while Instant::now() < until {
        assert_eq!(lock.lost(), None, "lease {lease:?}");
        assert_timeout(other.lock(key, ZERO, None));
        std::thread::sleep(ms(100));
    }
    assert!(
        lock.renewals() >= 2,
        "lease {lease:?}: {} renewals",
        lock.renewals()
    );
    assert_eq!(lock.lost(), None);
    // Nothing lost: wait_lost times out.
    assert_eq!(lock.wait_lost(Some(ms(10))), None);
    drop(lock);
    let g = other
        .lock(key, ZERO, None)
        .expect("free once the guard is dropped");
    other.release(key, &g.token).unwrap();
}

#[test]
fn lock_guard_renews_across_lease_lengths() {
    let s = Server::start(&[]);
    let cfg = cfg(&s);
    std::thread::scope(|sc| {
        let cfg = &cfg;
        let hs: Vec<_> = [1, 2]
            .into_iter()
            .map(|l| sc.spawn(move || hold_across_renewals(cfg, &format!("guard-{l}"), secs(l))))
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

#[test]
fn semaphore_guard_with_limit_two() {
    let s = Server::start(&[]);
    let opts = GuardOptions::new().lease(secs(1)).timeout(ZERO);
    let a = Semaphore::acquire(&cfg(&s), "pool", 2, &opts).unwrap();
    let b = Semaphore::acquire(&cfg(&s), "pool", 2, &opts).unwrap();
    assert!(b.fence() > a.fence());
    assert!(matches!(
        Semaphore::acquire(&cfg(&s), "pool", 2, &opts),
        Err(Error::Timeout)
    ));
    let mut other = client(&s);
    let until = Instant::now() + ms(2600);
    while Instant::now() < until {
        assert_timeout(other.sem_acquire("pool", 2, ZERO, None));
        std::thread::sleep(ms(100));
    }
    assert!(a.renewals() >= 2 && b.renewals() >= 2);
    assert_eq!((a.lost(), b.lost()), (None, None));
    let st = other.stats().unwrap();
    assert_eq!(st.semaphores[0].holders, 2);
    // A release frees one slot.
    a.release().unwrap();
    let g = other.sem_acquire("pool", 2, ZERO, None).unwrap();
    assert_timeout(other.sem_acquire("pool", 2, ZERO, None));
    drop(b);
    other.sem_acquire("pool", 2, ZERO, None).unwrap();
    other.sem_release("pool", &g.token).unwrap();
}

type Seen = Arc<Mutex<Vec<LostReason>>>;

fn recording_opts(lease: Duration) -> (GuardOptions, Seen) {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let opts = GuardOptions::new()
        .lease(lease)
        .timeout(secs(2))
        .on_lost(move |why| s2.lock().unwrap().push(why.clone()));
    (opts, seen)
}

#[test]
fn guard_reports_a_release_by_someone_else() {
    let s = Server::start(&[]);
    let (opts, seen) = recording_opts(secs(1));
    let lock = Lock::acquire(&cfg(&s), "k", &opts).unwrap();
    let mut raw = s.connect();
    assert_eq!(raw.cmd("r", "k", lock.token()), "ok");
    let t0 = Instant::now();
    assert_eq!(lock.wait_lost(Some(secs(3))), Some(LostReason::Refused));
    assert!(t0.elapsed() < secs(2));
    assert_eq!(lock.lost(), Some(LostReason::Refused));
    // Someone else takes the key; releasing the lost guard must not free it.
    let mut other = client(&s);
    let g = other.lock("k", ZERO, None).unwrap();
    assert!(matches!(lock.release(), Err(Error::Refused)));
    // release() joined the renewal thread: the callback ran exactly once.
    assert_eq!(*seen.lock().unwrap(), vec![LostReason::Refused]);
    assert_timeout(client(&s).lock("k", ZERO, None));
    other.release("k", &g.token).unwrap();
}

#[test]
fn guard_reports_a_dead_server() {
    let mut s = Server::start(&[]);
    let (opts, seen) = recording_opts(secs(1));
    // Renewing every 100 ms keeps short the time between the kill and the
    // reconnect, during which a parallel test could be given the freed
    // port.
    let opts = opts.renew_ratio(0.1);
    let lock = Lock::acquire(&cfg(&s), "k", &opts).unwrap();
    poll_until(secs(2), "a first renewal", || lock.renewals() >= 1);
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let t0 = Instant::now();
    match lock.wait_lost(Some(secs(4))) {
        // The reconnect found nothing listening any more.
        Some(LostReason::Disconnected(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(t0.elapsed() < secs(1), "noticed after {:?}", t0.elapsed());
    assert!(matches!(lock.lost(), Some(LostReason::Disconnected(_))));
    // The release cannot be confirmed.
    assert!(lock.release().is_err());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(matches!(seen[0], LostReason::Disconnected(_)));
}

/// A TCP proxy run by the test, whose connections can be cut.
struct Proxy {
    addr: String,
    state: Arc<Mutex<ProxyState>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    socks: Vec<TcpStream>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state: Arc<Mutex<ProxyState>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, acc, stp) = (state.clone(), accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                if stp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = down else { continue };
                let mut st = st.lock().unwrap();
                if st.cut {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                st.socks.push(down.try_clone().unwrap());
                st.socks.push(up.try_clone().unwrap());
                pump(down.try_clone().unwrap(), up.try_clone().unwrap());
                pump(up, down);
            }
        });
        Proxy {
            addr,
            state,
            accepted,
            stop,
        }
    }

    /// Breaks every connection and refuses new ones.
    fn cut(&self) {
        let mut st = self.state.lock().unwrap();
        st.cut = true;
        for s in &st.socks {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[test]
fn guard_reattaches_through_another_address() {
    let s = Server::start(&["--no-auto-release-on-disconnect"]);
    let proxy = Proxy::start(s.addr());
    let cluster = cfg(&s).with_servers(Servers::single([proxy.addr.clone(), s.addr()]).unwrap());
    let (opts, seen) = recording_opts(secs(1));
    let lock = Lock::acquire(&cluster, "k", &opts).unwrap();
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        1,
        "acquired through the proxy"
    );
    let mut other = client(&s);
    poll_until(secs(3), "a renewal through the proxy", || {
        lock.renewals() >= 1
    });
    proxy.cut();
    let at_cut = lock.renewals();
    poll_until(secs(4), "renewals after the cut", || {
        assert_eq!(lock.lost(), None);
        lock.renewals() >= at_cut + 3
    });
    assert_eq!(lock.lost(), None);
    assert!(seen.lock().unwrap().is_empty());
    // Still held, by the same token, on the server.
    assert_timeout(other.lock("k", ZERO, None));
    let st = other.stats().unwrap();
    assert_eq!(st.locks.len(), 1);
    assert_eq!(st.locks[0].key, "k");
    // The renewal keeps the lease alive past its first term.
    assert!(st.locks[0].lease_expires_in_s > 0.0);
    lock.release().unwrap();
    let g = other.lock("k", ZERO, None).unwrap();
    other.release("k", &g.token).unwrap();
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------
// Sharding
// ---------------------------------------------------------------------------

#[test]
fn shard_index_is_zlib_crc32_mod_n() {
    // zlib.crc32 of each key (computed with Python's zlib).
    let vectors: &[(&str, u32)] = &[
        ("a", 3_904_355_907),
        ("123456789", 3_421_780_262),
        ("my-key", 3_605_215_937),
        ("deploy", 2_453_354_746),
        ("migrations", 1_856_466_978),
        ("lock-1", 3_379_800_295),
        ("lock-2", 1_350_236_509),
        ("ключ", 212_833_818),
    ];
    for &(key, crc) in vectors {
        assert_eq!(crc32(key.as_bytes()), crc, "{key}");
        for n in 1..=7usize {
            assert_eq!(shard_index(key, n), (crc as usize) % n, "{key} of {n}");
        }
    }
    assert_eq!(shard_index("deploy", 2), 0);
    assert_eq!(shard_index("a", 2), 1);
    assert_eq!(shard_index("123456789", 3), 2);
    assert_eq!(shard_index("anything", 0), 0);
}

#[test]
fn keys_are_routed_to_their_shard() {
    let s0 = Server::start(&[]);
    let s1 = Server::start(&[]);
    let servers = Servers::from_shards(vec![vec![s0.addr()], vec![s1.addr()]]).unwrap();
    let cfg = cfg(&s0).with_servers(servers);
    assert_eq!(cfg.servers().for_key("deploy"), &[s0.addr()]);
    let mut raw0 = s0.connect();
    let mut raw1 = s1.connect();
    // "deploy" and "migrations" live on shard 0, "a" and "my-key" on 1.
    let mut held = Vec::new();
    for (key, shard) in [("deploy", 0), ("a", 1), ("migrations", 0), ("my-key", 1)] {
        let mut c = Client::connect_for_key(&cfg, key).unwrap();
        let want = if shard == 0 { s0.addr() } else { s1.addr() };
        assert_eq!(c.peer(), Some(want.as_str()), "{key}");
        let g = c.lock(key, ZERO, None).unwrap();
        let needle = format!("\"key\":\"{key}\"");
        let (on, off) = if shard == 0 {
            (common::stats(&mut raw0), common::stats(&mut raw1))
        } else {
            (common::stats(&mut raw1), common::stats(&mut raw0))
        };
        assert!(on.contains(&needle), "{key} not on shard {shard}: {on}");
        assert!(!off.contains(&needle), "{key} on the wrong shard: {off}");
        held.push((c, g));
    }
    // A guard goes to the key's shard too.
    let lock = Lock::acquire(&cfg, "lock-2", &GuardOptions::new()).unwrap();
    assert!(common::stats(&mut raw1).contains("\"key\":\"lock-2\""));
    assert!(!common::stats(&mut raw0).contains("\"key\":\"lock-2\""));
    drop(lock);
    for (mut c, g) in held {
        c.release(&g.key, &g.token).unwrap();
    }
}

#[test]
fn a_long_lease_outlives_the_servers_idle_timeout() {
    // The server closes connections idle for 2 s (and frees their locks);
    // the guard's keepalive renews more often than that whatever the lease.
    let s = Server::start(&["--read-timeout", "2"]);
    let opts = GuardOptions::new().lease(secs(30)).keepalive(ms(500));
    let lock = Lock::acquire(&cfg(&s), "long", &opts).unwrap();
    std::thread::sleep(secs(4));
    assert_eq!(lock.lost(), None);
    assert!(lock.renewals() >= 4, "{} renewals", lock.renewals());
    assert_timeout(client(&s).lock("long", ZERO, None));
    lock.release().unwrap();
}

#[test]
fn a_large_stats_reply_is_read_whole() {
    // 400 keys of 200 bytes: one JSON line far over the 64 KiB line limit
    // of other replies.
    let s = Server::start(&[]);
    let mut holder = client(&s);
    let keys: Vec<String> = (0..400).map(|i| format!("{i:0200}")).collect();
    for k in &keys {
        holder.lock(k, ZERO, None).unwrap();
    }
    let mut c = client(&s);
    let raw = c.stats_json().unwrap();
    assert!(raw.len() > 80_000, "{}", raw.len());
    let st = c.stats().unwrap();
    assert_eq!(st.locks.len(), 400);
    // The limit is back for the next replies on the same connection.
    c.ping().unwrap();
}

#[test]
fn numbers_out_of_range_from_the_server_are_protocol_errors() {
    let addr = fake_server(Some(
        "ok 0123456789abcdef0123456789abcdef 18446744073709551615\n",
    ));
    let mut c = Client::connect(&cfg_for(&addr)).unwrap();
    assert!(matches!(c.lock("k", ZERO, None), Err(Error::Protocol(_))));
    let addr = fake_server(Some("ok 1e300\n"));
    let mut c = Client::connect(&cfg_for(&addr)).unwrap();
    assert!(matches!(c.renew("k", "t", None), Err(Error::Protocol(_))));
    let addr = fake_server(Some("ok -1\n"));
    let mut c = Client::connect(&cfg_for(&addr)).unwrap();
    assert!(matches!(c.renew("k", "t", None), Err(Error::Protocol(_))));
}

#[test]
fn durations_without_limit_do_not_overflow() {
    let s = Server::start(&[]);
    let cfg = cfg(&s)
        .io_timeout(Duration::MAX)
        .connect_timeout(Duration::MAX);
    let mut c = Client::connect(&cfg).unwrap();
    c.ping().unwrap();
    c.listen("x", None).unwrap();
    let mut p = client(&s);
    assert_eq!(p.signal("x", "now").unwrap(), 1);
    let sig = c.next_signal(Some(Duration::MAX)).unwrap().unwrap();
    assert_eq!(sig.payload, "now");
    let lock = Lock::acquire(&cfg, "k", &GuardOptions::new().timeout(Duration::MAX)).unwrap();
    assert_eq!(lock.wait_lost(Some(ms(10))), None);
    drop(lock);
    let zero = cfg_for(&s.addr()).io_timeout(ZERO).connect_timeout(ZERO);
    // Clamped to 1 ms: connecting on loopback still works.
    assert!(Client::connect(&zero).is_ok());
}

#[test]
fn a_guard_dropped_from_its_own_callback_does_not_deadlock() {
    let s = Server::start(&[]);
    let slot: Arc<Mutex<Option<Lock>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let slot2 = slot.clone();
    let opts = GuardOptions::new().lease(secs(1)).on_lost(move |_| {
        // Drop the guard right here, on the renewal thread.
        let taken = slot2.lock().unwrap().take();
        drop(taken);
        let _ = tx.send(());
    });
    let lock = Lock::acquire(&cfg(&s), "k", &opts).unwrap();
    let token = lock.token().to_string();
    *slot.lock().unwrap() = Some(lock);
    let mut raw = s.connect();
    assert_eq!(raw.cmd("r", "k", &token), "ok");
    rx.recv_timeout(secs(5)).expect("callback ran and returned");
}
