//! The state machine under arbitrary command sequences: several connections
//! acquire, release, renew, enqueue, wait, listen and signal while time
//! advances (with and without `tick`) and connections drop. After every step
//! `check_invariants()` must hold and the replies must fit the outcome (a
//! blocked request gets no reply; only blocked connections are answered out
//! of turn, apart from pushed signals). At the end everyone leaves, time
//! passes, and nothing may remain.
//!
//! Input: one configuration byte, then operations of three bytes each
//! (opcode, two arguments); see `run`.

#![no_main]

use dflockd::core::{Config, ConnId, Core, Outbox, Outcome, SeededEntropy};
use dflockd::protocol::{Kind, Reply, Request, Token};
use libfuzzer_sys::fuzz_target;

const SLOTS: usize = 4;
const KEYS: [&str; 4] = ["a", "b", "c", "d"];
const PATTERNS: [&str; 5] = ["a.*", "a.>", "a.b", "*.b", ">"];
const GROUPS: [&str; 3] = ["", "g1", "g2"];
const CHANNELS: [&str; 4] = ["a.b", "a.c", "x.b", "a.b.c"];

struct Slot {
    id: ConnId,
    blocked: bool,
}

struct Fuzz {
    core: Core,
    out: Outbox,
    now: u64,
    slots: Vec<Slot>,
    next_id: ConnId,
    /// Tokens seen in grants, for releases and renewals.
    tokens: Vec<Token>,
}

impl Fuzz {
    fn check(&self, what: &str) {
        if let Err(e) = self.core.check_invariants() {
            panic!("after {what} at {} ms: {e}", self.now);
        }
    }

    /// Replies to anyone but the requester: grants and timeouts end a
    /// blocked connection's wait; signals may go anywhere.
    fn others(&mut self, requester: Option<ConnId>) {
        for &(conn, reply) in &self.out.replies {
            if Some(conn) == requester {
                continue;
            }
            if reply == Reply::Signal {
                assert!(
                    self.slots.iter().any(|s| s.id == conn),
                    "signal to a gone connection"
                );
                continue;
            }
            let slot = self.slots.iter_mut().find(|s| s.id == conn);
            let slot = slot.unwrap_or_else(|| panic!("{reply:?} to unknown conn {conn}"));
            assert!(
                slot.blocked,
                "{reply:?} to conn {conn}, which is not waiting"
            );
            assert!(
                matches!(reply, Reply::Granted { .. } | Reply::Timeout),
                "{reply:?} ends a wait"
            );
            slot.blocked = false;
            if let Reply::Granted { token, .. } = reply {
                self.tokens.push(token);
            }
        }
    }

    fn tick(&mut self) {
        self.out.clear();
        self.core.tick(self.now, &mut self.out);
        self.others(None);
        self.check("tick");
    }

    fn request(&mut self, slot: usize, req: &Request<'_>) {
        if self.slots[slot].blocked {
            // A blocked connection's next request waits behind it.
            return;
        }
        let id = self.slots[slot].id;
        self.out.clear();
        let outcome = self.core.handle(self.now, id, req, &mut self.out);
        match outcome {
            Outcome::Replied => {
                let own: Vec<&Reply> = self
                    .out
                    .replies
                    .iter()
                    .filter(|(c, r)| *c == id && *r != Reply::Signal)
                    .map(|(_, r)| r)
                    .collect();
                assert_eq!(own.len(), 1, "{req:?}: replies {:?}", self.out.replies);
                let last = self.out.replies.last().map(|&(c, r)| (c, r));
                assert_eq!(last.map(|(c, _)| c), Some(id), "{req:?}: answer not last");
                if let Some((_, Reply::Granted { token, .. } | Reply::Acquired { token, .. })) =
                    last
                {
                    self.tokens.push(token);
                }
                if let (Request::Signal { .. }, Some((_, Reply::OkNumber(n)))) = (req, last) {
                    let pushed = self
                        .out
                        .replies
                        .iter()
                        .filter(|(_, r)| *r == Reply::Signal)
                        .count();
                    assert_eq!(n as usize, pushed, "signal count");
                }
            }
            Outcome::Blocked => {
                assert!(
                    self.out
                        .replies
                        .iter()
                        .all(|(c, r)| *c != id || *r == Reply::Signal),
                    "{req:?} blocked but answered"
                );
                self.slots[slot].blocked = true;
            }
        }
        self.others(Some(id));
        self.check(req.name());
    }

    fn disconnect(&mut self, slot: usize) {
        let id = self.slots[slot].id;
        self.out.clear();
        self.core.disconnect(self.now, id, &mut self.out);
        assert!(self.out.replies.iter().all(|(c, _)| *c != id));
        self.slots[slot] = Slot {
            id: self.next_id,
            blocked: false,
        };
        self.core.connect(self.next_id);
        self.next_id += 1;
        self.others(None);
        self.check("disconnect");
    }

    fn teardown(&mut self) {
        for slot in std::mem::take(&mut self.slots) {
            self.out.clear();
            self.core.disconnect(self.now, slot.id, &mut self.out);
            self.check("final disconnect");
        }
        for _ in 0..100_000 {
            let Some(d) = self.core.next_deadline() else {
                break;
            };
            self.now = self.now.max(d);
            self.out.clear();
            self.core.tick(self.now, &mut self.out);
            assert!(self.out.replies.is_empty(), "a reply with nobody left");
            self.check("final tick");
        }
        assert_eq!(self.core.next_deadline(), None, "timers never settle");
        assert_eq!(self.core.keys(), 0, "keys left");
        assert_eq!(self.core.holders(), 0, "holders left");
        assert_eq!(self.core.connections(), 0);
        let signals = self.core.signals();
        assert_eq!(signals.subscription_count(), 0, "subscriptions left");
        assert_eq!(signals.node_count(), 1, "subject trie not pruned");
    }
}

#[allow(clippy::needless_update)] // fields added later keep their defaults
fn config(b: u8) -> Config {
    Config {
        auto_release_on_disconnect: b & 1 != 0,
        max_waiters: if b & 2 != 0 { 2 } else { 0 },
        max_keys: if b & 4 != 0 { 3 } else { 0 },
        default_lease_ms: [1_500, 2_000, 5_000, 33_000][(b >> 3) as usize & 3],
        gc_interval_ms: [1, 100, 1_000, 5_000][(b >> 5) as usize & 3],
        gc_max_idle_ms: if b & 0x80 != 0 { 0 } else { 2_000 },
        max_subscriptions: if b & 0x80 != 0 { 2 } else { 0 },
        ..Config::default()
    }
}

fn lease(b: u8) -> Option<u64> {
    match b % 4 {
        0 => None,
        n => Some(n as u64),
    }
}

fn run(data: &[u8]) {
    let Some((&cfg, ops)) = data.split_first() else {
        return;
    };
    let mut core = Core::new(config(cfg), 1 << 40, Box::new(SeededEntropy(cfg as u64)));
    let slots: Vec<Slot> = (1..=SLOTS as ConnId)
        .map(|id| {
            core.connect(id);
            Slot { id, blocked: false }
        })
        .collect();
    let mut f = Fuzz {
        core,
        out: Outbox::default(),
        now: 0,
        slots,
        next_id: SLOTS as ConnId + 1,
        tokens: Vec::new(),
    };
    f.check("start");
    let mut drained = false;
    for op in ops.chunks(3) {
        let (code, a, b) = (op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0));
        let slot = a as usize % SLOTS;
        let key = KEYS[(a as usize >> 2) % KEYS.len()];
        let token_text;
        let token = |f: &Fuzz, i: u8| -> String {
            match f.tokens.get(i as usize % f.tokens.len().max(1)) {
                Some(t) if i < 200 => format!("{t:?}"),
                _ if i & 1 == 0 => format!("{:032x}", i as u128 * 0x1234_5678_9abc),
                _ => "not-a-token".to_string(),
            }
        };
        let limit = 1 + (b as u64 >> 5) % 3;
        let kind = if limit > 1 || b & 0x10 != 0 {
            Kind::Semaphore
        } else {
            Kind::Lock
        };
        match code % 16 {
            0 | 14 | 15 => f.request(
                slot,
                &Request::Acquire {
                    key,
                    timeout_s: (b % 3) as u64,
                    limit,
                    lease_s: lease(b >> 2),
                    kind,
                },
            ),
            1 => {
                token_text = token(&f, b);
                f.request(
                    slot,
                    &Request::Release {
                        key,
                        token: &token_text,
                    },
                );
            }
            2 => {
                token_text = token(&f, b);
                f.request(
                    slot,
                    &Request::Renew {
                        key,
                        token: &token_text,
                        lease_s: lease(a >> 4),
                    },
                );
            }
            3 => f.request(
                slot,
                &Request::Enqueue {
                    key,
                    limit,
                    lease_s: lease(b >> 2),
                    kind,
                },
            ),
            4 => f.request(
                slot,
                &Request::Wait {
                    key,
                    timeout_s: (b % 3) as u64,
                },
            ),
            5 => {
                let req = match b % 3 {
                    0 => Request::Ping,
                    1 => Request::Stats,
                    _ => Request::Auth { token: b"x" },
                };
                f.request(slot, &req);
            }
            6 | 7 => {
                let pattern = PATTERNS[b as usize % PATTERNS.len()];
                let group = GROUPS[(b as usize / 8) % GROUPS.len()];
                let req = if code % 16 == 6 {
                    Request::Listen { pattern, group }
                } else {
                    Request::Unlisten { pattern, group }
                };
                f.request(slot, &req);
            }
            8 => f.request(
                slot,
                &Request::Signal {
                    channel: CHANNELS[b as usize % CHANNELS.len()],
                    payload: "hello",
                },
            ),
            9 => {
                f.now += a as u64 * 16 + b as u64;
                f.tick();
            }
            10 => f.now += a as u64 * 16 + b as u64,
            11 => {
                if let Some(d) = f.core.next_deadline() {
                    f.now = f.now.max(d);
                }
                if b & 1 == 0 {
                    f.tick();
                }
            }
            12 => f.disconnect(slot),
            _ => {
                if !drained && b == 0xd0 {
                    drained = true;
                    f.core.start_draining();
                }
            }
        }
    }
    f.teardown();
}

fuzz_target!(|data: &[u8]| run(data));
