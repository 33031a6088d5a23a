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

use slab::Slab;

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Largest distance from the wheel's current time that can be represented.
const MAX_SPAN: u64 = (1u64 << (SLOT_BITS as u64 * LEVELS as u64)) - 1;
const NIL: u32 = u32::MAX;

/// A handle to a scheduled timer, used to cancel it.
///
/// Handles carry a generation, so cancelling a handle whose timer already
/// fired (and whose slab slot was reused) is a harmless no-op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerHandle {
    index: u32,
    generation: u32,
}

struct Entry<T> {
    deadline: u64,
    generation: u32,
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
    next_generation: u32,
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
            next_generation: 0,
        }
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
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let index = self.entries.insert(Entry {
            deadline,
            generation,
            level: 0,
            slot: 0,
            prev: NIL,
            next: NIL,
            payload,
        }) as u32;
        self.link(index);
        TimerHandle { index, generation }
    }

    /// Cancels a timer, returning its payload if it was still scheduled.
    pub fn cancel(&mut self, handle: TimerHandle) -> Option<T> {
        let live = self
            .entries
            .get(handle.index as usize)
            .is_some_and(|e| e.generation == handle.generation);
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
            .is_some_and(|e| e.generation == handle.generation)
    }

    /// The earliest deadline among scheduled timers, if any. May be earlier
    /// than the true earliest deadline for entries on coarse levels (they
    /// cascade when that slot is reached), never later.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_expiration().map(|(_, _, deadline)| deadline)
    }

    /// Advances the wheel to `now` and appends the payload of every timer whose
    /// deadline is `<= now` to `fired`, in deadline order (ties in insertion
    /// order within a slot).
    pub fn expire(&mut self, now: u64, fired: &mut Vec<T>) {
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
            let rotated = occupied.rotate_right(now_slot as u32);
            let slot = (rotated.trailing_zeros() as usize + now_slot) % SLOTS;
            let level_start = self.elapsed & !(level_range.wrapping_sub(1));
            let mut deadline = level_start + slot as u64 * slot_range;
            // Entries sit ahead of the current time within their level, so a
            // slot at or behind it belongs to the next turn of the level (this
            // happens only for far deadlines clamped into the top level).
            // Level 0's current slot holds timers due right now.
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

    #[test]
    fn far_deadlines_are_clamped_not_lost() {
        let mut w = TimerWheel::new();
        w.insert(u64::MAX, 9);
        let mut v = Vec::new();
        w.expire(MAX_SPAN, &mut v);
        assert_eq!(v, vec![9]);
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
