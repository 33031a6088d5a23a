//! Property test of `Core` snapshots: a core restored from a snapshot
//! behaves exactly like the core it was taken from.
//!
//! Random operations (acquire, release, renew, enqueue, wait with timeouts
//! and leases, semaphores, listen/unlisten/signal, stats, disconnects,
//! draining, clock advances with and without a tick, including jumps far
//! beyond the timer wheel's span) run on a core built with a seeded entropy
//! source. At one or two random steps the running copy is replaced by one
//! restored from its own snapshot, given an entropy source in the same state;
//! the original and the copy then take the same remaining operations. Every
//! outcome, reply (in order), lease expiry, `stats` body, signal line,
//! `next_deadline()`, counter, and every later snapshot must be identical,
//! and the copy's invariants must hold throughout.

use std::cell::Cell;
use std::rc::Rc;

use dflockd::core::{Config, ConnId, Core, Entropy, Outbox, Outcome, SeededEntropy};
use dflockd::protocol::request::MAX_NUMBER;
use dflockd::protocol::{Kind, Reply, Request, Token};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, FileFailurePersistence};

/// Keys and their fixed limits. Eight keys against `max_keys` of 3 or 5
/// makes idle keys be evicted and slots reused.
const KEYS: [(&str, u64); 8] = [
    ("a", 1),
    ("b", 1),
    ("c", 1),
    ("d", 1),
    ("s", 2),
    ("t", 3),
    ("u", 2),
    ("lock.with.dots", 1),
];
const PATTERNS: [&str; 7] = ["a.*", "a.>", "a.b", "*.b", ">", "x.y", "a.*.c"];
const GROUPS: [&str; 3] = ["", "g", "h"];
const CHANNELS: [&str; 6] = ["a.b", "a.c", "x.y", "a.b.c", "q", "z.b"];
/// Connections alive at once (a disconnected one is replaced at once).
const SLOTS: usize = 5;

/// `SeededEntropy` whose state the test can read, so that the restored copy
/// gets an entropy source in the same state as the original's.
struct Shared(Rc<Cell<u64>>);

impl Entropy for Shared {
    fn fill(&mut self, buf: &mut [u8]) {
        let mut e = SeededEntropy(self.0.get());
        e.fill(buf);
        self.0.set(e.0);
    }
}

#[derive(Clone, Copy, Debug)]
enum Pick {
    /// A token this connection was granted.
    Own(usize),
    /// Any token ever granted.
    Any(usize),
    /// Well-formed but never issued.
    Bogus(u128),
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
        pick: Pick,
        keep_key: bool,
    },
    Renew {
        slot: usize,
        key: usize,
        pick: Pick,
        keep_key: bool,
        lease_s: Option<u64>,
    },
    Enqueue {
        slot: usize,
        key: usize,
        lease_s: Option<u64>,
        semaphore_form: bool,
    },
    Wait {
        slot: usize,
        key: usize,
        timeout_s: u64,
    },
    Listen {
        slot: usize,
        pattern: usize,
        group: usize,
    },
    Unlisten {
        slot: usize,
        pattern: usize,
        group: usize,
    },
    Signal {
        slot: usize,
        channel: usize,
    },
    Stats {
        slot: usize,
    },
    Advance {
        ms: u64,
        tick: bool,
    },
    ToNextDeadline {
        tick: bool,
    },
    Disconnect {
        slot: usize,
    },
    Drain,
}

fn lease_strategy() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        3 => Just(None),
        2 => Just(Some(1)),
        2 => Just(Some(2)),
        1 => Just(Some(4)),
        // Past a level-4 slot of the wheel (about 12 days).
        1 => Just(Some(2_000_000)),
        // Clamped by the wheel (about 2.2 years), fires early and re-arms.
        1 => Just(Some(MAX_NUMBER)),
    ]
}

fn timeout_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        3 => Just(1),
        2 => Just(2),
        1 => Just(5),
        1 => Just(3_000_000),
        1 => Just(MAX_NUMBER),
    ]
}

fn pick_strategy() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => any::<usize>().prop_map(Pick::Own),
        3 => any::<usize>().prop_map(Pick::Any),
        1 => any::<u128>().prop_map(Pick::Bogus),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let key = 0..KEYS.len();
    let advance = prop_oneof![
        4 => 0u64..20,
        4 => 20u64..1_500,
        2 => 1_500u64..6_000,
        1 => 1_000_000u64..5_000_000_000,
        1 => 60_000_000_000u64..100_000_000_000,
    ];
    prop_oneof![
        26 => (slot.clone(), key.clone(), timeout_strategy(), lease_strategy(), any::<bool>(), prop::bool::weighted(0.03))
            .prop_map(|(slot, key, timeout_s, lease_s, semaphore_form, wrong_limit)| Op::Acquire {
                slot, key, timeout_s, lease_s, semaphore_form, wrong_limit
            }),
        10 => (slot.clone(), key.clone(), pick_strategy(), prop::bool::weighted(0.1))
            .prop_map(|(slot, key, pick, keep_key)| Op::Release { slot, key, pick, keep_key }),
        8 => (slot.clone(), key.clone(), pick_strategy(), prop::bool::weighted(0.1), lease_strategy())
            .prop_map(|(slot, key, pick, keep_key, lease_s)| Op::Renew { slot, key, pick, keep_key, lease_s }),
        9 => (slot.clone(), key.clone(), lease_strategy(), any::<bool>())
            .prop_map(|(slot, key, lease_s, semaphore_form)| Op::Enqueue { slot, key, lease_s, semaphore_form }),
        9 => (slot.clone(), key.clone(), timeout_strategy())
            .prop_map(|(slot, key, timeout_s)| Op::Wait { slot, key, timeout_s }),
        6 => (slot.clone(), 0..PATTERNS.len(), 0..GROUPS.len())
            .prop_map(|(slot, pattern, group)| Op::Listen { slot, pattern, group }),
        3 => (slot.clone(), 0..PATTERNS.len(), 0..GROUPS.len())
            .prop_map(|(slot, pattern, group)| Op::Unlisten { slot, pattern, group }),
        6 => (slot.clone(), 0..CHANNELS.len())
            .prop_map(|(slot, channel)| Op::Signal { slot, channel }),
        3 => slot.clone().prop_map(|slot| Op::Stats { slot }),
        18 => (advance, prop::bool::weighted(0.85))
            .prop_map(|(ms, tick)| Op::Advance { ms, tick }),
        5 => prop::bool::weighted(0.8).prop_map(|tick| Op::ToNextDeadline { tick }),
        4 => slot.prop_map(|slot| Op::Disconnect { slot }),
        1 => Just(Op::Drain),
    ]
}

fn config_strategy() -> impl Strategy<Value = Config> {
    (
        any::<bool>(),
        prop_oneof![Just(0usize), Just(2)],
        prop_oneof![Just(0usize), Just(3), Just(5)],
        prop_oneof![Just(1_500u64), Just(5_000)],
        prop_oneof![Just(1u64), Just(100), Just(1_000)],
        prop_oneof![Just(0u64), Just(500), Just(3_000)],
        prop_oneof![Just(0usize), Just(2)],
        prop_oneof![Just(0usize), Just(3)],
    )
        .prop_map(
            |(
                auto_release,
                max_waiters,
                max_keys,
                lease,
                gc_interval,
                gc_idle,
                max_subscriptions,
                max_holds,
            )| Config {
                default_lease_ms: lease,
                max_keys,
                max_waiters,
                gc_interval_ms: gc_interval,
                gc_max_idle_ms: gc_idle,
                auto_release_on_disconnect: auto_release,
                max_subscriptions,
                max_holds_per_conn: max_holds,
            },
        )
}

fn hex(t: Token) -> String {
    format!("{:032x}", t.0)
}

fn snapshot(core: &Core) -> Vec<u8> {
    let mut v = Vec::new();
    core.snapshot(&mut v);
    v
}

/// The original and, once restored, the copy.
struct Pair {
    cfg: Config,
    a: Core,
    a_entropy: Rc<Cell<u64>>,
    b: Option<Core>,
    oa: Outbox,
    ob: Outbox,
    now: u64,
    conns: [ConnId; SLOTS],
    blocked: [bool; SLOTS],
    next_conn: ConnId,
    /// (connection, key, token) of every grant seen.
    issued: Vec<(ConnId, usize, Token)>,
    step: usize,
}

type TestResult = Result<(), TestCaseError>;

macro_rules! ensure_eq {
    ($p:expr, $a:expr, $b:expr, $what:expr) => {
        if $a != $b {
            return Err(TestCaseError::fail(format!(
                "step {} at {} ms: {} differ:\n original {:?}\n restored {:?}",
                $p.step, $p.now, $what, $a, $b
            )));
        }
    };
}

/// One input to the cores.
enum Input<'a> {
    Request(ConnId, Request<'a>),
    Tick,
    Disconnect(ConnId),
}

impl Pair {
    fn new(cfg: Config, seed: u64) -> Self {
        let a_entropy = Rc::new(Cell::new(seed));
        let mut a = Core::new(cfg.clone(), 1 << 40, Box::new(Shared(a_entropy.clone())));
        let conns: [ConnId; SLOTS] = std::array::from_fn(|i| i as ConnId + 1);
        for &c in &conns {
            a.connect(c);
        }
        Pair {
            cfg,
            a,
            a_entropy,
            b: None,
            oa: Outbox::default(),
            ob: Outbox::default(),
            now: 0,
            conns,
            blocked: [false; SLOTS],
            next_conn: SLOTS as ConnId + 1,
            issued: Vec::new(),
            step: 0,
        }
    }

    /// Replaces the copy (the original at first) by one restored from its
    /// snapshot, with an entropy source in the original's state.
    fn restore(&mut self) -> TestResult {
        let current = self.b.as_ref().unwrap_or(&self.a);
        let bytes = snapshot(current);
        let entropy = Box::new(SeededEntropy(self.a_entropy.get()));
        let b = Core::restore(self.cfg.clone(), &bytes, entropy)
            .map_err(|e| TestCaseError::fail(format!("step {}: {e}", self.step)))?;
        if bytes != snapshot(&b) {
            return Err(TestCaseError::fail(format!(
                "step {}: the restored core's snapshot differs",
                self.step
            )));
        }
        self.b = Some(b);
        // The outbox keeps the last stats body and signal line.
        self.ob.json = self.oa.json.clone();
        self.ob.signal = self.oa.signal.clone();
        self.compare()
    }

    /// Everything observable without an input.
    fn compare(&self) -> TestResult {
        let Some(b) = &self.b else {
            return Ok(());
        };
        let a = &self.a;
        ensure_eq!(self, a.next_deadline(), b.next_deadline(), "next deadlines");
        ensure_eq!(self, a.counters(), b.counters(), "counters");
        ensure_eq!(
            self,
            (a.keys(), a.holders(), a.waiters(), a.connections()),
            (b.keys(), b.holders(), b.waiters(), b.connections()),
            "sizes"
        );
        ensure_eq!(self, a.is_draining(), b.is_draining(), "draining flags");
        ensure_eq!(self, a.held_keys(), b.held_keys(), "held keys");
        if let Err(e) = b.check_invariants() {
            return Err(TestCaseError::fail(format!(
                "step {}: restored core: {e}",
                self.step
            )));
        }
        let (sa, sb) = (snapshot(a), snapshot(b));
        if sa != sb {
            let at = sa.iter().zip(&sb).take_while(|(x, y)| x == y).count();
            return Err(TestCaseError::fail(format!(
                "step {} at {} ms: snapshots differ from byte {at} (lengths {} and {})",
                self.step,
                self.now,
                sa.len(),
                sb.len()
            )));
        }
        Ok(())
    }

    fn apply(&mut self, input: Input<'_>) -> TestResult {
        self.oa.clear();
        self.ob.clear();
        let now = self.now;
        let run = |core: &mut Core, out: &mut Outbox| match &input {
            Input::Request(conn, req) => Some(core.handle(now, *conn, req, out)),
            Input::Tick => {
                core.tick(now, out);
                None
            }
            Input::Disconnect(conn) => {
                core.disconnect(now, *conn, out);
                None
            }
        };
        let outcome = run(&mut self.a, &mut self.oa);
        if let Some(b) = &mut self.b {
            let outcome_b = run(b, &mut self.ob);
            ensure_eq!(self, outcome, outcome_b, "outcomes");
            ensure_eq!(self, self.oa.replies, self.ob.replies, "replies");
            ensure_eq!(self, self.oa.expired, self.ob.expired, "lease expiries");
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            ensure_eq!(
                self,
                text(&self.oa.json),
                text(&self.ob.json),
                "stats bodies"
            );
            ensure_eq!(
                self,
                text(&self.oa.signal),
                text(&self.ob.signal),
                "signal lines"
            );
        }
        if let Err(e) = self.a.check_invariants() {
            return Err(TestCaseError::fail(format!(
                "step {}: original core: {e}",
                self.step
            )));
        }
        // Follow grants and unblocked connections.
        let key = match &input {
            Input::Request(
                _,
                Request::Acquire { key, .. }
                | Request::Enqueue { key, .. }
                | Request::Wait { key, .. },
            ) => KEYS.iter().position(|(k, _)| k == key),
            _ => None,
        };
        for &(conn, reply) in &self.oa.replies {
            let slot = self.conns.iter().position(|&c| c == conn);
            match reply {
                Reply::Granted { token, .. } | Reply::Acquired { token, .. } => {
                    // A grant to another connection is for the key it waits
                    // on; the issued list only needs a plausible key.
                    self.issued.push((conn, key.unwrap_or(0), token));
                    if let Some(s) = slot {
                        self.blocked[s] = false;
                    }
                }
                Reply::Timeout => {
                    if let Some(s) = slot {
                        self.blocked[s] = false;
                    }
                }
                _ => {}
            }
        }
        if let (Input::Request(conn, _), Some(Outcome::Blocked)) = (&input, outcome) {
            if let Some(s) = self.conns.iter().position(|c| c == conn) {
                self.blocked[s] = true;
            }
        }
        self.compare()
    }

    fn pick(&self, slot: usize, pick: Pick) -> Option<(usize, Token)> {
        let me = self.conns[slot];
        match pick {
            Pick::Own(i) => {
                let own: Vec<_> = self.issued.iter().filter(|(c, _, _)| *c == me).collect();
                (!own.is_empty()).then(|| {
                    let (_, k, t) = own[i % own.len()];
                    (*k, *t)
                })
            }
            Pick::Any(i) => (!self.issued.is_empty()).then(|| {
                let (_, k, t) = self.issued[i % self.issued.len()];
                (k, t)
            }),
            Pick::Bogus(t) => Some((0, Token(t))),
        }
    }

    fn run_op(&mut self, op: &Op) -> TestResult {
        // A connection blocked in `l`/`w` sends nothing until answered.
        let slot_of = |op: &Op| match *op {
            Op::Acquire { slot, .. }
            | Op::Release { slot, .. }
            | Op::Renew { slot, .. }
            | Op::Enqueue { slot, .. }
            | Op::Wait { slot, .. }
            | Op::Listen { slot, .. }
            | Op::Unlisten { slot, .. }
            | Op::Signal { slot, .. }
            | Op::Stats { slot } => Some(slot),
            _ => None,
        };
        if slot_of(op).is_some_and(|s| self.blocked[s]) {
            return Ok(());
        }
        match *op {
            Op::Acquire {
                slot,
                key,
                timeout_s,
                lease_s,
                semaphore_form,
                wrong_limit,
            } => {
                let (name, limit) = KEYS[key];
                let limit = if wrong_limit { limit + 1 } else { limit };
                let kind = if semaphore_form || limit != 1 {
                    Kind::Semaphore
                } else {
                    Kind::Lock
                };
                let req = Request::Acquire {
                    key: name,
                    timeout_s,
                    limit,
                    lease_s,
                    kind,
                };
                self.apply(Input::Request(self.conns[slot], req))
            }
            Op::Release {
                slot,
                key,
                pick,
                keep_key,
            }
            | Op::Renew {
                slot,
                key,
                pick,
                keep_key,
                ..
            } => {
                let Some((own_key, token)) = self.pick(slot, pick) else {
                    return Ok(());
                };
                let name = KEYS[if keep_key { key } else { own_key }].0;
                let t = hex(token);
                let req = match *op {
                    Op::Renew { lease_s, .. } => Request::Renew {
                        key: name,
                        token: &t,
                        lease_s,
                    },
                    _ => Request::Release {
                        key: name,
                        token: &t,
                    },
                };
                self.apply(Input::Request(self.conns[slot], req))
            }
            Op::Enqueue {
                slot,
                key,
                lease_s,
                semaphore_form,
            } => {
                let (name, limit) = KEYS[key];
                let kind = if semaphore_form || limit != 1 {
                    Kind::Semaphore
                } else {
                    Kind::Lock
                };
                let req = Request::Enqueue {
                    key: name,
                    limit,
                    lease_s,
                    kind,
                };
                self.apply(Input::Request(self.conns[slot], req))
            }
            Op::Wait {
                slot,
                key,
                timeout_s,
            } => {
                let req = Request::Wait {
                    key: KEYS[key].0,
                    timeout_s,
                };
                self.apply(Input::Request(self.conns[slot], req))
            }
            Op::Listen {
                slot,
                pattern,
                group,
            } => {
                let req = Request::Listen {
                    pattern: PATTERNS[pattern],
                    group: GROUPS[group],
                };
                self.apply(Input::Request(self.conns[slot], req))
            }
            Op::Unlisten {
                slot,
                pattern,
                group,
            } => {
                let req = Request::Unlisten {
                    pattern: PATTERNS[pattern],
                    group: GROUPS[group],
                };
                self.apply(Input::Request(self.conns[slot], req))
            }
            Op::Signal { slot, channel } => {
                let payload = format!("payload {}", self.step);
                let req = Request::Signal {
                    channel: CHANNELS[channel],
                    payload: &payload,
                };
                self.apply(Input::Request(self.conns[slot], req))
            }
            Op::Stats { slot } => self.apply(Input::Request(self.conns[slot], Request::Stats)),
            Op::Advance { ms, tick } => {
                self.now += ms;
                if tick {
                    self.apply(Input::Tick)
                } else {
                    self.compare()
                }
            }
            Op::ToNextDeadline { tick } => {
                if let Some(d) = self.a.next_deadline() {
                    self.now = self.now.max(d);
                }
                if tick {
                    self.apply(Input::Tick)
                } else {
                    self.compare()
                }
            }
            Op::Disconnect { slot } => {
                let old = self.conns[slot];
                self.apply(Input::Disconnect(old))?;
                let new = self.next_conn;
                self.next_conn += 1;
                self.conns[slot] = new;
                self.blocked[slot] = false;
                self.a.connect(new);
                if let Some(b) = &mut self.b {
                    b.connect(new);
                }
                self.compare()
            }
            Op::Drain => {
                self.a.start_draining();
                if let Some(b) = &mut self.b {
                    b.start_draining();
                }
                self.compare()
            }
        }
    }

    /// Everyone leaves and time runs out: both must end the same.
    fn teardown(&mut self) -> TestResult {
        for slot in 0..SLOTS {
            self.apply(Input::Disconnect(self.conns[slot]))?;
        }
        for _ in 0..1_000 {
            let Some(d) = self.a.next_deadline() else {
                break;
            };
            self.now = self.now.max(d);
            self.apply(Input::Tick)?;
            self.apply(Input::Request(0, Request::Stats))?;
        }
        Ok(())
    }
}

fn run_case(cfg: Config, seed: u64, ops: &[Op], restore_at: &[usize]) -> TestResult {
    let mut p = Pair::new(cfg, seed);
    for (i, op) in ops.iter().enumerate() {
        p.step = i;
        for _ in restore_at.iter().filter(|&&r| r == i) {
            p.restore()?;
        }
        p.run_op(op)?;
    }
    p.step = ops.len();
    if p.b.is_none() {
        p.restore()?;
    }
    p.teardown()
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
    fn restored_core_behaves_like_the_original(
        cfg in config_strategy(),
        seed in any::<u64>(),
        ops in prop::collection::vec(op_strategy(), 1..=250),
        restore_at in prop::collection::vec(0usize..250, 1..=2),
    ) {
        run_case(cfg, seed, &ops, &restore_at)?;
    }
}

// ---- fixed scenarios ----

fn small() -> Config {
    Config {
        default_lease_ms: 2_000,
        max_keys: 3,
        max_waiters: 0,
        gc_interval_ms: 100,
        gc_max_idle_ms: 500,
        auto_release_on_disconnect: true,
        ..Config::default()
    }
}

/// Far deadlines are clamped by the wheel and fire early to be re-armed;
/// a lease renewed to last longer keeps its old timer. Snapshots taken in
/// between must reproduce every firing moment.
#[test]
fn clamped_and_renewed_timers_fire_at_the_same_moments() {
    use Op::*;
    let ops = [
        Acquire {
            slot: 0,
            key: 0,
            timeout_s: 0,
            lease_s: Some(MAX_NUMBER),
            semaphore_form: false,
            wrong_limit: false,
        },
        Acquire {
            slot: 1,
            key: 0,
            timeout_s: MAX_NUMBER,
            lease_s: None,
            semaphore_form: false,
            wrong_limit: false,
        },
        Acquire {
            slot: 2,
            key: 1,
            timeout_s: 0,
            lease_s: Some(2_000_000),
            semaphore_form: false,
            wrong_limit: false,
        },
        Acquire {
            slot: 3,
            key: 4,
            timeout_s: 0,
            lease_s: Some(1),
            semaphore_form: true,
            wrong_limit: false,
        },
        Renew {
            slot: 3,
            key: 4,
            pick: Pick::Own(0),
            keep_key: false,
            lease_s: Some(4),
        },
        Advance {
            ms: 1_000,
            tick: true,
        },
        Advance {
            ms: 80_000_000_000,
            tick: true,
        },
        ToNextDeadline { tick: true },
        Advance {
            ms: 80_000_000_000,
            tick: true,
        },
        ToNextDeadline { tick: true },
        Advance {
            ms: 80_000_000_000,
            tick: true,
        },
    ];
    for at in 0..ops.len() {
        run_case(small(), 5, &ops, &[at]).unwrap();
    }
}

/// Keys evicted and collected leave vacant slots that later keys reuse in
/// an order `stats` shows; subscriptions likewise.
#[test]
fn reused_slots_keep_their_order() {
    use Op::*;
    let mut ops = Vec::new();
    for key in 0..KEYS.len() {
        ops.push(Acquire {
            slot: key % SLOTS,
            key,
            timeout_s: 0,
            lease_s: Some(1),
            semaphore_form: false,
            wrong_limit: false,
        });
        ops.push(Advance {
            ms: 1_000,
            tick: true,
        });
    }
    for (i, pattern) in [0, 1, 2, 3, 4, 5].into_iter().enumerate() {
        ops.push(Listen {
            slot: i % SLOTS,
            pattern,
            group: i % GROUPS.len(),
        });
    }
    ops.push(Unlisten {
        slot: 1,
        pattern: 1,
        group: 1,
    });
    ops.push(Unlisten {
        slot: 3,
        pattern: 3,
        group: 0,
    });
    ops.push(Disconnect { slot: 0 });
    for key in [3, 1, 6, 2] {
        ops.push(Acquire {
            slot: 4,
            key,
            timeout_s: 0,
            lease_s: None,
            semaphore_form: true,
            wrong_limit: false,
        });
    }
    for (i, pattern) in [6, 1, 3].into_iter().enumerate() {
        ops.push(Listen {
            slot: 2,
            pattern,
            group: i,
        });
    }
    ops.push(Stats { slot: 2 });
    for at in 0..=ops.len() {
        run_case(small(), 9, &ops, &[at]).unwrap();
    }
}
