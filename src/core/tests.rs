//! Unit tests of the state machine through its public entry points.

use super::*;
use crate::protocol::Kind;

struct Harness {
    core: Core,
    out: Outbox,
    now: u64,
}

impl Harness {
    fn new() -> Self {
        Self::with(Config::default())
    }

    fn with(cfg: Config) -> Self {
        let mut core = Core::new(cfg, 1 << 40, Box::new(SeededEntropy(7)));
        for c in 1..=20 {
            core.connect(c);
        }
        Harness {
            core,
            out: Outbox::default(),
            now: 0,
        }
    }

    fn run(&mut self, conn: ConnId, req: Request<'_>) -> Option<Reply> {
        self.out.clear();
        let outcome = self.core.handle(self.now, conn, &req, &mut self.out);
        self.core.check_invariants().unwrap();
        match outcome {
            Outcome::Replied => {
                // The requester's reply comes last, after grants it caused.
                let (c, r) = self.out.replies.pop().unwrap();
                assert_eq!(c, conn);
                Some(r)
            }
            Outcome::Blocked => {
                assert!(self.out.replies.iter().all(|(c, _)| *c != conn));
                None
            }
        }
    }

    /// Replies to other connections produced by the last call.
    fn others(&self) -> Vec<(ConnId, Reply)> {
        self.out.replies.clone()
    }

    fn advance(&mut self, ms: u64) -> Vec<(ConnId, Reply)> {
        self.now += ms;
        self.out.clear();
        self.core.tick(self.now, &mut self.out);
        self.core.check_invariants().unwrap();
        self.out.replies.clone()
    }

    fn disconnect(&mut self, conn: ConnId) -> Vec<(ConnId, Reply)> {
        self.out.clear();
        self.core.disconnect(self.now, conn, &mut self.out);
        self.core.check_invariants().unwrap();
        self.out.replies.clone()
    }

    fn lock(
        &mut self,
        conn: ConnId,
        key: &str,
        timeout_s: u64,
        lease_s: Option<u64>,
    ) -> Option<Reply> {
        self.run(
            conn,
            Request::Acquire {
                key,
                timeout_s,
                limit: 1,
                lease_s,
                kind: Kind::Lock,
            },
        )
    }

    fn sem(&mut self, conn: ConnId, key: &str, timeout_s: u64, limit: u64) -> Option<Reply> {
        self.run(
            conn,
            Request::Acquire {
                key,
                timeout_s,
                limit,
                lease_s: None,
                kind: Kind::Semaphore,
            },
        )
    }

    fn release(&mut self, conn: ConnId, key: &str, token: Token) -> Reply {
        let t = hex(token);
        self.run(conn, Request::Release { key, token: &t }).unwrap()
    }

    fn renew(&mut self, conn: ConnId, key: &str, token: Token, lease_s: Option<u64>) -> Reply {
        let t = hex(token);
        self.run(
            conn,
            Request::Renew {
                key,
                token: &t,
                lease_s,
            },
        )
        .unwrap()
    }

    fn enqueue(&mut self, conn: ConnId, key: &str, lease_s: Option<u64>) -> Reply {
        self.run(
            conn,
            Request::Enqueue {
                key,
                limit: 1,
                lease_s,
                kind: Kind::Lock,
            },
        )
        .unwrap()
    }

    fn wait(&mut self, conn: ConnId, key: &str, timeout_s: u64) -> Option<Reply> {
        self.run(conn, Request::Wait { key, timeout_s })
    }
}

fn hex(t: Token) -> String {
    let mut b = [0u8; 32];
    t.encode(&mut b);
    String::from_utf8(b.to_vec()).unwrap()
}

fn granted(r: Option<Reply>) -> Token {
    match r {
        Some(Reply::Granted { token, .. }) | Some(Reply::Acquired { token, .. }) => token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn grant_of(replies: &[(ConnId, Reply)], conn: ConnId) -> Token {
    for (c, r) in replies {
        if *c == conn {
            if let Reply::Granted { token, .. } = r {
                return *token;
            }
        }
    }
    panic!("no grant for {conn} in {replies:?}");
}

#[test]
fn try_lock_and_release() {
    let mut h = Harness::new();
    let t = granted(h.lock(1, "k", 0, None));
    assert_eq!(h.lock(2, "k", 0, None), Some(Reply::Timeout));
    assert_eq!(h.release(2, "k", Token(t.0 ^ 1)), Reply::Error);
    assert_eq!(h.release(2, "nokey", t), Reply::Error);
    assert_eq!(h.release(1, "k", t), Reply::Ok);
    assert_eq!(h.release(1, "k", t), Reply::Error);
    granted(h.lock(2, "k", 0, None));
}

#[test]
fn grant_reports_the_lease_and_fences_increase() {
    let mut h = Harness::new();
    let a = h.lock(1, "a", 0, Some(7));
    assert!(matches!(a, Some(Reply::Granted { lease_s: 7, .. })));
    let b = h.lock(1, "b", 0, None);
    assert!(matches!(b, Some(Reply::Granted { lease_s: 33, .. })));
    assert!(granted(b).fence() > granted(a).fence());
}

#[test]
fn fifo_with_many_waiters() {
    let mut h = Harness::new();
    let mut t = granted(h.lock(1, "k", 10, None));
    for c in 2..=12 {
        assert_eq!(h.lock(c, "k", 10, None), None);
    }
    for c in 2..=12 {
        let prev = if c == 2 { 1 } else { c - 1 };
        assert_eq!(h.release(prev, "k", t), Reply::Ok);
        let others = h.others();
        assert_eq!(others.len(), 1);
        t = grant_of(&others, c);
    }
}

#[test]
fn acquire_timeout_removes_the_waiter() {
    let mut h = Harness::new();
    let t = granted(h.lock(1, "k", 0, None));
    assert_eq!(h.lock(2, "k", 2, None), None);
    assert_eq!(h.lock(3, "k", 5, None), None);
    assert_eq!(h.advance(1999), vec![]);
    assert_eq!(h.advance(1), vec![(2, Reply::Timeout)]);
    assert_eq!(h.release(1, "k", t), Reply::Ok);
    grant_of(&h.others(), 3);
}

#[test]
fn lease_expiry_hands_off_at_the_deadline() {
    let mut h = Harness::new();
    granted(h.lock(1, "k", 0, Some(2)));
    assert_eq!(h.lock(2, "k", 10, None), None);
    assert!(h.advance(1999).is_empty());
    let r = h.advance(1);
    grant_of(&r, 2);
    assert_eq!(h.out.expired.len(), 1);
    assert_eq!(&*h.out.expired[0].key, "k");
    assert_eq!(h.core.counters().lease_expiries, 1);
}

#[test]
fn renew_extends_and_renew_after_expiry_fails() {
    let mut h = Harness::new();
    let t = granted(h.lock(1, "k", 0, Some(2)));
    h.advance(1500);
    assert_eq!(h.renew(1, "k", t, None), Reply::OkNumber(33));
    h.advance(1000);
    assert_eq!(
        h.lock(2, "k", 0, None),
        Some(Reply::Timeout),
        "renewed lease still held"
    );
    assert_eq!(h.renew(1, "k", t, Some(1)), Reply::OkNumber(1));
    // Shortened: the lease timer is re-armed at the earlier deadline.
    h.advance(1000);
    assert_eq!(h.renew(1, "k", t, None), Reply::Error);
    granted(h.lock(2, "k", 0, None));
}

#[test]
fn renew_in_the_expiry_millisecond_fails_and_hands_off() {
    let mut h = Harness::new();
    let t = granted(h.lock(1, "k", 0, Some(1)));
    assert_eq!(h.lock(2, "k", 5, None), None);
    h.now += 1000; // no tick: the timer is due but has not fired
    assert_eq!(h.renew(1, "k", t, None), Reply::Error);
    grant_of(&h.others(), 2);
}

#[test]
fn two_phase_all_branches() {
    let mut h = Harness::new();
    // Free: acquired at once; `w` then resets the lease and returns the token.
    let t = granted(Some(h.enqueue(1, "k", Some(5))));
    assert_eq!(h.enqueue(1, "k", None), Reply::ErrorAlreadyEnqueued);
    h.advance(4000);
    assert_eq!(
        h.wait(1, "k", 1),
        Some(Reply::Granted {
            token: t,
            lease_s: 5
        })
    );
    h.advance(4000);
    assert_eq!(
        h.lock(2, "k", 0, None),
        Some(Reply::Timeout),
        "w reset the lease"
    );
    assert_eq!(h.wait(1, "k", 1), Some(Reply::ErrorNotEnqueued));
    // Queued, then granted while not waiting, then picked up by `w`.
    assert_eq!(h.enqueue(2, "k", Some(3)), Reply::Queued);
    assert_eq!(h.release(1, "k", t), Reply::Ok);
    assert!(h.others().is_empty(), "a two-phase grant is not pushed");
    h.advance(2000);
    let t2 = granted(h.wait(2, "k", 1));
    // Queued and blocked in `w`, granted by a release.
    assert_eq!(h.enqueue(3, "k", None), Reply::Queued);
    assert_eq!(h.wait(3, "k", 10), None);
    assert_eq!(h.release(2, "k", t2), Reply::Ok);
    let t3 = grant_of(&h.others(), 3);
    assert_eq!(h.wait(3, "k", 1), Some(Reply::ErrorNotEnqueued));
    // `w` that times out removes the waiter; `w 0` polls.
    assert_eq!(h.enqueue(4, "k", None), Reply::Queued);
    assert_eq!(h.wait(4, "k", 1), None);
    assert_eq!(h.advance(1000), vec![(4, Reply::Timeout)]);
    assert_eq!(h.enqueue(5, "k", None), Reply::Queued);
    assert_eq!(h.wait(5, "k", 0), Some(Reply::Timeout));
    assert_eq!(h.wait(5, "k", 0), Some(Reply::ErrorNotEnqueued));
    // Granted before `w`, lease ran out: error_lease_expired.
    assert_eq!(h.enqueue(6, "k", Some(1)), Reply::Queued);
    assert_eq!(h.release(3, "k", t3), Reply::Ok);
    h.advance(1000);
    assert_eq!(h.wait(6, "k", 5), Some(Reply::ErrorLeaseExpired));
    // Wait without enqueue; release of a pre-granted two-phase token clears it.
    assert_eq!(h.wait(7, "k", 1), Some(Reply::ErrorNotEnqueued));
    let t8 = granted(Some(h.enqueue(8, "k", None)));
    assert_eq!(h.release(8, "k", t8), Reply::Ok);
    assert_eq!(h.wait(8, "k", 1), Some(Reply::ErrorNotEnqueued));
    assert!(matches!(
        h.enqueue(8, "k", None),
        Reply::Acquired { lease_s: 33, .. }
    ));
}

#[test]
fn disconnect_with_and_without_auto_release() {
    let mut h = Harness::new();
    granted(h.lock(1, "k", 0, None));
    assert_eq!(h.lock(2, "k", 10, None), None);
    assert_eq!(h.lock(3, "k", 10, None), None);
    // A waiter that leaves is skipped.
    assert!(h.disconnect(2).is_empty());
    let r = h.disconnect(1);
    grant_of(&r, 3);

    let mut h = Harness::with(Config {
        auto_release_on_disconnect: false,
        ..Config::default()
    });
    let t = granted(h.lock(1, "k", 0, Some(5)));
    assert_eq!(h.lock(2, "k", 10, None), None);
    assert!(h.disconnect(1).is_empty());
    // The lease still runs out, and another connection may use the token.
    assert_eq!(h.renew(3, "k", t, Some(5)), Reply::OkNumber(5));
    assert!(h.advance(4999).is_empty());
    grant_of(&h.advance(1), 2);
}

#[test]
fn disconnect_drops_two_phase_state() {
    let mut h = Harness::new();
    let t = granted(h.lock(1, "k", 0, None));
    assert_eq!(h.enqueue(2, "k", None), Reply::Queued);
    assert_eq!(h.enqueue(3, "k", None), Reply::Queued);
    h.disconnect(2);
    assert_eq!(h.release(1, "k", t), Reply::Ok);
    // Conn 3 is granted (not pushed) and picks it up with `w`.
    granted(h.wait(3, "k", 1));
    h.disconnect(3);
    granted(h.lock(4, "k", 0, None));
}

#[test]
fn max_keys_and_max_waiters() {
    let mut h = Harness::with(Config {
        max_keys: 2,
        max_waiters: 1,
        ..Config::default()
    });
    let a = granted(h.lock(1, "a", 0, None));
    granted(h.lock(1, "b", 0, None));
    assert_eq!(h.lock(1, "c", 0, None), Some(Reply::ErrorMaxLocks));
    assert_eq!(h.lock(2, "a", 10, None), None);
    assert_eq!(h.lock(3, "a", 10, None), Some(Reply::ErrorMaxWaiters));
    assert_eq!(h.enqueue(3, "a", None), Reply::ErrorMaxWaiters);
    // An idle key makes room for a new one.
    assert_eq!(h.release(1, "a", a), Reply::Ok);
    let a2 = grant_of(&h.others(), 2);
    assert_eq!(h.release(2, "a", a2), Reply::Ok);
    granted(h.lock(1, "c", 0, None));
    assert_eq!(h.core.keys(), 2);
}

#[test]
fn gc_forgets_idle_keys_after_max_idle() {
    let mut h = Harness::new();
    let t = granted(h.lock(1, "k", 0, None));
    h.release(1, "k", t);
    assert_eq!(h.core.keys(), 1);
    h.advance(59_999);
    assert_eq!(h.core.keys(), 1);
    h.advance(5_001);
    assert_eq!(h.core.keys(), 0);
    // Used again before GC: not collected.
    let t = granted(h.lock(1, "k", 0, None));
    h.release(1, "k", t);
    h.advance(30_000);
    let t = granted(h.lock(1, "k", 0, None));
    h.advance(100_000);
    assert_eq!(h.core.keys(), 1);
    h.release(1, "k", t);
}

#[test]
fn limit_mismatch_and_shared_namespace() {
    let mut h = Harness::new();
    granted(h.lock(1, "k", 0, None));
    assert_eq!(h.sem(2, "k", 0, 2), Some(Reply::ErrorLimitMismatch));
    // A semaphore of limit 1 is the lock: it queues behind the holder.
    assert_eq!(h.sem(2, "k", 0, 1), Some(Reply::Timeout));
    granted(h.sem(3, "s", 0, 3));
    assert_eq!(h.lock(4, "s", 0, None), Some(Reply::ErrorLimitMismatch));
    assert_eq!(
        h.run(
            4,
            Request::Enqueue {
                key: "s",
                limit: 2,
                lease_s: None,
                kind: Kind::Semaphore
            }
        ),
        Some(Reply::ErrorLimitMismatch)
    );
}

#[test]
fn semaphore_fifo_across_slots_and_one_conn_many_slots() {
    let mut h = Harness::new();
    let a = granted(h.sem(1, "s", 0, 3));
    let b = granted(h.sem(1, "s", 0, 3));
    let c = granted(h.sem(2, "s", 0, 3));
    for conn in 3..=6 {
        assert_eq!(h.sem(conn, "s", 10, 3), None);
    }
    assert_eq!(h.release(1, "s", b), Reply::Ok);
    grant_of(&h.others(), 3);
    let r = h.disconnect(1); // frees `a`
    grant_of(&r, 4);
    let _ = (a, c);
    assert_eq!(h.release(2, "s", c), Reply::Ok);
    grant_of(&h.others(), 5);
}

#[test]
fn stale_timers_do_nothing() {
    let mut h = Harness::new();
    // A waiter granted before its timeout: the timeout must not fire a reply.
    let t = granted(h.lock(1, "k", 0, None));
    assert_eq!(h.lock(2, "k", 1, None), None);
    h.release(1, "k", t);
    let t2 = grant_of(&h.others(), 2);
    assert!(h.advance(2000).is_empty());
    // A renewed lease: the old deadline passes without an expiry.
    h.advance(30_000);
    h.renew(2, "k", t2, Some(10));
    h.advance(5_000);
    assert!(h.out.expired.is_empty());
    assert_eq!(h.lock(3, "k", 0, None), Some(Reply::Timeout));
}

#[test]
fn draining_refuses_new_acquisitions_only() {
    let mut h = Harness::new();
    let t = granted(h.lock(1, "k", 0, None));
    assert_eq!(h.enqueue(2, "k", None), Reply::Queued);
    h.core.start_draining();
    assert_eq!(h.lock(3, "k", 5, None), Some(Reply::ErrorDraining));
    assert_eq!(h.enqueue(3, "j", None), Reply::ErrorDraining);
    assert_eq!(h.renew(1, "k", t, None), Reply::OkNumber(33));
    assert_eq!(h.release(1, "k", t), Reply::Ok);
    granted(h.wait(2, "k", 1));
}

#[test]
fn stats_json_shape() {
    let mut h = Harness::new();
    granted(h.lock(1, "a\"b", 0, Some(10)));
    assert_eq!(h.lock(2, "a\"b", 10, None), None);
    granted(h.sem(3, "s", 0, 2));
    let t = granted(h.lock(1, "idle", 0, None));
    h.release(1, "idle", t);
    h.advance(1500);
    let r = h.run(5, Request::Stats);
    assert_eq!(r, Some(Reply::Stats));
    let json = String::from_utf8(h.out.json.clone()).unwrap();
    assert_eq!(
        json,
        "{\"connections\":20,\"locks\":[{\"key\":\"a\\\"b\",\"owner_conn_id\":1,\"lease_expires_in_s\":8.5,\"waiters\":1}],\
\"semaphores\":[{\"key\":\"s\",\"limit\":2,\"holders\":1,\"waiters\":0}],\
\"idle_locks\":[{\"key\":\"idle\",\"idle_s\":1.5}],\"idle_semaphores\":[],\"signal_channels\":[]}"
    );
}

#[test]
fn a_new_enqueue_replaces_a_two_phase_grant_whose_lease_ran_out() {
    let mut h = Harness::new();
    let t = granted(Some(h.enqueue(1, "k", Some(1))));
    h.advance(1000);
    assert_eq!(h.release(1, "k", t), Reply::Error);
    // Without a `w`, the expired grant must not block the key for this
    // connection forever.
    granted(Some(h.enqueue(1, "k", Some(1))));
    assert_eq!(h.enqueue(1, "k", None), Reply::ErrorAlreadyEnqueued);
}

#[test]
fn a_very_long_wait_does_not_time_out_early() {
    let mut h = Harness::new();
    granted(h.lock(1, "k", 0, Some(crate::protocol::request::MAX_NUMBER)));
    assert_eq!(
        h.lock(2, "k", crate::protocol::request::MAX_NUMBER, None),
        None
    );
    // Past the timer wheel's span (about 2.2 years): the timer fires early
    // and is re-armed, no `timeout` yet.
    assert!(h.advance(80_000_000_000).is_empty());
    assert!(h.advance(80_000_000_000).is_empty());
}

#[test]
fn one_connection_cannot_hold_without_bound() {
    let mut h = Harness::with(Config {
        max_holds_per_conn: 2,
        ..Config::default()
    });
    let a = granted(h.sem(1, "s", 0, 1000));
    granted(h.sem(1, "s", 0, 1000));
    assert_eq!(h.sem(1, "s", 0, 1000), Some(Reply::ErrorMaxLocks));
    assert_eq!(h.lock(1, "other", 0, None), Some(Reply::ErrorMaxLocks));
    assert_eq!(
        h.run(
            1,
            Request::Enqueue {
                key: "e",
                limit: 1,
                lease_s: None,
                kind: Kind::Lock
            }
        ),
        Some(Reply::ErrorMaxLocks)
    );
    // Other connections are not affected; releasing makes room again.
    granted(h.sem(2, "s", 0, 1000));
    assert_eq!(h.release(1, "s", a), Reply::Ok);
    granted(h.sem(1, "s", 0, 1000));
}
