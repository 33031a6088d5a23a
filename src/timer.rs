//! A hierarchical timer wheel with millisecond resolution.
//!
//! Six levels of 64 slots: level `n` slots are `64^n` ms wide, so the wheel
//! spans `64^6` ms (about 2.2 years); later deadlines are clamped to the far
//! edge and simply fire early-and-rearm in the callers (every caller treats a
//! firing as a hint and re-checks its own state).
//!
//! Entries live in a slab and are linked into per-slot doubly linked lists,
//! so insert and cancel are O(1). A 64-bit occupancy bitmap per level makes
//! finding the next deadline a handful of bit operations. Entries cascade to
//! finer levels as time advances and fire only when the wheel's time has
//! reached their deadline: a timer never fires early.
//!
//! The wheel never reads a clock: it is advanced with [`TimerWheel::expire`]
//! and `now` in milliseconds from an arbitrary origin chosen by the caller.
//!
//! Every timer gets an arming sequence number, and each `expire` hands out
//! its batch in (deadline, sequence) order. Where an entry sits in the wheel
//! depends only on the wheel's time and the entry's deadline, so a wheel
//! rebuilt from (time, deadlines, sequence numbers) — see
//! [`TimerWheel::resume`], [`TimerWheel::rearm`] and
//! [`TimerWheel::order_rearmed`] — fires exactly the same timers at the same
//! moments, in the same order, as the original.

use slab::Slab;

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Largest distance from the wheel's current time that can be represented.
pub const MAX_SPAN: u64 = (1u64 << (SLOT_BITS as u64 * LEVELS as u64)) - 1;
const NIL: u32 = u32::MAX;

/// A handle to a scheduled timer, used to cancel it.
///
/// Handles carry a generation (the low half of the arming sequence number),
/// so cancelling a handle whose timer already fired (and whose slab slot was
/// reused) is a harmless no-op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerHandle {
    index: u32,
    generation: u32,
}

struct Entry<T> {
    deadline: u64,
    /// When the timer was armed: the wheel's insert count at the time.
    seq: u64,
    level: u8,
    slot: u8,
    prev: u32,
    next: u32,
    payload: T,
}

/// The wheel itself; `T` is an opaque payload handed back on expiry.
pub struct TimerWheel<T> {
    entries: Slab<Entry<T>>,
    heads: [[u32; SLOTS]; LEVELS],
    tails: [[u32; SLOTS]; LEVELS],
    occupied: [u64; LEVELS],
    /// The wheel's current time: every entry's deadline is `>= elapsed`.
    elapsed: u64,
    next_seq: u64,
}

impl<T> Default for TimerWheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerWheel<T> {
    pub fn new() -> Self {
        TimerWheel {
            entries: Slab::new(),
            heads: [[NIL; SLOTS]; LEVELS],
            tails: [[NIL; SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            elapsed: 0,
            next_seq: 0,
        }
    }

    /// An empty wheel at time `elapsed` whose next timer gets sequence number
    /// `next_seq`: the start of rebuilding a wheel recorded by
    /// [`elapsed`](Self::elapsed), [`next_seq`](Self::next_seq) and
    /// [`scheduled`](Self::scheduled), whose timers are then put back with
    /// [`rearm`](Self::rearm).
    pub fn resume(elapsed: u64, next_seq: u64) -> Self {
        TimerWheel {
            elapsed,
            next_seq,
            ..Self::new()
        }
    }

    /// After timers were put back with [`rearm`](Self::rearm) in any order,
    /// links them as if they had been armed in the order of their sequence
    /// numbers. Handles stay valid.
    pub fn order_rearmed(&mut self) {
        let mut all: Vec<u32> = self.entries.iter().map(|(i, _)| i as u32).collect();
        all.sort_unstable_by_key(|&i| self.entries[i as usize].seq);
        self.heads = [[NIL; SLOTS]; LEVELS];
        self.tails = [[NIL; SLOTS]; LEVELS];
        self.occupied = [0; LEVELS];
        for i in all {
            self.link(i);
        }
    }

    /// The wheel's current time (the latest `now` it was advanced to).
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// The sequence number the next armed timer gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// (deadline, arming sequence number) of a scheduled timer. The deadline
    /// is the one the wheel keeps: a very distant one is clamped.
    pub fn scheduled(&self, handle: TimerHandle) -> Option<(u64, u64)> {
        self.entries
            .get(handle.index as usize)
            .filter(|e| e.seq as u32 == handle.generation)
            .map(|e| (e.deadline, e.seq))
    }

    /// Puts back a timer recorded by [`scheduled`](Self::scheduled), with its
    /// deadline and sequence number unchanged. `None` (and nothing armed) if
    /// the deadline is outside `elapsed ..= elapsed + MAX_SPAN` or the
    /// sequence number is not below [`next_seq`](Self::next_seq); the caller
    /// checks that sequence numbers are distinct, and calls
    /// [`order_rearmed`](Self::order_rearmed) once all are back (until then,
    /// timers with equal deadlines may fire in the order they were put back).
    pub fn rearm(&mut self, deadline: u64, seq: u64, payload: T) -> Option<TimerHandle> {
        let in_span = deadline >= self.elapsed && deadline - self.elapsed <= MAX_SPAN;
        if !in_span || seq >= self.next_seq {
            return None;
        }
        Some(self.link_new(deadline, seq, payload))
    }

    /// Number of scheduled timers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Schedules `payload` to fire at `deadline` (ms). A deadline in the past
    /// fires on the next [`expire`](Self::expire).
    pub fn insert(&mut self, deadline: u64, payload: T) -> TimerHandle {
        let deadline = deadline
            .max(self.elapsed)
            .min(self.elapsed.saturating_add(MAX_SPAN));
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.link_new(deadline, seq, payload)
    }

    fn link_new(&mut self, deadline: u64, seq: u64, payload: T) -> TimerHandle {
        let index = self.entries.insert(Entry {
            deadline,
            seq,
            level: 0,
            slot: 0,
            prev: NIL,
            next: NIL,
            payload,
        }) as u32;
        self.link(index);
        TimerHandle {
            index,
            generation: seq as u32,
        }
    }

    /// Cancels a timer, returning its payload if it was still scheduled.
    pub fn cancel(&mut self, handle: TimerHandle) -> Option<T> {
        let live = self
            .entries
            .get(handle.index as usize)
            .is_some_and(|e| e.seq as u32 == handle.generation);
        if !live {
            return None;
        }
        self.unlink(handle.index);
        Some(self.entries.remove(handle.index as usize).payload)
    }

    /// Whether `handle` names a timer that has neither fired nor been cancelled.
    pub fn is_scheduled(&self, handle: TimerHandle) -> bool {
        self.entries
            .get(handle.index as usize)
            .is_some_and(|e| e.seq as u32 == handle.generation)
    }

    /// The earliest deadline among scheduled timers, if any. May be earlier
    /// than the true earliest deadline for entries on coarse levels (they
    /// cascade when that slot is reached), never later.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_expiration().map(|(_, _, deadline)| deadline)
    }

    /// Advances the wheel to `now` and appends the payload of every timer whose
    /// deadline is `<= now` to `fired`, in (deadline, arming sequence) order.
    pub fn expire(&mut self, now: u64, fired: &mut Vec<T>) {
        // Deadline order holds because slots are taken in time order. Arming
        // order among equal deadlines holds because every slot's list is in
        // arming order: one deadline maps to one slot per level, entries
        // cascade in list order, and a coarse slot is cascaded before anything
        // can be armed straight into the finer slots it covers (a resumed
        // wheel is linked in that order by `order_rearmed`). So no sort.
        let mut last = (0, 0);
        while let Some((level, slot, deadline)) = self.next_expiration() {
            if deadline > now {
                break;
            }
            self.elapsed = deadline;
            let mut cursor = self.heads[level][slot];
            self.heads[level][slot] = NIL;
            self.tails[level][slot] = NIL;
            self.occupied[level] &= !(1u64 << slot);
            while cursor != NIL {
                let index = cursor;
                let entry = &mut self.entries[index as usize];
                cursor = entry.next;
                entry.prev = NIL;
                entry.next = NIL;
                if entry.deadline <= self.elapsed {
                    let key = (entry.deadline, entry.seq);
                    debug_assert!(last <= key, "fired out of (deadline, arming) order");
                    last = key;
                    fired.push(self.entries.remove(index as usize).payload);
                } else {
                    // Cascade to a finer level now that time has moved on.
                    self.link(index);
                }
            }
        }
        if now > self.elapsed {
            self.elapsed = now;
        }
    }

    fn level_for(&self, deadline: u64) -> usize {
        let masked = (self.elapsed ^ deadline) | (SLOTS as u64 - 1);
        let significant = 63 - masked.leading_zeros() as usize;
        (significant / SLOT_BITS as usize).min(LEVELS - 1)
    }

    fn link(&mut self, index: u32) {
        let deadline = self.entries[index as usize].deadline;
        let level = self.level_for(deadline);
        let slot = ((deadline >> (level as u32 * SLOT_BITS)) as usize) & (SLOTS - 1);
        // Append at the tail so that timers sharing a slot fire in the order
        // they were scheduled.
        let tail = self.tails[level][slot];
        if tail == NIL {
            self.heads[level][slot] = index;
        } else {
            self.entries[tail as usize].next = index;
        }
        self.tails[level][slot] = index;
        let e = &mut self.entries[index as usize];
        e.prev = tail;
        e.next = NIL;
        e.level = level as u8;
        e.slot = slot as u8;
        self.occupied[level] |= 1u64 << slot;
    }

    fn unlink(&mut self, index: u32) {
        let (level, slot, prev, next) = {
            let e = &self.entries[index as usize];
            (e.level as usize, e.slot as usize, e.prev, e.next)
        };
        if prev == NIL {
            self.heads[level][slot] = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.tails[level][slot] = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        if self.heads[level][slot] == NIL {
            self.occupied[level] &= !(1u64 << slot);
        }
    }

    /// (level, slot, slot start time) of the next slot to process.
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        for level in 0..LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let shift = level as u32 * SLOT_BITS;
            let slot_range = 1u64 << shift;
            let level_range = slot_range << SLOT_BITS;
            let now_slot = ((self.elapsed >> shift) as usize) & (SLOTS - 1);
            // Entries sit ahead of the current time within their level, so a
            // slot at or behind it belongs to the next turn of the level (this
            // happens only for far deadlines clamped into the top level).
            // Level 0's current slot holds timers due right now; on the other
            // levels the current slot comes last, after the rest of the turn
            // (a clamped deadline lands in it, and must not hide the earlier
            // slots of this turn).
            let first = if level == 0 { now_slot } else { now_slot + 1 } % SLOTS;
            let rotated = occupied.rotate_right(first as u32);
            let slot = (rotated.trailing_zeros() as usize + first) % SLOTS;
            let level_start = self.elapsed & !(level_range.wrapping_sub(1));
            let mut deadline = level_start + slot as u64 * slot_range;
            if deadline < self.elapsed || (level > 0 && deadline == self.elapsed) {
                deadline += level_range;
            }
            return Some((level, slot, deadline));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut TimerWheel<u64>, now: u64) -> Vec<u64> {
        let mut v = Vec::new();
        w.expire(now, &mut v);
        v
    }

    #[test]
    fn fires_in_deadline_order_never_early() {
        let mut w = TimerWheel::new();
        for d in [5u64, 1, 70, 64, 63, 4096, 4095, 300_000, 2] {
            w.insert(d, d);
        }
        assert_eq!(drain(&mut w, 0), Vec::<u64>::new());
        assert_eq!(drain(&mut w, 1), vec![1]);
        assert_eq!(drain(&mut w, 4), vec![2]);
        assert_eq!(drain(&mut w, 100), vec![5, 63, 64, 70]);
        assert_eq!(drain(&mut w, 4095), vec![4095]);
        assert_eq!(drain(&mut w, 299_999), vec![4096]);
        assert_eq!(drain(&mut w, 300_000), vec![300_000]);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_is_exact_and_stale_handles_are_harmless() {
        let mut w = TimerWheel::new();
        let a = w.insert(10, 1);
        let b = w.insert(10, 2);
        let c = w.insert(5000, 3);
        assert_eq!(w.cancel(b), Some(2));
        assert_eq!(w.cancel(b), None);
        assert_eq!(drain(&mut w, 10), vec![1]);
        // `a` fired; its slot may be reused by a new timer.
        let d = w.insert(20, 4);
        assert_eq!(w.cancel(a), None);
        assert!(w.is_scheduled(d));
        assert_eq!(w.cancel(c), Some(3));
        assert_eq!(drain(&mut w, 10_000), vec![4]);
    }

    #[test]
    fn past_deadlines_fire_next_expire() {
        let mut w = TimerWheel::new();
        drain(&mut w, 1000);
        w.insert(10, 7);
        assert_eq!(w.next_deadline(), Some(1000));
        assert_eq!(drain(&mut w, 1000), vec![7]);
    }

    #[test]
    fn same_millisecond_keeps_insertion_order() {
        let mut w = TimerWheel::new();
        for i in 0..10 {
            w.insert(3, i);
        }
        assert_eq!(drain(&mut w, 3), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn next_deadline_is_never_later_than_truth() {
        let mut w = TimerWheel::new();
        drain(&mut w, 12_345);
        w.insert(12_345 + 70_000, 1);
        let nd = w.next_deadline().unwrap();
        assert!((12_345..=12_345 + 70_000).contains(&nd));
    }

    /// A clamped deadline sits in the top level's current slot, for its
    /// next turn; it must not hide a nearer deadline on the same level.
    #[test]
    fn a_clamped_deadline_does_not_delay_nearer_ones() {
        let mut w = TimerWheel::new();
        let mut v = Vec::new();
        w.expire(5_000, &mut v);
        w.insert(u64::MAX, 1);
        let month = 30 * 24 * 3600 * 1000;
        w.insert(5_000 + month, 2);
        assert_eq!(w.next_deadline(), Some(2 << 30));
        assert_eq!(drain(&mut w, 5_000 + month - 1), Vec::<u64>::new());
        assert_eq!(drain(&mut w, 5_000 + month), vec![2]);
        assert_eq!(drain(&mut w, 5_000 + MAX_SPAN - 1), Vec::<u64>::new());
        assert_eq!(drain(&mut w, 5_000 + MAX_SPAN), vec![1]);
    }

    #[test]
    fn far_deadlines_are_clamped_not_lost() {
        let mut w = TimerWheel::new();
        w.insert(u64::MAX, 9);
        let mut v = Vec::new();
        w.expire(MAX_SPAN, &mut v);
        assert_eq!(v, vec![9]);
    }

    #[test]
    fn ties_fire_in_arming_order_across_cascades() {
        let mut w = TimerWheel::new();
        let mut v = Vec::new();
        w.expire(4_000, &mut v);
        // Armed at 4000 for 4100: on level 2 until 4096, then cascaded.
        w.insert(4_100, 1);
        w.expire(4_097, &mut v);
        w.insert(4_100, 2);
        // Rebuilt with the later one first: the order still follows arming.
        let mut r = TimerWheel::resume(w.elapsed(), w.next_seq());
        r.rearm(4_100, 1, 2).unwrap();
        r.rearm(4_100, 0, 1).unwrap();
        r.order_rearmed();
        assert_eq!(drain(&mut w, 4_100), vec![1, 2]);
        assert_eq!(drain(&mut r, 4_100), vec![1, 2]);
    }

    #[test]
    fn rearm_refuses_what_the_wheel_cannot_hold() {
        let mut w = TimerWheel::resume(1_000, 5);
        assert!(w.rearm(999, 0, 0).is_none());
        assert!(w.rearm(1_000 + MAX_SPAN + 1, 0, 0).is_none());
        assert!(w.rearm(2_000, 5, 0).is_none());
        let h = w.rearm(1_000 + MAX_SPAN, 4, 7).unwrap();
        assert_eq!(w.scheduled(h), Some((1_000 + MAX_SPAN, 4)));
        assert_eq!(
            w.insert(1, 8),
            TimerHandle {
                index: 1,
                generation: 5
            }
        );
    }

    /// A wheel rebuilt from (time, deadlines, sequence numbers) at any
    /// moment fires the same timers at the same moments in the same order,
    /// and reports the same next deadline, as the original.
    #[test]
    fn a_resumed_wheel_matches_the_original() {
        let mut seed = 0x0123_4567_89ab_cdefu64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..40 {
            let mut a = TimerWheel::new();
            let mut live: Vec<(u64, TimerHandle)> = Vec::new();
            let mut b: Option<(TimerWheel<u64>, Vec<TimerHandle>)> = None;
            let mut now = 0u64;
            let mut id = 0u64;
            let mut deadlines = std::collections::HashMap::new();
            let resume_at = rnd() % 300;
            for step in 0..300u64 {
                if step == resume_at {
                    let mut w = TimerWheel::resume(a.elapsed(), a.next_seq());
                    // In any order: the order of re-arming must not matter.
                    let mut order: Vec<usize> = (0..live.len()).collect();
                    order.sort_by_key(|_| rnd());
                    let mut handles = vec![None; live.len()];
                    for i in order {
                        let (d, s) = a.scheduled(live[i].1).unwrap();
                        handles[i] = w.rearm(d, s, live[i].0);
                    }
                    w.order_rearmed();
                    b = Some((w, handles.into_iter().map(Option::unwrap).collect()));
                }
                match rnd() % 8 {
                    0..=3 => {
                        let span = match rnd() % 6 {
                            0 => rnd() % 64,
                            1 => rnd() % 5_000,
                            2 => rnd() % 400_000,
                            3 => rnd() % 80_000_000_000,
                            4 => u64::MAX - now,
                            _ => 0,
                        };
                        id += 1;
                        let h = a.insert(now + span, id);
                        deadlines.insert(id, a.scheduled(h).unwrap().0);
                        live.push((id, h));
                        if let Some((w, hs)) = &mut b {
                            hs.push(w.insert(now + span, id));
                        }
                    }
                    4 if !live.is_empty() => {
                        let i = (rnd() % live.len() as u64) as usize;
                        let (pid, h) = live.swap_remove(i);
                        assert_eq!(a.cancel(h), Some(pid));
                        if let Some((w, hs)) = &mut b {
                            assert_eq!(w.cancel(hs.swap_remove(i)), Some(pid));
                        }
                    }
                    _ => {
                        now += match rnd() % 4 {
                            0 => rnd() % 100,
                            1 => rnd() % 100_000,
                            2 => rnd() % 80_000_000_000,
                            _ => a.next_deadline().map_or(0, |d| d.saturating_sub(now)),
                        };
                        let fired = drain(&mut a, now);
                        // Ids follow arming order.
                        let keys: Vec<(u64, u64)> =
                            fired.iter().map(|i| (deadlines[i], *i)).collect();
                        assert!(keys.is_sorted(), "round {round} step {step}: {keys:?}");
                        assert!(keys.iter().all(|&(d, _)| d <= now));
                        if let Some((w, hs)) = &mut b {
                            assert_eq!(drain(w, now), fired, "round {round} step {step}");
                            let keep: Vec<bool> =
                                live.iter().map(|(p, _)| !fired.contains(p)).collect();
                            let mut k = keep.iter();
                            hs.retain(|_| *k.next().unwrap());
                        }
                        live.retain(|(p, _)| !fired.contains(p));
                    }
                }
                if let Some((w, _)) = &b {
                    assert_eq!(w.next_deadline(), a.next_deadline(), "round {round}");
                    assert_eq!(w.len(), a.len());
                }
            }
        }
    }

    #[test]
    fn many_timers_against_sorted_reference() {
        // Deterministic pseudo-random deadlines across all levels, with random
        // cancels, checked against a plain sorted list.
        let mut w = TimerWheel::new();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut live = Vec::new();
        let mut now = 0u64;
        let mut fired_total = 0;
        for round in 0..200 {
            for _ in 0..500 {
                let span = match rnd() % 4 {
                    0 => rnd() % 64,
                    1 => rnd() % 5000,
                    2 => rnd() % 400_000,
                    _ => rnd() % 30_000_000,
                };
                let d = now + span;
                let id = round * 1000 + live.len() as u64;
                let h = w.insert(d, id);
                live.push((d, id, h));
            }
            for _ in 0..100 {
                if live.is_empty() {
                    break;
                }
                let i = (rnd() % live.len() as u64) as usize;
                let (_, id, h) = live.swap_remove(i);
                assert_eq!(w.cancel(h), Some(id));
            }
            now += rnd() % 200_000;
            let mut fired = Vec::new();
            w.expire(now, &mut fired);
            let mut expected: Vec<(u64, u64)> = live
                .iter()
                .filter(|(d, _, _)| *d <= now)
                .map(|(d, id, _)| (*d, *id))
                .collect();
            expected.sort();
            let mut got: Vec<(u64, u64)> = fired
                .iter()
                .map(|id| (live.iter().find(|(_, i, _)| i == id).unwrap().0, *id))
                .collect();
            // Deadline order must hold; ids within a deadline may differ in order.
            assert!(
                got.windows(2).all(|p| p[0].0 <= p[1].0),
                "not in deadline order"
            );
            got.sort();
            assert_eq!(got, expected);
            fired_total += fired.len();
            live.retain(|(d, _, _)| *d > now);
            assert_eq!(w.len(), live.len());
        }
        assert!(fired_total > 0);
    }
}
