//! Snapshots of [`Core`]: its whole state in a compact binary form, such that
//! a core restored from one behaves exactly like the core it was taken from
//! (same replies, same `stats`, same deadlines, same expiries) given the same
//! inputs and an entropy source in the same state.
//!
//! Timers carry history (a lease timer stays at its old deadline after a
//! renewal that extends the lease, the GC timer's deadline depends on when it
//! was armed, distant deadlines are clamped by the wheel), so the snapshot
//! records each armed timer's deadline as the wheel keeps it and its arming
//! sequence number; the wheel hands out every batch of fired timers in
//! (deadline, sequence) order, which re-arming them reproduces. Slab slots are
//! kept as they were, vacant ones included, in the order they will be reused:
//! a key's slot decides its place in `stats`.
//!
//! # Format (version 1)
//!
//! Little-endian integers; a string is a `u32` length and UTF-8 bytes; a
//! count is a `u32`; a timer is `u64` deadline, `u64` sequence number.
//!
//! ```text
//! u8 version = 1
//! u64 next_waiter, u8 draining
//! u64 grants, releases, acquire_timeouts, lease_expiries,
//!     signals_published, signals_delivered
//! u64 held, u64 waiting
//! u64 fence, u16 pool position, (256 - position) * 8 bytes of unused pool
//! u64 wheel time, u64 wheel next sequence number
//! u32 resource slots, count + u32s: vacant slots (reused last first)
//! per occupied slot, ascending:
//!     str key, u64 limit, u32 pins,
//!     u8 idle, u64 idle_since, u32 idle_prev, u32 idle_next,
//!     count + holders: u128 token, u64 conn, u64 expires_at, u64 timer_at, timer
//!     count + waiters: u64 id, u64 conn, u64 lease_ms, u64 deadline,
//!                      u8 flags (1 two-phase, 2 armed), [timer if armed]
//! u32 idle_head, u32 idle_tail, u8 GC armed, [timer]
//! count + connections, ascending id:
//!     u64 id, u8 blocked, [u32 resource, u64 waiter],
//!     count + two-phase entries: u32 resource, u64 lease_ms,
//!                                u8 state, u64 waiter (0) | u128 token (1)
//! signals (see `Signals::write_snapshot`)
//! ```
//!
//! A connection's holdings are not stored: they are its holders. Neither are
//! the token index and the subscription trie, which follow from the rest.

use std::collections::VecDeque;
use std::fmt;

use hashbrown::{HashMap, HashSet};
use slab::Slab;

use super::signals::Signals;
use super::tokens::{BATCH, TokenSource};
use super::{
    Config, ConnId, ConnState, Core, CoreTimer, Counters, Enqueued, Entropy, Holder, NIL, Resource,
    TwoPhase, Waiter,
};
use crate::protocol::Token;
use crate::protocol::request::MAX_NUMBER;
use crate::timer::{TimerHandle, TimerWheel};

/// The format's version, the snapshot's first byte.
pub const VERSION: u8 = 1;

/// Times (in ms) beyond this are refused: far beyond any real clock, and far
/// enough from `u64::MAX` that no sum of a time and a configured interval
/// overflows.
const MAX_TIME: u64 = 1 << 62;

/// Counters (grants, waiter ids, timer sequence numbers...) beyond this are
/// refused: none gets near, and adding to one must not overflow.
const MAX_COUNT: u64 = 1 << 62;

/// Why [`Core::restore`] refused a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// The input ends before the snapshot does.
    Truncated,
    /// A version this build does not read.
    BadVersion(u8),
    /// Well-formed but not a state the core can be in (or trailing bytes).
    Inconsistent(String),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Truncated => f.write_str("snapshot truncated"),
            SnapshotError::BadVersion(v) => {
                write!(f, "snapshot version {v} not supported (expected {VERSION})")
            }
            SnapshotError::Inconsistent(why) => write!(f, "snapshot inconsistent: {why}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

pub(super) fn bad<T>(why: impl Into<String>) -> Result<T, SnapshotError> {
    Err(SnapshotError::Inconsistent(why.into()))
}

// ---- writing ----

pub(super) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u128(out: &mut Vec<u8>, v: u128) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A count or a length. Nothing in the core comes near 2^32 of anything.
pub(super) fn put_len(out: &mut Vec<u8>, n: usize) {
    debug_assert!(u32::try_from(n).is_ok());
    put_u32(out, n as u32);
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// The recorded form of a missing timer; never accepted by `rearm`.
const NO_TIMER: (u64, u64) = (u64::MAX, u64::MAX);

fn put_timer(out: &mut Vec<u8>, timers: &TimerWheel<CoreTimer>, handle: TimerHandle) {
    let (deadline, seq) = timers.scheduled(handle).unwrap_or(NO_TIMER);
    put_u64(out, deadline);
    put_u64(out, seq);
}

// ---- reading ----

/// Reads a snapshot front to back; every read is checked against what is
/// left.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if n > self.buf.len() {
            return Err(SnapshotError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(super) fn u128(&mut self) -> Result<u128, SnapshotError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    pub(super) fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => bad(format!("{b} is not a flag")),
        }
    }

    pub(super) fn str(&mut self) -> Result<&'a str, SnapshotError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).or_else(|_| bad("a string is not UTF-8"))
    }

    /// A count of items that take at least `min_size` bytes each: larger
    /// than what is left of the input can hold means the input is cut short.
    /// Bounds every allocation by the input's size.
    pub(super) fn count(&mut self, min_size: usize) -> Result<usize, SnapshotError> {
        let n = self.u32()? as usize;
        self.fits(n, min_size)?;
        Ok(n)
    }

    /// Whether `n` items of at least `min_size` bytes can still follow.
    pub(super) fn fits(&self, n: usize, min_size: usize) -> Result<(), SnapshotError> {
        match n.checked_mul(min_size) {
            Some(need) if need <= self.buf.len() => Ok(()),
            _ => Err(SnapshotError::Truncated),
        }
    }

    fn count64(&mut self) -> Result<u64, SnapshotError> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return bad(format!("count {n} out of range"));
        }
        Ok(n)
    }

    fn time(&mut self) -> Result<u64, SnapshotError> {
        let t = self.u64()?;
        if t > MAX_TIME {
            return bad(format!("time {t} out of range"));
        }
        Ok(t)
    }
}

/// Reads the vacant list of a slab of `len` slots: the vacant slots in the
/// order the slab reuses them (last first), and which slots they are.
pub(super) fn read_vacant(
    r: &mut Reader<'_>,
    len: usize,
    min_occupied_size: usize,
) -> Result<(Vec<u32>, Vec<bool>), SnapshotError> {
    let n = r.count(4)?;
    let Some(occupied) = len.checked_sub(n) else {
        return bad("more vacant slots than slots");
    };
    // The occupied slots follow, so this bounds `len` by the input too.
    r.fits(occupied, min_occupied_size)?;
    let mut vacant = Vec::with_capacity(n);
    let mut is_vacant = vec![false; len];
    for _ in 0..n {
        let i = r.u32()?;
        match is_vacant.get_mut(i as usize) {
            Some(v) if !*v => *v = true,
            _ => return bad(format!("vacant slot {i} out of range or repeated")),
        }
        vacant.push(i);
    }
    Ok((vacant, is_vacant))
}

/// A slab with `items` in their slots and the other slots vacant, to be
/// reused in the order of `vacant` (last first), as `Slab` does: each
/// removal puts a slot first in line.
pub(super) fn build_slab<T>(
    items: Vec<Option<T>>,
    vacant: &[u32],
    mut filler: impl FnMut() -> T,
) -> Slab<T> {
    let mut slab = Slab::with_capacity(items.len());
    for item in items {
        slab.insert(item.unwrap_or_else(&mut filler));
    }
    for &i in vacant {
        slab.remove(i as usize);
    }
    slab
}

impl Core {
    /// Appends the whole state to `out`, in the format described in the
    /// module documentation. [`Core::restore`] reads it back.
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        put_u64(out, self.next_waiter);
        out.push(u8::from(self.draining));
        let c = &self.counters;
        for v in [
            c.grants,
            c.releases,
            c.acquire_timeouts,
            c.lease_expiries,
            c.signals_published,
            c.signals_delivered,
        ] {
            put_u64(out, v);
        }
        put_u64(out, self.held as u64);
        put_u64(out, self.waiting as u64);
        let (fence, pos, unused) = self.tokens.parts();
        put_u64(out, fence);
        put_u16(out, pos as u16);
        out.extend_from_slice(unused);
        put_u64(out, self.timers.elapsed());
        put_u64(out, self.timers.next_seq());

        put_len(out, self.resources.len() + self.vacant.len());
        put_len(out, self.vacant.len());
        for &v in &self.vacant {
            put_u32(out, v);
        }
        for (_, r) in &self.resources {
            put_str(out, &r.key);
            put_u64(out, r.limit);
            put_u32(out, r.pins);
            out.push(u8::from(r.idle));
            put_u64(out, r.idle_since);
            put_u32(out, r.idle_prev);
            put_u32(out, r.idle_next);
            put_len(out, r.holders.len());
            for h in &r.holders {
                put_u128(out, h.token.0);
                put_u64(out, h.conn);
                put_u64(out, h.expires_at);
                put_u64(out, h.timer_at);
                put_timer(out, &self.timers, h.timer);
            }
            put_len(out, r.waiters.len());
            for w in &r.waiters {
                put_u64(out, w.id);
                put_u64(out, w.conn);
                put_u64(out, w.lease_ms);
                put_u64(out, w.deadline);
                out.push(u8::from(w.two_phase) | (u8::from(w.timer.is_some()) << 1));
                if let Some(t) = w.timer {
                    put_timer(out, &self.timers, t);
                }
            }
        }
        put_u32(out, self.idle_head);
        put_u32(out, self.idle_tail);
        out.push(u8::from(self.gc_timer.is_some()));
        if let Some(t) = self.gc_timer {
            put_timer(out, &self.timers, t);
        }

        let mut conns: Vec<(&ConnId, &ConnState)> = self.conns.iter().collect();
        conns.sort_unstable_by_key(|(id, _)| **id);
        put_len(out, conns.len());
        for (&id, c) in conns {
            put_u64(out, id);
            out.push(u8::from(c.blocked.is_some()));
            if let Some((res, waiter)) = c.blocked {
                put_u32(out, res);
                put_u64(out, waiter);
            }
            put_len(out, c.two_phase.len());
            for tp in &c.two_phase {
                put_u32(out, tp.res);
                put_u64(out, tp.lease_ms);
                match tp.state {
                    Enqueued::Queued(waiter) => {
                        out.push(0);
                        put_u64(out, waiter);
                    }
                    Enqueued::Granted(token) => {
                        out.push(1);
                        put_u128(out, token.0);
                    }
                }
            }
        }
        self.signals.write_snapshot(out);
    }

    /// A core in the state recorded by [`snapshot`](Self::snapshot), with
    /// `cfg` (which should be the one the snapshot was taken under) and
    /// `entropy` (which should be in the state the original's was in, for
    /// the same tokens to follow). Every field is checked: any input either
    /// restores a core whose invariants hold or is refused; none panics.
    pub fn restore(
        cfg: Config,
        bytes: &[u8],
        entropy: Box<dyn Entropy>,
    ) -> Result<Core, SnapshotError> {
        // A lease comes from a request or from the configuration.
        let max_lease_ms = cfg.default_lease_ms.max(MAX_NUMBER * 1000);
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != VERSION {
            return Err(SnapshotError::BadVersion(version));
        }
        let next_waiter = r.count64()?;
        let draining = r.bool()?;
        let counters = Counters {
            grants: r.count64()?,
            releases: r.count64()?,
            acquire_timeouts: r.count64()?,
            lease_expiries: r.count64()?,
            signals_published: r.count64()?,
            signals_delivered: r.count64()?,
        };
        let held = r.u64()?;
        let waiting = r.u64()?;
        let fence = r.u64()?;
        let pos = r.u16()? as usize;
        if pos > BATCH {
            return bad(format!("token pool position {pos} out of range"));
        }
        let unused = r.take((BATCH - pos) * 8)?;
        let Some(tokens) = TokenSource::from_parts(fence, pos, unused, entropy) else {
            return bad("token pool");
        };
        let elapsed = r.time()?;
        let next_seq = r.count64()?;
        let mut timers = TimerWheel::resume(elapsed, next_seq);
        let mut seqs = Vec::new();
        let mut rearm = |r: &mut Reader<'_>, t: CoreTimer| -> Result<TimerHandle, SnapshotError> {
            let (deadline, seq) = (r.u64()?, r.u64()?);
            seqs.push(seq);
            match timers.rearm(deadline, seq, t) {
                Some(handle) => Ok(handle),
                None => bad(format!("timer ({deadline}, {seq}) out of range")),
            }
        };

        // Resources. The smallest is a key of length 0 with no holder and
        // no waiter.
        const RESOURCE_SIZE: usize = 4 + 8 + 4 + 1 + 8 + 4 + 4 + 4 + 4;
        const HOLDER_SIZE: usize = 16 + 8 + 8 + 8 + 16;
        const WAITER_SIZE: usize = 8 + 8 + 8 + 8 + 1;
        let slots = r.u32()? as usize;
        let (vacant, is_vacant) = read_vacant(&mut r, slots, RESOURCE_SIZE)?;
        let mut items: Vec<Option<Resource>> = Vec::with_capacity(slots);
        let mut keys = HashMap::new();
        let mut holder_at = HashMap::new();
        let mut waiter_ids = HashSet::new();
        for (idx, &vacant) in is_vacant.iter().enumerate() {
            if vacant {
                items.push(None);
                continue;
            }
            let res = idx as u32;
            let key: Box<str> = r.str()?.into();
            let limit = r.u64()?;
            if limit == 0 {
                return bad(format!("{key:?}: limit 0"));
            }
            let pins = r.u32()?;
            let idle = r.bool()?;
            let idle_since = r.time()?;
            let idle_prev = r.u32()?;
            let idle_next = r.u32()?;
            let n = r.count(HOLDER_SIZE)?;
            let mut holders = Vec::with_capacity(n);
            for i in 0..n {
                let token = Token(r.u128()?);
                let conn = r.u64()?;
                let expires_at = r.u64()?;
                let timer_at = r.u64()?;
                let timer = rearm(&mut r, CoreTimer::Lease { res, token })?;
                if token.fence() > tokens.fence() {
                    return bad(format!("{key:?}: a token from the future"));
                }
                if holder_at.insert(token, (res, i as u32)).is_some() {
                    return bad(format!("{key:?}: token {token:?} held twice"));
                }
                holders.push(Holder {
                    token,
                    conn,
                    expires_at,
                    timer,
                    timer_at,
                });
            }
            let n = r.count(WAITER_SIZE)?;
            let mut waiters = VecDeque::with_capacity(n);
            for _ in 0..n {
                let id = r.u64()?;
                let conn = r.u64()?;
                let lease_ms = r.u64()?;
                if lease_ms > max_lease_ms {
                    return bad(format!("lease of {lease_ms} ms"));
                }
                let deadline = r.u64()?;
                let flags = r.u8()?;
                if flags > 3 {
                    return bad(format!("{key:?}: waiter flags {flags}"));
                }
                let two_phase = flags & 1 != 0;
                let timer = if flags & 2 != 0 {
                    Some(rearm(&mut r, CoreTimer::WaitTimeout { res, waiter: id })?)
                } else {
                    None
                };
                if id == 0 || id > next_waiter || !waiter_ids.insert(id) {
                    return bad(format!("{key:?}: waiter id {id} out of range or repeated"));
                }
                if !two_phase && timer.is_none() {
                    return bad(format!("{key:?}: a blocking waiter without a timer"));
                }
                waiters.push_back(Waiter {
                    id,
                    conn,
                    lease_ms,
                    timer,
                    deadline,
                    two_phase,
                });
            }
            if keys.insert(key.clone(), res).is_some() {
                return bad(format!("key {key:?} twice"));
            }
            items.push(Some(Resource {
                key,
                limit,
                holders,
                waiters,
                pins,
                idle,
                idle_since,
                idle_prev,
                idle_next,
            }));
        }
        let idle_head = r.u32()?;
        let idle_tail = r.u32()?;
        let gc_timer = if r.bool()? {
            Some(rearm(&mut r, CoreTimer::Gc)?)
        } else {
            None
        };

        // Connections.
        const CONN_SIZE: usize = 8 + 1 + 4;
        const TWO_PHASE_SIZE: usize = 4 + 8 + 1 + 8;
        let n = r.count(CONN_SIZE)?;
        let mut conns: HashMap<ConnId, ConnState> = HashMap::with_capacity(n);
        let mut last = None;
        for _ in 0..n {
            let id = r.u64()?;
            if last.is_some_and(|l| l >= id) {
                return bad("connections out of order");
            }
            last = Some(id);
            let blocked = if r.bool()? {
                Some((r.u32()?, r.u64()?))
            } else {
                None
            };
            let m = r.count(TWO_PHASE_SIZE)?;
            let mut two_phase = Vec::with_capacity(m);
            for _ in 0..m {
                let res = r.u32()?;
                let lease_ms = r.u64()?;
                if lease_ms > max_lease_ms {
                    return bad(format!("lease of {lease_ms} ms"));
                }
                let state = match r.u8()? {
                    0 => Enqueued::Queued(r.u64()?),
                    1 => Enqueued::Granted(Token(r.u128()?)),
                    s => return bad(format!("conn {id}: two-phase state {s}")),
                };
                two_phase.push(TwoPhase {
                    res,
                    lease_ms,
                    state,
                });
            }
            conns.insert(
                id,
                ConnState {
                    holdings: HashSet::new(),
                    two_phase,
                    blocked,
                },
            );
        }
        for item in items.iter().flatten() {
            for h in &item.holders {
                if let Some(c) = conns.get_mut(&h.conn) {
                    c.holdings.insert(h.token);
                }
            }
        }

        let signals = Signals::read_snapshot(&mut r)?;
        if r.remaining() != 0 {
            return bad(format!("{} trailing bytes", r.remaining()));
        }
        seqs.sort_unstable();
        if seqs.windows(2).any(|w| w[0] == w[1]) {
            return bad("two timers armed at once");
        }
        timers.order_rearmed();

        let resources = build_slab(items, &vacant, || Resource {
            key: "".into(),
            limit: 1,
            holders: Vec::new(),
            waiters: VecDeque::new(),
            pins: 0,
            idle: false,
            idle_since: 0,
            idle_prev: NIL,
            idle_next: NIL,
        });
        let core = Core {
            cfg,
            keys,
            resources,
            conns,
            timers,
            tokens,
            idle_head,
            idle_tail,
            gc_timer,
            next_waiter,
            draining,
            counters,
            fired: Vec::new(),
            signals,
            receivers: Vec::new(),
            holder_at,
            held: held as usize,
            waiting: waiting as usize,
            vacant,
        };
        core.check_links()?;
        core.check_invariants()
            .map_err(SnapshotError::Inconsistent)?;
        Ok(core)
    }

    /// What `check_invariants` leaves out: that waiters, blocked connections
    /// and two-phase entries name each other, not just something that exists.
    fn check_links(&self) -> Result<(), SnapshotError> {
        for (id, c) in &self.conns {
            if let Some((res, waiter)) = c.blocked {
                let w = self
                    .resources
                    .get(res as usize)
                    .and_then(|r| r.waiters.iter().find(|w| w.id == waiter));
                if !w.is_some_and(|w| w.conn == *id && w.timer.is_some()) {
                    return bad(format!("conn {id}: blocked on someone else's waiter"));
                }
            }
            for tp in &c.two_phase {
                let Some(r) = self.resources.get(tp.res as usize) else {
                    return bad(format!("conn {id}: two-phase entry for a vacant slot"));
                };
                let ok = match tp.state {
                    Enqueued::Queued(waiter) => r
                        .waiters
                        .iter()
                        .find(|w| w.id == waiter)
                        .is_some_and(|w| w.conn == *id && w.two_phase),
                    Enqueued::Granted(token) => match self.holder_at.get(&token) {
                        Some(&(res, i)) => {
                            res == tp.res
                                && r.holders.get(i as usize).is_some_and(|h| h.conn == *id)
                        }
                        // Its lease ran out before `w` took it.
                        None => true,
                    },
                };
                if !ok {
                    return bad(format!("conn {id}: two-phase entry names someone else's"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Outbox, SeededEntropy};
    use crate::protocol::{Kind, Reply, Request};

    fn hex(t: Token) -> String {
        format!("{:032x}", t.0)
    }

    fn cfg() -> Config {
        Config {
            gc_interval_ms: 700,
            gc_max_idle_ms: 3_000,
            ..Config::default()
        }
    }

    fn lock(key: &str, timeout_s: u64, lease_s: Option<u64>) -> Request<'_> {
        Request::Acquire {
            key,
            timeout_s,
            limit: 1,
            lease_s,
            kind: Kind::Lock,
        }
    }

    fn sem(key: &str, timeout_s: u64, limit: u64) -> Request<'_> {
        Request::Acquire {
            key,
            timeout_s,
            limit,
            lease_s: Some(4),
            kind: Kind::Semaphore,
        }
    }

    fn enqueue(key: &str, lease_s: Option<u64>) -> Request<'_> {
        Request::Enqueue {
            key,
            limit: 1,
            lease_s,
            kind: Kind::Lock,
        }
    }

    /// The last token granted in `out`.
    fn token(out: &Outbox) -> Token {
        out.replies
            .iter()
            .rev()
            .find_map(|(_, r)| match r {
                Reply::Granted { token, .. } | Reply::Acquired { token, .. } => Some(*token),
                _ => None,
            })
            .expect("a grant")
    }

    /// Runs one request and returns the token it granted, if any.
    fn run(c: &mut Core, now: u64, conn: ConnId, req: Request<'_>) -> Option<Token> {
        let mut out = Outbox::default();
        let _ = c.handle(now, conn, &req, &mut out);
        c.check_invariants().unwrap();
        let granted =
            |(_, r): &(ConnId, Reply)| matches!(r, Reply::Granted { .. } | Reply::Acquired { .. });
        out.replies.iter().any(granted).then(|| token(&out))
    }

    /// A core with something of everything: holders, blocked and two-phase
    /// waiters, a grant waiting for its `w`, idle keys, vacant slots, signal
    /// groups with a moved cursor, connections with no state.
    fn busy() -> Core {
        let mut c = Core::new(cfg(), 1 << 40, Box::new(SeededEntropy(99)));
        for conn in 1..=11 {
            c.connect(conn);
        }
        let mut now = 5;
        let far = crate::protocol::request::MAX_NUMBER;
        let lock_release = |c: &mut Core, now, key| {
            let t = hex(run(c, now, 1, lock(key, 0, None)).unwrap());
            run(c, now, 1, Request::Release { key, token: &t });
        };
        // Keys that go idle and are collected leave vacant slots.
        for key in ["gone1", "gone2", "gone3"] {
            lock_release(&mut c, now, key);
        }
        run(&mut c, now, 1, lock("a", 0, Some(10)));
        run(&mut c, now, 2, lock("a", 30, None));
        run(&mut c, now, 3, enqueue("a", Some(5)));
        run(&mut c, now, 4, sem("s", 0, 2));
        run(&mut c, now, 5, sem("s", 0, 2));
        run(&mut c, now, 6, sem("s", 20, 2));
        run(&mut c, now, 7, enqueue("e", Some(2)));
        now += 4_000;
        c.tick(now, &mut Outbox::default());
        assert_eq!(c.keys(), 3, "the first keys are collected");
        lock_release(&mut c, now, "idle");
        // A renewal that extends the lease leaves the timer behind.
        let t = hex(run(&mut c, now, 8, lock("r", 0, Some(2))).unwrap());
        let renew = Request::Renew {
            key: "r",
            token: &t,
            lease_s: Some(60),
        };
        run(&mut c, now, 8, renew);
        run(&mut c, now, 9, lock("far", 0, Some(far)));
        run(&mut c, now, 10, lock("far", far, None));
        lock_release(&mut c, now, "idle2");
        for (conn, pattern, group) in [
            (1, "a.*", ""),
            (2, "a.*", "g"),
            (3, "a.*", "g"),
            (4, "a.>", "g"),
            (5, "x", ""),
            (5, "y", ""),
            (6, "z.*.q", "h"),
        ] {
            run(&mut c, now, conn, Request::Listen { pattern, group });
        }
        let unlisten = Request::Unlisten {
            pattern: "x",
            group: "",
        };
        run(&mut c, now, 5, unlisten);
        let signal = Request::Signal {
            channel: "a.b",
            payload: "p",
        };
        run(&mut c, now, 9, signal);
        c
    }

    fn snap(c: &Core) -> Vec<u8> {
        let mut v = Vec::new();
        c.snapshot(&mut v);
        v
    }

    fn restored(bytes: &[u8]) -> Result<Core, SnapshotError> {
        Core::restore(cfg(), bytes, Box::new(SeededEntropy(1)))
    }

    enum Step<'a> {
        Req(ConnId, Request<'a>),
        Tick,
        Disconnect(ConnId),
    }

    /// Feeds one step to both cores; everything must agree.
    fn both(a: &mut Core, b: &mut Core, now: u64, step: Step<'_>) {
        let (mut oa, mut ob) = (Outbox::default(), Outbox::default());
        match step {
            Step::Req(conn, req) => {
                let ra = a.handle(now, conn, &req, &mut oa);
                assert_eq!(ra, b.handle(now, conn, &req, &mut ob));
            }
            Step::Tick => {
                a.tick(now, &mut oa);
                b.tick(now, &mut ob);
            }
            Step::Disconnect(conn) => {
                a.disconnect(now, conn, &mut oa);
                b.disconnect(now, conn, &mut ob);
            }
        }
        assert_eq!(oa.replies, ob.replies);
        assert_eq!(oa.expired, ob.expired);
        assert_eq!(oa.json, ob.json);
        assert_eq!(oa.signal, ob.signal);
        assert_eq!(a.next_deadline(), b.next_deadline());
        assert_eq!(snap(a), snap(b));
        b.check_invariants().unwrap();
    }

    /// Drives both cores through the same steps, past every deadline.
    fn agree(a: &mut Core, b: &mut Core) {
        let mut now = 4_005;
        both(a, b, now, Step::Req(11, Request::Stats));
        for (conn, key) in [(9, "n1"), (9, "n2"), (3, "a"), (7, "e")] {
            both(a, b, now, Step::Req(conn, lock(key, 0, None)));
        }
        let wait = Request::Wait {
            key: "e",
            timeout_s: 3,
        };
        both(a, b, now, Step::Req(7, wait));
        let signal = Request::Signal {
            channel: "a.b",
            payload: "q",
        };
        both(a, b, now, Step::Req(9, signal));
        let listen = Request::Listen {
            pattern: "new",
            group: "",
        };
        both(a, b, now, Step::Req(9, listen));
        while let Some(d) = a.next_deadline() {
            if d > now + 200_000 {
                break;
            }
            now = d;
            both(a, b, now, Step::Tick);
            both(a, b, now, Step::Req(11, Request::Stats));
        }
        for conn in 1..=11 {
            both(a, b, now, Step::Disconnect(conn));
            both(a, b, now, Step::Req(12, Request::Stats));
        }
        for _ in 0..3 {
            now += 80_000_000_000;
            both(a, b, now, Step::Tick);
            both(a, b, now, Step::Req(12, Request::Stats));
        }
    }

    #[test]
    fn round_trip_is_exact_and_behaves_the_same() {
        let mut a = busy();
        let bytes = snap(&a);
        assert_eq!(bytes[0], VERSION);
        let mut b = restored(&bytes).unwrap();
        assert_eq!(snap(&b), bytes);
        assert_eq!(b.keys(), a.keys());
        assert_eq!(b.holders(), a.holders());
        assert_eq!(b.waiters(), a.waiters());
        assert_eq!(b.counters(), a.counters());
        assert_eq!(b.connections(), a.connections());
        // The token pool came along: the same tokens follow (the pool has
        // not run out, so the entropy source is not consulted).
        agree(&mut a, &mut b);
    }

    #[test]
    fn empty_core_round_trips() {
        let c = Core::new(Config::default(), 7, Box::new(SeededEntropy(1)));
        let bytes = snap(&c);
        let r = Core::restore(Config::default(), &bytes, Box::new(SeededEntropy(1))).unwrap();
        assert_eq!(snap(&r), bytes);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = snap(&busy());
        for len in 0..bytes.len() {
            match restored(&bytes[..len]) {
                Err(SnapshotError::Truncated) => {}
                Err(e) => panic!("cut at {len}: {e}, expected truncated"),
                Ok(_) => panic!("cut at {len}: accepted"),
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            restored(&longer),
            Err(SnapshotError::Inconsistent(_))
        ));
        let mut v2 = bytes;
        v2[0] = 2;
        assert_eq!(restored(&v2).err(), Some(SnapshotError::BadVersion(2)));
        assert_eq!(
            SnapshotError::BadVersion(2).to_string(),
            "snapshot version 2 not supported (expected 1)"
        );
    }

    /// Requests, ticks and disconnects on a restored core, from `now`.
    /// With `sound`, its invariants must hold throughout.
    fn exercise(c: &mut Core, mut now: u64, sound: bool) {
        let mut out = Outbox::default();
        let check = |c: &Core| {
            if sound {
                c.check_invariants().unwrap();
            }
        };
        let wait = Request::Wait {
            key: "e",
            timeout_s: 1,
        };
        let signal = Request::Signal {
            channel: "a.b",
            payload: "",
        };
        let requests = [
            (3, lock("a", 1, None)),
            (7, wait),
            (9, signal),
            (11, lock("new", 0, None)),
            (11, Request::Stats),
        ];
        // Only from connections that exist (as the caller guarantees).
        for (conn, req) in requests {
            if !c.conns.contains_key(&conn) {
                continue;
            }
            let _ = c.handle(now, conn, &req, &mut out);
            check(c);
        }
        for _ in 0..20 {
            let Some(d) = c.next_deadline() else { break };
            now = now.max(d);
            c.tick(now, &mut out);
            check(c);
        }
        for conn in 0..=12 {
            c.disconnect(now, conn, &mut out);
            check(c);
        }
        c.tick(now + 100_000_000_000, &mut out);
        check(c);
    }

    /// Damaged snapshots are refused or restore a sound core; nothing panics,
    /// not even using what was restored.
    #[test]
    fn damage_never_panics() {
        let core = busy();
        let bytes = snap(&core);
        // Most of a small snapshot is the token pool: aim most damage at
        // the rest.
        let pool_at = 1 + 8 + 1 + 6 * 8 + 2 * 8 + 8 + 2;
        let pool_len = core.tokens.parts().2.len();
        assert!(pool_len > 0);
        assert_eq!(&bytes[pool_at..pool_at + pool_len], core.tokens.parts().2);
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for round in 0..3_000 {
            let mut b = bytes.clone();
            for _ in 0..1 + rnd() % 3 {
                let mut i = (rnd() % b.len() as u64) as usize;
                while round % 4 != 0 && (pool_at..pool_at + pool_len).contains(&i) {
                    i = (rnd() % b.len() as u64) as usize;
                }
                if round % 2 == 0 {
                    b[i] ^= 1 << (rnd() % 8);
                } else {
                    b[i] = rnd() as u8;
                }
            }
            let Ok(mut c) = restored(&b) else {
                continue;
            };
            accepted += 1;
            c.check_invariants().unwrap();
            // Damage may move a recorded time past 4 s: the clock would
            // then go backwards, which breaks no rule that could panic (but
            // may put the idle list out of order).
            exercise(&mut c, 4_005, false);
            let mut c = restored(&b).unwrap();
            exercise(&mut c, MAX_TIME, true);
        }
        // Flips in counters, expiries, payload bytes and the like are
        // harmless: some damaged snapshots are accepted.
        assert!(accepted > 0);
    }
}
