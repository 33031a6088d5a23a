//! Model-based property test of the lock state machine.
//!
//! Random sequences of requests, time advances and disconnects are driven
//! through `Core`'s public entry points while a small reference model follows
//! along. The model predicts every reply to the requester exactly (tokens
//! aside, which it learns), and checks everything else the core produces:
//!
//! - `check_invariants()` after every step;
//! - holders never exceed a key's limit, and the model's holder count equals
//!   the core's;
//! - no waiter while a slot is free (a lost wake-up);
//! - grants in FIFO order per key: a grant goes to the oldest live waiter
//!   (two-phase waiters that are not blocked in `w` are granted without a
//!   reply; the model infers those grants and confirms them at `w`);
//! - every holder whose lease has run out is expired by `tick`, and every
//!   blocked waiter past its timeout is answered;
//! - fresh tokens are unique and their fences strictly increase;
//! - after everyone disconnects and time passes, the core is empty.
//!
//! Timer ties inside one `tick` (a lease and a timeout due in the same
//! millisecond) may be resolved either way; the model accepts any order that
//! a correct machine could produce.

use std::collections::{BTreeMap, HashSet, VecDeque};

use dflockd::core::{Config, ConnId, Core, Outbox, Outcome, SeededEntropy};
use dflockd::protocol::{Kind, Reply, Request, Token};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, FileFailurePersistence};

/// Key names and their fixed limits: a key's limit never changes between
/// uses, so a limit mismatch is only ever sent on purpose.
const KEYS: [(&str, u64); 5] = [("a", 1), ("b", 1), ("c", 1), ("s", 2), ("t", 3)];
/// Connections alive at any time (a disconnected one is replaced at once).
const SLOTS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum TokenPick {
    /// A token this connection holds (any key).
    Own(usize),
    /// A token anyone holds (any key).
    Any(usize),
    /// Any token ever issued, possibly released or expired long ago.
    Stale(usize),
    /// Well-formed but never issued.
    Bogus(u128),
    /// Not a token at all.
    Malformed,
}

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        slot: usize,
        key: usize,
        timeout_s: u64,
        lease_s: Option<u64>,
        semaphore_form: bool,
        wrong_limit: bool,
    },
    Release {
        slot: usize,
        key: usize,
        pick: TokenPick,
        /// Send the picked token under `key` rather than its own key.
        keep_key: bool,
    },
    Renew {
        slot: usize,
        key: usize,
        pick: TokenPick,
        keep_key: bool,
        lease_s: Option<u64>,
    },
    Enqueue {
        slot: usize,
        key: usize,
        lease_s: Option<u64>,
        semaphore_form: bool,
        wrong_limit: bool,
    },
    Wait {
        slot: usize,
        key: usize,
        timeout_s: u64,
    },
    Misc {
        slot: usize,
        which: u8,
    },
    /// Moves the clock; `tick: false` leaves due timers pending so that the
    /// next request meets them overdue (as when a request and a deadline
    /// fall in the same loop turn).
    Advance {
        ms: u64,
        tick: bool,
    },
    /// Jumps to the core's next deadline, and ticks unless `tick` is false
    /// (a request then lands in the very millisecond of a deadline).
    ToNextDeadline {
        tick: bool,
    },
    Disconnect {
        slot: usize,
    },
}

fn lease_strategy() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![3 => Just(None), 2 => Just(Some(1)), 2 => Just(Some(2)), 1 => Just(Some(4))]
}

fn timeout_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(0u64), 3 => Just(1), 2 => Just(2), 1 => Just(5)]
}

fn pick_strategy() -> impl Strategy<Value = TokenPick> {
    prop_oneof![
        6 => any::<usize>().prop_map(TokenPick::Own),
        2 => any::<usize>().prop_map(TokenPick::Any),
        2 => any::<usize>().prop_map(TokenPick::Stale),
        1 => any::<u128>().prop_map(TokenPick::Bogus),
        1 => Just(TokenPick::Malformed),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let key = 0..KEYS.len();
    prop_oneof![
        30 => (slot.clone(), key.clone(), timeout_strategy(), lease_strategy(), any::<bool>(), prop::bool::weighted(0.03))
            .prop_map(|(slot, key, timeout_s, lease_s, semaphore_form, wrong_limit)| Op::Acquire {
                slot, key, timeout_s, lease_s, semaphore_form, wrong_limit
            }),
        12 => (slot.clone(), key.clone(), pick_strategy(), prop::bool::weighted(0.1))
            .prop_map(|(slot, key, pick, keep_key)| Op::Release { slot, key, pick, keep_key }),
        8 => (slot.clone(), key.clone(), pick_strategy(), prop::bool::weighted(0.1), lease_strategy())
            .prop_map(|(slot, key, pick, keep_key, lease_s)| Op::Renew { slot, key, pick, keep_key, lease_s }),
        10 => (slot.clone(), key.clone(), lease_strategy(), any::<bool>(), prop::bool::weighted(0.03))
            .prop_map(|(slot, key, lease_s, semaphore_form, wrong_limit)| Op::Enqueue {
                slot, key, lease_s, semaphore_form, wrong_limit
            }),
        12 => (slot.clone(), key.clone(), timeout_strategy())
            .prop_map(|(slot, key, timeout_s)| Op::Wait { slot, key, timeout_s }),
        2 => (slot.clone(), 0u8..3).prop_map(|(slot, which)| Op::Misc { slot, which }),
        20 => (prop_oneof![4 => 0u64..20, 4 => 20u64..1500, 1 => 1500u64..6000], prop::bool::weighted(0.9))
            .prop_map(|(ms, tick)| Op::Advance { ms, tick }),
        5 => prop::bool::weighted(0.8).prop_map(|tick| Op::ToNextDeadline { tick }),
        4 => slot.prop_map(|slot| Op::Disconnect { slot }),
    ]
}

fn config_strategy() -> impl Strategy<Value = Config> {
    (
        any::<bool>(),
        prop_oneof![Just(0usize), Just(2)],
        prop_oneof![Just(0usize), Just(3)],
        prop_oneof![Just(1_500u64), Just(2_000), Just(5_000)],
        prop_oneof![Just(1u64), Just(100), Just(1_000)],
        prop_oneof![Just(0u64), Just(500), Just(3_000)],
    )
        .prop_map(
            |(auto_release, max_waiters, max_keys, lease, gc_interval, gc_idle)| Config {
                default_lease_ms: lease,
                max_keys,
                max_waiters,
                gc_interval_ms: gc_interval,
                gc_max_idle_ms: gc_idle,
                auto_release_on_disconnect: auto_release,
                ..Config::default()
            },
        )
}

// ---- the model ----

struct MHolder {
    conn: ConnId,
    /// `None` for a two-phase grant made without a reply, until `w` names it.
    token: Option<Token>,
    expires_at: u64,
}

struct MWaiter {
    conn: ConnId,
    lease_ms: u64,
    /// Set while the connection is blocked on this waiter (`l`, `sl`, `w`).
    deadline: Option<u64>,
    two_phase: bool,
}

#[derive(Default)]
struct MKey {
    holders: Vec<MHolder>,
    queue: VecDeque<MWaiter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tp {
    Queued,
    Granted(Option<Token>),
}

#[derive(Clone, Copy)]
struct MTp {
    lease_ms: u64,
    state: Tp,
}

struct MConn {
    id: ConnId,
    blocked: Option<usize>,
    two_phase: BTreeMap<usize, MTp>,
}

impl MConn {
    fn new(id: ConnId) -> Self {
        MConn {
            id,
            blocked: None,
            two_phase: BTreeMap::new(),
        }
    }
}

/// What the model expects the requester to get back.
#[derive(Debug)]
enum Expect {
    Blocked,
    Reply(Reply),
    /// `ok <token> <lease>` (or `acquired ...`) with a fresh token: the
    /// requester now holds a slot of `key`.
    FreshGrant {
        key: usize,
        lease_s: u64,
    },
    FreshAcquired {
        key: usize,
        lease_s: u64,
    },
    /// `w` handing over a grant made earlier.
    Handover {
        key: usize,
        token: Option<Token>,
        lease_s: u64,
    },
}

struct Harness {
    core: Core,
    out: Outbox,
    cfg: Config,
    now: u64,
    keys: Vec<MKey>,
    conns: Vec<MConn>,
    next_conn: ConnId,
    draining: bool,
    /// Every token seen so far, with its key.
    issued: Vec<(usize, Token)>,
    seen: HashSet<u128>,
    last_fence: u64,
    step: usize,
}

type TestResult = Result<(), TestCaseError>;

macro_rules! ensure {
    ($h:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!(
                "step {} at {} ms: {}",
                $h.step,
                $h.now,
                format!($($fmt)+)
            )));
        }
    };
}

fn key_of(name: &str) -> usize {
    KEYS.iter()
        .position(|(k, _)| *k == name)
        .unwrap_or_else(|| panic!("unknown key {name:?}"))
}

fn hex(t: Token) -> String {
    format!("{:032x}", t.0)
}

impl Harness {
    fn new(cfg: Config, seed: u64) -> Self {
        let mut core = Core::new(cfg.clone(), 1 << 40, Box::new(SeededEntropy(seed)));
        let conns: Vec<MConn> = (1..=SLOTS as ConnId).map(MConn::new).collect();
        for c in &conns {
            core.connect(c.id);
        }
        Harness {
            core,
            out: Outbox::default(),
            cfg,
            now: 0,
            keys: (0..KEYS.len()).map(|_| MKey::default()).collect(),
            conns,
            next_conn: SLOTS as ConnId + 1,
            draining: false,
            issued: Vec::new(),
            seen: HashSet::new(),
            last_fence: 0,
            step: 0,
        }
    }

    fn lease_ms(&self, lease_s: Option<u64>) -> u64 {
        lease_s.map_or(self.cfg.default_lease_ms, |s| s * 1000)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut MConn> {
        self.conns.iter_mut().find(|c| c.id == id)
    }

    /// Whether the core must still know `key` (holders, waiters or pins).
    fn key_live(&self, key: usize) -> bool {
        let k = &self.keys[key];
        !k.holders.is_empty()
            || !k.queue.is_empty()
            || self.conns.iter().any(|c| c.two_phase.contains_key(&key))
    }

    fn live_keys(&self) -> usize {
        (0..KEYS.len()).filter(|&k| self.key_live(k)).count()
    }

    fn free_slot(&self, key: usize) -> bool {
        let k = &self.keys[key];
        k.queue.is_empty() && (k.holders.len() as u64) < KEYS[key].1
    }

    /// `error_max_locks` is due when the key is new and every key the core
    /// knows is in use (idle keys are evicted to make room).
    fn max_locks_refused(&self, key: usize, core_keys_before: usize) -> bool {
        let live = self.live_keys();
        self.cfg.max_keys != 0
            && !self.key_live(key)
            && core_keys_before == live
            && live >= self.cfg.max_keys
    }

    fn note_fresh_token(&mut self, key: usize, t: Token) -> TestResult {
        ensure!(self, self.seen.insert(t.0), "token {t:?} issued twice");
        ensure!(
            self,
            t.fence() > self.last_fence,
            "fence {} not above the previous grant's {}",
            t.fence(),
            self.last_fence
        );
        self.last_fence = t.fence();
        self.issued.push((key, t));
        Ok(())
    }

    /// Makes the head waiter of `key` a holder without a reply (a two-phase
    /// waiter not blocked in `w`).
    fn silent_grant(&mut self, key: usize) -> TestResult {
        let w = self.keys[key].queue.pop_front().expect("a waiter");
        ensure!(
            self,
            w.two_phase && w.deadline.is_none(),
            "FIFO/lost wake-up on {:?}: conn {} blocked at the head of the queue got no grant",
            KEYS[key].0,
            w.conn
        );
        self.keys[key].holders.push(MHolder {
            conn: w.conn,
            token: None,
            expires_at: self.now + w.lease_ms,
        });
        let conn = w.conn;
        let entry = self
            .conn_mut(conn)
            .and_then(|c| c.two_phase.get_mut(&key))
            .map(|tp| {
                let was = tp.state;
                tp.state = Tp::Granted(None);
                was
            });
        ensure!(
            self,
            entry == Some(Tp::Queued),
            "two-phase waiter of conn {conn} without a queued entry ({entry:?})"
        );
        Ok(())
    }

    /// A grant or timeout delivered to a blocked connection other than the
    /// requester.
    fn on_other_reply(&mut self, conn: ConnId, reply: Reply, timeouts_allowed: bool) -> TestResult {
        let blocked = self
            .conns
            .iter()
            .find(|c| c.id == conn)
            .and_then(|c| c.blocked);
        let Some(key) = blocked else {
            return Err(TestCaseError::fail(format!(
                "step {}: reply {reply:?} to conn {conn}, which is not blocked",
                self.step
            )));
        };
        let idx = self.keys[key]
            .queue
            .iter()
            .position(|w| w.conn == conn && w.deadline.is_some());
        let Some(idx) = idx else {
            return Err(TestCaseError::fail(format!(
                "step {}: conn {conn} blocked on {:?} has no waiter",
                self.step, KEYS[key].0
            )));
        };
        match reply {
            Reply::Timeout => {
                ensure!(
                    self,
                    timeouts_allowed,
                    "timeout outside a tick for conn {conn}"
                );
                let w = self.keys[key].queue.remove(idx).expect("waiter");
                let deadline = w.deadline.expect("blocked");
                ensure!(
                    self,
                    deadline <= self.now,
                    "conn {conn} timed out at {} before its deadline {deadline}",
                    self.now
                );
                let c = self.conn_mut(conn).expect("live");
                c.blocked = None;
                if w.two_phase {
                    c.two_phase.remove(&key);
                }
            }
            Reply::Granted { token, lease_s } => {
                for _ in 0..idx {
                    self.silent_grant(key)?;
                }
                let w = self.keys[key].queue.pop_front().expect("waiter");
                ensure!(
                    self,
                    lease_s == w.lease_ms / 1000,
                    "grant to conn {conn} reports lease {lease_s}, waiter asked {} ms",
                    w.lease_ms
                );
                self.note_fresh_token(key, token)?;
                self.keys[key].holders.push(MHolder {
                    conn,
                    token: Some(token),
                    expires_at: self.now + w.lease_ms,
                });
                ensure!(
                    self,
                    self.keys[key].holders.len() as u64 <= KEYS[key].1,
                    "{:?}: {} holders over limit {}",
                    KEYS[key].0,
                    self.keys[key].holders.len(),
                    KEYS[key].1
                );
                let c = self.conn_mut(conn).expect("live");
                c.blocked = None;
                if w.two_phase {
                    c.two_phase.remove(&key);
                }
            }
            other => {
                return Err(TestCaseError::fail(format!(
                    "step {}: unexpected reply {other:?} to blocked conn {conn}",
                    self.step
                )));
            }
        }
        Ok(())
    }

    /// After every step: grants the model can infer, then cross-checks.
    fn settle(&mut self) -> TestResult {
        for (key, &(name, limit)) in KEYS.iter().enumerate() {
            while (self.keys[key].holders.len() as u64) < limit && !self.keys[key].queue.is_empty()
            {
                self.silent_grant(key)?;
            }
            ensure!(
                self,
                self.keys[key].holders.len() as u64 <= limit,
                "{name:?} over its limit"
            );
        }
        if let Err(e) = self.core.check_invariants() {
            return Err(TestCaseError::fail(format!(
                "step {} at {} ms: invariant broken: {e}",
                self.step, self.now
            )));
        }
        let holders: usize = self.keys.iter().map(|k| k.holders.len()).sum();
        ensure!(
            self,
            self.core.holders() == holders,
            "core has {} holders, model {holders}",
            self.core.holders()
        );
        ensure!(
            self,
            self.core.keys() >= self.live_keys(),
            "core knows {} keys, {} are in use",
            self.core.keys(),
            self.live_keys()
        );
        ensure!(
            self,
            self.core.connections() == self.conns.len(),
            "core has {} connections",
            self.core.connections()
        );
        Ok(())
    }

    fn check_expired(&self, mut want: Vec<(usize, ConnId)>) -> TestResult {
        let mut got: Vec<(usize, ConnId)> = self
            .out
            .expired
            .iter()
            .map(|e| (key_of(&e.key), e.conn))
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        ensure!(
            self,
            got == want,
            "lease expiries {got:?}, expected {want:?}"
        );
        Ok(())
    }

    fn tick(&mut self) -> TestResult {
        let mut expired = Vec::new();
        for (key, k) in self.keys.iter_mut().enumerate() {
            let now = self.now;
            k.holders.retain(|h| {
                let gone = h.expires_at <= now;
                if gone {
                    expired.push((key, h.conn));
                }
                !gone
            });
        }
        self.out.clear();
        self.core.tick(self.now, &mut self.out);
        self.check_expired(expired)?;
        let replies = std::mem::take(&mut self.out.replies);
        for &(conn, reply) in &replies {
            self.on_other_reply(conn, reply, true)?;
        }
        for (key, k) in self.keys.iter().enumerate() {
            for w in &k.queue {
                if let Some(d) = w.deadline {
                    ensure!(
                        self,
                        d > self.now,
                        "conn {} still waits on {:?} past its deadline {d}",
                        w.conn,
                        KEYS[key].0
                    );
                }
            }
        }
        self.settle()
    }

    fn disconnect(&mut self, slot: usize, reconnect: bool) -> TestResult {
        let conn = self.conns[slot].id;
        for k in &mut self.keys {
            k.queue.retain(|w| w.conn != conn);
            if self.cfg.auto_release_on_disconnect {
                k.holders.retain(|h| h.conn != conn);
            }
        }
        if reconnect {
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns[slot] = MConn::new(id);
        } else {
            self.conns.remove(slot);
        }
        self.out.clear();
        self.core.disconnect(self.now, conn, &mut self.out);
        if reconnect {
            self.core.connect(self.conns[slot].id);
        }
        self.check_expired(Vec::new())?;
        let replies = std::mem::take(&mut self.out.replies);
        for &(c, reply) in &replies {
            ensure!(self, c != conn, "reply {reply:?} to the departed conn");
            self.on_other_reply(c, reply, false)?;
        }
        self.settle()
    }

    fn resolve_token(
        &self,
        slot: usize,
        key: usize,
        pick: TokenPick,
        keep_key: bool,
    ) -> (usize, String) {
        let me = self.conns[slot].id;
        let held = |only_me: bool| -> Vec<(usize, Token)> {
            self.keys
                .iter()
                .enumerate()
                .flat_map(|(k, m)| {
                    m.holders
                        .iter()
                        .filter(move |h| !only_me || h.conn == me)
                        .filter_map(move |h| h.token.map(|t| (k, t)))
                })
                .collect()
        };
        let choose = |list: Vec<(usize, Token)>, i: usize| list.get(i % list.len().max(1)).copied();
        let picked = match pick {
            TokenPick::Own(i) => choose(held(true), i).or_else(|| choose(held(false), i)),
            TokenPick::Any(i) => choose(held(false), i),
            TokenPick::Stale(i) => choose(self.issued.clone(), i),
            TokenPick::Bogus(v) => return (key, hex(Token(v))),
            TokenPick::Malformed => return (key, "NOT-A-TOKEN".into()),
        };
        match picked {
            Some((k, t)) => (if keep_key { key } else { k }, hex(t)),
            None => (key, hex(Token(0xdead_beef))),
        }
    }

    fn run_op(&mut self, op: &Op) -> TestResult {
        match *op {
            Op::Advance { ms, tick } => {
                self.now += ms;
                if tick {
                    return self.tick();
                }
                return Ok(());
            }
            Op::ToNextDeadline { tick } => {
                if let Some(d) = self.core.next_deadline() {
                    self.now = self.now.max(d);
                }
                if tick {
                    return self.tick();
                }
                return Ok(());
            }
            Op::Disconnect { slot } => return self.disconnect(slot, true),
            _ => {}
        }
        let slot = match *op {
            Op::Acquire { slot, .. }
            | Op::Release { slot, .. }
            | Op::Renew { slot, .. }
            | Op::Enqueue { slot, .. }
            | Op::Wait { slot, .. }
            | Op::Misc { slot, .. } => slot,
            _ => unreachable!(),
        };
        // A blocked connection sends nothing until it is answered.
        if self.conns[slot].blocked.is_some() {
            return Ok(());
        }
        let token_holder;
        let req = match *op {
            Op::Acquire {
                key,
                timeout_s,
                lease_s,
                semaphore_form,
                wrong_limit,
                ..
            } => Request::Acquire {
                key: KEYS[key].0,
                timeout_s,
                limit: self.limit_to_send(key, wrong_limit),
                lease_s,
                kind: if semaphore_form || KEYS[key].1 > 1 {
                    Kind::Semaphore
                } else {
                    Kind::Lock
                },
            },
            Op::Release {
                key,
                pick,
                keep_key,
                ..
            } => {
                let (k, t) = self.resolve_token(slot, key, pick, keep_key);
                token_holder = t;
                Request::Release {
                    key: KEYS[k].0,
                    token: &token_holder,
                }
            }
            Op::Renew {
                key,
                pick,
                keep_key,
                lease_s,
                ..
            } => {
                let (k, t) = self.resolve_token(slot, key, pick, keep_key);
                token_holder = t;
                Request::Renew {
                    key: KEYS[k].0,
                    token: &token_holder,
                    lease_s,
                }
            }
            Op::Enqueue {
                key,
                lease_s,
                semaphore_form,
                wrong_limit,
                ..
            } => Request::Enqueue {
                key: KEYS[key].0,
                limit: self.limit_to_send(key, wrong_limit),
                lease_s,
                kind: if semaphore_form || KEYS[key].1 > 1 {
                    Kind::Semaphore
                } else {
                    Kind::Lock
                },
            },
            Op::Wait { key, timeout_s, .. } => Request::Wait {
                key: KEYS[key].0,
                timeout_s,
            },
            Op::Misc { which, .. } => match which {
                0 => Request::Ping,
                1 => Request::Stats,
                _ => Request::Auth { token: b"secret" },
            },
            _ => unreachable!(),
        };
        self.request(slot, &req)
    }

    /// The limit to send for `key`: its own, or (on purpose, and only while
    /// the core surely knows the key) a different one.
    fn limit_to_send(&self, key: usize, wrong: bool) -> u64 {
        if wrong && self.key_live(key) {
            KEYS[key].1 + 1
        } else {
            KEYS[key].1
        }
    }

    fn request(&mut self, slot: usize, req: &Request<'_>) -> TestResult {
        let conn = self.conns[slot].id;
        let core_keys_before = self.core.keys();
        let mut expired = Vec::new();
        let expect = self.predict(slot, req, core_keys_before, &mut expired)?;
        self.out.clear();
        let outcome = self.core.handle(self.now, conn, req, &mut self.out);
        let mut replies = std::mem::take(&mut self.out.replies);
        let own = match outcome {
            Outcome::Replied => {
                let last = replies.pop();
                ensure!(
                    self,
                    matches!(last, Some((c, _)) if c == conn),
                    "{req:?}: replied, but the last reply is {last:?}"
                );
                last.map(|(_, r)| r)
            }
            Outcome::Blocked => None,
        };
        ensure!(
            self,
            replies.iter().all(|&(c, _)| c != conn),
            "{req:?}: extra replies to the requester: {replies:?}"
        );
        self.check_expired(expired)?;
        self.check_own(slot, req, expect, own)?;
        for &(c, reply) in &replies {
            self.on_other_reply(c, reply, false)?;
        }
        if let (Request::Stats, Some(Reply::Stats)) = (req, own) {
            let json = &self.out.json;
            ensure!(
                self,
                json.first() == Some(&b'{') && json.last() == Some(&b'}'),
                "stats body {:?}",
                String::from_utf8_lossy(json)
            );
        }
        self.settle()
    }

    /// Works out the requester's reply and applies the request's direct
    /// effects to the model (grants it causes for others are checked after).
    fn predict(
        &mut self,
        slot: usize,
        req: &Request<'_>,
        core_keys_before: usize,
        expired: &mut Vec<(usize, ConnId)>,
    ) -> Result<Expect, TestCaseError> {
        let me = self.conns[slot].id;
        let now = self.now;
        Ok(match *req {
            Request::Acquire {
                key,
                timeout_s,
                limit,
                lease_s,
                ..
            } => {
                let k = key_of(key);
                let lease_ms = self.lease_ms(lease_s);
                if self.draining {
                    Expect::Reply(Reply::ErrorDraining)
                } else if limit != KEYS[k].1 {
                    Expect::Reply(Reply::ErrorLimitMismatch)
                } else if self.max_locks_refused(k, core_keys_before) {
                    Expect::Reply(Reply::ErrorMaxLocks)
                } else if self.free_slot(k) {
                    self.keys[k].holders.push(MHolder {
                        conn: me,
                        token: None,
                        expires_at: now + lease_ms,
                    });
                    Expect::FreshGrant {
                        key: k,
                        lease_s: lease_ms / 1000,
                    }
                } else if timeout_s == 0 {
                    Expect::Reply(Reply::Timeout)
                } else if self.cfg.max_waiters != 0
                    && self.keys[k].queue.len() >= self.cfg.max_waiters
                {
                    Expect::Reply(Reply::ErrorMaxWaiters)
                } else {
                    self.keys[k].queue.push_back(MWaiter {
                        conn: me,
                        lease_ms,
                        deadline: Some(now + timeout_s * 1000),
                        two_phase: false,
                    });
                    self.conns[slot].blocked = Some(k);
                    Expect::Blocked
                }
            }
            Request::Release { key, token } => {
                let k = key_of(key);
                match self.find_holder(k, token) {
                    Some(i) => {
                        let h = self.keys[k].holders.swap_remove(i);
                        let t = h.token;
                        if let Some(c) = self.conn_mut(h.conn) {
                            if c.two_phase.get(&k).map(|tp| tp.state) == Some(Tp::Granted(t)) {
                                c.two_phase.remove(&k);
                            }
                        }
                        Expect::Reply(Reply::Ok)
                    }
                    None => Expect::Reply(Reply::Error),
                }
            }
            Request::Renew {
                key,
                token,
                lease_s,
            } => {
                let k = key_of(key);
                match self.find_holder(k, token) {
                    Some(i) if self.keys[k].holders[i].expires_at <= now => {
                        let h = self.keys[k].holders.swap_remove(i);
                        expired.push((k, h.conn));
                        Expect::Reply(Reply::Error)
                    }
                    Some(i) => {
                        let lease_ms = self.lease_ms(lease_s);
                        self.keys[k].holders[i].expires_at = now + lease_ms;
                        Expect::Reply(Reply::OkNumber(lease_ms / 1000))
                    }
                    None => Expect::Reply(Reply::Error),
                }
            }
            Request::Enqueue {
                key,
                limit,
                lease_s,
                ..
            } => {
                let k = key_of(key);
                let lease_ms = self.lease_ms(lease_s);
                // A two-phase grant whose holder is gone (its lease ran out
                // before any `w`) is over: a new `e` replaces it.
                if let Some(MTp {
                    state: Tp::Granted(t),
                    ..
                }) = self.conns[slot].two_phase.get(&k).copied()
                {
                    let held = self.keys[k]
                        .holders
                        .iter()
                        .any(|h| h.conn == me && h.token == t);
                    if !held {
                        self.conns[slot].two_phase.remove(&k);
                    }
                }
                if self.conns[slot].two_phase.contains_key(&k) {
                    Expect::Reply(Reply::ErrorAlreadyEnqueued)
                } else if self.draining {
                    Expect::Reply(Reply::ErrorDraining)
                } else if limit != KEYS[k].1 {
                    Expect::Reply(Reply::ErrorLimitMismatch)
                } else if self.max_locks_refused(k, core_keys_before) {
                    Expect::Reply(Reply::ErrorMaxLocks)
                } else if self.free_slot(k) {
                    self.keys[k].holders.push(MHolder {
                        conn: me,
                        token: None,
                        expires_at: now + lease_ms,
                    });
                    self.conns[slot].two_phase.insert(
                        k,
                        MTp {
                            lease_ms,
                            state: Tp::Granted(None),
                        },
                    );
                    Expect::FreshAcquired {
                        key: k,
                        lease_s: lease_ms / 1000,
                    }
                } else if self.cfg.max_waiters != 0
                    && self.keys[k].queue.len() >= self.cfg.max_waiters
                {
                    Expect::Reply(Reply::ErrorMaxWaiters)
                } else {
                    self.keys[k].queue.push_back(MWaiter {
                        conn: me,
                        lease_ms,
                        deadline: None,
                        two_phase: true,
                    });
                    self.conns[slot].two_phase.insert(
                        k,
                        MTp {
                            lease_ms,
                            state: Tp::Queued,
                        },
                    );
                    Expect::Reply(Reply::Queued)
                }
            }
            Request::Wait { key, timeout_s } => {
                let k = key_of(key);
                match self.conns[slot].two_phase.get(&k).copied() {
                    None => Expect::Reply(Reply::ErrorNotEnqueued),
                    Some(MTp {
                        lease_ms,
                        state: Tp::Granted(token),
                    }) => {
                        self.conns[slot].two_phase.remove(&k);
                        let i = self.keys[k]
                            .holders
                            .iter()
                            .position(|h| h.conn == me && h.token == token);
                        match i {
                            None => Expect::Reply(Reply::ErrorLeaseExpired),
                            Some(i) if self.keys[k].holders[i].expires_at <= now => {
                                self.keys[k].holders.swap_remove(i);
                                expired.push((k, me));
                                Expect::Reply(Reply::ErrorLeaseExpired)
                            }
                            Some(i) => {
                                self.keys[k].holders[i].expires_at = now + lease_ms;
                                Expect::Handover {
                                    key: k,
                                    token,
                                    lease_s: lease_ms / 1000,
                                }
                            }
                        }
                    }
                    Some(MTp {
                        state: Tp::Queued, ..
                    }) => {
                        let i = self.keys[k]
                            .queue
                            .iter()
                            .position(|w| w.conn == me && w.two_phase);
                        let Some(i) = i else {
                            return Err(TestCaseError::fail("model: queued entry without waiter"));
                        };
                        if timeout_s == 0 {
                            self.keys[k].queue.remove(i);
                            self.conns[slot].two_phase.remove(&k);
                            Expect::Reply(Reply::Timeout)
                        } else {
                            self.keys[k].queue[i].deadline = Some(now + timeout_s * 1000);
                            self.conns[slot].blocked = Some(k);
                            Expect::Blocked
                        }
                    }
                }
            }
            Request::Ping => Expect::Reply(Reply::Ok),
            Request::Stats => Expect::Reply(Reply::Stats),
            Request::Auth { .. } => Expect::Reply(Reply::Error),
            // Signals do not touch locks; the model does not send them.
            other => {
                return Err(TestCaseError::fail(format!(
                    "model does not send {other:?}"
                )));
            }
        })
    }

    fn find_holder(&self, key: usize, token: &str) -> Option<usize> {
        let t = Token::parse(token.as_bytes())?;
        self.keys[key]
            .holders
            .iter()
            .position(|h| h.token == Some(t))
    }

    /// Fills in the token of the holder the model created for a fresh grant.
    fn learn_token(&mut self, slot: usize, key: usize, token: Token, two_phase: bool) {
        let me = self.conns[slot].id;
        if let Some(h) = self.keys[key]
            .holders
            .iter_mut()
            .rev()
            .find(|h| h.conn == me && h.token.is_none())
        {
            h.token = Some(token);
        }
        if two_phase {
            if let Some(tp) = self.conns[slot].two_phase.get_mut(&key) {
                tp.state = Tp::Granted(Some(token));
            }
        }
    }

    fn check_own(
        &mut self,
        slot: usize,
        req: &Request<'_>,
        expect: Expect,
        own: Option<Reply>,
    ) -> TestResult {
        match (expect, own) {
            (Expect::Blocked, None) => Ok(()),
            (Expect::Reply(want), Some(got)) => {
                ensure!(self, got == want, "{req:?}: got {got:?}, expected {want:?}");
                Ok(())
            }
            (Expect::FreshGrant { key, lease_s }, Some(Reply::Granted { token, lease_s: l }))
            | (
                Expect::FreshAcquired { key, lease_s },
                Some(Reply::Acquired { token, lease_s: l }),
            ) => {
                let two_phase = matches!(req, Request::Enqueue { .. });
                ensure!(self, l == lease_s, "{req:?}: lease {l}, expected {lease_s}");
                self.note_fresh_token(key, token)?;
                self.learn_token(slot, key, token, two_phase);
                Ok(())
            }
            (
                Expect::Handover {
                    key,
                    token: want,
                    lease_s,
                },
                Some(Reply::Granted { token, lease_s: l }),
            ) => {
                ensure!(self, l == lease_s, "{req:?}: lease {l}, expected {lease_s}");
                match want {
                    Some(t) => ensure!(
                        self,
                        t == token,
                        "{req:?}: handed over {token:?}, granted {t:?}"
                    ),
                    None => {
                        // Granted without a reply earlier: first sight of it.
                        ensure!(
                            self,
                            self.seen.insert(token.0),
                            "token {token:?} issued twice"
                        );
                        self.last_fence = self.last_fence.max(token.fence());
                        self.issued.push((key, token));
                        let me = self.conns[slot].id;
                        let h = self.keys[key]
                            .holders
                            .iter_mut()
                            .find(|h| h.conn == me && h.token.is_none());
                        ensure!(self, h.is_some(), "model: no silent holder to name");
                        if let Some(h) = h {
                            h.token = Some(token);
                        }
                    }
                }
                Ok(())
            }
            (want, got) => Err(TestCaseError::fail(format!(
                "step {} at {} ms: {req:?}: got {got:?}, expected {want:?}",
                self.step, self.now
            ))),
        }
    }

    /// Everyone leaves; once time has passed, nothing may remain.
    fn teardown(&mut self) -> TestResult {
        while !self.conns.is_empty() {
            self.disconnect(0, false)?;
        }
        for _ in 0..10_000 {
            let Some(d) = self.core.next_deadline() else {
                break;
            };
            self.now = self.now.max(d);
            self.tick()?;
        }
        ensure!(
            self,
            self.core.keys() == 0 && self.core.holders() == 0,
            "after teardown: {} keys, {} holders",
            self.core.keys(),
            self.core.holders()
        );
        ensure!(
            self,
            self.core.next_deadline().is_none(),
            "a timer survives teardown: {:?}",
            self.core.next_deadline()
        );
        Ok(())
    }
}

fn run_case(cfg: Config, seed: u64, ops: &[Op], drain_at: Option<usize>) -> TestResult {
    let mut h = Harness::new(cfg, seed);
    h.settle()?;
    for (i, op) in ops.iter().enumerate() {
        h.step = i;
        if drain_at == Some(i) {
            h.core.start_draining();
            h.draining = true;
        }
        h.run_op(op)?;
    }
    h.step = ops.len();
    h.teardown()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(PtConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..PtConfig::default()
    })]

    #[test]
    fn core_matches_model(
        cfg in config_strategy(),
        seed in any::<u64>(),
        ops in prop::collection::vec(op_strategy(), 1..=250),
        drain_at in prop::option::weighted(0.15, 0usize..250),
    ) {
        run_case(cfg, seed, &ops, drain_at)?;
    }
}

// ---- fixed scenarios: corner cases worth pinning down ----

fn small() -> Config {
    Config {
        default_lease_ms: 2_000,
        max_keys: 0,
        max_waiters: 0,
        gc_interval_ms: 100,
        gc_max_idle_ms: 500,
        auto_release_on_disconnect: true,
        ..Config::default()
    }
}

#[test]
fn two_phase_grant_without_reply_is_handed_over_in_fifo_order() {
    use Op::*;
    let ops = [
        Acquire {
            slot: 0,
            key: 0,
            timeout_s: 0,
            lease_s: Some(1),
            semaphore_form: false,
            wrong_limit: false,
        },
        Enqueue {
            slot: 1,
            key: 0,
            lease_s: None,
            semaphore_form: false,
            wrong_limit: false,
        },
        Acquire {
            slot: 2,
            key: 0,
            timeout_s: 5,
            lease_s: None,
            semaphore_form: false,
            wrong_limit: false,
        },
        // The lease runs out: conn 2 (two-phase, not waiting) is granted silently.
        Advance {
            ms: 1_000,
            tick: true,
        },
        Wait {
            slot: 1,
            key: 0,
            timeout_s: 1,
        },
        Release {
            slot: 1,
            key: 0,
            pick: TokenPick::Own(0),
            keep_key: false,
        },
        Advance { ms: 10, tick: true },
    ];
    run_case(small(), 1, &ops, None).unwrap();
}

#[test]
fn overdue_timers_met_by_requests_before_the_tick() {
    use Op::*;
    let ops = [
        Enqueue {
            slot: 0,
            key: 3,
            lease_s: Some(1),
            semaphore_form: true,
            wrong_limit: false,
        },
        Acquire {
            slot: 1,
            key: 3,
            timeout_s: 0,
            lease_s: Some(1),
            semaphore_form: true,
            wrong_limit: false,
        },
        Enqueue {
            slot: 2,
            key: 3,
            lease_s: Some(2),
            semaphore_form: true,
            wrong_limit: false,
        },
        Advance {
            ms: 1_000,
            tick: false,
        },
        // Both leases are due but not yet expired by a tick.
        Renew {
            slot: 1,
            key: 3,
            pick: TokenPick::Own(0),
            keep_key: false,
            lease_s: None,
        },
        Wait {
            slot: 0,
            key: 3,
            timeout_s: 1,
        },
        Wait {
            slot: 2,
            key: 3,
            timeout_s: 1,
        },
        Advance { ms: 0, tick: true },
    ];
    run_case(small(), 2, &ops, None).unwrap();
    let mut cfg = small();
    cfg.auto_release_on_disconnect = false;
    run_case(cfg, 3, &ops, None).unwrap();
}
