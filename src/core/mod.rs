//! The lock state machine: resources, FIFO queues, leases, two-phase acquire.
//!
//! A *resource* is a key with a holder limit. A lock is a resource whose limit
//! is 1; a semaphore is one whose limit is larger. Every command maps onto the
//! same handful of operations on resources, so locks and semaphores cannot
//! drift apart.
//!
//! The machine does no I/O and never reads a clock: every entry point takes
//! `now` (milliseconds from an origin chosen by the caller) and reports what
//! happened in an [`Outbox`]: replies for any connection (a release may grant
//! the lock to another connection), and lease-expiry notices. Its own timers
//! (lease expiry, acquire and wait timeouts, idle-key GC) live in a timer wheel
//! that the caller advances with [`Core::tick`].

mod invariants;
pub mod signals;
mod snapshot;
mod stats;
pub mod tokens;

use std::collections::VecDeque;

use hashbrown::{HashMap, HashSet};
use slab::Slab;

use crate::protocol::reply::encode_signal;
use crate::protocol::{Reply, Request, Token};
use crate::timer::{TimerHandle, TimerWheel};
use signals::Signals;
pub use snapshot::SnapshotError;
use tokens::TokenSource;
pub use tokens::{Entropy, OsEntropy, SeededEntropy};

/// Names a client connection. The caller guarantees an id is never reused.
pub type ConnId = u64;

/// Limits and defaults of the state machine.
#[derive(Clone, Debug)]
pub struct Config {
    pub default_lease_ms: u64,
    /// Most distinct keys at once; 0 = unlimited.
    pub max_keys: usize,
    /// Most waiters per key; 0 = unlimited.
    pub max_waiters: usize,
    /// How often idle keys are looked at, at most.
    pub gc_interval_ms: u64,
    /// A key with no holder and no waiter is forgotten after this long.
    pub gc_max_idle_ms: u64,
    /// Release a connection's holdings when it disconnects.
    pub auto_release_on_disconnect: bool,
    /// Most signal subscriptions per connection; 0 = unlimited.
    pub max_subscriptions: usize,
    /// Most locks and semaphore slots one connection may hold at once when
    /// it asks for another; 0 = unlimited.
    pub max_holds_per_conn: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_lease_ms: 33_000,
            max_keys: 1024,
            max_waiters: 0,
            gc_interval_ms: 5_000,
            gc_max_idle_ms: 60_000,
            auto_release_on_disconnect: true,
            max_subscriptions: 0,
            max_holds_per_conn: 1024,
        }
    }
}

/// Whether a request was answered or is waiting for a grant or a timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// The reply is in the outbox.
    Replied,
    /// No reply yet: one will appear in a later outbox (grant or timeout).
    Blocked,
}

/// A lease that ran out while its holder still had it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseExpired {
    pub key: Box<str>,
    pub conn: ConnId,
}

/// What an operation produced. The caller drains it after every call.
#[derive(Default)]
pub struct Outbox {
    /// Replies in the order they were produced.
    pub replies: Vec<(ConnId, Reply)>,
    pub expired: Vec<LeaseExpired>,
    /// The body of the last [`Reply::Stats`].
    pub json: Vec<u8>,
    /// The line of the last signal published, for every [`Reply::Signal`].
    pub signal: Vec<u8>,
}

impl Outbox {
    /// The body that goes with `reply` when it is encoded.
    pub fn body(&self, reply: &Reply) -> &[u8] {
        match reply {
            Reply::Signal => &self.signal,
            _ => &self.json,
        }
    }
}

impl Outbox {
    pub fn clear(&mut self) {
        self.replies.clear();
        self.expired.clear();
    }
}

/// Running totals, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub grants: u64,
    pub releases: u64,
    pub acquire_timeouts: u64,
    pub lease_expiries: u64,
    pub signals_published: u64,
    pub signals_delivered: u64,
}

const NIL: u32 = u32::MAX;

struct Holder {
    token: Token,
    conn: ConnId,
    expires_at: u64,
    /// The lease timer and the deadline it is armed for. A renewal that
    /// extends the lease leaves it alone (it re-arms when it fires); one that
    /// shortens it re-arms it at once.
    timer: TimerHandle,
    timer_at: u64,
}

struct Waiter {
    id: u64,
    conn: ConnId,
    lease_ms: u64,
    /// Armed while the connection is blocked on this waiter (`l`, `sl`, `w`).
    timer: Option<TimerHandle>,
    /// When the blocked request times out. The timer may fire earlier (the
    /// wheel clamps very distant deadlines) and is then re-armed.
    deadline: u64,
    /// Queued by `e`/`se` rather than by a blocking acquire.
    two_phase: bool,
}

struct Resource {
    key: Box<str>,
    limit: u64,
    holders: Vec<Holder>,
    waiters: VecDeque<Waiter>,
    /// Two-phase entries naming this resource. They keep it from being
    /// forgotten, so that their index stays valid until they are settled.
    pins: u32,
    /// Links in the idle list (oldest first) while the resource has neither
    /// holder nor waiter.
    idle: bool,
    idle_since: u64,
    idle_prev: u32,
    idle_next: u32,
}

impl Resource {
    fn is_unused(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty() && self.pins == 0
    }

    fn waiter(&self, id: u64) -> Option<usize> {
        self.waiters.iter().position(|w| w.id == id)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Enqueued {
    /// In the queue, as waiter `id`.
    Queued(u64),
    /// Granted before the connection's `w` picked it up.
    Granted(Token),
}

struct TwoPhase {
    res: u32,
    lease_ms: u64,
    state: Enqueued,
}

#[derive(Default)]
struct ConnState {
    /// Tokens this connection holds (see `Core::holder_at` for where).
    holdings: HashSet<Token>,
    two_phase: Vec<TwoPhase>,
    /// The waiter this connection is blocked on.
    blocked: Option<(u32, u64)>,
}

impl ConnState {
    fn two_phase_at(&self, res: u32) -> Option<usize> {
        self.two_phase.iter().position(|t| t.res == res)
    }
}

#[derive(Clone, Copy, Debug)]
enum CoreTimer {
    Lease { res: u32, token: Token },
    WaitTimeout { res: u32, waiter: u64 },
    Gc,
}

/// The state machine. See the module documentation.
pub struct Core {
    cfg: Config,
    keys: HashMap<Box<str>, u32>,
    resources: Slab<Resource>,
    conns: HashMap<ConnId, ConnState>,
    timers: TimerWheel<CoreTimer>,
    tokens: TokenSource,
    idle_head: u32,
    idle_tail: u32,
    gc_timer: Option<TimerHandle>,
    next_waiter: u64,
    draining: bool,
    counters: Counters,
    fired: Vec<CoreTimer>,
    signals: Signals,
    receivers: Vec<ConnId>,
    /// Where each holder is: its resource and its index in `holders`, so a
    /// token is found in O(1) however many holders a key has.
    holder_at: HashMap<Token, (u32, u32)>,
    /// Holders and waiters across all keys.
    held: usize,
    waiting: usize,
    /// The vacant slots of `resources`, the next one to be reused last. A
    /// key's slot decides its place in `stats`, so snapshots record it (the
    /// slab does not tell).
    vacant: Vec<u32>,
}

fn replied(out: &mut Outbox, conn: ConnId, reply: Reply) -> Outcome {
    out.replies.push((conn, reply));
    Outcome::Replied
}

impl Core {
    /// `fence_seed` starts the token counter (the wall clock in nanoseconds
    /// in the server); `entropy` supplies the tokens' random halves.
    pub fn new(cfg: Config, fence_seed: u64, entropy: Box<dyn Entropy>) -> Core {
        Core {
            cfg,
            keys: HashMap::new(),
            resources: Slab::new(),
            conns: HashMap::new(),
            timers: TimerWheel::new(),
            tokens: TokenSource::new(fence_seed, entropy),
            idle_head: NIL,
            idle_tail: NIL,
            gc_timer: None,
            next_waiter: 0,
            draining: false,
            counters: Counters::default(),
            fired: Vec::new(),
            signals: Signals::new(),
            receivers: Vec::new(),
            holder_at: HashMap::new(),
            held: 0,
            waiting: 0,
            vacant: Vec::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Registers a new connection.
    pub fn connect(&mut self, conn: ConnId) {
        self.conns.insert(conn, ConnState::default());
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Number of distinct keys currently known (held, waited on or idle).
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Total holders across all keys.
    pub fn holders(&self) -> usize {
        self.held
    }

    /// Total waiters across all keys.
    pub fn waiters(&self) -> usize {
        self.waiting
    }

    /// (keys with limit 1, keys with a larger limit).
    pub fn keys_by_kind(&self) -> (usize, usize) {
        let locks = self.resources.iter().filter(|(_, r)| r.limit == 1).count();
        (locks, self.resources.len() - locks)
    }

    /// Nothing is held and nobody waits: a draining server may exit.
    pub fn is_quiescent(&self) -> bool {
        self.held == 0 && self.waiting == 0
    }

    /// Whether `conn` holds, waits for and has enqueued nothing.
    pub fn conn_is_idle(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_none_or(|c| c.holdings.is_empty() && c.two_phase.is_empty() && c.blocked.is_none())
    }

    /// (key, holders, waiters) of every key with a holder or a waiter.
    pub fn held_keys(&self) -> Vec<(Box<str>, usize, usize)> {
        self.resources
            .iter()
            .filter(|(_, r)| !r.holders.is_empty() || !r.waiters.is_empty())
            .map(|(_, r)| (r.key.clone(), r.holders.len(), r.waiters.len()))
            .collect()
    }

    /// Stop granting new acquisitions: `l`, `sl`, `e`, `se` get
    /// `error_draining`; releases, renewals and waits already queued go on.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The earliest moment [`tick`](Self::tick) has work to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next_deadline()
    }

    /// Handles one request from `conn`.
    pub fn handle(
        &mut self,
        now: u64,
        conn: ConnId,
        req: &Request<'_>,
        out: &mut Outbox,
    ) -> Outcome {
        match *req {
            Request::Acquire {
                key,
                timeout_s,
                limit,
                lease_s,
                ..
            } => self.acquire(now, conn, key, timeout_s, limit, lease_s, out),
            Request::Release { key, token } => self.release(now, conn, key, token, out),
            Request::Renew {
                key,
                token,
                lease_s,
            } => self.renew(now, conn, key, token, lease_s, out),
            Request::Enqueue {
                key,
                limit,
                lease_s,
                ..
            } => self.enqueue(now, conn, key, limit, lease_s, out),
            Request::Wait { key, timeout_s } => self.wait(now, conn, key, timeout_s, out),
            Request::Ping => replied(out, conn, Reply::Ok),
            Request::Stats => {
                out.json.clear();
                self.write_stats(now, &mut out.json);
                replied(out, conn, Reply::Stats)
            }
            // Authentication is settled by the connection layer before any
            // request reaches the state machine; a stray `auth` is an error.
            Request::Auth { .. } => replied(out, conn, Reply::Error),
            Request::Listen { .. } if self.draining => replied(out, conn, Reply::ErrorDraining),
            Request::Listen { pattern, group } => {
                let max = self.cfg.max_subscriptions;
                if max != 0
                    && self.signals.count_for(conn) >= max
                    && !self.signals.is_member(conn, pattern, group)
                {
                    return replied(out, conn, Reply::Error);
                }
                self.signals.listen(conn, pattern, group);
                replied(out, conn, Reply::Ok)
            }
            Request::Unlisten { pattern, group } => {
                self.signals.unlisten(conn, pattern, group);
                replied(out, conn, Reply::Ok)
            }
            Request::Signal { channel, payload } => {
                let mut receivers = std::mem::take(&mut self.receivers);
                receivers.clear();
                let n = self.signals.publish(channel, &mut receivers);
                if n > 0 {
                    encode_signal(channel, payload, &mut out.signal);
                }
                out.replies
                    .extend(receivers.iter().map(|&r| (r, Reply::Signal)));
                self.receivers = receivers;
                self.counters.signals_published += 1;
                self.counters.signals_delivered += n as u64;
                replied(out, conn, Reply::OkNumber(n as u64))
            }
        }
    }

    /// The signal subscriptions, for stats and tests.
    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    /// Forgets a connection: drops its waiters and two-phase entries, and
    /// releases what it holds if auto-release is on (else leaves the leases to
    /// run out).
    pub fn disconnect(&mut self, now: u64, conn: ConnId, out: &mut Outbox) {
        self.signals.disconnect(conn);
        let Some(state) = self.conns.remove(&conn) else {
            return;
        };
        if let Some((res, waiter)) = state.blocked {
            self.drop_waiter(now, res, waiter);
        }
        for tp in &state.two_phase {
            self.resources[tp.res as usize].pins -= 1;
            match tp.state {
                Enqueued::Queued(waiter) => self.drop_waiter(now, tp.res, waiter),
                Enqueued::Granted(_) => self.settle(now, tp.res),
            }
        }
        if self.cfg.auto_release_on_disconnect {
            // In grant order, so that the same history always hands slots to
            // waiters in the same order (set iteration order is random).
            let mut tokens: Vec<Token> = state.holdings.iter().copied().collect();
            tokens.sort_unstable();
            for token in &tokens {
                if let Some(&(res, i)) = self.holder_at.get(token) {
                    self.remove_holder(res, i as usize);
                    self.counters.releases += 1;
                    self.pump(now, res, out);
                    self.settle(now, res);
                }
            }
        }
    }

    /// Fires every timer due at `now`.
    pub fn tick(&mut self, now: u64, out: &mut Outbox) {
        let mut fired = std::mem::take(&mut self.fired);
        self.timers.expire(now, &mut fired);
        for t in fired.drain(..) {
            match t {
                CoreTimer::Lease { res, token } => self.on_lease_timer(now, res, token, out),
                CoreTimer::WaitTimeout { res, waiter } => {
                    self.on_wait_timeout(now, res, waiter, out)
                }
                CoreTimer::Gc => self.on_gc(now),
            }
        }
        self.fired = fired;
    }

    // ---- commands ----

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        now: u64,
        conn: ConnId,
        key: &str,
        timeout_s: u64,
        limit: u64,
        lease_s: Option<u64>,
        out: &mut Outbox,
    ) -> Outcome {
        let (res, lease_ms) = match self.open(now, conn, key, limit, lease_s) {
            Ok(opened) => opened,
            Err(reply) => return replied(out, conn, reply),
        };
        if self.has_free_slot(res) {
            let token = self.grant(now, res, conn, lease_ms);
            return replied(
                out,
                conn,
                Reply::Granted {
                    token,
                    lease_s: lease_ms / 1000,
                },
            );
        }
        if timeout_s == 0 {
            self.counters.acquire_timeouts += 1;
            return replied(out, conn, Reply::Timeout);
        }
        if self.waiters_full(res) {
            return replied(out, conn, Reply::ErrorMaxWaiters);
        }
        let waiter = self.new_waiter_id();
        let deadline = now.saturating_add(timeout_s * 1000);
        let timer = self
            .timers
            .insert(deadline, CoreTimer::WaitTimeout { res, waiter });
        self.waiting += 1;
        self.resources[res as usize].waiters.push_back(Waiter {
            id: waiter,
            conn,
            lease_ms,
            timer: Some(timer),
            deadline,
            two_phase: false,
        });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.blocked = Some((res, waiter));
        }
        Outcome::Blocked
    }

    fn release(
        &mut self,
        now: u64,
        conn: ConnId,
        key: &str,
        token: &str,
        out: &mut Outbox,
    ) -> Outcome {
        let Some((res, i)) = self.find_holder(key, token) else {
            return replied(out, conn, Reply::Error);
        };
        let holder = self.remove_holder(res, i);
        // A two-phase grant released before its `w` is finished with.
        let granted = self
            .conns
            .get(&holder.conn)
            .and_then(|c| c.two_phase_at(res).map(|i| c.two_phase[i].state));
        if granted == Some(Enqueued::Granted(holder.token)) {
            self.take_two_phase(holder.conn, res);
        }
        self.counters.releases += 1;
        self.pump(now, res, out);
        self.settle(now, res);
        replied(out, conn, Reply::Ok)
    }

    fn renew(
        &mut self,
        now: u64,
        conn: ConnId,
        key: &str,
        token: &str,
        lease_s: Option<u64>,
        out: &mut Outbox,
    ) -> Outcome {
        let Some((res, i)) = self.find_holder(key, token) else {
            return replied(out, conn, Reply::Error);
        };
        if self.resources[res as usize].holders[i].expires_at <= now {
            // Its timer has not fired yet in this millisecond: expire it now.
            self.expire_holder(now, res, i, out);
            return replied(out, conn, Reply::Error);
        }
        let lease_ms = self.lease_ms(lease_s);
        self.set_expiry(res, i, now + lease_ms);
        replied(out, conn, Reply::OkNumber(lease_ms / 1000))
    }

    fn enqueue(
        &mut self,
        now: u64,
        conn: ConnId,
        key: &str,
        limit: u64,
        lease_s: Option<u64>,
        out: &mut Outbox,
    ) -> Outcome {
        if let (Some(&res), Some(c)) = (self.keys.get(key), self.conns.get(&conn)) {
            if let Some(i) = c.two_phase_at(res) {
                // A grant whose lease ran out before any `w` took it is over:
                // the published clients never send `w` after `acquired`, so
                // let a new `e` replace it rather than refuse forever.
                let over = match c.two_phase[i].state {
                    Enqueued::Granted(t) => self.holder_pos(res, t).is_none(),
                    Enqueued::Queued(_) => false,
                };
                if !over {
                    return replied(out, conn, Reply::ErrorAlreadyEnqueued);
                }
                self.take_two_phase(conn, res);
                self.settle(now, res);
            }
        }
        let (res, lease_ms) = match self.open(now, conn, key, limit, lease_s) {
            Ok(opened) => opened,
            Err(reply) => return replied(out, conn, reply),
        };
        let (state, reply) = if self.has_free_slot(res) {
            let token = self.grant(now, res, conn, lease_ms);
            (
                Enqueued::Granted(token),
                Reply::Acquired {
                    token,
                    lease_s: lease_ms / 1000,
                },
            )
        } else if self.waiters_full(res) {
            return replied(out, conn, Reply::ErrorMaxWaiters);
        } else {
            let waiter = self.new_waiter_id();
            self.waiting += 1;
            self.resources[res as usize].waiters.push_back(Waiter {
                id: waiter,
                conn,
                lease_ms,
                timer: None,
                deadline: 0,
                two_phase: true,
            });
            (Enqueued::Queued(waiter), Reply::Queued)
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.two_phase.push(TwoPhase {
                res,
                lease_ms,
                state,
            });
            self.resources[res as usize].pins += 1;
        }
        replied(out, conn, reply)
    }

    fn wait(
        &mut self,
        now: u64,
        conn: ConnId,
        key: &str,
        timeout_s: u64,
        out: &mut Outbox,
    ) -> Outcome {
        let found = self.keys.get(key).copied().and_then(|res| {
            let c = self.conns.get(&conn)?;
            let i = c.two_phase_at(res)?;
            Some((res, c.two_phase[i].lease_ms, c.two_phase[i].state))
        });
        let Some((res, lease_ms, state)) = found else {
            return replied(out, conn, Reply::ErrorNotEnqueued);
        };
        match state {
            Enqueued::Granted(token) => {
                self.take_two_phase(conn, res);
                let Some(h) = self.holder_pos(res, token) else {
                    self.settle(now, res);
                    return replied(out, conn, Reply::ErrorLeaseExpired);
                };
                if self.resources[res as usize].holders[h].expires_at <= now {
                    self.expire_holder(now, res, h, out);
                    return replied(out, conn, Reply::ErrorLeaseExpired);
                }
                // The lease runs a full term from the moment `w` takes it.
                self.set_expiry(res, h, now + lease_ms);
                replied(
                    out,
                    conn,
                    Reply::Granted {
                        token,
                        lease_s: lease_ms / 1000,
                    },
                )
            }
            Enqueued::Queued(waiter) => {
                if timeout_s == 0 {
                    self.take_two_phase(conn, res);
                    self.drop_waiter(now, res, waiter);
                    self.counters.acquire_timeouts += 1;
                    return replied(out, conn, Reply::Timeout);
                }
                let deadline = now.saturating_add(timeout_s * 1000);
                let timer = self
                    .timers
                    .insert(deadline, CoreTimer::WaitTimeout { res, waiter });
                let r = &mut self.resources[res as usize];
                if let Some(w) = r.waiter(waiter) {
                    r.waiters[w].timer = Some(timer);
                    r.waiters[w].deadline = deadline;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.blocked = Some((res, waiter));
                }
                Outcome::Blocked
            }
        }
    }

    // ---- timers ----

    fn on_lease_timer(&mut self, now: u64, res: u32, token: Token, out: &mut Outbox) {
        // The resource slot may have been reused; the token identifies the
        // holder uniquely, so a stale timer finds nothing.
        let Some(i) = self.holder_pos(res, token) else {
            return;
        };
        let expires_at = self.resources[res as usize].holders[i].expires_at;
        if expires_at > now {
            // Renewed since the timer was armed.
            let timer = self
                .timers
                .insert(expires_at, CoreTimer::Lease { res, token });
            let h = &mut self.resources[res as usize].holders[i];
            h.timer = timer;
            h.timer_at = expires_at;
            return;
        }
        self.expire_holder(now, res, i, out);
    }

    fn on_wait_timeout(&mut self, now: u64, res: u32, waiter: u64, out: &mut Outbox) {
        let Some(i) = self
            .resources
            .get(res as usize)
            .and_then(|r| r.waiter(waiter))
        else {
            return;
        };
        let w = &mut self.resources[res as usize].waiters[i];
        if w.deadline > now {
            // Fired early (a clamped, very distant deadline): wait on.
            w.timer = Some(
                self.timers
                    .insert(w.deadline, CoreTimer::WaitTimeout { res, waiter }),
            );
            return;
        }
        let Some(w) = self.resources[res as usize].waiters.remove(i) else {
            return;
        };
        self.waiting -= 1;
        if let Some(c) = self.conns.get_mut(&w.conn) {
            c.blocked = None;
        }
        if w.two_phase {
            self.take_two_phase(w.conn, res);
        }
        self.counters.acquire_timeouts += 1;
        out.replies.push((w.conn, Reply::Timeout));
        self.pump(now, res, out);
        self.settle(now, res);
    }

    fn on_gc(&mut self, now: u64) {
        self.gc_timer = None;
        while self.idle_head != NIL {
            let head = self.idle_head;
            if self.resources[head as usize].idle_since + self.cfg.gc_max_idle_ms > now {
                break;
            }
            self.remove_resource(head);
        }
        self.arm_gc(now);
    }

    // ---- resource operations ----

    fn lease_ms(&self, lease_s: Option<u64>) -> u64 {
        lease_s.map_or(self.cfg.default_lease_ms, |s| s * 1000)
    }

    fn new_waiter_id(&mut self) -> u64 {
        self.next_waiter += 1;
        self.next_waiter
    }

    fn has_free_slot(&self, res: u32) -> bool {
        let r = &self.resources[res as usize];
        r.waiters.is_empty() && (r.holders.len() as u64) < r.limit
    }

    fn waiters_full(&self, res: u32) -> bool {
        self.cfg.max_waiters != 0
            && self.resources[res as usize].waiters.len() >= self.cfg.max_waiters
    }

    fn find_holder(&self, key: &str, token: &str) -> Option<(u32, usize)> {
        let &res = self.keys.get(key)?;
        let token = Token::parse(token.as_bytes())?;
        Some((res, self.holder_pos(res, token)?))
    }

    /// The resource a new acquisition or enqueue works on, and its lease:
    /// refused while draining, when the connection already holds its
    /// maximum, on a limit mismatch, or when keys run out.
    fn open(
        &mut self,
        now: u64,
        conn: ConnId,
        key: &str,
        limit: u64,
        lease_s: Option<u64>,
    ) -> Result<(u32, u64), Reply> {
        if self.draining {
            return Err(Reply::ErrorDraining);
        }
        // One connection cannot pile up holdings without bound (a semaphore
        // with a huge limit would otherwise let it).
        let max = self.cfg.max_holds_per_conn;
        if max != 0
            && self
                .conns
                .get(&conn)
                .is_some_and(|c| c.holdings.len() >= max)
        {
            return Err(Reply::ErrorMaxLocks);
        }
        let res = self.resource_for(now, key, limit)?;
        Ok((res, self.lease_ms(lease_s)))
    }

    /// The resource for `key`, created with `limit` if new. A key's limit is
    /// fixed by its first request.
    fn resource_for(&mut self, now: u64, key: &str, limit: u64) -> Result<u32, Reply> {
        if let Some(&res) = self.keys.get(key) {
            if self.resources[res as usize].limit != limit {
                return Err(Reply::ErrorLimitMismatch);
            }
            self.unlink_idle(res);
            return Ok(res);
        }
        if self.cfg.max_keys != 0 && self.keys.len() >= self.cfg.max_keys {
            // Idle keys never stand in the way: the oldest makes room.
            if self.idle_head == NIL {
                return Err(Reply::ErrorMaxLocks);
            }
            self.remove_resource(self.idle_head);
        }
        let key: Box<str> = key.into();
        let res = self.resources.insert(Resource {
            key: key.clone(),
            limit,
            holders: Vec::new(),
            waiters: VecDeque::new(),
            pins: 0,
            idle: false,
            idle_since: now,
            idle_prev: NIL,
            idle_next: NIL,
        }) as u32;
        let reused = self.vacant.pop();
        debug_assert!(reused.is_none_or(|v| v == res));
        self.keys.insert(key, res);
        Ok(res)
    }

    /// Makes `conn` a holder of `res`.
    fn grant(&mut self, now: u64, res: u32, conn: ConnId, lease_ms: u64) -> Token {
        let token = self.tokens.next_token();
        let expires_at = now + lease_ms;
        let timer = self
            .timers
            .insert(expires_at, CoreTimer::Lease { res, token });
        self.held += 1;
        let pos = self.resources[res as usize].holders.len() as u32;
        self.holder_at.insert(token, (res, pos));
        self.resources[res as usize].holders.push(Holder {
            token,
            conn,
            expires_at,
            timer,
            timer_at: expires_at,
        });
        if let Some(c) = self.conns.get_mut(&conn) {
            c.holdings.insert(token);
        }
        self.counters.grants += 1;
        token
    }

    /// Grants free slots to waiters in FIFO order.
    fn pump(&mut self, now: u64, res: u32, out: &mut Outbox) {
        loop {
            let r = &mut self.resources[res as usize];
            if r.holders.len() as u64 >= r.limit {
                return;
            }
            let Some(w) = r.waiters.pop_front() else {
                return;
            };
            self.waiting -= 1;
            let token = self.grant(now, res, w.conn, w.lease_ms);
            if let Some(timer) = w.timer {
                // The connection is blocked on this waiter: answer it.
                self.timers.cancel(timer);
                if let Some(c) = self.conns.get_mut(&w.conn) {
                    c.blocked = None;
                }
                if w.two_phase {
                    self.take_two_phase(w.conn, res);
                }
                out.replies.push((
                    w.conn,
                    Reply::Granted {
                        token,
                        lease_s: w.lease_ms / 1000,
                    },
                ));
            } else if let Some(c) = self.conns.get_mut(&w.conn) {
                // Queued by `e`: the grant waits for the connection's `w`.
                if let Some(tp) = c.two_phase_at(res) {
                    c.two_phase[tp].state = Enqueued::Granted(token);
                }
            }
        }
    }

    /// Removes holder `i` of `res` from the resource and its connection's
    /// index, cancelling its lease timer. Two-phase entries are left alone.
    fn remove_holder(&mut self, res: u32, i: usize) -> Holder {
        let holders = &mut self.resources[res as usize].holders;
        let h = holders.swap_remove(i);
        if let Some(moved) = holders.get(i) {
            self.holder_at.insert(moved.token, (res, i as u32));
        }
        self.holder_at.remove(&h.token);
        self.held -= 1;
        self.timers.cancel(h.timer);
        if let Some(c) = self.conns.get_mut(&h.conn) {
            c.holdings.remove(&h.token);
        }
        h
    }

    /// The index in `res`'s holders of the holder with `token`.
    fn holder_pos(&self, res: u32, token: Token) -> Option<usize> {
        match self.holder_at.get(&token) {
            Some(&(r, i)) if r == res => Some(i as usize),
            _ => None,
        }
    }

    fn expire_holder(&mut self, now: u64, res: u32, i: usize, out: &mut Outbox) {
        let h = self.remove_holder(res, i);
        self.counters.lease_expiries += 1;
        out.expired.push(LeaseExpired {
            key: self.resources[res as usize].key.clone(),
            conn: h.conn,
        });
        self.pump(now, res, out);
        self.settle(now, res);
    }

    fn set_expiry(&mut self, res: u32, i: usize, expires_at: u64) {
        let h = &mut self.resources[res as usize].holders[i];
        h.expires_at = expires_at;
        if expires_at < h.timer_at {
            let token = h.token;
            let old = h.timer;
            self.timers.cancel(old);
            let timer = self
                .timers
                .insert(expires_at, CoreTimer::Lease { res, token });
            let h = &mut self.resources[res as usize].holders[i];
            h.timer = timer;
            h.timer_at = expires_at;
        }
    }

    /// Removes a queued waiter (timed out, cancelled or disconnected).
    fn drop_waiter(&mut self, now: u64, res: u32, waiter: u64) {
        let r = &mut self.resources[res as usize];
        if let Some(i) = r.waiter(waiter) {
            if let Some(w) = r.waiters.remove(i) {
                self.waiting -= 1;
                if let Some(t) = w.timer {
                    self.timers.cancel(t);
                }
            }
        }
        self.settle(now, res);
    }

    /// Removes `conn`'s two-phase entry for `res`. The caller settles `res`.
    fn take_two_phase(&mut self, conn: ConnId, res: u32) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(i) = c.two_phase_at(res) {
            c.two_phase.swap_remove(i);
            self.resources[res as usize].pins -= 1;
        }
    }

    /// Puts an unused resource on the idle list for GC.
    fn settle(&mut self, now: u64, res: u32) {
        let r = &mut self.resources[res as usize];
        if r.idle || !r.is_unused() {
            return;
        }
        r.idle = true;
        r.idle_since = now;
        r.idle_prev = self.idle_tail;
        r.idle_next = NIL;
        if self.idle_tail == NIL {
            self.idle_head = res;
        } else {
            self.resources[self.idle_tail as usize].idle_next = res;
        }
        self.idle_tail = res;
        self.arm_gc(now);
    }

    fn unlink_idle(&mut self, res: u32) {
        let r = &mut self.resources[res as usize];
        if !r.idle {
            return;
        }
        r.idle = false;
        let (prev, next) = (r.idle_prev, r.idle_next);
        if prev == NIL {
            self.idle_head = next;
        } else {
            self.resources[prev as usize].idle_next = next;
        }
        if next == NIL {
            self.idle_tail = prev;
        } else {
            self.resources[next as usize].idle_prev = prev;
        }
    }

    fn remove_resource(&mut self, res: u32) {
        self.unlink_idle(res);
        let r = self.resources.remove(res as usize);
        self.vacant.push(res);
        self.keys.remove(&r.key);
    }

    fn arm_gc(&mut self, now: u64) {
        if self.gc_timer.is_some() || self.idle_head == NIL {
            return;
        }
        let due = self.resources[self.idle_head as usize].idle_since + self.cfg.gc_max_idle_ms;
        let at = due.max(now + self.cfg.gc_interval_ms.max(1));
        self.gc_timer = Some(self.timers.insert(at, CoreTimer::Gc));
    }
}

#[cfg(test)]
mod tests;
